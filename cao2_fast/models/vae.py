"""The VAE: a diffusers ``AutoencoderKL`` read from a local directory.

Latents are the encoder mean times the config's ``scaling_factor`` (0.18215 for SD VAEs); ``decode`` divides it back
and returns images in [−1, 1].
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UserError, require_dir
from .weights import (DIFFUSERS_WEIGHTS, PIPELINE_INDEX, check_fits, component_in_index, config_int, config_number,
                      diffusers_model_files, first_line, held_values, load_checked, pipeline_component,
                      read_diffusers_config, read_weights, shown)


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
    """Load ``AutoencoderKL`` from a local diffusers directory (a pipeline root with ``vae/`` works too).

    The config and the weights are read here, not by diffusers: every file is checked to be a regular file, the
    weights load as tensors only (a pickled ``.bin`` runs no code), a config that declares a larger model than the
    weights hold is refused before anything is built, and each failure is one ``UserError`` line naming its file.
    """
    p = require_dir(path, "a diffusers AutoencoderKL directory with config.json and weights")
    p, cfg = read_diffusers_config(p, "vae", "AutoencoderKL", ("AutoencoderKL",))
    cfg_file = p / "config.json"
    if cfg.get("_class_name") != "AutoencoderKL":
        raise UserError(f"{cfg_file}: is a {cfg.get('_class_name')!r}, not an AutoencoderKL (is this the VAE "
                        "directory?)")
    scaling_factor = config_number(cfg, "scaling_factor", cfg_file, default=0.18215)
    init = _init_args(cfg, cfg_file)
    wfile = next((p / n for n in DIFFUSERS_WEIGHTS if (p / n).exists()), None)
    if wfile is None:
        raise UserError(f"{p}: no diffusion_pytorch_model.safetensors or .bin (expected AutoencoderKL weights)")
    sd = read_weights(wfile)
    check_fits(min_params(init), held_values(sd), cfg_file, "VAE")
    from diffusers import AutoencoderKL

    try:
        with warnings.catch_warnings(), _quiet_diffusers():
            warnings.simplefilter("ignore")
            ae = AutoencoderKL(**init)
    except Exception as e:
        raise UserError(f"{cfg_file}: cannot build an AutoencoderKL from it ({type(e).__name__}: "
                        f"{first_line(str(e))})") from None
    fix = getattr(ae, "_fix_state_dict_keys_on_load", None)  # older attention key names (query/key/value/proj_attn)
    if fix is not None:
        sd = fix(dict(sd)) or sd
    load_checked(ae, sd, wfile, "AutoencoderKL")
    ae.requires_grad_(False)
    vae = VAE(ae, scaling_factor)
    return vae.eval().to(device=device, dtype=dtype)


def checkpoint_files(names: set[str], read_index: Callable[[], dict]) -> tuple[str, list[str]] | None:
    """What :func:`load_vae` reads of a repository, from the list of its files (paths relative to its root):
    (``""``, the root being what is loaded; the files it reads), in the loader's order: a pipeline's
    AutoencoderKL component (the folder ``model_index.json`` names, read through ``read_index``), else an
    AutoencoderKL at the root (``config.json`` and its weights, safetensors before ``.bin``). None when the
    repository holds neither; a VAE with files missing raises ``LookupError`` saying which."""
    index = read_index() if PIPELINE_INDEX in names else None
    sub = "vae" if index is None else component_in_index(index, "vae", ("AutoencoderKL",))
    listed = index is not None and isinstance(index.get(sub), list)
    if any(n.startswith(f"{sub}/") for n in names) or (listed and "config.json" not in names):
        files = diffusers_model_files(names, sub, "the VAE of a diffusers pipeline")
        return "", ([PIPELINE_INDEX] if index is not None else []) + files
    if "config.json" in names:
        return "", diffusers_model_files(names, "", "the weights of a diffusers AutoencoderKL")
    return None


def pipeline_holds_vae(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (``model_index.json``) with its AutoencoderKL component
    (``vae/``, or the folder the index names)."""
    if not path.is_dir() or not (path / PIPELINE_INDEX).is_file():
        return False
    return (path / pipeline_component(path, "vae", ("AutoencoderKL",)) / "config.json").is_file()


def _init_args(cfg: dict, where: Path) -> dict:
    """The config's ``AutoencoderKL`` arguments (private ``_`` keys and keys this diffusers does not take are
    dropped), with the ones that size the model checked: positive integers and lists of them."""
    import inspect

    from diffusers import AutoencoderKL

    known = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    init = {k: v for k, v in cfg.items() if k in known}
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        if key in init:
            config_int(init, key, where)
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key in init:
            v = init[key]
            kind = int if key == "block_out_channels" else str
            if not isinstance(v, list) or not v or not all(isinstance(x, kind) and not isinstance(x, bool)
                                                           for x in v):
                raise UserError(f"{where}: {key!r} is {shown(v)}, expected a non-empty list of "
                                f"{'integers' if kind is int else 'block names'}")
            if kind is int and min(v) < 1:
                raise UserError(f"{where}: {key!r} holds {min(v)}, expected channel counts of at least 1")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
        if key in init and not isinstance(init[key], bool):
            raise UserError(f"{where}: {key!r} is {shown(init[key])}, expected true or false")
    channels = init.get("block_out_channels", [64])
    for key in ("down_block_types", "up_block_types"):
        if len(init.get(key, ["x"])) > len(channels):
            raise UserError(f"{where}: {len(init[key])} {key} but only {len(channels)} block_out_channels")
    return init


def min_params(init: dict) -> int:
    """A lower bound on the parameters of ``AutoencoderKL(**init)``: the weights of its convolutions and linear
    layers along the main path (biases, norms, shortcuts and attention left out), from the config alone."""
    c = list(init.get("block_out_channels", [64]))
    lpb = init.get("layers_per_block", 1)
    latent = init.get("latent_channels", 4)
    n_down = len(init.get("down_block_types", ["x"]))
    n_up = len(init.get("up_block_types", ["x"]))
    total = 9 * init.get("in_channels", 3) * c[0] + 9 * c[0] * init.get("out_channels", 3)  # conv_in, conv_out
    prev = c[0]
    for i in range(n_down):  # encoder: layers_per_block resnets of two 3x3 convolutions each
        total += 9 * prev * c[i] + 9 * c[i] * c[i] + (lpb - 1) * 18 * c[i] * c[i]
        prev = c[i]
    rev = c[::-1]
    prev = rev[0]
    for i in range(n_up):  # decoder: one resnet more per block
        total += 9 * prev * rev[i] + 9 * rev[i] * rev[i] + lpb * 18 * rev[i] * rev[i]
        prev = rev[i]
    total += 2 * 2 * 18 * c[-1] * c[-1]  # the two mid-block resnets of encoder and decoder
    total += 9 * c[-1] * 2 * latent + 9 * latent * c[-1]  # encoder conv_out (mean and logvar), decoder conv_in
    if init.get("use_quant_conv", True):
        total += 4 * latent * latent
    if init.get("use_post_quant_conv", True):
        total += latent * latent
    return total


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' own log lines (deprecation notes, ignored config keys) stay out of the one-line output."""
    from diffusers.utils import logging as dlogging

    before = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(before)
