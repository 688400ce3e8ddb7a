"""Reading weight files: ``.safetensors`` or ``torch.save`` checkpoints, unwrapped to a plain state dict.

Training checkpoints wrap the weights (``{"ema": ..., "model": ..., "opt": ..., "args": Namespace}`` from DiT's
train.py, ``{"state_dict": ...}`` from timm/RDED) and DDP prefixes keys with ``module.``; all of that is undone here.
Loading stays ``weights_only`` (no code from a checkpoint runs); ``argparse.Namespace`` is allowed for the "args".
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import warnings
import zipfile
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
    """The state dict in ``path``; any failure is a one-line ``UserError`` naming the file.

    What the file may make this process allocate is bounded by the file's own size: a torch zip checkpoint whose
    entries are compressed or declare more bytes than the file holds is refused before ``torch.load`` (a zip bomb
    would inflate far beyond its size), safetensors never hold more than their bytes, and a tensor that claims more
    values than its data holds (a stride-0 view) is refused, so no later step sizes an allocation by it."""
    path = require_file(path, "a weights file: .safetensors or a torch checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            _check_torch_zip(path)
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. the pickle-protocol notice: the error below says what matters
                obj = torch.load(path, map_location="cpu", weights_only=True)
            sd = unwrap(obj)
        _check_views(sd)
        return sd
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:  # a pickle that needs code (numpy arrays, classes, functions) to load
        raise UserError(f"{path}: {_unpickling_message(str(e))}") from None
    except Exception as e:  # truncated zip, not a tensor file
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {first_line(str(e))})") from None


ZIP_SLACK = 1 << 16  # bytes the entries of a torch zip checkpoint may declare beyond the file's own size


def _check_torch_zip(path: Path) -> None:
    """Refuse, from the zip's central directory alone, a torch zip checkpoint that would inflate: ``torch.save``
    stores its entries uncompressed, so together they never declare more bytes than the file has. Other files
    (the legacy torch format) pass: torch fills their storages from the bytes that follow in the file itself, and
    a file shorter than it declares fails where it ends."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's own test for its zip format
            return
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        entries = z.infolist()
    total = 0
    for e in entries:
        if e.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"zip entry {e.filename!r} is compressed, which torch.save never writes; refusing to "
                            "inflate it (re-save the weights with torch.save, or as .safetensors)")
        total += e.file_size
    if total > size + ZIP_SLACK:
        raise UserError(f"its zip entries declare {total} bytes but the file has {size}; refusing to read it "
                        "(a damaged or crafted checkpoint)")


def _check_views(sd: dict) -> None:
    for k, v in sd.items():
        held = v.untyped_storage().nbytes() // max(v.element_size(), 1)
        if v.numel() > held:
            raise UserError(f"tensor {k!r} of shape {tuple(v.shape)} claims {v.numel()} values but its data holds "
                            f"{held} (an expanded view); refusing it")


