"""The class-conditional DiT (Peebles & Xie) as published, and the loaders of original and diffusers checkpoints.

This file is what a reader checks against the DiT paper and the original checkpoints: the config and named sizes,
the sinusoidal timestep and 2-D sin-cos position embeddings, the patch embedding, the timestep and label embedders,
the adaLN-Zero blocks (attention and MLP), the final layer, the learned-sigma output, and the loaders. Every module
computes its released form. Three switches, set together by :meth:`DiT.set_kernels` from a :class:`DiTKernels`,
send a module to the same maths in a form that is quicker on CPU; those forms live in :mod:`.dit_cpu`.

Differences from the two reference implementations, all output-preserving:
* the conditioning vector c = t_emb + y_emb is computed once per forward (diffusers recomputes it in every block);
* Q, K and V are one fused linear (diffusers keeps three), attention is ``scaled_dot_product_attention``;
* the sinusoidal timestep frequencies follow the source of the weights: ``freq_shift=0`` is the original DiT
  (exp(-ln(1e4)·i/half)), ``freq_shift=1`` is diffusers (exp(-ln(1e4)·i/(half-1))).

``model(x, t, y)`` returns all ``2·C`` output channels (eps then the learned-variance values) for learned-sigma models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, require_file
from . import dit_cpu
from .weights import (DIFFUSERS_WEIGHTS, PIPELINE_INDEX, check_fits, component_in_index, config_int, config_number,
                      metadata_config,
                      diffusers_model_files, first_line, held_values, load_checked, read_diffusers_config,
                      read_weights)

NAMED_SIZES = {  # (depth, hidden, heads), docs/method.md
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT. ``input_size`` is the latent side, ``num_classes`` excludes the null class."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    norm_eps: float = 1e-6
    mlp_norm_eps: float | None = None  # eps of the LayerNorm before the MLP; diffusers uses its config's norm_eps
    freq_shift: int = 0  # 0: original DiT timestep frequencies, 1: diffusers'

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @classmethod
    def named(cls, name: str, **overrides) -> "DiTConfig":
        """``DiT-XL/2`` style names (also ``dit-xl-2``); overrides set any other field."""
        key = name.upper().replace("DIT-", "").replace("DIT_", "").replace("-", "/").replace("_", "/")
        size, _, patch = key.partition("/")
        if size not in NAMED_SIZES or patch not in {"2", "4", "8"}:
            raise UserError(f"unknown DiT size {name!r}: expected DiT-{{S,B,L,XL}}/{{2,4,8}}")
        depth, hidden, heads = NAMED_SIZES[size]
        return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch), **overrides)

    def flops_per_forward(self) -> float:
        """FLOPs (2 per multiply-add) of one image-forward, counting the linears, attention and adaLN (the cost model
        of docs/method.md)."""
        t, d = self.num_tokens, self.hidden_size
        per_block = 12 * d * d * t + 2 * t * t * d + 6 * d * d
        return 2.0 * self.depth * per_block


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: int = 0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of (possibly fractional) timesteps ``t`` (N,) -> (N, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position table of DiT/MAE, (1, grid*grid, dim), computed in float64 like the original."""

    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(d // 2, dtype=torch.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # first grid varies along w, as np.meshgrid(w, h)
    emb = torch.cat([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], dim=1)
    return emb.float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches of the latent, each projected to a token (a strided convolution)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.as_matmul = False  # DiTKernels.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_matmul:
            return dit_cpu.patch_embed_matmul(self.proj, x)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: int = 0):
        super().__init__()
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.freq_dim, self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index ``num_classes``). In train mode labels drop to null with
    probability ``dropout_prob`` unless ``drop`` (the original's ``force_drop_ids``) is given (the released stage-2
    quirk (b))."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def labels(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The labels after dropout: ``num_classes`` (null) where dropped."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding_table(self.labels(y, drop))


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.impl = "sdpa"  # DiTKernels.attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d/H)
        if self.impl == "sdpa":
            x = F.scaled_dot_product_attention(*qkv.unbind(0))
        else:
            x = dit_cpu.math_attention(qkv)[0]
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two linears around the tanh-approximate GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu_form = "tanh"  # DiTKernels.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h, approximate="tanh") if self.gelu_form == "tanh" else dit_cpu.sigmoid_gelu(h)
        return self.fc2(h)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate·attn(modulate(norm(x))), then x + gate·mlp(modulate(norm(x))), with the shifts,
    scales and gates of the block's adaLN output for the conditioning."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.mlp_eps = cfg.norm_eps if cfg.mlp_norm_eps is None else cfg.mlp_norm_eps
        self.dim = d
        self.attn = Attention(d, cfg.num_heads)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.fused = False  # DiTKernels.fused

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """``mod``: this block's adaLN output for the conditioning (:meth:`DiT.conditioning`)."""
        if self.fused:
            return dit_cpu.fused_block(self, x, mod)
        d = self.dim  # a constant, not x.shape[-1]: keeps the graph exportable with a dynamic batch
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(F.layer_norm(x, (d,), eps=self.eps), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(F.layer_norm(x, (d,), eps=self.mlp_eps), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.dim = d
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = mod.chunk(2, dim=1)
        return self.linear(modulate(F.layer_norm(x, (self.dim,), eps=self.eps), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """DiT with adaLN-Zero blocks. Parameter names follow the original checkpoint layout (docs/method.md)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        grid = cfg.input_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.hidden_size, grid), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self._memo = dit_cpu.ConditioningMemo()  # serves the fused forms only

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None = None):
        """x: (N, C, H, W) latents; t: (N,) timesteps (int or float); y: (N,) class ids, ``num_classes`` = null."""
        fused = self.x_embedder.as_matmul  # DiTKernels.fused: the memo and the final layer of dit_cpu
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        labels = self.y_embedder.labels(y, drop)
        memo = self._memo.modulations(self, t, labels) if fused else None
        mods = memo or self.conditioning(t, labels)
        for block, mod in zip(self.blocks, mods):
            h = block(h, mod)
        if fused:
            return dit_cpu.final_layer_pixel_shuffle(self, h, mods[-1])
        return self.unpatchify(self.final_layer(h, mods[-1]))

    def conditioning(self, t: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """The adaLN outputs of every block, then of the final layer, for timesteps ``t`` and labels after
        dropout."""
        c = self.t_embedder(t) + self.y_embedder.embedding_table(labels)
        return [block.adaLN_modulation(c) for block in self.blocks] + [self.final_layer.adaLN_modulation(c)]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.cfg.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    @property
    def kernels(self) -> DiTKernels:
        fused = self.x_embedder.as_matmul
        if not len(self.blocks):
            return replace(RELEASED_KERNELS, fused=fused)
        return DiTKernels(self.blocks[0].mlp.gelu_form, self.blocks[0].attn.impl, fused)

    def set_kernels(self, kernels: DiTKernels) -> "DiT":
        """Evaluate every module in the :class:`DiTKernels` forms (the maths is unchanged)."""
        for block in self.blocks:
            block.mlp.gelu_form = kernels.gelu
            block.attn.impl = kernels.attention
            block.fused = kernels.fused
        self.x_embedder.as_matmul = kernels.fused
        return self

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> "DiT":
        """Random weights with non-zero adaLN and output layers, so that every path of the model matters
        (the original zero-init makes a fresh DiT output zeros, useless for tests and timing)."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        return self


# ----------------------------------------------------------------------------------------------------------------
# Execution forms


@dataclass(frozen=True)
class DiTKernels:
    """The form each switchable part of a DiT runs in; every choice computes the same maths (to float rounding).

    The defaults, :data:`RELEASED_KERNELS`, are the released forms: ``gelu="tanh"`` is torch's tanh-GELU kernel,
    ``attention="sdpa"`` is ``scaled_dot_product_attention`` (flash attention on GPUs), ``fused=False`` the adaLN
    arithmetic, patch convolution and unpatchify above. The others are the CPU forms of :mod:`.dit_cpu`:
    ``gelu="sigmoid"`` the same GELU through σ with a hand-written backward, ``attention="math"`` two batched matmuls
    and a softmax, and ``fused=True`` the modulations and gated residuals as one ``addcmul`` each, the patches in and
    out through matmuls and pixel (un)shuffles, and the conditioning memo; with all three CPU forms, frozen weights
    and a gradient wanted for the input only (stage 2), each block runs as one autograd node.
    """

    gelu: str = "tanh"
    attention: str = "sdpa"
    fused: bool = False

    def __post_init__(self):
        if self.gelu not in ("tanh", "sigmoid"):
            raise ValueError(f"unknown GELU form {self.gelu!r}: tanh or sigmoid")
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"unknown attention {self.attention!r}: sdpa or math")


RELEASED_KERNELS = DiTKernels()


def fast_kernels(device) -> DiTKernels:
    """The quicker :class:`DiTKernels` on ``device``: the sigmoid GELU, written-out attention and fused forms on
    CPU; the released ones on GPUs, where torch's GELU is one fused memory pass and SDPA is flash attention."""
    return DiTKernels("sigmoid", "math", fused=True) if torch.device(device).type == "cpu" else RELEASED_KERNELS


# ----------------------------------------------------------------------------------------------------------------
# Loading


def infer_config(sd: dict, **overrides) -> DiTConfig:
    """Read a DiTConfig off an original-layout state dict (sizes, patch, classes, learned sigma)."""
    try:
        w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(_block_index(k, "blocks.") for k in sd if k.startswith("blocks."))
        num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
        out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise UserError(f"not an original-layout DiT state dict (missing or malformed {e})") from None
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd and sd["pos_embed"].dim() == 3 else None
    heads = overrides.pop("num_heads", None) or _heads_for(hidden)
    input_size = overrides.pop("input_size", None) or (int(round(tokens**0.5)) * patch if tokens else 32)
    return DiTConfig(
        input_size=input_size, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=mlp_hidden / hidden if hidden else 0.0, num_classes=num_classes,
        learn_sigma=out_ch == 2 * in_ch, **overrides,
    )


def _block_index(key: str, prefix: str) -> int:
    """The block number in ``blocks.<n>.…``: ASCII digits only (``int`` would take ``-1``, ``1_0`` or other
    scripts' digits)."""
    part = key[len(prefix):].split(".", 1)[0]
    if not (part.isascii() and part.isdigit()):
        raise ValueError(f"block key {key!r}")
    return int(part)


def param_count(cfg: DiTConfig) -> int:
    """Parameters of ``DiT(cfg)``, from the config alone (nothing is built): what a file must hold to fill it."""
    d, c, p, o = cfg.hidden_size, cfg.in_channels, cfg.patch_size, cfg.out_channels
    h = int(d * cfg.mlp_ratio)
    embed = (d * c * p * p + d) + (256 * d + d + d * d + d) + (cfg.num_classes + 1) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (d * p * p * o + p * p * o)
    return embed + cfg.depth * block + final


_INT_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
               "freq_shift")
_FLOAT_FIELDS = ("mlp_ratio", "class_dropout_prob", "norm_eps")


def check_config(cfg: DiTConfig, where) -> None:
    """Refuse a DiTConfig no DiT can be built from (one line naming ``where``): sizes below 1, a hidden size the
    heads or the 2-D position table cannot split, a latent side the patch does not divide."""
    def bad(text: str):
        raise UserError(f"{where}: DiT config {text}")

    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            bad(f"{name} is {v!r}, expected an integer")
        if v < (0 if name == "freq_shift" else 1):
            bad(f"{name} is {v}, expected at least {0 if name == 'freq_shift' else 1}")
    for name in _FLOAT_FIELDS + ("mlp_norm_eps",):
        v = getattr(cfg, name)
        if v is None and name == "mlp_norm_eps":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(f"{name} is {v!r}, expected a finite number")
    if not isinstance(cfg.learn_sigma, bool):
        bad(f"learn_sigma is {cfg.learn_sigma!r}, expected true or false")
    if cfg.freq_shift not in (0, 1):
        bad(f"freq_shift is {cfg.freq_shift}, expected 0 (original) or 1 (diffusers)")
    if cfg.hidden_size % cfg.num_heads:
        bad(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.hidden_size % 4:
        bad(f"hidden_size {cfg.hidden_size} is not a multiple of 4 (the 2-D sin-cos position table)")
    if cfg.input_size % cfg.patch_size:
        bad(f"input_size {cfg.input_size} is not divisible by patch_size {cfg.patch_size}")
    if not (cfg.mlp_ratio > 0 and int(cfg.hidden_size * cfg.mlp_ratio) >= 1):
        bad(f"mlp_ratio is {cfg.mlp_ratio}, expected a positive ratio")
    if not 0 <= cfg.class_dropout_prob <= 1:
        bad(f"class_dropout_prob is {cfg.class_dropout_prob}, expected 0..1")
    if cfg.norm_eps <= 0 or (cfg.mlp_norm_eps is not None and cfg.mlp_norm_eps <= 0):
        bad("norm_eps must be above 0")


def _check_buildable(cfg: DiTConfig, sd: dict, where) -> None:
    """``check_config``, then refuse a config that needs more parameters than the file's tensors hold (or a
    position table larger than that): the file, not its metadata or key names, bounds what is allocated."""
    check_config(cfg, where)
    held = held_values(sd)
    check_fits(param_count(cfg), held, where, f"DiT (depth {cfg.depth}, hidden size {cfg.hidden_size})")
    table = cfg.num_tokens * cfg.hidden_size
    if table > max(held, 1 << 20):
        raise UserError(f"{where}: declares a {cfg.input_size}x{cfg.input_size} latent, whose position table "
                        f"({table:,} values) is larger than the weights ({held:,} values); refusing to build it")


def _heads_for(hidden: int) -> int:
    for depth, d, heads in NAMED_SIZES.values():
        if d == hidden:
            return heads
    return max(1, hidden // 64)


def diffusers_to_original(sd: dict, depth: int) -> dict:
    """Rename a diffusers ``DiTTransformer2DModel`` state dict to the original layout (Q/K/V fused)."""
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    emb = "transformer_blocks.0.norm1.emb."
    emb_keys = [k for k in sd if k.startswith(emb)]
    for b in range(1, depth):  # diffusers stores one copy of the conditioning embedders per block
        for k in emb_keys:
            other = sd[k.replace("transformer_blocks.0.", f"transformer_blocks.{b}.", 1)]
            if not torch.equal(other, sd[k]):
                raise UserError(f"block {b}'s copy of {k[len(emb):]} differs from block 0's: the lean DiT computes the "
                                "conditioning once and needs identical copies")
    for i in (0, 2):
        j = 1 if i == 0 else 2
        out[f"t_embedder.mlp.{i}.weight"] = sd[f"{emb}timestep_embedder.linear_{j}.weight"]
        out[f"t_embedder.mlp.{i}.bias"] = sd[f"{emb}timestep_embedder.linear_{j}.bias"]
    out["y_embedder.embedding_table.weight"] = sd[f"{emb}class_embedder.embedding_table.weight"]
    for b in range(depth):
        p, q = f"transformer_blocks.{b}.", f"blocks.{b}."
        for kind in ("weight", "bias"):
            out[f"{q}attn.qkv.{kind}"] = torch.cat([sd[f"{p}attn1.to_{n}.{kind}"] for n in "qkv"], 0)
            out[f"{q}attn.proj.{kind}"] = sd[f"{p}attn1.to_out.0.{kind}"]
            out[f"{q}mlp.fc1.{kind}"] = sd[f"{p}ff.net.0.proj.{kind}"]
            out[f"{q}mlp.fc2.{kind}"] = sd[f"{p}ff.net.2.{kind}"]
            out[f"{q}adaLN_modulation.1.{kind}"] = sd[f"{p}norm1.linear.{kind}"]
    return out


def load_dit(path: str | Path, freq_shift: int | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> DiT:
    """Load a DiT from an original ``.pt``/``.safetensors`` state dict or a diffusers model directory.

    Accepts a diffusers pipeline root (uses its ``transformer/``), a ``transformer/`` directory, or a weights file.
    ``freq_shift`` defaults to the convention of the weights' source (0 original, 1 diffusers). Returns the model in
    eval mode with frozen weights. Every failure is one ``UserError`` line naming the file; a config (saved
    metadata, key names, config.json) that declares a larger model than the weights hold is refused before
    anything is built.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or directory (expected a DiT checkpoint .pt or a diffusers transformer dir)")
    if p.is_dir():
        model = _load_diffusers_dir(p, freq_shift)
    else:
        p = require_file(p, "a DiT checkpoint: .pt, .safetensors or a diffusers transformer dir")
        saved = _saved_config(p)  # checked against the file's tensor sizes before any tensor is read
        sd = read_weights(p)
        if "pos_embed.proj.weight" in sd:  # diffusers layout saved as a single file
            try:
                depth = 1 + max((_block_index(k, "transformer_blocks.") for k in sd
                                 if k.startswith("transformer_blocks.")), default=-1)
                if depth > len(sd):  # each block has a dozen tensors: a larger index is no real block
                    raise ValueError(f"block index {depth - 1} among {len(sd)} tensors")
                sd = diffusers_to_original(sd, depth)
            except UserError as e:  # differing copies of the conditioning embedders
                raise UserError(f"{p}: {e}") from None
            except (KeyError, ValueError, RuntimeError) as e:  # a missing key, a bad index, q/k/v that do not stack
                raise UserError(f"{p}: not diffusers DiT transformer weights (missing or malformed "
                                f"{first_line(str(e), 120)})") from None
            source_shift = 1
        else:
            source_shift = 0
        if "x_embedder.proj.weight" not in sd:
            raise UserError(f"{p}: not a DiT checkpoint (no 'x_embedder.proj.weight'; is it a VAE or classifier?)")
        if saved is not None:  # written by save_dit: the exact config travels with the weights
            cfg = saved if freq_shift is None else replace(saved, freq_shift=freq_shift)
        else:
            try:
                cfg = infer_config(sd, freq_shift=source_shift if freq_shift is None else freq_shift,
                                   mlp_norm_eps=None if source_shift == 0 else 1e-5)
            except UserError as e:
                raise UserError(f"{p}: {e}") from None
        _check_buildable(cfg, sd, p)
        model = DiT(cfg)
        _load_into(model, sd, p)
    model.requires_grad_(False)
    return model.eval().to(device=device, dtype=dtype)


def _load_into(model: DiT, sd: dict, where: Path) -> None:
    sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # fixed table, recomputed
    load_checked(model, sd, where, "DiT")


_DIFFUSERS_REQUIRED = ("num_layers", "num_attention_heads", "attention_head_dim", "sample_size", "patch_size",
                       "in_channels", "num_embeds_ada_norm")


def _load_diffusers_dir(p: Path, freq_shift: int | None) -> DiT:
    p, dc = read_diffusers_config(p, "transformer", "DiTTransformer2DModel", DIFFUSERS_CLASSES)
    cfg_file = p / "config.json"
    if dc.get("_class_name") not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise UserError(f"{cfg_file}: is a {dc.get('_class_name')!r}, not a DiT transformer")
    wfile = next((p / n for n in DIFFUSERS_WEIGHTS if (p / n).exists()), None)
    if wfile is None:
        raise UserError(f"{p}: no diffusion_pytorch_model.safetensors or .bin (expected DiT transformer weights)")
    size = {k: config_int(dc, k, cfg_file) for k in _DIFFUSERS_REQUIRED}
    out_channels = config_int(dc, "out_channels", cfg_file, default=size["in_channels"])
    norm_eps = config_number(dc, "norm_eps", cfg_file, default=1e-5)
    sd = read_weights(wfile)
    depth, heads = size["num_layers"], size["num_attention_heads"]
    hidden = heads * size["attention_head_dim"]
    try:
        mlp_hidden = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as e:
        raise UserError(f"{wfile}: not DiT transformer weights (missing {e})") from None
    cfg = DiTConfig(
        input_size=size["sample_size"], patch_size=size["patch_size"], in_channels=size["in_channels"],
        hidden_size=hidden, depth=depth, num_heads=heads, num_classes=size["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * size["in_channels"], norm_eps=1e-6, mlp_norm_eps=norm_eps,
        freq_shift=1 if freq_shift is None else freq_shift, mlp_ratio=mlp_hidden / hidden,
    )
    _check_buildable(cfg, sd, cfg_file)
    try:
        osd = diffusers_to_original(sd, depth)
    except UserError as e:
        raise UserError(f"{wfile}: {e}") from None
    except KeyError as e:
        raise UserError(f"{wfile}: not DiT transformer weights (missing {e})") from None
    except RuntimeError as e:  # q, k and v that do not stack
        raise UserError(f"{wfile}: not DiT transformer weights ({first_line(str(e), 120)})") from None
    model = DiT(cfg)
    _load_into(model, osd, wfile)
    return model


DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the class names of a diffusers DiT's config
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")  # an original checkpoint at a repository's root


def checkpoint_files(names: set[str], read_index: Callable[[], dict]) -> tuple[str, list[str]]:
    """What :func:`load_dit` reads of a repository, from the list of its files (paths relative to its root):
    (the path to load, relative to the root, ``""`` for the root itself; the files it reads). The same order as
    the loader: a pipeline's transformer component (the folder ``model_index.json`` names, read through
    ``read_index``), a diffusers transformer at the root (``config.json`` and its weights, safetensors before
    ``.bin``), else the one original checkpoint at the root. What is missing raises ``LookupError`` saying so."""
    index = read_index() if PIPELINE_INDEX in names else None
    sub = "transformer" if index is None else component_in_index(index, "transformer", DIFFUSERS_CLASSES)
    if any(n.startswith(f"{sub}/") for n in names) or (index is not None and "config.json" not in names):
        files = diffusers_model_files(names, sub, "the DiT transformer of a diffusers pipeline")
        return "", ([PIPELINE_INDEX] if index is not None else []) + files
    if "config.json" in names:
        return "", diffusers_model_files(names, "", "the weights of a diffusers DiT transformer")
    roots = sorted(n for n in names if "/" not in n and n.endswith(CHECKPOINT_SUFFIXES))
    if len(roots) > 1:
        raise LookupError(f"{len(roots)} checkpoints ({', '.join(roots[:4])}), not one; download the one you want and "
                          "pass its path")
    if not roots:
        raise LookupError("no DiT checkpoint (expected a diffusers pipeline: model_index.json with transformer/, a "
                          "diffusers transformer: config.json with its weights, or one .pt or .safetensors file)")
    return roots[0], roots


def save_dit(model: DiT, path: str | Path) -> None:
    """Write weights (original layout) and the config beside them as safetensors metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"dit_config": json.dumps(asdict(model.cfg))})


def _saved_config(p: Path) -> DiTConfig | None:
    """The config ``save_dit`` wrote into the safetensors metadata, checked key by key (bad JSON, unknown keys and
    values of the wrong type are one line naming the file), or None when there is none. The parameters it needs are
    checked against the values the file's header says its tensors hold, before any tensor is read."""
    if p.suffix != ".safetensors":
        return None
    raw, held = metadata_config(p, "dit_config", {f.name for f in dataclasses.fields(DiTConfig)}, _INT_FIELDS,
                                _FLOAT_FIELDS, "DiT", expected_hint=True)
    if raw is None:
        return None
    where = f"{p}: dit_config metadata"
    if raw.get("mlp_norm_eps") is not None:
        config_number(raw, "mlp_norm_eps", where)
    if "learn_sigma" in raw and not isinstance(raw["learn_sigma"], bool):
        raise UserError(f"{where}: 'learn_sigma' is {raw['learn_sigma']!r}, expected true or false")
    cfg = DiTConfig(**raw)
    check_config(cfg, p)
    check_fits(param_count(cfg), held, p, f"DiT (depth {cfg.depth}, hidden size {cfg.hidden_size})")
    return cfg


def random_dit(cfg: DiTConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> DiT:
    """A DiT with random weights (for tests and timing: cost does not depend on weight values)."""
    g = torch.Generator().manual_seed(seed)
    model = DiT(cfg).init_weights(g)
    model.requires_grad_(False)
    return model.eval().to(device=device, dtype=dtype)


__all__ = ["DiT", "DiTConfig", "load_dit", "save_dit", "random_dit", "timestep_embedding", "diffusers_to_original",
           "infer_config"]
