"""The VAE: a diffusers ``AutoencoderKL`` read from a local directory.

Latents are the encoder mean times the config's ``scaling_factor`` (0.18215 for SD VAEs); ``decode`` divides it back
and returns images in [−1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, require_dir
from .weights import read_diffusers_config


class VAE(nn.Module):
    def __init__(self, autoencoder: nn.Module, scaling_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] -> scaled latents (encoder mean, no sampling)."""
        return self.autoencoder.encode(images).latent_dist.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images, nominally in [−1, 1] (not clamped)."""
        return self.autoencoder.decode(latents / self.scaling_factor).sample

    forward = decode


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> VAE:
    """Load ``AutoencoderKL`` from a local diffusers directory (a pipeline root with ``vae/`` works too)."""
    p = require_dir(path, "a diffusers AutoencoderKL directory with config.json and weights")
    p, cfg = read_diffusers_config(p, "vae", "AutoencoderKL")
    if cfg.get("_class_name") != "AutoencoderKL":
        raise UserError(f"{p / 'config.json'}: is a {cfg.get('_class_name')!r}, not an AutoencoderKL (is this the VAE "
                        "directory?)")
    from diffusers import AutoencoderKL

    try:
        ae = AutoencoderKL.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise UserError(f"{p}: cannot load AutoencoderKL ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    ae.requires_grad_(False)
    vae = VAE(ae, cfg.get("scaling_factor", 0.18215))
    return vae.eval().to(device=device, dtype=dtype)
