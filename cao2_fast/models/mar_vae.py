"""MAR's KL-16 VAE: the LDM-layout ``kl16.ckpt`` read into a diffusers ``AutoencoderKL`` and wrapped as a :class:`VAE`.

The LDM KL autoencoder of MAR (ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual blocks per encoder level and 3 per
decoder level, attention after each encoder block at the last (16×16) level, attention in both mid blocks and
nowhere else in the decoder, 16 latent channels, quant_conv 32→32, post_quant_conv 16→16) is exactly diffusers'
``AutoencoderKL`` with block_out_channels (128, 128, 256, 256, 512), layers_per_block 2, latent_channels 16,
4 × ``DownEncoderBlock2D`` + ``AttnDownEncoderBlock2D``, 5 × ``UpDecoderBlock2D`` and 32 norm groups: each module
computes what its LDM counterpart computes (the down-sampling convolution pads right and bottom, attention is one
head over all channels with a 1/√C scale, every GroupNorm has eps 1e-6), and only the names differ.
:func:`ldm_to_diffusers` renames them; diffusers' own single-file converter does not carry attention blocks inside
encoder levels, which this VAE has.

Latents are scaled by 0.2325: ``load_kl16(path).decode(latents)`` divides it back and returns images in [−1, 1];
MAR's tokens [B, 256, 16] become latents [B, 16, 16, 16] with :func:`cao2_fast.models.mar.unpatchify`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ..errors import UserError, require_file
from .mar import _state_dict, read_torch_checkpoint
from .vae import VAE, _quiet_diffusers, min_params
from .weights import check_fits, first_line, held_values, load_checked, read_weights

KL16_SCALE = 0.2325
KL16_FILE = "kl16.ckpt"

KL16_INIT = dict(  # AutoencoderKL arguments of MAR's KL-16
    in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",) * 5, mid_block_add_attention=True,
)

_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def ldm_key_to_diffusers(key: str, levels: int) -> str:
    """The diffusers ``AutoencoderKL`` name of one LDM VAE key (``levels`` = the number of resolution levels;
    decoder level i is diffusers up block levels−1−i). A key of no known module raises ``KeyError`` naming it."""
    try:
        return _rename(key, levels)
    except KeyError:
        raise KeyError(key) from None


def _rename(key: str, levels: int) -> str:
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
    if m:
        part, name, kind = m.groups()
        return f"{part}.{'conv_norm_out' if name == 'norm_out' else name}.{kind}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)", key)
    if m:
        part, module, sub, kind = m.groups()
        if module == "attn_1":
            return f"{part}.mid_block.attentions.0.{_ATTN_PARTS[sub]}.{kind}"
        return f"{part}.mid_block.resnets.{int(module[-1]) - 1}.{_RESNET_PARTS[sub]}.{kind}"
    m = re.fullmatch(r"encoder\.down\.([0-9]+)\.(block|attn)\.([0-9]+)\.(\w+)\.(weight|bias)", key)
    if m:
        level, kind_, j, sub, kind = m.groups()
        parts = _RESNET_PARTS if kind_ == "block" else _ATTN_PARTS
        group = "resnets" if kind_ == "block" else "attentions"
        return f"encoder.down_blocks.{int(level)}.{group}.{int(j)}.{parts[sub]}.{kind}"
    m = re.fullmatch(r"encoder\.down\.([0-9]+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{int(m.group(1))}.downsamplers.0.conv.{m.group(2)}"
    m = re.fullmatch(r"decoder\.up\.([0-9]+)\.(block|attn)\.([0-9]+)\.(\w+)\.(weight|bias)", key)
    if m:
        level, kind_, j, sub, kind = m.groups()
        parts = _RESNET_PARTS if kind_ == "block" else _ATTN_PARTS
        group = "resnets" if kind_ == "block" else "attentions"
        return f"decoder.up_blocks.{levels - 1 - int(level)}.{group}.{int(j)}.{parts[sub]}.{kind}"
    m = re.fullmatch(r"decoder\.up\.([0-9]+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    raise KeyError(key)


def ldm_to_diffusers(sd: dict, levels: int | None = None) -> dict:
    """An LDM VAE state dict renamed to diffusers ``AutoencoderKL`` keys; the attention projections (1×1
    convolutions) become linear weights. Keys outside the autoencoder (a training loss's, say) are dropped; an
    unknown key inside it raises ``KeyError`` naming it, an attention weight that is no 1×1 kernel ``ValueError``."""
    levels = _levels(sd) if levels is None else levels
    out = {}
    for key, value in sd.items():
        if not key.startswith(_PREFIXES):
            continue
        new = ldm_key_to_diffusers(key, levels)
        if ".attentions." in new and new.endswith(".weight") and "group_norm" not in new:
            if value.dim() == 4:
                if tuple(value.shape[2:]) != (1, 1):
                    raise ValueError(f"{key} of shape {tuple(value.shape)} is no 1×1 projection")
                value = value[:, :, 0, 0]
        out[new] = value
    return out


def _levels(sd: dict) -> int:
    return _structure(sd)[0]


def _structure(sd: dict) -> tuple[int, dict]:
    """(levels, {(part, level, "block"|"attn"): count}) of an LDM VAE's keys, in one pass over them."""
    counts: dict = {}
    levels = 0
    for k in sd:
        m = re.match(r"(encoder)\.down\.([0-9]+)\.(block|attn)\.([0-9]+)\.", k) or \
            re.match(r"(decoder)\.up\.([0-9]+)\.(block|attn)\.([0-9]+)\.", k)
        if m:
            part, level, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            counts[(part, level, kind)] = max(counts.get((part, level, kind), 0), j + 1)
            if part == "encoder":
                levels = max(levels, level + 1)
    if not levels:
        raise KeyError("encoder.down.0")
    return levels, counts


def infer_init(sd: dict, norm_num_groups: int = 32) -> dict:
    """``AutoencoderKL`` arguments read off an LDM VAE state dict: channels per level, residual blocks per level,
    which encoder and decoder levels attend, whether the mid blocks attend, latent channels. The decoder must have
    one residual block more per level than the encoder and the same channels (as every LDM KL autoencoder does)."""
    levels, counts = _structure(sd)
    lpb = counts.get(("encoder", 0, "block"), 0)
    if levels > len(sd) or lpb > len(sd):
        raise ValueError(f"a block index beyond the {len(sd)} tensors")
    channels, down, up = [], [], []
    for i in range(levels):
        if counts.get(("encoder", i, "block"), 0) != lpb:
            raise ValueError(f"encoder level {i} has another number of residual blocks than level 0 ({lpb})")
        if counts.get(("decoder", i, "block"), 0) != lpb + 1:
            raise ValueError(f"decoder level {i} does not have {lpb + 1} residual blocks (encoder levels have {lpb})")
        channels.append(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]))
        if int(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0]) != channels[-1]:
            raise ValueError(f"decoder level {i} has other channels than encoder level {i}")
        down.append("AttnDownEncoderBlock2D" if counts.get(("encoder", i, "attn")) else "DownEncoderBlock2D")
        up.append("AttnUpDecoderBlock2D" if counts.get(("decoder", i, "attn")) else "UpDecoderBlock2D")
    if any(level >= levels for _, level, _ in counts):
        raise ValueError(f"decoder levels beyond the encoder's {levels}")
    mid = [any(k.startswith(f"{part}.mid.attn_1.") for k in sd) for part in ("encoder", "decoder")]
    if mid[0] != mid[1]:
        raise ValueError("attention in one mid block but not the other")
    latent = int(sd["post_quant_conv.weight"].shape[0])
    return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                out_channels=int(sd["decoder.conv_out.weight"].shape[0]), block_out_channels=tuple(channels),
                layers_per_block=lpb, latent_channels=latent, norm_num_groups=norm_num_groups,
                down_block_types=tuple(down), up_block_types=tuple(reversed(up)), mid_block_add_attention=mid[0])


