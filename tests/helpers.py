"""Tiny, locally built models and independent restatements shared by the foundation-model tests."""

from __future__ import annotations

import math

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std²) values (diffusers zero-inits some of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return module


def sync_block_embedders_(model) -> None:
    """Make every block's copy of the timestep/class embedders equal block 0's, as in converted checkpoints."""
    src = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(src)


def tiny_diffusers_dit(seed: int = 0, heads: int = 2, head_dim: int = 16, layers: int = 2, sample_size: int = 8,
                       patch: int = 2, in_channels: int = 4, out_channels: int | None = 8, num_classes: int = 10,
                       norm_eps: float = 1e-5, std: float = 0.05):
    """A random-weight diffusers ``DiTTransformer2DModel`` in eval mode with identical per-block embedders."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels, out_channels=out_channels,
        num_layers=layers, sample_size=sample_size, patch_size=patch, num_embeds_ada_norm=num_classes,
        norm_eps=norm_eps,
    )
    randomize_(model, seed, std)
    sync_block_embedders_(model)
    return model.eval()


def set_diffusers_freq_shift_(model, shift: int) -> None:
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def diffusers_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


# ---------------------------------------------------------------------------------------------------------------
# Independent restatements


def mae_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid², embed_dim) table of MAE / DiT ``get_2d_sincos_pos_embed``."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = mae_1d_sincos(embed_dim // 2, grid[0])
    emb_w = mae_1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def reference_timestep_embedding(t: np.ndarray, dim: int, shift: int) -> np.ndarray:
    """float64 [cos, sin] features with frequencies exp(-ln(1e4)·i/(half-shift))."""
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - shift))
    args = np.asarray(t, dtype=np.float64)[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=1)
    return emb


def original_layout_from_diffusers(sd: dict, depth: int, grid: int) -> dict:
    """Write the facebookresearch DiT key layout from a diffusers ``DiTTransformer2DModel`` state dict."""
    e = "transformer_blocks.0.norm1.emb."
    hidden = sd["pos_embed.proj.weight"].shape[0]
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"].clone(),
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"].clone(),
        "pos_embed": torch.from_numpy(mae_2d_sincos(hidden, grid)).float().unsqueeze(0),
        "t_embedder.mlp.0.weight": sd[e + "timestep_embedder.linear_1.weight"].clone(),
        "t_embedder.mlp.0.bias": sd[e + "timestep_embedder.linear_1.bias"].clone(),
        "t_embedder.mlp.2.weight": sd[e + "timestep_embedder.linear_2.weight"].clone(),
        "t_embedder.mlp.2.bias": sd[e + "timestep_embedder.linear_2.bias"].clone(),
        "y_embedder.embedding_table.weight": sd[e + "class_embedder.embedding_table.weight"].clone(),
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"].clone(),
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"].clone(),
        "final_layer.linear.weight": sd["proj_out_2.weight"].clone(),
        "final_layer.linear.bias": sd["proj_out_2.bias"].clone(),
    }
    for i in range(depth):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        q, k, v = (sd[f"{d}attn1.to_{n}.weight"] for n in ("q", "k", "v"))
        qb, kb, vb = (sd[f"{d}attn1.to_{n}.bias"] for n in ("q", "k", "v"))
        out[o + "attn.qkv.weight"] = torch.cat([q, k, v], dim=0)
        out[o + "attn.qkv.bias"] = torch.cat([qb, kb, vb], dim=0)
        out[o + "attn.proj.weight"] = sd[d + "attn1.to_out.0.weight"].clone()
        out[o + "attn.proj.bias"] = sd[d + "attn1.to_out.0.bias"].clone()
        out[o + "mlp.fc1.weight"] = sd[d + "ff.net.0.proj.weight"].clone()
        out[o + "mlp.fc1.bias"] = sd[d + "ff.net.0.proj.bias"].clone()
        out[o + "mlp.fc2.weight"] = sd[d + "ff.net.2.weight"].clone()
        out[o + "mlp.fc2.bias"] = sd[d + "ff.net.2.bias"].clone()
        out[o + "adaLN_modulation.1.weight"] = sd[d + "norm1.linear.weight"].clone()
        out[o + "adaLN_modulation.1.bias"] = sd[d + "norm1.linear.bias"].clone()
    return out


def tiny_autoencoder(seed: int = 0, scaling_factor: float = 0.5):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, latent_channels=4, sample_size=16, scaling_factor=scaling_factor,
    )
    return ae.eval()


def run_cli(args, capsys):
    """Run ``cao2-fast ARGS`` in-process: (exit code, stdout, stderr)."""
    import pytest

    from cao2_fast.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def run_cli_captured(args) -> tuple[str, str]:
    """Run ``cao2-fast ARGS`` in-process where ``capsys`` cannot serve (module-scoped fixtures): its stdout and
    stderr, after asserting it exited 0; torch's thread count (which ``--threads`` sets) is restored."""
    import contextlib
    import io

    import pytest
    import torch

    from cao2_fast.cli.main import main

    before = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(args)
            raise SystemExit(0)
    finally:
        torch.set_num_threads(before)
    assert exc.value.code == 0, stderr.getvalue()
    return stdout.getvalue(), stderr.getvalue()
