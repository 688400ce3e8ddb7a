"""Reading weight files: ``.safetensors`` or ``torch.save`` checkpoints, unwrapped to a plain state dict.

Training checkpoints wrap the weights (``{"ema": ..., "model": ..., "opt": ..., "args": Namespace}`` from DiT's
train.py, ``{"state_dict": ...}`` from timm/RDED) and DDP prefixes keys with ``module.``; all of that is undone here.
Loading stays ``weights_only`` (no code from a checkpoint runs); ``argparse.Namespace`` is allowed for the "args".
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
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
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle-protocol notice: the error below says what matters
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return unwrap(obj)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:  # a pickle that needs code (numpy arrays, classes) to load
        raise UserError(f"{path}: not a plain tensor checkpoint ({_unpickling_reason(str(e))}); cao2-fast loads "
                        "weights only, so re-save it as a state dict of tensors (or .safetensors)") from None
    except Exception as e:  # truncated zip, not a tensor file
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {_first_line(str(e))})") from None


def _first_line(text: str, limit: int = 160) -> str:
    line = next((x.strip() for x in _ANSI.sub("", text).splitlines() if x.strip()), "no detail")
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " …"


def _unpickling_reason(text: str) -> str:
    """The line of torch's weights-only refusal that names what it met (a global or an opcode)."""
    m = re.search(r"(Unsupported (?:global: GLOBAL \S+|operand \S+))", text)
    return m.group(1) if m else _first_line(text)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_checked(model: torch.nn.Module, sd: dict, where: Path, what: str) -> None:
    """``model.load_state_dict(sd)`` where every difference (missing or unexpected keys, a tensor of another shape)
    is one ``UserError`` line naming the file, instead of torch's multi-line RuntimeError."""
    own = model.state_dict()
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd
             and tuple(sd[k].shape) != tuple(v.shape)]
    if shape:
        raise UserError(f"{where}: {what} weights do not fit: {shape[0]} (checkpoint vs model)"
                        + (f" and {len(shape) - 1} more" if len(shape) > 1 else ""))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{where}: {what} weights do not fit (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


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