def held_values(sd: dict) -> int:
    """How many values the tensors of ``sd`` hold in memory (each storage counted once). A model built to fit a
    file needs at most this many parameters: the file must hold every weight."""
    seen: dict[tuple[int, int], int] = {}
    for v in sd.values():
        st = v.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        seen[key] = max(seen.get(key, 0), st.nbytes() // max(v.element_size(), 1))
    return sum(seen.values())


def check_fits(needed: int, held: int, where: Path | str, what: str) -> None:
    """Refuse to build a model of ``needed`` parameters from a file whose tensors hold only ``held`` values: its
    config (or its keys) declare a model the file cannot fill, and building it would allocate what the file
    decides rather than what it holds."""
    if needed > held:
        raise UserError(f"{where}: declares a {what} of {needed:,} parameters ({_size(4 * needed)} as float32), "
                        f"but the weights hold only {held:,} values; refusing to build it")


def _size(n: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    while n >= 1000 and len(units) > 1:
        n /= 1000
        units.pop(0)
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


def first_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of ``text`` without terminal colour codes, shortened at a word boundary."""
    line = next((x.strip() for x in _ANSI.sub("", text).splitlines() if x.strip()), "no detail")
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " …"


def _unpickling_message(text: str) -> str:
    """torch's weights-only refusal, reworded: the global (or opcode) the pickle needs, never torch's advice to
    load it unsafely. torch's wording differs between versions ("Unsupported global: GLOBAL x", "Unsupported class
    x", "unsupported GLOBAL x whose module ... is blocked", "unrecognized function x"), so only the name is taken."""
    text = _ANSI.sub("", text)
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    m = (re.search(r"GLOBAL\s+([\w.]+)", tail) or re.search(r"Unsupported class\s+([\w.]+)", tail)
         or re.search(r"unrecognized function\s+(<[^>]*>|[\w.]+)", tail))
    if m:
        what = f"the global {m.group(1).rstrip('.')}"
    else:
        m = re.search(r"Unsupported operand\s+(\S+)", tail)
        what = f"pickle opcode {m.group(1)}" if m else None
    if what is None:
        reason = next((x.strip() for x in tail.splitlines() if x.strip() and "weights_only" not in x
                       and "Weights only load failed" not in x), "a pickle it cannot load as weights")
        what = first_line(reason, 120)
    return (f"not a plain tensor checkpoint (loading it needs {what}, and cao2-fast runs no code from a checkpoint); "
            "re-save it as a state dict of tensors (or .safetensors)")


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
    kind = [f"{k} is {sd[k].dtype}" for k, v in own.items() if k in sd and v.is_floating_point()
            and not sd[k].is_floating_point()]
    if kind:
        raise UserError(f"{where}: {what} weights do not fit: {kind[0]}, where real-valued weights belong")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise UserError(f"{where}: {what} weights do not fit ({first_line(str(e))})") from None
    if missing or unexpected:
        raise UserError(f"{where}: {what} weights do not fit (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


def read_diffusers_config(folder: Path, subfolder: str, what: str, classes: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """(model folder, parsed config.json) of a diffusers model: ``folder`` itself or, for a pipeline root, the folder
    of its ``what`` component: the one its ``model_index.json`` lists with a class in ``classes``, else
    ``subfolder``. A missing, oversized or malformed config, or one that is not a JSON object, is a one-line error
    naming the file."""
    sub = pipeline_component(folder, subfolder, classes or (what,))
    if (folder / sub).is_dir():
        folder = folder / sub
    return folder, read_json_object(folder / "config.json", f"a diffusers {what} config.json")


def read_json_object(file: Path, what: str) -> dict:
    """A small JSON file that must hold an object (a config, a pipeline index); every failure is one line naming
    it."""
    cfg_file = require_file(file, what)
    if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{cfg_file}: {cfg_file.stat().st_size} bytes is too large for {what}")
    try:
        cfg = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({first_line(str(e))})") from None
    except OSError as e:
        raise UserError(f"{cfg_file}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file}: is a JSON {_json_kind(cfg)}, not an object of config keys")
    return cfg


PIPELINE_INDEX = "model_index.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # in order of preference
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def pipeline_component(root: Path, default: str, classes: tuple[str, ...]) -> str:
    """The subfolder of a diffusers pipeline root holding the component of one of ``classes``, as the root's
    ``model_index.json`` lists it (``"vae": ["diffusers", "AutoencoderKL"]``); ``default`` when there is no index
    or it lists no such component. An index that is not a JSON object is a one-line error."""
    index = root / PIPELINE_INDEX
    if not index.exists():
        return default
    return component_in_index(read_json_object(index, "a diffusers pipeline model_index.json"), default, classes)


def component_in_index(index: dict, default: str, classes: tuple[str, ...]) -> str:
    """``pipeline_component`` on a parsed index: the listed components whose class is one of ``classes`` (the
    default name first if it is among them); names that are not a plain folder name are passed over."""
    found = sorted(k for k, v in index.items() if isinstance(k, str) and _COMPONENT.fullmatch(k) and ".." not in k
                   and isinstance(v, list) and len(v) == 2 and v[1] in classes)
    return default if default in found or not found else found[0]


def diffusers_model_files(names: set[str], folder: str, what: str) -> list[str]:
    """In a listing of repository files, the ones a diffusers model folder's loader reads: ``config.json`` and the
    first of ``DIFFUSERS_WEIGHTS`` present (``folder`` is ``""`` for the root). A missing one raises
    ``LookupError`` naming it and ``what`` the folder holds."""
    prefix = f"{folder}/" if folder else ""
    if prefix + "config.json" not in names:
        raise LookupError(f"no {prefix}config.json ({what})")
    weights = next((prefix + w for w in DIFFUSERS_WEIGHTS if prefix + w in names), None)
    if weights is None:
        raise LookupError(f"no {prefix}{DIFFUSERS_WEIGHTS[0]} or .bin ({what})")
    return [prefix + "config.json", weights]


MAX_CONFIG_BYTES = 1 << 20  # a diffusers config.json is a few hundred bytes


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def config_int(cfg: dict, key: str, where: Path | str, default=None, minimum: int = 1) -> int:
    """``cfg[key]`` as an int of at least ``minimum`` (``default`` when absent and a default is given); anything
    else is a one-line error naming the file and the key."""
    if key not in cfg or (cfg[key] is None and default is not None):
        if default is None:
            raise UserError(f"{where}: lacks {key!r} (an integer)")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: {key!r} is {shown(v)}, expected an integer")
    if v < minimum:
        raise UserError(f"{where}: {key!r} is {v}, expected at least {minimum}")
    return v


def config_number(cfg: dict, key: str, where: Path | str, default=None, positive: bool = True) -> float:
    """``cfg[key]`` as a finite float (positive unless told otherwise); a string, null, NaN or infinity is a
    one-line error naming the file and the key."""
    if key not in cfg:
        if default is None:
            raise UserError(f"{where}: lacks {key!r} (a number)")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where}: {key!r} is {shown(v)}, expected a finite number")
    if positive and v <= 0:
        raise UserError(f"{where}: {key!r} is {v}, expected a number above 0")
    return float(v)


def shown(v) -> str:
    """A JSON value for an error line: its kind and (shortened) text, e.g. ``string "0.18"``, or ``null``."""
    if v is None:
        return "null"
    text = json.dumps(v) if not isinstance(v, float) else repr(v)
    return f"{_json_kind(v)} {text if len(text) <= 40 else text[:40] + ' …'}"


def metadata_config(p: Path, key: str, fields: set[str], int_fields, float_fields, what: str,
                    expected_hint: bool = False) -> tuple[dict | None, int]:
    """A config saved as JSON under ``key`` in a safetensors file's metadata, and how many values its tensors hold
    (read from the header alone, before any tensor). The config is checked before anything is built from it: a JSON
    object, no key outside ``fields``, whole numbers in ``int_fields`` and finite numbers in ``float_fields``.
    Returns (None, held) when there is no such key; every problem is one ``UserError`` line naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:  # reads the header only
            meta = f.metadata() or {}
            held = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception as e:
        raise UserError(f"{p}: cannot read weights ({type(e).__name__}: {first_line(str(e))})") from None
    if key not in meta:
        return None, held
    where = f"{p}: {key} metadata"
    try:
        raw = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{where} is not valid JSON ({first_line(str(e))})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where} is not a JSON object of {what} config fields")
    unknown = sorted(k for k in raw if k not in fields)
    if unknown:
        hint = f" (expected some of {', '.join(sorted(fields))})" if expected_hint else ""
        raise UserError(f"{where} has unknown keys {unknown[:4]}{hint}")
    for name in int_fields:
        if name in raw:
            config_int(raw, name, where, minimum=0)
    for name in float_fields:
        if name in raw:
            config_number(raw, name, where, positive=False)
    return raw, held
