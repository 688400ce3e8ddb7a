"""MAR (masked autoregressive generation with a per-token diffusion loss) as released, and its checkpoint loaders.

This file is what a reader checks against docs SPEC-MAR §1: the config and named sizes, the MAE encoder and decoder
(a 64-row buffer of class embeddings, learned position tables, pre-norm ViT blocks), the DiffLoss MLP with adaLN
residual blocks, its Gaussian diffusion (cosine schedule, ε-prediction, learned-range variance, respaced ancestral
sampling with a temperature), the masking helpers of the sampler and of the latent optimisation, and the loaders.
Nothing here draws a random number that a caller could want to replay: orders, mask rates, label drops, timesteps
and every noise tensor are arguments, so that a batched caller can reproduce a per-image run exactly.

The API a generator builds on:

* ``MARConfig`` (``MARConfig.named("mar_base")``), its FLOP counts (``encoder_flops(tokens)``, ``decoder_flops()``,
  ``diffloss_flops_per_row_step()``) and ``param_count(cfg)``.
* ``MAR(cfg)``: ``class_embedding(labels)`` (class ids → ``class_emb`` rows; a [B, class_num] label vector →
  ``v @ class_emb.weight``, the released ``embed_linear``; ``None`` → ``fake_latent``), ``null_embedding(b)``;
  ``forward_mae_encoder(tokens, mask, class_embedding, drop=None)`` and ``forward_mae_decoder(x, mask)``, or both
  at once with ``model(tokens, mask, class_embedding)`` → z [B, seq_len, decoder width]; ``forward_loss(z, target,
  t, noise)`` → the diffusion-loss terms per token; ``model.diffloss`` (a :class:`DiffLoss`: ``.net``, the
  training diffusion ``.train_diffusion`` and the respaced ``.gen_diffusion``, ``.sample(...)``);
  ``set_attention("math" | "sdpa")``.
  ``mask`` is [B, seq_len] with 1 (or True) = masked, i.e. not seen by the encoder. Rows may hide different numbers
  of tokens: the encoder then pads to the longest row and masks the padding out of attention (the released code
  needs equal counts; with equal counts this is exactly its computation).
* ``p_sample(net, diffusion, x, t, z, noise, temperature, cfg, z_uncond)``: one ancestral DiffLoss step over a
  batch of token rows, with a row-wise guidance scale and temperature.
* ``random_orders``, ``mask_by_order``, ``next_mask_len``, ``linear_cfg`` (the sampler's schedule) and
  ``random_masking`` (the latent optimisation's masks), ``patchify`` / ``unpatchify`` (tokens [B, 256, 16] ↔
  latents [B, 16, 16, 16]).
* ``load_mar(path)`` (``checkpoint-last.pth``, a folder holding it, or ``.safetensors``), ``save_mar``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, require_file
from ..diffusion import discretized_gaussian_log_likelihood, normal_kl
from .weights import (_check_torch_zip, _check_views, _unpickling_message, check_fits, first_line, held_values,
                      load_checked, metadata_config, read_weights)

NAMED_SIZES = {  # name: (width, depth, heads) of encoder and decoder alike; (DiffLoss depth, width) of the release
    "mar_base": (768, 12, 12, 6, 1024),
    "mar_large": (1024, 16, 16, 8, 1280),
    "mar_huge": (1280, 20, 16, 12, 1536),
}


@dataclass(frozen=True)
class MARConfig:
    """Architecture of a MAR. The defaults are ``mar_base`` with the DiffLoss of its released checkpoint (6 × 1024)
    and the released sampling and loss settings ("100" DiffLoss steps, one diffusion sample per token)."""

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    buffer_size: int = 64
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    class_num: int = 1000
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    mask_ratio_min: float = 0.7  # the training mask rate's truncated normal starts here (drawn by the caller)
    diffloss_d: int = 6
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 1
    grad_checkpointing: bool = False
    norm_eps: float = 1e-6

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_embed_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    @property
    def size_name(self) -> str | None:
        """``mar_base``/``mar_large``/``mar_huge`` when encoder and decoder are that size, else None."""
        for name, (width, depth, heads, _, _) in NAMED_SIZES.items():
            if (self.encoder_embed_dim, self.encoder_depth, self.encoder_num_heads) == (width, depth, heads) == (
                    self.decoder_embed_dim, self.decoder_depth, self.decoder_num_heads):
                return name
        return None

    @classmethod
    def named(cls, name: str, **overrides) -> "MARConfig":
        """``mar_base``, ``mar_large`` or ``mar_huge`` (also ``mar-base``, ``base``) with the DiffLoss of that size's
        released checkpoint; overrides set any other field (``diffloss_d``, ``diffloss_w`` included)."""
        key = name.lower().replace("-", "_")
        key = key if key.startswith("mar_") else f"mar_{key}"
        if key not in NAMED_SIZES:
            raise UserError(f"unknown MAR size {name!r}: expected one of {', '.join(NAMED_SIZES)}")
        width, depth, heads, d, w = NAMED_SIZES[key]
        fields = dict(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=width,
                      decoder_depth=depth, decoder_num_heads=heads, diffloss_d=d, diffloss_w=w)
        return cls(**{**fields, **overrides})

    # -- cost model: FLOP = 2 per multiply-add; a ViT block on n rows of width d costs 24·d²·n + 4·n²·d ---------

    @staticmethod
    def _block_flops(d: int, n: int, mlp_ratio: float) -> float:
        h = int(d * mlp_ratio)
        return 2.0 * (4 * d * d * n + 2 * d * h * n) + 4.0 * n * n * d

    def encoder_flops(self, tokens: int) -> float:
        """One sequence through the encoder blocks on ``tokens`` rows (the buffer plus the visible tokens:
        ``buffer_size + visible``)."""
        return self.encoder_depth * self._block_flops(self.encoder_embed_dim, tokens, self.mlp_ratio)

    def decoder_flops(self) -> float:
        """One sequence through the decoder blocks (always ``buffer_size + seq_len`` rows)."""
        n = self.buffer_size + self.seq_len
        return self.decoder_depth * self._block_flops(self.decoder_embed_dim, n, self.mlp_ratio)

    def diffloss_flops_per_row_step(self) -> float:
        """One token row through the DiffLoss MLP once (one diffusion step): the timestep and condition embeddings,
        the input projection, the residual blocks with their adaLN, the final layer."""
        w, c = self.diffloss_w, self.token_embed_dim
        macs = (TIMESTEP_FREQ_DIM * w + w * w) + self.decoder_embed_dim * w + c * w
        macs += self.diffloss_d * (3 * w * w + 2 * w * w)
        macs += 2 * w * w + w * 2 * c
        return 2.0 * macs


def param_count(cfg: MARConfig) -> int:
    """Parameters of ``MAR(cfg)`` from the config alone (nothing is built): what a file must hold to fill it."""
    def vit(d: int, depth: int) -> int:
        h = int(d * cfg.mlp_ratio)
        return depth * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d))

    de, dd, t, rows = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.token_embed_dim, cfg.seq_len + cfg.buffer_size
    enc = cfg.class_num * de + de + (t * de + de) + 2 * de + rows * de + vit(de, cfg.encoder_depth) + 2 * de
    dec = (de * dd + dd) + dd + rows * dd + vit(dd, cfg.decoder_depth) + 2 * dd + cfg.seq_len * dd
    w = cfg.diffloss_w
    net = (TIMESTEP_FREQ_DIM * w + w + w * w + w) + (dd * w + w) + (t * w + w)
    net += cfg.diffloss_d * (2 * w + 2 * (w * w + w) + (3 * w * w + 3 * w))
    net += (w * 2 * t + 2 * t) + (2 * w * w + 2 * w)
    return enc + dec + net


# ----------------------------------------------------------------------------------------------------------------
# Token layout and masking


def patchify(latents: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """VAE latents [B, C, H, W] → tokens [B, (H/p)·(W/p), C·p²], rows in raster order, each token's values ordered
    channel-major within its p×p patch (MAR's layout)."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, channels: int = 16, patch_size: int = 1) -> torch.Tensor:
    """Tokens [B, L, C·p²] → latents [B, C, √L·p, √L·p] (the inverse of :func:`patchify`)."""
    b, n, _ = tokens.shape
    side, p = math.isqrt(n), patch_size
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    x = tokens.reshape(b, side, side, channels, p, p)
    return torch.einsum("nhwcpq->nchpwq", x).reshape(b, channels, side * p, side * p)


def random_orders(bsz: int, seq_len: int = 256, rng=None) -> torch.Tensor:
    """One generation order (a permutation of 0..seq_len−1) per sample, [bsz, seq_len] int64, drawn as the release
    draws them: a numpy shuffle of ``arange(seq_len)`` per sample, from ``rng`` (a ``numpy.random.Generator`` or
    ``RandomState``; the global numpy state when None)."""
    rng = np.random if rng is None else rng
    orders = []
    for _ in range(bsz):
        order = np.arange(seq_len)
        rng.shuffle(order)
        orders.append(order)
    return torch.from_numpy(np.stack(orders).astype(np.int64)) if orders else torch.zeros(0, seq_len,
                                                                                          dtype=torch.long)


def mask_by_order(mask_len: int | torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: True at the first ``mask_len`` entries of each order. In the sampler these stay masked for the
    next step, so tokens are revealed from the END of the order. ``mask_len`` is one count or one per row."""
    b, n = orders.shape
    if isinstance(mask_len, torch.Tensor) and mask_len.numel() > 1:
        ranks = torch.arange(n, device=orders.device).expand(b, n)
        hidden = ranks < mask_len.reshape(b, 1).to(orders.device)
    else:
        hidden = torch.zeros(b, n, dtype=torch.bool, device=orders.device)
        hidden[:, :int(mask_len)] = True
    return torch.zeros(b, n, dtype=torch.bool, device=orders.device).scatter(1, orders, hidden)


def next_mask_len(step: int, num_iter: int, n_masked: int, seq_len: int = 256) -> int:
    """How many tokens stay masked after sampler step ``step`` (0-based) of ``num_iter``, with ``n_masked`` masked
    now: ⌊seq_len·cos(π/2·(step+1)/num_iter)⌋, kept within [1, n_masked − 1] (MaskGIT's cosine schedule)."""
    ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    return int(max(1.0, min(float(n_masked) - 1.0, float(np.floor(seq_len * ratio)))))


def linear_cfg(cfg: float, mask_len: int, seq_len: int = 256) -> torch.Tensor:
    """The released linear guidance schedule, 1 + (cfg − 1)·(seq_len − mask_len)/seq_len, computed in float32 as
    the release computes it (a 0-d tensor)."""
    remaining = seq_len - torch.tensor(float(mask_len), dtype=torch.float32)
    return 1 + (cfg - 1) * remaining / seq_len


def random_masking(orders: torch.Tensor, rate: float, floor_ratio: float | None = None) -> torch.Tensor:
    """Float mask [B, L] (1 = masked) hiding the first n entries of each order, n = ⌈L·rate⌉ — the training mask
    for a drawn rate. ``floor_ratio`` gives the latent optimisation's released rule: n = max(⌈L·rate⌉,
    ⌊L·floor_ratio⌋) (0.25 there; with rates ≥ 0.7 the floor never binds)."""
    b, n = orders.shape
    count = int(np.ceil(n * rate))
    if floor_ratio is not None:
        count = max(count, int(n * floor_ratio))
    return mask_by_order(count, orders).float()


# ----------------------------------------------------------------------------------------------------------------
# The MAE encoder and decoder


class Attention(nn.Module):
    """Multi-head self-attention with a fused Q/K/V linear (with bias) and dropout on the attention weights and
    after the output projection. ``impl="math"`` is the released form (q·scale, k^T, softmax, dropout, ·v);
    ``"sdpa"`` is ``scaled_dot_product_attention`` (the same maths). ``key_valid`` [B, N] masks padded keys out."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.impl = "math"

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        keep = None if key_valid is None else key_valid[:, None, None, :]
        if self.impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if keep is not None:
                attn = attn.masked_fill(~keep, float("-inf"))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    """fc1, exact GELU, dropout, fc2, dropout."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)); no LayerScale, no drop-path."""

    def __init__(self, dim: int, heads: int, cfg: MARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, heads, cfg.attn_dropout, cfg.proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.proj_dropout)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


class MAR(nn.Module):
    """The MAE encoder/decoder with its DiffLoss. Parameter names follow the released checkpoints."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        de, dd, rows = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.seq_len + cfg.buffer_size
        self.class_emb = nn.Embedding(cfg.class_num, de)
        self.fake_latent = nn.Parameter(torch.zeros(1, de))
        self.z_proj = nn.Linear(cfg.token_embed_dim, de)
        self.z_proj_ln = nn.LayerNorm(de, eps=cfg.norm_eps)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, rows, de))
        self.encoder_blocks = nn.ModuleList(Block(de, cfg.encoder_num_heads, cfg) for _ in range(cfg.encoder_depth))
        self.encoder_norm = nn.LayerNorm(de, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(de, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, rows, dd))
        self.decoder_blocks = nn.ModuleList(Block(dd, cfg.decoder_num_heads, cfg) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len, dd))
        self.diffloss = DiffLoss(cfg.token_embed_dim, dd, cfg.diffloss_d, cfg.diffloss_w, cfg.num_sampling_steps,
                                 cfg.grad_checkpointing)

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def token_embed_dim(self) -> int:
        return self.cfg.token_embed_dim

    # -- class conditioning ---------------------------------------------------------------------------------------

    def class_embedding(self, labels: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """The encoder's buffer rows for ``labels``: int class ids [B] → ``class_emb`` rows; a float label vector
        [B, class_num] (one-hot, soft, or zeros) → ``v @ class_emb.weight`` (the release's ``embed_linear``; zeros
        give the zero vector); None → ``fake_latent`` repeated ``batch`` times (the unconditional row)."""
        if labels is None:
            return self.null_embedding(1 if batch is None else batch)
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[1] != self.cfg.class_num:
                raise ValueError(f"a label vector must be [B, {self.cfg.class_num}], not {list(labels.shape)}")
            return F.linear(labels, self.class_emb.weight.t())
        return self.class_emb(labels)

    def null_embedding(self, batch: int) -> torch.Tensor:
        """``fake_latent`` for ``batch`` rows: the learned unconditional embedding of classifier-free guidance."""
        return self.fake_latent.expand(batch, -1)

    # -- encoder and decoder --------------------------------------------------------------------------------------

    def kept_rows(self, mask: torch.Tensor, bucketed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's rows of each sample: (index [B, K] into the buffer+sequence rows — the buffer first, then
        the unmasked tokens in position order, then, where a row keeps fewer than K, masked positions as padding;
        valid [B, K] bool, or None when every row keeps K). K is the most rows any sample keeps; ``bucketed``
        rounds it up to :meth:`row_bucket` and always returns ``valid``, so a compiled caller sees a few shapes,
        not one per count (the padded rows are left out of attention and the decoder drops them)."""
        b = mask.shape[0]
        keep = torch.cat([torch.ones(b, self.cfg.buffer_size, dtype=torch.bool, device=mask.device), mask == 0], 1)
        counts = keep.sum(1)
        k = int(counts.max())
        if bucketed:
            k = self.row_bucket(k)
        index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :k]
        if not bucketed and bool((counts == k).all()):
            return index, None
        return index, torch.arange(k, device=mask.device)[None] < counts[:, None]

    def row_bucket(self, k: int) -> int:
        """``k`` encoder rows rounded up to a multiple of 8 chosen so that the buffer plus the whole sequence spans
        at most 8 such steps (the last bucket is the full length)."""
        total = self.cfg.buffer_size + self.cfg.seq_len
        step = 8 * math.ceil(total / 64)
        return min(total, step * math.ceil(k / step))

    def forward_mae_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                            drop: torch.Tensor | None = None, rows: tuple | None = None) -> torch.Tensor:
        """tokens [B, L, token_dim], mask [B, L] (nonzero = masked), class_embedding [B, width] → the encoded rows
        [B, K, width] (buffer, then the visible tokens in position order; see :meth:`kept_rows`, whose result
        ``rows`` may pass in).

        In training mode the class embedding drops to ``fake_latent`` where ``drop`` [B] is true (drawn here with
        probability ``label_drop_prob`` from torch's global generator when not given); in eval mode never."""
        x = self.z_proj(tokens)
        b, _, d = x.shape
        if self.training and (drop is not None or self.cfg.label_drop_prob > 0):
            if drop is None:
                drop = torch.rand(b) < self.cfg.label_drop_prob
            m = drop.to(x.device).unsqueeze(-1).to(x.dtype)
            class_embedding = m * self.fake_latent + (1 - m) * class_embedding
        buffer = class_embedding.unsqueeze(1).to(x.dtype).expand(b, self.cfg.buffer_size, d)
        x = self.z_proj_ln(torch.cat([buffer, x], 1) + self.encoder_pos_embed_learned)
        index, valid = self.kept_rows(mask) if rows is None else rows
        x = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, d))
        for block in self.encoder_blocks:
            x = self._run(block, x, valid)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, rows: tuple | None = None) -> torch.Tensor:
        """Encoded rows [B, K, enc width] and the same mask (and ``rows``) → z [B, L, dec width]: every masked
        position and the buffer start as ``mask_token``, the encoded rows go back to their positions, then the
        decoder blocks, its norm, the buffer rows dropped and the diffusion position table added."""
        x = self.decoder_embed(x)
        b, _, d = x.shape
        index, valid = self.kept_rows(mask) if rows is None else rows
        token = self.mask_token.to(x.dtype)
        if valid is not None:
            x = torch.where(valid.unsqueeze(-1), x, token)
        full = token.repeat(b, self.cfg.buffer_size + self.cfg.seq_len, 1)
        x = full.scatter(1, index.unsqueeze(-1).expand(-1, -1, d), x) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = self._run(block, x, None)
        x = self.decoder_norm(x)
        return x[:, self.cfg.buffer_size:] + self.diffusion_pos_embed_learned

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor,
                drop: torch.Tensor | None = None, rows: tuple | None = None) -> torch.Tensor:
        """Encoder then decoder: z [B, L, dec width], the DiffLoss condition of every token (``rows``: the mask's
        :meth:`kept_rows`, computed here when not given)."""
        rows = self.kept_rows(mask) if rows is None else rows
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, class_embedding, drop, rows), mask,
                                        rows)

    def forward_static(self, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in eval mode with fixed shapes: the encoder keeps every row in place and the masked ones
        out of attention as keys (instead of dropping them), and the decoder replaces them by ``mask_token``. The
        same z up to rounding; it costs the encoder the masked rows' work, but one graph serves every mask, which
        compiled and exported engines want."""
        x = self.z_proj(tokens)
        b, _, d = x.shape
        buffer = class_embedding.unsqueeze(1).to(x.dtype).expand(b, self.cfg.buffer_size, d)
        x = self.z_proj_ln(torch.cat([buffer, x], 1) + self.encoder_pos_embed_learned)
        keep = torch.cat([mask.new_zeros(b, self.cfg.buffer_size), mask], 1) == 0
        for block in self.encoder_blocks:
            x = block(x, keep)
        x = self.decoder_embed(self.encoder_norm(x))
        x = torch.where(keep.unsqueeze(-1), x, self.mask_token.to(x.dtype)) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x, None)
        x = self.decoder_norm(x)
        return x[:, self.cfg.buffer_size:] + self.diffusion_pos_embed_learned

    def _run(self, block: Block, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, valid, use_reentrant=False)
        return block(x, valid)

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     include_vb: bool = True) -> dict:
        """The DiffLoss terms of every token (rows in (sample, position) order, repeated ``diffusion_batch_mul``
        times): z [B, L, D], target [B, L, C], t [B·L·mul] timesteps in 0..999, noise [B·L·mul, C]. Returns
        :meth:`DiffLoss.forward`'s dict; masking and averaging are the caller's."""
        b, n, _ = target.shape
        mul = self.cfg.diffusion_batch_mul
        target = target.reshape(b * n, -1).repeat(mul, 1)
        z = z.reshape(b * n, -1).repeat(mul, 1)
        return self.diffloss(target, z, t, noise, include_vb)

    # -- execution and test helpers -------------------------------------------------------------------------------

    def set_attention(self, impl: str) -> "MAR":
        """``"math"``: the released attention arithmetic; ``"sdpa"``: torch's fused attention (same maths)."""
        if impl not in ("math", "sdpa"):
            raise ValueError(f"unknown attention {impl!r}: math or sdpa")
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            block.attn.impl = impl
        return self

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> "MAR":
        """Random N(0, std²) values in every parameter (LayerNorm scales around 1), so that every path matters
        (the released initialisation zeroes the DiffLoss adaLN and output layers)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                v = torch.randn(p.shape, generator=generator) * std
                p.copy_(v + 1 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln.weight"))
                        else v)
        return self


# ----------------------------------------------------------------------------------------------------------------
# DiffLoss: the per-token denoiser


TIMESTEP_FREQ_DIM = 256


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] features of timesteps ``t`` (N,) → (N, dim), frequencies exp(−ln(max_period)·i/half) (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t))


class ResBlock(nn.Module):
    """x + gate·mlp(modulate(LN(x), shift, scale)), with shift, scale and gate from SiLU → Linear(w, 3w) of y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The DiffLoss MLP: x [N, C] noisy token, t [N] timesteps (original scale), c [N, Dz] MAR condition →
    [N, 2C] (ε, then the learned-range variance values). ``embed(t, c)`` and ``trunk(x, y)`` split it so a caller
    may keep ``cond_embed(c)`` across steps; ``forward`` = ``trunk(x, embed(t, c))`` exactly."""

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)

    def embed(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t) + self.cond_embed(c)

    def trunk(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, self.embed(t, c))


# ----------------------------------------------------------------------------------------------------------------
# DiffLoss: its diffusion


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta), ᾱ(s) = cos²((s + 0.008)/1.008·π/2) (float64, as released)."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_steps: int, spacing: str | int | None) -> list[int]:
    """The original timesteps a respacing keeps, ascending: ``"100"`` → round(i·(T−1)/99) for i = 0..99 (a running
    float sum, then Python's round, as released); comma-separated counts split T into equal sections; ``""`` or
    None keeps all."""
    if spacing is None or spacing == "":
        return list(range(num_steps))
    try:
        counts = [int(x) for x in str(spacing).split(",")]
    except ValueError:
        raise UserError(f"num_sampling_steps {spacing!r}: expected a step count such as \"100\" (or counts "
                        "separated by commas)") from None
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise UserError(f"num_sampling_steps {spacing!r}: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class MARDiffusion:
    """The DiffLoss's Gaussian diffusion: ε-prediction with learned-range variance over ``betas`` (float64); when
    respaced, ``timestep_map[i]`` is the original timestep of step i and the net is told that one. Tables are
    float64 and gathered as float32, as released."""

    def __init__(self, betas: np.ndarray, timestep_map: list[int]):
        b = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(b)
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long)
        ac = np.cumprod(1.0 - b, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        pv = b * (1.0 - ac_prev) / (1.0 - ac)
        self.tables64 = {
            "betas": b,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": pv,
            "posterior_log_variance_clipped": np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.array([]),
            "log_betas": np.log(b),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        }
        self._cache: dict = {}

    @classmethod
    def create(cls, spacing: str | int | None = None, num_steps: int = 1000) -> "MARDiffusion":
        """The cosine schedule of ``num_steps``, respaced to ``spacing`` (``"100"`` for sampling, None for training)."""
        base = cosine_betas(num_steps)
        keep = space_timesteps(num_steps, spacing)
        ac = np.cumprod(1.0 - base, axis=0)  # kept steps' betas are recomputed even when all are kept, as released
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1 - ac[i] / last)
            last = ac[i]
        return cls(np.array(new_betas), keep)

    def table(self, name: str, device) -> torch.Tensor:
        """A schedule table as a float32 tensor on ``device``."""
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self.tables64[name]).float().to(device)
        return self._cache[key]

    def gather(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as a float32 column [N, 1]."""
        return self.table(name, t.device)[t].unsqueeze(-1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        key = ("timestep_map", str(t.device))  # kept per device: no host copy per step (a CUDA graph forbids it)
        if key not in self._cache:
            self._cache[key] = self.timestep_map.to(t.device)
        return self._cache[key][t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.gather("sqrt_alphas_cumprod", t) * x0 + self.gather("sqrt_one_minus_alphas_cumprod", t) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t−1} | x_t, x0)."""
        mean = self.gather("posterior_mean_coef1", t) * x0 + self.gather("posterior_mean_coef2", t) * xt
        return mean, self.gather("posterior_log_variance_clipped", t)

    def p_mean_variance(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """(mean, log-variance, x0 prediction) of p(x_{t−1} | x_t) from the net's [N, 2C] output: the variance
        interpolates log β̃_t (the clipped posterior variance) and log β_t by (v + 1)/2; no clipping of x0."""
        c = xt.shape[1]
        eps, v = model_out[:, :c], model_out[:, c:]
        min_log = self.gather("posterior_log_variance_clipped", t)
        max_log = self.gather("log_betas", t)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self.gather("sqrt_recip_alphas_cumprod", t) * xt - self.gather("sqrt_recipm1_alphas_cumprod", t) * eps
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0

    def p_sample_from_output(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                             noise: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """x_{t−1} = mean + [t ≠ 0]·exp(½·log-variance)·noise·temperature."""
        mean, log_var, _ = self.p_mean_variance(model_out, xt, t)
        nonzero = (t != 0).float().view(-1, 1)
        return mean + nonzero * torch.exp(0.5 * log_var) * noise * _column(temperature, xt)

    def training_losses(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                        noise: torch.Tensor, include_vb: bool = True) -> dict:
        """The released per-row loss terms: ``mse`` = mean_c(ε − ε̂)², ``vb`` = the variational-bound term in bits
        for the learned variance with the mean's gradient stopped (KL of the posteriors; the discretised decoder
        NLL where t = 0), ``loss`` = mse + vb (mse alone without ``include_vb``), ``model_output`` = ε̂ [N, C],
        ``target`` = ε, ``x_t``."""
        xt = self.q_sample(x0, t, noise)
        out = net(xt, self.model_timesteps(t), z)
        c = x0.shape[1]
        eps, v = out[:, :c], out[:, c:]
        terms = {"model_output": eps, "target": noise, "x_t": xt, "mse": ((noise - eps) ** 2).mean(dim=1)}
        if include_vb:
            frozen = torch.cat([eps.detach(), v], dim=1)
            mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
            true_mean, true_log_var = self.q_posterior(x0, xt, t)
            kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / np.log(2.0)
            nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=1) / np.log(2.0)
            terms["vb"] = torch.where(t == 0, nll, kl)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


def _column(value: float | torch.Tensor, like: torch.Tensor):
    """A scalar as is; a per-row tensor [N] as a float32 column [N, 1] on ``like``'s device."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float32).reshape(-1, 1) if value.dim() else value
    return value


def guided_output(net: SimpleMLPAdaLN, x: torch.Tensor, t_model: torch.Tensor, z: torch.Tensor,
                  z_uncond: torch.Tensor | None, cfg: float | torch.Tensor | None) -> torch.Tensor:
    """The net's [N, 2C] output for rows x at net timesteps ``t_model``. With ``z_uncond``, one call on [x; x]
    with [z; z_uncond]: all C ε channels become ε_u + cfg·(ε_c − ε_u) (``cfg`` a number or one per row) and the
    variance values are the conditional row's own — the released guidance (the unconditional rows' own x never
    enters)."""
    if z_uncond is None:
        return net(x, t_model, z)
    n, c = x.shape
    both = net(torch.cat([x, x]), torch.cat([t_model, t_model]), torch.cat([z, z_uncond]))
    cond, uncond = both[:n], both[n:]
    eps = uncond[:, :c] + _column(1.0 if cfg is None else cfg, x) * (cond[:, :c] - uncond[:, :c])
    return torch.cat([eps, cond[:, c:]], dim=1)


def p_sample(net: SimpleMLPAdaLN, diffusion: MARDiffusion, x: torch.Tensor, t: int | torch.Tensor,
             z: torch.Tensor, noise: torch.Tensor, temperature: float | torch.Tensor = 1.0,
             cfg: float | torch.Tensor | None = None, z_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step x_t → x_{t−1} for N token rows: x [N, C] at respaced step ``t`` (one for all rows, or
    [N]), conditions z [N, Dz], the step's standard-normal ``noise`` [N, C] (used ×temperature; ignored where
    t = 0), ``temperature`` a number or [N]. With ``z_uncond`` [N, Dz] the step is guided with ``cfg`` (a number
    or [N]) as :func:`guided_output` says. No clipping."""
    n = x.shape[0]
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        t = torch.full((n,), int(t), dtype=torch.long, device=x.device)
    out = guided_output(net, x, diffusion.model_timesteps(t), z, z_uncond, cfg)
    return diffusion.p_sample_from_output(out, x, t, noise, temperature)


class DiffLoss(nn.Module):
    """The per-token diffusion head: ``net`` (:class:`SimpleMLPAdaLN`), ``train_diffusion`` (1000 cosine steps),
    ``gen_diffusion`` (respaced to ``num_sampling_steps``)."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str = "100", grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth, grad_checkpointing)
        self.train_diffusion = MARDiffusion.create(None)
        self.gen_diffusion = MARDiffusion.create(num_sampling_steps)

    def forward(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                include_vb: bool = True) -> dict:
        """:meth:`MARDiffusion.training_losses` of the net on rows ``target`` [N, C] with conditions z [N, Dz] at
        timesteps t [N] (0..999) with noise ε [N, C]."""
        return self.train_diffusion.training_losses(self.net, target, t, z, noise, include_vb)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, noise: torch.Tensor,
               step_noise: torch.Tensor | Callable[[int], torch.Tensor], temperature: float | torch.Tensor = 1.0,
               cfg: float | torch.Tensor | None = None, z_uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Token rows [N, C] from the initial ``noise`` [N, C] through every respaced step, last to first;
        ``step_noise[i]`` (or ``step_noise(i)``) is the standard-normal noise [N, C] of respaced step i. Guided
        when ``z_uncond`` is given (the release feeds the same initial noise to both halves and keeps the
        conditional half: that is this)."""
        x = noise
        for i in reversed(range(self.gen_diffusion.num_steps)):
            e = step_noise(i) if callable(step_noise) else step_noise[i]
            x = p_sample(self.net, self.gen_diffusion, x, i, z, e, temperature, cfg, z_uncond)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Loading


_INT_FIELDS = ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "buffer_size", "encoder_embed_dim",
               "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
               "class_num", "diffloss_d", "diffloss_w", "diffusion_batch_mul")
_FLOAT_FIELDS = ("mlp_ratio", "label_drop_prob", "attn_dropout", "proj_dropout", "mask_ratio_min", "norm_eps")


def check_config(cfg: MARConfig, where) -> None:
    """Refuse a MARConfig no MAR can be built from (one line naming ``where``)."""
    def bad(text: str):
        raise UserError(f"{where}: MAR config {text}")

    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            bad(f"{name} is {v!r}, expected an integer")
        if v < (0 if name in ("buffer_size", "encoder_depth", "decoder_depth", "diffloss_d") else 1):
            bad(f"{name} is {v}, expected a positive integer")
    for name in _FLOAT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(f"{name} is {v!r}, expected a finite number")
    for name in ("label_drop_prob", "attn_dropout", "proj_dropout", "mask_ratio_min"):
        if not 0 <= getattr(cfg, name) <= 1:
            bad(f"{name} is {getattr(cfg, name)}, expected 0..1")
    if not isinstance(cfg.grad_checkpointing, bool):
        bad(f"grad_checkpointing is {cfg.grad_checkpointing!r}, expected true or false")
    if not isinstance(cfg.num_sampling_steps, str):
        bad(f"num_sampling_steps is {cfg.num_sampling_steps!r}, expected a string such as \"100\"")
    for part in ("encoder", "decoder"):
        width, heads = getattr(cfg, f"{part}_embed_dim"), getattr(cfg, f"{part}_num_heads")
        if width % heads:
            bad(f"{part}_embed_dim {width} is not divisible by {part}_num_heads {heads}")
    if cfg.img_size % (cfg.vae_stride * cfg.patch_size) or cfg.seq_len < 1:
        bad(f"img_size {cfg.img_size} is not a multiple of vae_stride·patch_size = {cfg.vae_stride * cfg.patch_size}")
    if not (cfg.mlp_ratio > 0 and int(cfg.encoder_embed_dim * cfg.mlp_ratio) >= 1
            and int(cfg.decoder_embed_dim * cfg.mlp_ratio) >= 1):
        bad(f"mlp_ratio is {cfg.mlp_ratio}, expected a positive ratio")
    if cfg.norm_eps <= 0:
        bad("norm_eps must be above 0")
    try:
        space_timesteps(1000, cfg.num_sampling_steps)
    except UserError as e:
        bad(str(e))


def _indices(sd: dict, prefix: str) -> int:
    """How many numbered modules ``prefix<n>.`` the keys name (1 + the largest n; ASCII digits only)."""
    top = -1
    for k in sd:
        if k.startswith(prefix):
            part = k[len(prefix):].split(".", 1)[0]
            if not (part.isascii() and part.isdigit()):
                raise ValueError(f"block key {k!r}")
            top = max(top, int(part))
    return top + 1


def infer_config(sd: dict, num_heads: int | None = None, **overrides) -> MARConfig:
    """A MARConfig read off a state dict's shapes: widths, depths, classes, buffer, sequence, token size and the
    DiffLoss depth and width. Attention heads are not in the shapes: encoder and decoder must be one of the named
    sizes (their heads), unless ``num_heads`` is given (then any size, with that many heads in both)."""
    try:
        de, token_dim = sd["z_proj.weight"].shape
        dd = sd["decoder_embed.weight"].shape[0]
        seq_len = sd["diffusion_pos_embed_learned"].shape[1]
        buffer = sd["encoder_pos_embed_learned"].shape[1] - seq_len
        class_num = sd["class_emb.weight"].shape[0]
        mlp_hidden = sd["encoder_blocks.0.mlp.fc1.weight"].shape[0] if "encoder_blocks.0.mlp.fc1.weight" in sd else 4 * de
        enc_depth = _indices(sd, "encoder_blocks.")
        dec_depth = _indices(sd, "decoder_blocks.")
        width = sd["diffloss.net.input_proj.weight"].shape[0]
        d = _indices(sd, "diffloss.net.res_blocks.")
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
        raise UserError(f"not a MAR state dict (missing or malformed {first_line(str(e), 120)})") from None
    side = math.isqrt(seq_len) if seq_len > 0 else 0
    if side * side != seq_len or buffer < 0:
        raise UserError(f"not a MAR state dict: a diffusion position table of {seq_len} rows is no square token grid")
    if num_heads is None:
        named = [n for n, (w, depth, _, _, _) in NAMED_SIZES.items() if (de, enc_depth) == (w, depth) == (dd, dec_depth)]
        if not named:
            sizes = ", ".join(f"{n} ({w} wide, {depth} deep)" for n, (w, depth, *_) in NAMED_SIZES.items())
            raise UserError(f"a MAR of encoder {de} wide × {enc_depth} deep and decoder {dd} × {dec_depth} fits none "
                            f"of {sizes}; pass num_heads to load another size")
        num_heads = NAMED_SIZES[named[0]][2]
    return MARConfig(img_size=side * 16, vae_stride=16, patch_size=1, vae_embed_dim=token_dim, buffer_size=buffer,
                     encoder_embed_dim=de, encoder_depth=enc_depth, encoder_num_heads=num_heads,
                     decoder_embed_dim=dd, decoder_depth=dec_depth, decoder_num_heads=num_heads,
                     mlp_ratio=mlp_hidden / de if de else 0.0, class_num=class_num, diffloss_d=d, diffloss_w=width,
                     **overrides)


CHECKPOINT_NAME = "checkpoint-last.pth"


def read_torch_checkpoint(path: Path):
    """The object a ``torch.save`` file holds, loaded tensors-only (``argparse.Namespace`` is the one class
    admitted, for training checkpoints' ``args``) after the zip checks of :mod:`.weights`; zip files are
    memory-mapped, so tensors nobody reads (an optimizer's state) are never brought into memory. A pickle that
    needs any other global is refused naming it; every failure is one line naming the file."""
    path = require_file(path, "a torch checkpoint")
    try:
        _check_torch_zip(path)
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: {_unpickling_message(str(e))}") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {first_line(str(e))})") from None


def _state_dict(obj, where: Path, what: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: {what} is a {type(obj).__name__}, not a state dict")
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    try:
        _check_views(sd)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return sd


def _checkpoint_dicts(obj, where: Path, ema: bool) -> tuple[dict, dict | None]:
    """(the ``model`` state dict, the ``model_ema`` one or None) of a training checkpoint; a bare state dict is
    its own weights."""
    if isinstance(obj, dict) and "model" in obj:
        sd = _state_dict(obj["model"], where, "its 'model'")
        if not ema:
            return sd, None
        if not isinstance(obj.get("model_ema"), dict):
            raise UserError(f"{where}: has no 'model_ema' (the EMA weights the release samples with); pass ema=False "
                            "to load the raw 'model' weights")
        return sd, _state_dict(obj["model_ema"], where, "its 'model_ema'")
    return _state_dict(obj, where, "the checkpoint"), None


def load_mar(path: str | Path, *, ema: bool = True, num_heads: int | None = None,
             num_sampling_steps: str | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> MAR:
    """Load a MAR from a training checkpoint (``checkpoint-last.pth``: {model, model_ema, optimizer, epoch, scaler,
    args}, or a folder holding one), a bare state dict, or a ``.safetensors`` file (``save_mar``'s, or the same
    keys without a config).

    As released: ``model`` is loaded strictly, then every parameter is overwritten with ``model_ema`` (``ema=False``
    keeps the raw weights). The size comes from ``save_mar``'s metadata or the tensor shapes (see
    :func:`infer_config`); a model larger than the file's tensors hold is refused before it is built.
    ``num_sampling_steps`` overrides the DiffLoss respacing ("100"). Returns the model in eval mode with frozen
    weights; every failure is one ``UserError`` line naming the file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    p = require_file(p, f"a MAR checkpoint: {CHECKPOINT_NAME}, a folder holding it, or .safetensors")
    ema_sd = None
    if p.suffix == ".safetensors":
        saved = _saved_config(p)
        sd = read_weights(p)
    else:
        saved = None
        sd, ema_sd = _checkpoint_dicts(read_torch_checkpoint(p), p, ema)
    if saved is not None:
        cfg = saved if num_heads is None else replace(saved, encoder_num_heads=num_heads, decoder_num_heads=num_heads)
    else:
        try:
            cfg = infer_config(sd, num_heads)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None
    if num_sampling_steps is not None:
        cfg = replace(cfg, num_sampling_steps=str(num_sampling_steps))
    check_config(cfg, p)
    check_fits(param_count(cfg), held_values(sd), p,
               f"MAR (encoder {cfg.encoder_embed_dim}×{cfg.encoder_depth}, decoder {cfg.decoder_embed_dim}×"
               f"{cfg.decoder_depth}, DiffLoss {cfg.diffloss_w}×{cfg.diffloss_d})")
    model = MAR(cfg)
    load_checked(model, sd, p, "MAR")
    if ema_sd is not None:
        names = [n for n, _ in model.named_parameters()]
        missing = [n for n in names if n not in ema_sd]
        if missing:
            raise UserError(f"{p}: 'model_ema' lacks {len(missing)} of the model's parameters ({missing[0]}, …)")
        load_checked(model, {n: ema_sd[n] for n in names}, p, "MAR EMA")
    model.requires_grad_(False)
    return model.eval().to(device=device, dtype=dtype)


def save_mar(model: MAR, path: str | Path) -> None:
    """Write the weights as safetensors with the config in the metadata (``load_mar`` reads it back)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"mar_config": json.dumps(asdict(model.cfg))})


def _saved_config(p: Path) -> MARConfig | None:
    """``save_mar``'s config from the safetensors metadata, checked field by field and against the values the
    header says the tensors hold (before any tensor is read); None when there is none."""
    raw, held = metadata_config(p, "mar_config", {f.name for f in dataclasses.fields(MARConfig)}, _INT_FIELDS,
                                _FLOAT_FIELDS, "MAR")
    if raw is None:
        return None
    cfg = MARConfig(**raw)
    check_config(cfg, p)
    check_fits(param_count(cfg), held, p, f"MAR (encoder {cfg.encoder_embed_dim}×{cfg.encoder_depth}, decoder "
                                          f"{cfg.decoder_embed_dim}×{cfg.decoder_depth})")
    return cfg


def random_mar(cfg: MARConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> MAR:
    """A MAR with random weights in eval mode (for tests and timing: cost does not depend on weight values)."""
    model = MAR(cfg).init_weights(torch.Generator().manual_seed(seed))
    model.requires_grad_(False)
    return model.eval().to(device=device, dtype=dtype)


__all__ = ["MAR", "MARConfig", "MARDiffusion", "DiffLoss", "SimpleMLPAdaLN", "NAMED_SIZES", "param_count",
           "patchify", "unpatchify", "random_orders", "mask_by_order", "next_mask_len", "linear_cfg",
           "random_masking", "p_sample", "guided_output", "load_mar", "save_mar", "infer_config", "random_mar",
           "read_torch_checkpoint", "timestep_embedding", "cosine_betas", "space_timesteps"]
