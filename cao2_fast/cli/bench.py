"""``cao2-fast bench``: reference (the released code's execution) vs fast, one process, same models and inputs."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .common import Device, DType, PresetName, parse_counts, resolve_device, set_threads, user_cache_dir
from .main import app


class BenchModel(str, Enum):
    digits = "digits"
    tiny = "tiny"
    dit_s = "dit-s-2-256"
    dit_b = "dit-b-2-256"
    dit_l = "dit-l-2-256"
    dit_xl = "dit-xl-2-256"


class Ops(str, Enum):
    torch = "torch"
    triton = "triton"


class BenchBackbone(str, Enum):
    dit = "dit"
    mar = "mar"


OUT_DEFAULT = "$CAO2_FAST_CACHE/bench, else ~/.cache/cao2-fast/bench"

EXAMPLES = """
Examples:

  cao2-fast bench --preset digits                  # CPU, embedded preset

  cao2-fast bench --preset digits --threads 1 --out /tmp/b     # one core

  cao2-fast bench --preset digits --early-reject 10 --early-keep 10

  cao2-fast bench --model dit-xl-2-256 --random-weights --device cuda

  cao2-fast bench --backbone mar                   # MAR, digits-mar preset
"""

WHAT, HOW = "What to time", "How to time it"


@app.command(epilog=EXAMPLES)
def bench(
    backbone: Annotated[BenchBackbone, typer.Option(help="Generator family to time: dit, or mar (the embedded digits-mar preset, its released execution against the batched one).", rich_help_panel=WHAT)] = BenchBackbone.dit,
    preset: Annotated[PresetName | None, typer.Option(help="Benchmark an embedded preset.", rich_help_panel=WHAT)] = None,
    model: Annotated[BenchModel | None, typer.Option(metavar="NAME", help="Real DiT architecture with random weights (needs --random-weights): dit-s-2-256, dit-b-2-256, dit-l-2-256, dit-xl-2-256; tiny: a seconds-long smoke run.", rich_help_panel=WHAT)] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build --model with random weights (timing does not depend on them).", rich_help_panel=WHAT)] = False,
    device: Annotated[Device, typer.Option("--device", help="Where to run: auto picks CUDA when present.", rich_help_panel=WHAT)] = Device.auto,
    dtype: Annotated[DType | None, typer.Option(metavar="DTYPE", help="Fast path dtype: float32, bfloat16 or float16.", show_default="bfloat16 on CUDA, float32 on CPU; MAR: float32, the recipe's", rich_help_panel=WHAT)] = None,
    ops: Annotated[Ops | None, typer.Option(help="Stage-2 step ops.", show_default="triton on CUDA, torch on CPU", rich_help_panel=WHAT)] = None,
    compile_stage2: Annotated[bool, typer.Option("--compile", help="Fast stage 2 on the torch.compile engine, and a stage-1 path fast-compile (the DiT on it; compile times reported apart); MAR: an extra stage-2 path, fast-compile.", rich_help_panel=WHAT)] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch, both paths.", show_default="torch's", rich_help_panel=WHAT)] = None,
    steps1: Annotated[int | None, typer.Option(help="Sampling steps timed per candidate (normalised to 50); MAR: sampling iterations timed (normalised to the preset's by the cost model).", show_default="5; MAR: the preset's 16", rich_help_panel=HOW)] = None,
    steps2: Annotated[int, typer.Option(help="Stage-2 steps timed per latent.", rich_help_panel=HOW)] = 5,
    ref_images: Annotated[int, typer.Option(help="Latents the reference path optimises one at a time.", rich_help_panel=HOW)] = 2,
    batch: Annotated[int | None, typer.Option(help="Fast stage-2 batch.", show_default="largest that fits, halving on OOM", rich_help_panel=HOW)] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed runs of each path, alternating reference and fast; the medians are reported.", show_default="7 on CPU, where a shared machine's load moves short runs; 3 on CUDA, for the grid and for MAR", rich_help_panel=HOW)] = None,
    out: Annotated[Path | None, typer.Option(help=f"Folder for the JSON rows and the chart (default: {OUT_DEFAULT}).", rich_help_panel=HOW)] = None,
    early_reject: Annotated[str | None, typer.Option("--early-reject", metavar="STEP", help="Also time stage 1 with early rejection (path fast+early): after STEP of 50 sampling steps only the best --early-keep candidates per class finish; 'S1,S2' checks twice.", show_default="off", rich_help_panel=WHAT)] = None,
    early_keep: Annotated[str | None, typer.Option("--early-keep", metavar="M", help="Candidates per class that survive each --early-reject check (IPC..K·IPC).", rich_help_panel=WHAT)] = None,
    early_reject_grid: Annotated[bool, typer.Option("--early-reject-grid", help="Instead: stage 1 with early rejection (a grid of check step and survivors) and with guidance intervals against the exact stage 1, at K 2 and 4, guidance 2.7 and 1.0: FLOPs saved, pick agreement, wall-time ratio (--repeats timed runs each), and the ImageNet-1K projection. Needs --preset.", rich_help_panel=WHAT)] = False,
    sampler: Annotated[str | None, typer.Option("--sampler", metavar="NAME", help="Also time stage 1 on a few-step sampler (path fast+NAME): ddim or dpmpp over --sample-steps steps, with its job projected to ImageNet-1K IPC 10 on one H100.", show_default="off", rich_help_panel=WHAT)] = None,
    sample_steps: Annotated[int | None, typer.Option("--sample-steps", metavar="N", help="Steps of --sampler.", rich_help_panel=WHAT)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result rows as JSON on stdout (the table goes to stderr).", rich_help_panel=HOW)] = False,
) -> None:
    """Time stage 1, stage 2 and the projected end-to-end job on the reference and fast paths: medians of the timed
    runs with their min–max range (and IQR from 4 runs), the projected job marked as such, and a warning when the
    machine is busy. With --backbone mar: the MAR stages on the digits-mar preset, with attribution paths."""
    if (sampler is not None or sample_steps is not None) and (backbone == BenchBackbone.mar or early_reject_grid):
        raise UserError("--sampler/--sample-steps time the DiT's stage 1: drop them with "
                        + ("--backbone mar" if backbone == BenchBackbone.mar else "--early-reject-grid"))
    if backbone == BenchBackbone.mar:
        _bench_mar(preset, model, random_weights, device, dtype, ops, compile_stage2, threads, steps1, steps2,
                   ref_images, batch, repeats, out, early_reject, early_keep, early_reject_grid, as_json)
        return
    if steps1 is None:
        steps1 = 5
    if (preset is None) == (model is None):
        raise UserError("choose one of --preset digits or --model dit-xl-2-256 --random-weights")
    if model is not None and not random_weights:
        raise UserError("--model builds the architecture only: add --random-weights (or bench a preset)")
    for name, v in (("--steps1", steps1), ("--steps2", steps2), ("--ref-images", ref_images), ("--repeats", repeats),
                    ("--batch", batch)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be at least 1 (got {v})")
    early_step, early_keep_ = parse_counts("--early-reject", early_reject), parse_counts("--early-keep", early_keep)
    if early_reject_grid and (early_step, early_keep_) != (None, None):
        raise UserError("--early-reject-grid runs its own grid of checks: drop --early-reject/--early-keep")
    from ..benchmark import check_sampler

    few = check_sampler(sampler, sample_steps)  # before any model is built
    from ..extras import require

    require("matplotlib", what="the bench's chart")  # before minutes of timing, not after them
    import torch

    from ..benchmark import check_destination, format_table, run_bench, write_results

    set_threads(threads)
    dev = resolve_device(device)
    if repeats is None:  # the grid times many settings: it keeps 3
        repeats = 3 if dev == "cuda" or early_reject_grid else 7
    name = preset.value if preset else model.value
    log, warn = _loggers()
    out_dir = out if out is not None else user_cache_dir() / "bench"
    if early_reject_grid:
        if preset is None:
            raise UserError("--early-reject-grid runs on a preset's real models: add --preset digits")
        from ..bench_early import format_rows, run_and_write

        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir}: is a file, not a folder; pass --out with a folder for the bench results")
        rows, jpath, ppath = run_and_write(name, out_dir, repeats, dev, log, warn=warn)
        _report(format_rows(rows), rows, f"{jpath} and {ppath}", as_json)
        return

    where = "cuda" if dev == "cuda" else f"cpu-{torch.get_num_threads()}t"  # CPU results depend on the thread count
    tag = f"bench_{name}_{where}{'_compile' if compile_stage2 else ''}{f'_{few[0]}{few[1]}' if few else ''}"
    check_destination(out_dir, tag)  # before the run: a refused destination costs no bench time
    rows = run_bench(name, dev, dtype.value if dtype else None, steps1, steps2, ref_images, batch,
                     ops=ops.value if ops else None, compile_stage2=compile_stage2, compile_stage1=compile_stage2,
                     repeats=repeats,
                     early_step=early_step, early_keep=early_keep_, sampler=sampler, sample_steps=sample_steps,
                     log=log, warn=warn)
    jpath, ppath = write_results(rows, out_dir, tag)
    _report(format_table(rows), rows, f"{jpath} and {ppath}", as_json)


def _bench_mar(preset, model, random_weights, device, dtype, ops, compile_stage2, threads, steps1, steps2,
               ref_images, batch, repeats, out, early_reject, early_keep, early_reject_grid, as_json) -> None:
    """``bench --backbone mar``: refuse the DiT-only options in one line, then time the MAR paths
    (:mod:`cao2_fast.bench_mar`) and write ``bench_digits-mar_<device>.json`` and its chart."""
    from ..bench_mar import refuse_options

    refuse_options(model=model.value if model else None, random_weights=random_weights,
                   preset=preset.value if preset else None, early_reject=early_reject, early_keep=early_keep,
                   early_reject_grid=early_reject_grid, ops=ops.value if ops else None)
    for name, v in (("--steps2", steps2), ("--ref-images", ref_images), ("--repeats", repeats), ("--batch", batch)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be at least 1 (got {v})")
    if steps1 is not None and steps1 < 2:
        raise UserError(f"--steps1 must be at least 2 for MAR (got {steps1}): stability compares the last two "
                        "sampling iterations")
    from ..extras import require

    require("matplotlib", what="the bench's chart")  # before minutes of timing, not after them
    from ..bench_mar import format_mar_table, run_and_write

    set_threads(threads)
    dev = resolve_device(device)
    log, warn = _loggers()
    out_dir = out if out is not None else user_cache_dir() / "bench"
    rows, jpath, ppath = run_and_write(out_dir, dev, log=log, warn=warn, fast_dtype=dtype.value if dtype else None,
                                       steps1=steps1, steps2=steps2, ref_images=ref_images, fast_batch=batch,
                                       repeats=repeats or 3, compile_stage2=compile_stage2)
    _report(format_mar_table(rows), rows, f"{jpath} and {ppath}", as_json)


def _loggers():
    """(log, warn) for a bench run: progress lines on stderr stamped with the seconds since now, and warnings."""
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {message}", file=sys.stderr, flush=True)

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    return log, warn


def _report(table: str, rows: list[dict], written: str, as_json: bool) -> None:
    """The table on stdout, or with --json the rows as JSON on stdout and the table on stderr."""
    if as_json:
        from ..fileio import json_bytes

        print(table, file=sys.stderr)
        print(f"wrote {written}", file=sys.stderr)
        print(json_bytes(rows, indent=1).decode())
    else:
        print(table)
        print(f"wrote {written}")
