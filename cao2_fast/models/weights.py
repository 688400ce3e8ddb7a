"""Reading weight files: ``.safetensors`` or ``torch.save`` checkpoints, unwrapped to a plain state dict.

Training checkpoints wrap the weights (``{"ema": ..., "model": ..., "opt": ..., "args": Namespace}`` from DiT's
train.py, ``{"state_dict": ...}`` from timm/RDED) and DDP prefixes keys with ``module.``; all of that is undone here.
Loading stays ``weights_only`` (no code from a checkpoint runs); ``argparse.Namespace`` is allowed for the "args".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import UserError

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
