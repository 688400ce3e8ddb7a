"""``cao2-fast bench``: the released code's execution (``reference``) against this project's (``fast``), in one
process, on the same models and inputs (SPEC §5).

Timing follows gpt-fast/timm habits: warm-up outside the timed region, device synchronised around it, compile and
build time kept apart. Items are normalised to full-length work: a stage-1 item is one candidate sampled over all
``sample_steps`` guided steps and then decoded and scored (stage 1 is timed over ``steps1`` steps and only its
sampling time is scaled to 50; its decodes and classifier calls are timed apart and counted once); a stage-2 item is
one latent-step (forward + backward to the input + Adam). FLOP counts use the DiT only (SPEC §5): 2·F per guided
candidate-step, 2·F per latent-step (forward + backward to the input; the reference's extra weight-gradient work is
not counted as useful).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import reference, stage1, stage2
from .config import RECIPES, early_check_list
from .numerics import tf32
from .diffusion import Diffusion
from .models.dit import RELEASED_KERNELS, DiTConfig, fast_kernels, random_dit

PEAK_TFLOPS = {"H100": 798.0, "H200": 790.0}  # bf16 dense matmul measured on these machines (SPEC §5)
IMAGENET_IPC10 = {"candidates": 40_000, "latents": 10_000}
RELEASED_TF32 = RECIPES["official"].tf32  # the reference path runs as `--recipe official` does (SPEC §2, §5)


@dataclass
class Setup:
    name: str
    dit: torch.nn.Module
    vae: torch.nn.Module
    classifier: torch.nn.Module
    classes_per_batch: int  # reference batch is one class: K·IPC candidates
    k: int
    ipc: int
    guidance_scale: float = 2.7


def oversampling(model: str) -> tuple[int, int]:
    """(K, IPC) that :func:`build_setup` gives ``model``: digits and tiny at K 2, the DiT architectures at ImageNet's
    K 4; IPC 10 (tiny: 2)."""
    return {"digits": (2, 10), "tiny": (2, 2)}.get(model, (4, 10))


def build_setup(model: str, device: str) -> Setup:
    """``digits``: the embedded preset. ``dit-{s,b,l,xl}-2-256``: the real architecture with random weights, with
    the sd-vae-ft-mse VAE and timm ResNet-18 at their real sizes (random weights too)."""
    from .models.random import random_classifier, random_vae

    if model == "digits":
        from .pipeline import Distiller

        d = Distiller.from_preset("digits", ipc=10)
        return Setup("digits", d.dit, d.vae, d.classifier, 2, *oversampling(model),
                     guidance_scale=d.config.guidance_scale)
    if model == "tiny":  # a few-second smoke run of every code path
        dit = random_dit(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10), seed=0)
        clf = random_classifier("test_resnet", 10, 32)
        return Setup("tiny", dit, random_vae(tiny=True), clf, 2, *oversampling(model))
    size = model.lower().replace("dit-", "").split("-")[0].upper()
    cfg = DiTConfig.named(f"DiT-{size}/2", input_size=32)
    dit = random_dit(cfg, seed=0)
    vae = random_vae(tiny=False)
    clf = random_classifier("resnet18", 1000, 224)
    return Setup(model, dit, vae, clf, 6, *oversampling(model))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Seconds spent inside ``with clock:`` blocks, the device synchronised at both ends."""

    def __init__(self, device):
        self.device, self.total = device, 0.0

    def __enter__(self):
        _sync(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        _sync(self.device)
        self.total += time.perf_counter() - self.t0


def _timed(fn, device) -> float:
    """Wall time of one run of ``fn``, synchronising the device before and after."""
    clock = _Clock(device)
    with clock:
        fn()
    return clock.total


def _timed_pair(ref, fast, device, repeats: int) -> tuple[float, float]:
    """Median wall times of ``ref`` and ``fast``, timed alternately (ref, fast, ref, fast, ...): a shared machine
    that slows down or speeds up during the measurement moves both paths alike, not their ratio."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((ref, fast), times):
            out.append(_timed(fn, device))
    return statistics.median(times[0]), statistics.median(times[1])


def _timed_scaled(fns, device, repeats: int, scale: float) -> tuple[list[float], list[float]]:
    """Each of ``fns`` (called with a :class:`_Clock`) run in turn ``repeats`` times; per run, the time outside the
    clock is multiplied by ``scale`` and the time inside it kept. Returns the medians of those totals and, for each
    fn, the median time inside its clock."""
    totals, inside = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for fn, tot, ins in zip(fns, totals, inside):
            clock = _Clock(device)
            wall = _timed(lambda: fn(clock), device)
            tot.append((wall - clock.total) * scale + clock.total)
            ins.append(clock.total)
    return [statistics.median(t) for t in totals], [statistics.median(t) for t in inside]


def _peak_of(fn, device) -> float:
    """Peak device memory of one more run of ``fn`` (CUDA); on CPU the process's peak RSS so far."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
    return _peak_memory(device)


def _peak_memory(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _peak_tflops(device) -> tuple[float | None, str]:
    """The hardware peak to divide by: SPEC §5's measured bf16 rate on H100/H200; on CPU an fp32 matmul measured
    now (so the CPU 'MFU' is relative to what this machine's BLAS reaches)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v, f"SPEC §5 bf16 matmul on {key}"
        return None, "unknown GPU"
    a = torch.randn(1024, 1024)
    a @ a
    dt = min(_timed(lambda: a @ a, "cpu") for _ in range(20))  # a peak is the best run, not a typical one
    return 2 * 1024**3 / dt / 1e12, f"fp32 1024³ matmul measured on this CPU, best of 20, {torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_bench(model: str = "digits", device: str = "cpu", fast_dtype: str | None = None, steps1: int = 5,
              steps2: int = 5, ref_images: int = 2, fast_batch: int | None = None, classes: int | None = None,
              ops: str | None = None, cuda_graph: bool | None = None, compile_stage2: bool = False,
              repeats: int = 3, early_step=None, early_keep=None, log=print) -> list[dict]:
    """Measure both paths for stage 1 and stage 2 and derive end to end. Returns JSON-ready rows. ``log`` gets a
    line as each phase begins and ends (and the notes of a halved batch).

    ``early_step``/``early_keep``: early rejection as in :class:`cao2_fast.config.DistillConfig` (check after
    ``early_step`` of 50 steps, keep ``early_keep`` candidates per class; tuples for several checks). Stage 1 and
    the job then get a third path, ``fast+early``: the fast stage 1 that stops sampling all but the kept
    candidates at each check (their x̂0 decoded, scored and ranked by the released rule, most confident correct
    first), timed in the same alternation. ``steps1`` is raised, where needed, to the least count that puts every
    check on a whole step of the shortened schedule."""
    k, ipc = oversampling(model)
    early = early_check_list(early_step, early_keep, 50, ipc, k * ipc)  # [] when off; bad values: UserError
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    if not on_cuda:  # both paths run under it: freed activations are reused instead of faulted in again
        from .cpu import keep_freed_memory

        keep_freed_memory()
    fast_dtype = fast_dtype or ("bfloat16" if on_cuda else "float32")
    fdt = getattr(torch, fast_dtype)
    log(f"building the {model} models on {device}")
    s = build_setup(model, device)
    cfg = s.dit.cfg
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    flop_fwd = cfg.flops_per_forward()
    peak, peak_source = _peak_tflops(device)
    n_cand = s.k * s.ipc
    classes = classes or s.classes_per_batch
    if early:  # the shortened schedule must land on every check: step·steps1/50 whole
        need = math.lcm(steps1, *(50 // math.gcd(50, step) for step, _ in early))
        if need != steps1:
            log(f"stage 1: timing {need} steps instead of {steps1}, so that the checks fall on whole steps")
        steps1 = need
    g = torch.Generator().manual_seed(0)
    ref_dit = s.dit.to(dev, torch.float32).set_kernels(RELEASED_KERNELS)  # torch's GELU and SDPA, as released
    s.vae.to(dev, torch.float32)
    s.classifier.to(dev, torch.float32)
    diffusion_short = Diffusion.create(respacing=steps1)  # timing only: a step costs the same at any respacing
    base = {"device": _device_name(device), "model": model, "torch": torch.__version__,
            "triton": _version("triton"), "commit": _commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "peak_tflops": peak, "peak_source": peak_source, "repeats": repeats}
    rows = []

    # -- stage 1 -------------------------------------------------------------------------------------------------
    noises = [stage1.Stage1Noise.draw(n_cand, latent, steps1, g) for _ in range(classes)]

    # Each stage-1 path runs its decodes and classifier calls inside ``clock``: only the sampling part of its time is
    # scaled from steps1 to 50 steps (a candidate is decoded and scored once, however many steps it was sampled for).
    def ref_stage1(clock):
        with tf32(RELEASED_TF32, dev):  # the released scripts: fp32 weights, TF32 matmuls and convolutions
            for c, nz in enumerate(noises):
                z = reference.stage1_class(ref_dit, diffusion_short, nz.initial, nz.steps, c, cfg.num_classes,
                                           s.guidance_scale, 3, dev)
                with torch.no_grad(), clock:
                    s.classifier(s.vae.decode(z))

    fast_dit = _copy_model(s.dit, dev, fdt).set_kernels(fast_kernels(dev))
    vae_f = _copy_model(s.vae, dev, fdt)
    clf_f = _copy_model(s.classifier, dev, fdt)
    allnoise = stage1.Stage1Noise.cat(noises)
    labels = torch.tensor([c for c in range(classes) for _ in range(n_cand)])

    def fast_stage1(clock):
        with torch.no_grad():
            z = stage1.generate(lambda x, t, y: fast_dit(x, t, y), diffusion_short, allnoise, labels, cfg.num_classes,
                                s.guidance_scale, 3, dev, fdt, batch=len(labels))
            with clock:
                stage1.decode_and_score(vae_f.decode, clf_f, z, dev, fdt, batch=min(64, len(labels)))

    checks_short = [(step * steps1 // 50, keep) for step, keep in early]

    def early_stage1(clock):
        def score(x0):
            with clock:
                _, probs = stage1.decode_and_score(vae_f.decode, clf_f, x0, dev, fdt, batch=min(64, len(x0)))
            return probs, probs.isfinite().all(1)

        def rank(j, idx, probs, finite):  # class j is label j here
            return stage1.early_rank(probs, j, "confident", "desc", valid=finite)

        with torch.no_grad():
            z, _, _ = stage1.generate_early(lambda x, t, y: fast_dit(x, t, y), diffusion_short, allnoise, labels,
                                            n_cand, cfg.num_classes, s.guidance_scale, 3, dev, fdt, len(labels),
                                            checks_short, score, rank)
            with clock:
                stage1.decode_and_score(vae_f.decode, clf_f, z, dev, fdt, batch=min(64, len(z)))

    paths1 = [ref_stage1, fast_stage1] + ([early_stage1] if early else [])
    log(f"stage 1: warm-up, then {repeats} timed runs of each path ({classes * n_cand} candidates, {steps1} steps"
        + (f"; fast+early checks {', '.join(f'keep {m} after {st}/50' for st, m in early)}" if early else "") + ")")
    for fn in paths1:  # warm-ups
        fn(_Clock(dev))
    full = 50 / steps1  # normalise to 50 sampling steps per candidate
    times1, decode1 = _timed_scaled(paths1, device, repeats, full)
    mems1 = [_peak_of(lambda: fn(_Clock(dev)), device) for fn in paths1]
    n1 = classes * n_cand
    flop1 = 50 * 2 * flop_fwd  # per candidate (guided: 2 forwards per step)
    # fast+early: the DiT forwards it runs per candidate it starts, every step guided as in flop1
    flop1_early = stage1.dit_forwards(n_cand, 50, early, 2.0) * flop_fwd / n_cand if early else None
    for path, t, dec, mem, dt_name, batch, flop in zip(
            ("reference", "fast", "fast+early"), times1, decode1, mems1, ("float32", fast_dtype, fast_dtype),
            (2 * n_cand, 2 * n1, 2 * n1), (flop1, flop1, flop1_early)):
        per_item = t / n1
        rows.append(dict(base, stage="1", path=path, dtype=dt_name, batch=batch, unit="candidates/s",
                         throughput=1 / per_item, seconds_per_item=per_item, flop_per_item=flop,
                         decode_score_share=dec / t,
                         tflops=flop / per_item / 1e12, peak_mem_gib=round(mem, 3), steps_timed=steps1,
                         **({"early_reject": [list(c) for c in early]} if path == "fast+early" else {})))

    log("stage 1: " + ", ".join(f"{r['path']} {r['throughput']:.2f}" for r in rows) + " candidates/s ("
        + ", ".join(f"{rows[0]['seconds_per_item'] / r['seconds_per_item']:.2f}x" for r in rows[1:]) + ")")

    # -- stage 2 -------------------------------------------------------------------------------------------------
    log(f"stage 2: warm-up{' and compilation' if compile_stage2 else ''}, then {repeats} timed runs of each path")
    diffusion = Diffusion.create(respacing=50)
    x0 = torch.randn(ref_images, *latent, generator=g)
    nz2 = stage2.Stage2Noise.draw(ref_images, latent, steps2, 11, g, 0.0)
    y_null = torch.full((ref_images,), cfg.num_classes)

    def run_ref2():
        with tf32(RELEASED_TF32, dev):
            return reference.stage2(ref_dit, diffusion, x0, y_null, nz2, steps2, 6e-4, 10.0, "official", False, dev,
                                    weight_grads=True)

    run_ref2()  # warm-up
    dit2, compile_s = fast_dit, None
    if compile_stage2:  # the compiled stage-2 engine; its compile time is measured on the warm-up and kept apart
        from .engines import stage2_engine

        dit2 = stage2_engine("compile", fast_dit, dev, fast_dtype)
    batch2, run_fast2, warm_s = _fast_stage2(dit2, diffusion, latent, steps2, fast_batch, dev, fdt, g, cfg, ops,
                                             on_cuda if cuda_graph is None else cuda_graph, log)
    if compile_stage2:
        compile_s = warm_s
    t_ref2, t_fast2 = _timed_pair(run_ref2, run_fast2, device, repeats)
    mem_ref2, mem_fast2 = _peak_of(run_ref2, device), _peak_of(run_fast2, device)
    flop2 = 2 * flop_fwd
    for path, t, n, mem, dt_name, batch in (("reference", t_ref2, ref_images * steps2, mem_ref2, "float32", 1),
                                            ("fast", t_fast2, batch2 * steps2, mem_fast2, fast_dtype, batch2)):
        per_item = t / n
        rows.append(dict(base, stage="2", path=path, dtype=dt_name, batch=batch, unit="latent-steps/s",
                         throughput=1 / per_item, seconds_per_item=per_item, flop_per_item=flop2,
                         tflops=flop2 / per_item / 1e12, peak_mem_gib=round(mem, 3),
                         engine="compile" if path == "fast" and compile_stage2 else "eager",
                         compile_s=compile_s if path == "fast" else None))

    r2ref, r2fast = rows[-2:]
    log(f"stage 2: reference {r2ref['throughput']:.1f}, fast {r2fast['throughput']:.1f} latent-steps/s "
        f"({r2ref['seconds_per_item'] / r2fast['seconds_per_item']:.2f}x, fast batch {batch2})")

    # -- end to end (projected from the two stages) ----------------------------------------------------------------
    job = IMAGENET_IPC10 if model.startswith("dit-") else {"candidates": 10 * 20, "latents": 10 * 10}
    for path in ("reference", "fast") + (("fast+early",) if early else ()):
        r1 = next(r for r in rows if r["stage"] == "1" and r["path"] == path)
        r2 = next(r for r in rows if r["stage"] == "2" and r["path"] == path.split("+")[0])  # stage 2 as fast
        seconds = job["candidates"] * r1["seconds_per_item"] + job["latents"] * 100 * r2["seconds_per_item"]
        flop = job["candidates"] * r1["flop_per_item"] + job["latents"] * 100 * flop2
        rows.append(dict(base, stage="e2e", path=path, dtype=r2["dtype"], batch=r2["batch"], unit="jobs/h",
                         throughput=3600 / seconds, seconds_per_item=seconds, flop_per_item=flop,
                         tflops=flop / seconds / 1e12, peak_mem_gib=max(r1["peak_mem_gib"], r2["peak_mem_gib"]),
                         job=job, projected_minutes=seconds / 60, **({"early_reject": r1["early_reject"]}
                                                                      if "early_reject" in r1 else {}),
                         floor_minutes=(flop / (peak * 1e12) / 60) if peak else None))
    for r in rows:
        r["mfu"] = r["tflops"] / peak if peak else None
        ref = next(x for x in rows if x["stage"] == r["stage"] and x["path"] == "reference")
        r["ratio"] = ref["seconds_per_item"] / r["seconds_per_item"]  # fast / reference speed
    return rows


def _fast_stage2(dit, diffusion, latent, steps, batch, dev, dtype, g, cfg, ops, cuda_graph, log):
    """The batched stage 2 at the largest batch that runs: ``batch=None`` starts at 256 (CUDA) or 64 (CPU) and
    halves on out-of-memory. Returns (batch, the warmed-up run, seconds of the warm-up run)."""

    def attempt(b: int):
        x0 = torch.randn(b, *latent, generator=g)
        nz = stage2.Stage2Noise.draw(b, latent, steps, 11, g, 0.0)
        y = torch.full((b,), cfg.num_classes)

        def run():
            stage2.optimize(lambda *a: dit(*a), diffusion, x0, y, nz, steps, 6e-4, 10.0, "official", False, dev,
                            dtype, ops=ops, cuda_graph=cuda_graph)

        return run, _timed(run, dev)  # the warm-up includes any compilation

    b, (run, warm) = stage2.halve_on_oom(attempt, batch or (256 if dev.type == "cuda" else 64), log)
    return b, run, warm


def _copy_model(m, dev, dtype):
    import copy

    return copy.deepcopy(m).to(dev, dtype)


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def write_results(rows: list[dict], out_dir: Path, tag: str) -> tuple[Path, Path]:
    """JSON rows + their chart (:func:`plot_results`). Files are replaced atomically."""
    from .fileio import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / f"{tag}.json"
    atomic_write(jpath, json.dumps(rows, indent=1).encode())
    ppath = out_dir / f"{tag}.png"
    plot_results(rows, ppath)
    return jpath, ppath


STAGE_AXES = {  # what each stage's panel shows: the row field, its label, and a reader's name for the stage
    "1": ("throughput", "candidates/s", "stage 1: sample + select"),
    "2": ("throughput", "latent-steps/s", "stage 2: optimise latents"),
    "e2e": ("projected_minutes", "minutes (lower is better)", "whole job, projected"),
}


def plot_results(rows: list[dict], path: Path) -> None:
    """The chart of one bench run: per stage, the absolute throughput of the reference and fast paths (and
    fast+early where timed; the end-to-end panel: the projected job time), and beside them the fast/reference
    speed ratios. The title names
    the model, device, dtype and the fast stage-2 engine (eager or torch.compile). Reads rows as written to JSON,
    so a chart can be redrawn from a results file: ``plot_results(json.load(open(f)), Path("x.png"))``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import save_figure

    by = {(r["stage"], r["path"]): r for r in rows}
    stages = [s for s in STAGE_AXES if (s, "reference") in by and (s, "fast") in by]
    colors = {"reference": "#999999", "fast": "#2a7f62", "fast+early": "#d08a2e"}
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(3.0 * (len(stages) + 1), 3.4), layout="constrained")
    for ax, stage in zip(axes, stages):
        field, unit, name = STAGE_AXES[stage]
        job = by[stage, "fast"].get("job")
        if stage == "e2e" and job:
            name += f"\n({job['candidates']:,} candidates, {job['latents']:,} latents)"
        paths = [p for p in colors if (stage, p) in by]
        vals = [by[stage, p][field] for p in paths]
        bars = ax.bar([p.replace("+", "\n+") for p in paths], vals, color=[colors[p] for p in paths])
        ax.bar_label(bars, labels=[_short(v) for v in vals], padding=2, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.margins(y=0.18)  # room for the value labels above the bars
        ax.tick_params(labelsize=8)
    ax = axes[-1]
    pairs = [(s, p) for s in stages for p in ("fast", "fast+early") if (s, p) in by]
    ratios = [by[k]["ratio"] for k in pairs]
    names = [(f"stage {s}" if s != "e2e" else "job") + ("\n+early" if p == "fast+early" else "") for s, p in pairs]
    bars = ax.bar(names, ratios, color=[colors[p] for _, p in pairs])
    ax.bar_label(bars, labels=[f"{r:.1f}×" for r in ratios], padding=2, fontsize=8)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_title("speed-up of fast over reference", fontsize=9)
    ax.set_ylabel("fast / reference speed", fontsize=8)
    ax.margins(y=0.18)
    ax.tick_params(labelsize=8)
    fast2 = by.get(("2", "fast"), {})
    engine = "torch.compile" if fast2.get("engine") == "compile" else "eager"
    r0 = rows[0]
    early = by.get(("1", "fast+early"), {}).get("early_reject")
    early = ("; early: " + ", ".join(f"keep {m} after {st}/50" for st, m in early)) if early else ""
    fig.suptitle(f"cao2-fast bench: {r0['model']} on {r0['device']}; fast path {fast2.get('dtype', '?')}, "
                 f"stage 2 {engine}{early}; medians of {r0.get('repeats', '?')} runs", fontsize=9)
    save_figure(fig, path, dpi=120)


def _short(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def format_table(rows: list[dict]) -> str:
    lines = [f"{'stage':>5} {'path':>10} {'dtype':>8} {'batch':>5} {'throughput':>26} {'TFLOP/s':>9} {'MFU':>7} "
             f"{'mem GiB':>8} {'ratio':>7}"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"{r['stage']:>5} {r['path']:>10} {r['dtype']:>8} {r['batch']:>5} "
                     f"{r['throughput']:>10.3f} {r['unit']:<15} {r['tflops']:>9.4f} {mfu:>7} "
                     f"{r['peak_mem_gib']:>8.2f} {r['ratio']:>6.2f}×")
    for r in rows:
        if r["stage"] == "e2e":
            floor = f", floor {r['floor_minutes']:.1f} min at peak" if r["floor_minutes"] else ""
            what = "ImageNet-1K IPC10" if r["job"] == IMAGENET_IPC10 else f"{r['model']} IPC10 (10 classes)"
            lines.append(f"projected {what} ({r['job']['candidates']} candidates, {r['job']['latents']} latents), "
                         f"{r['path']}: {r['projected_minutes']:.2f} min{floor}")
    return "\n".join(lines)

