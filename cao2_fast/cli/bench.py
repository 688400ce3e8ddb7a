"""``cao2-fast bench``: reference (the released code's execution) vs fast, one process, same models and inputs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .common import Device, DeviceOpt, resolve_device, set_threads
from .main import app


class BenchModel(str, Enum):
    digits = "digits"
    tiny = "tiny"
    dit_s = "dit-s-2-256"
    dit_b = "dit-b-2-256"
    dit_l = "dit-l-2-256"
    dit_xl = "dit-xl-2-256"


EXAMPLES = """
Examples:

  cao2-fast bench --preset digits                               # CPU, embedded preset

  cao2-fast bench --preset digits --threads 1 --out /tmp/b      # one core

  cao2-fast bench --model dit-xl-2-256 --random-weights --device cuda
"""


@app.command(epilog=EXAMPLES)
def bench(
    preset: Annotated[str | None, typer.Option(help="Benchmark an embedded preset (digits).")] = None,
    model: Annotated[BenchModel | None, typer.Option(help="Real DiT architecture (needs --random-weights).")] = None,
    random_weights: Annotated[bool, typer.Option(help="Build --model with random weights (timing does not depend on them).")] = False,
    device: DeviceOpt = Device.auto,
    dtype: Annotated[str | None, typer.Option(help="Fast path dtype (default bfloat16 on CUDA, float32 on CPU).")] = None,
    steps1: Annotated[int, typer.Option(help="Sampling steps timed per candidate (normalised to 50).")] = 5,
    steps2: Annotated[int, typer.Option(help="Stage-2 steps timed per latent.")] = 5,
    ref_images: Annotated[int, typer.Option(help="Latents the reference path optimises one at a time.")] = 2,
    batch: Annotated[int | None, typer.Option(help="Fast stage-2 batch (default: largest that fits, halving on OOM).")] = None,
    ops: Annotated[str | None, typer.Option(help="Stage-2 step ops: torch or triton (default: triton on CUDA).")] = None,
    compile_stage2: Annotated[bool, typer.Option("--compile", help="Fast stage 2 on the torch.compile engine (compile time reported apart).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON rows and the chart.")] = Path("bench/results"),
    repeats: Annotated[int, typer.Option(help="Timed runs of each path, alternating reference and fast; the medians are reported.")] = 3,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch, both paths (default: torch's).")] = None,
) -> None:
    """Time stage 1, stage 2 and the projected end-to-end job on the reference and fast paths."""
    import torch

    from ..benchmark import format_table, run_bench, write_results

    if (preset is None) == (model is None):
        raise UserError("choose one of --preset digits or --model dit-xl-2-256 --random-weights")
    if preset is not None and preset != "digits":
        raise UserError(f"unknown preset {preset!r}: digits")
    if model is not None and not random_weights:
        raise UserError("--model builds the architecture only: add --random-weights (or bench a preset)")
    if ops not in (None, "torch", "triton"):
        raise UserError(f"--ops {ops!r}: torch or triton")
    for name, v in (("--steps1", steps1), ("--steps2", steps2), ("--ref-images", ref_images), ("--repeats", repeats)):
        if v < 1:
            raise UserError(f"{name} must be at least 1")
    set_threads(threads)
    dev = resolve_device(device)
    name = preset or model.value
    rows = run_bench(name, dev, dtype, steps1, steps2, ref_images, batch, ops=ops, compile_stage2=compile_stage2,
                     repeats=repeats)
    print(format_table(rows))
    where = "cuda" if dev == "cuda" else f"cpu-{torch.get_num_threads()}t"  # CPU results depend on the thread count
    tag = f"bench_{name}_{where}{'_compile' if compile_stage2 else ''}"
    jpath, ppath = write_results(rows, out, tag)
    print(f"wrote {jpath} and {ppath}")