def load_kl16(path: str | Path, *, norm_num_groups: int = 32, scaling_factor: float = KL16_SCALE,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VAE:
    """MAR's VAE from ``kl16.ckpt`` (a torch dict with the weights under ``"model"``, LDM key names; a folder
    holding it; or a ``.safetensors`` / bare state dict of the same keys) as a :class:`VAE` with ``scaling_factor``
    0.2325. The architecture is read off the keys (the KL-16 one for the released file); GroupNorm's group count
    is not in the weights (32 in LDM). Every LDM weight of the autoencoder must fill a diffusers weight and every
    diffusers weight must be filled; a model larger than the file's tensors hold is refused before it is built.
    Returns the VAE in eval mode with frozen weights; every failure is one ``UserError`` line naming the file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / KL16_FILE
    p = require_file(p, f"MAR's VAE: {KL16_FILE}, a folder holding it, or .safetensors")
    if p.suffix == ".safetensors":
        sd = read_weights(p)
    else:
        obj = read_torch_checkpoint(p)
        sd = _state_dict(obj["model"] if isinstance(obj, dict) and "model" in obj else obj, p, "its weights")
    try:
        init = infer_init(sd, norm_num_groups)
        converted = ldm_to_diffusers(sd, len(init["block_out_channels"]))
    except KeyError as e:
        raise UserError(f"{p}: not an LDM KL autoencoder (missing or unknown key {first_line(str(e), 120)})") from None
    except (ValueError, IndexError, AttributeError, TypeError) as e:
        raise UserError(f"{p}: not an LDM KL autoencoder ({first_line(str(e), 160)})") from None
    check_fits(min_params(init), held_values(sd), p, "VAE")
    from diffusers import AutoencoderKL

    try:
        with warnings.catch_warnings(), _quiet_diffusers():
            warnings.simplefilter("ignore")
            ae = AutoencoderKL(**init, scaling_factor=scaling_factor)
    except Exception as e:
        raise UserError(f"{p}: cannot build an AutoencoderKL from its keys ({type(e).__name__}: "
                        f"{first_line(str(e))})") from None
    load_checked(ae, converted, p, "KL-16 VAE")
    ae.requires_grad_(False)
    return VAE(ae, scaling_factor).eval().to(device=device, dtype=dtype)


def random_kl16(seed: int = 0, scaling_factor: float = KL16_SCALE, **overrides) -> VAE:
    """The KL-16 architecture (or ``overrides`` of its ``AutoencoderKL`` arguments) with random weights, in eval
    mode (for tests and timing)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _quiet_diffusers():
        torch.manual_seed(seed)  # inside fork_rng: the caller's global generator is left as it was
        warnings.simplefilter("ignore")
        ae = AutoencoderKL(**{**KL16_INIT, **overrides}, scaling_factor=scaling_factor)
    ae.requires_grad_(False)
    return VAE(ae.eval(), scaling_factor).eval()


__all__ = ["load_kl16", "ldm_to_diffusers", "ldm_key_to_diffusers", "infer_init", "random_kl16", "KL16_INIT",
           "KL16_SCALE"]
