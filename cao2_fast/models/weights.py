"""Reading weight files: ``.safetensors`` or ``torch.save`` checkpoints, unwrapped to a plain state dict.

Training checkpoints wrap the weights (``{"ema": ..., "model": ..., "opt": ..., "args": Namespace}`` from DiT's
train.py, ``{"state_dict": ...}`` from timm/RDED) and DDP prefixes keys with ``module.``; all of that is undone here.
Loading stays ``weights_only`` (no code from a checkpoint runs); ``argparse.Namespace`` is allowed for the "args".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UserError, require_file

WRAPPERS = ("ema", "state_dict", "model")  # EMA weights are preferred over raw ones when a checkpoint has both


def unwrap(obj) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    for key in WRAPPERS:
        if isinstance(obj.get(key), dict):
            return unwrap(obj[key])
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights(path: Path) -> dict:
    """The state dict in ``path``; any failure is a one-line ``UserError`` naming the file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return unwrap(obj)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # truncated zip, foreign pickle, not a tensor file
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def read_diffusers_config(folder: Path, subfolder: str, what: str) -> tuple[Path, dict]:
    """(model folder, parsed config.json) of a diffusers model: ``folder`` itself or its ``subfolder`` (a pipeline
    root). A missing or malformed config is a one-line error naming the file."""
    if (folder / subfolder).is_dir():
        folder = folder / subfolder
    cfg_file = require_file(folder / "config.json", f"a diffusers {what} config.json")
    try:
        return folder, json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
