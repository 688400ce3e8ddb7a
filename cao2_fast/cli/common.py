"""Option types and helpers shared by the command modules."""

from __future__ import annotations

import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None keeps torch's default), rejecting values below 1 in one line."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    import torch

    torch.set_num_threads(threads)


def resolve_device(device: Device | str) -> str:
    import torch

    d = device.value if isinstance(device, Device) else device
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return d


def progress_enabled(no_progress: bool) -> bool:
    """Progress is reported unless --no-progress or CAO2_FAST_NO_PROGRESS is set, and by rank 0 only."""
    if no_progress or os.environ.get("CAO2_FAST_NO_PROGRESS"):
        return False
    return int(os.environ.get("RANK", "0")) == 0


def bars_enabled(no_progress: bool) -> bool:
    """Redrawn bars only where someone watches them: progress on and stderr a terminal (not CI, ``2> log``,
    Slurm, where each redraw would be one more line of the log)."""
    return progress_enabled(no_progress) and sys.stderr.isatty()


def make_progress(no_progress: bool):
    """The distill progress report: False when off; bars on a terminal; otherwise a few plain log lines."""
    if not progress_enabled(no_progress):
        return False
    from ..progress import Bars, LogLines

    return Bars() if sys.stderr.isatty() else LogLines()


DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run: auto picks CUDA when present.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Master seed; each class's randomness depends on (seed, class id) only.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress report (also CAO2_FAST_NO_PROGRESS=1); bars are drawn on a terminal only.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder.")]


class RecipeName(str, Enum):
    official = "official"
    consistent = "consistent"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class EngineName(str, Enum):
    eager = "eager"
    compile = "compile"
    onnx = "onnx"
    trt = "trt"


class Stage2EngineName(str, Enum):
    """Stage 2 differentiates through the DiT: only engines with a backward pass are offered."""

    eager = "eager"
    compile = "compile"


class PresetName(str, Enum):
    digits = "digits"


def check_real_models(model: str | None, classifier: str | None, option: str = "--dit") -> None:
    """Real models need a generator (``option``: --dit or --mar) and a classifier; the VAE may come from a DiT
    that is a diffusers pipeline."""
    missing = [name for name, v in ((option, model), ("--classifier", classifier)) if v is None]
    if missing:
        raise UserError(f"real checkpoints need {option} and --classifier, and --vae unless the DiT is a diffusers "
                        f"pipeline holding its VAE (missing {', '.join(missing)})")


def user_cache_dir() -> Path:
    """``$CAO2_FAST_CACHE``, else ``~/.cache/cao2-fast``: where cao2-fast keeps what is not part of a result."""
    base = os.environ.get("CAO2_FAST_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "cao2-fast"


ENGINE_DIR_DEFAULT = "$CAO2_FAST_CACHE/engines, else ~/.cache/cao2-fast/engines"

EngineOpt = Annotated[EngineName, typer.Option("--engine", help="Stage-1 engine (DiT sampling, VAE decode, classifier): eager PyTorch, torch.compile, ONNX Runtime or TensorRT.")]
Stage2EngineOpt = Annotated[Stage2EngineName | None, typer.Option("--stage2-engine", help="Stage-2 DiT engine (it needs gradients).", show_default="compile on CUDA, eager on CPU")]
EngineDirOpt = Annotated[Path | None, typer.Option("--engine-dir", help=f"Engine cache folder (default: {ENGINE_DIR_DEFAULT}).")]


def parse_counts(name: str, text: str | None) -> int | tuple[int, ...] | None:
    """``10`` -> 10, ``10,20`` -> (10, 20): one early-rejection check, or one per entry."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", p, re.ASCII) for p in parts):
        raise UserError(f"{name} {text!r}: expected a whole number, or several separated by commas (e.g. 10,20)")
    return int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts)
