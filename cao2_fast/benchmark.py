"""``cao2-fast bench``: the released code's execution (``reference``) against this project's (``fast``), in one
process, on the same models and inputs (docs/method.md, cost model).

Timing follows gpt-fast/timm habits: warm-up outside the timed region, device synchronised around it, compile and build
time kept apart. Items are normalised to full-length work: a stage-1 item is one candidate sampled over all
``sample_steps`` guided steps and then decoded and scored (stage 1 is timed over ``steps1`` steps and only its sampling
time is scaled to 50; its decodes and classifier calls are timed apart and counted once); a stage-2 item is one
latent-step (forward + backward to the input + Adam). FLOP counts use the DiT only (docs/method.md, cost model): 2·F per
guided candidate-step, 2·F per latent-step (forward + backward to the input; the reference's extra weight-gradient work
is not counted as useful).

Every measured figure is the median over ``repeats`` timed runs of its path, and each row carries the spread of
those runs (``spread``: min, max and, from 4 runs on, the quartiles q1 and q3 of the per-run values); a ratio's
spread is that of the per-round ratios (each round times every path once, back to back). Rows of the ``e2e`` stage
are *projected*, not measured: the job's item counts times the stage rows' per-item times (``"projected": true``;
they carry no batch, MFU or memory). CPU memory is the growth of the resident set during one more run of the path
(its peak, reset before the run, less the resident set just before it), not the process's lifetime peak. The
machine's load average is recorded before and after the bench, with a warning when other work held cores the
bench needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import json
import math
import os
import resource
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import reference, selection, stage1, stage2
from .config import RECIPES, early_check_list
from .errors import UserError
from .numerics import tf32
from .diffusion import Diffusion
from .generators.dit import RELEASED_KERNELS, DiTConfig, DiTGenerator, dit_spec, fast_kernels
from .schedulers import SchedulerSampler

# bf16 dense matmul measured on these machines (docs/method.md, cost model)
PEAK_TFLOPS = {"H100": 798.0, "H200": 790.0}
IMAGENET_IPC10 = {"candidates": 40_000, "latents": 10_000}
# the reference path runs as `--recipe official` does (docs/method.md: recipes, cost model)
RELEASED_TF32 = RECIPES["official"].tf32


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
    from .models.random import random_classifier

    if model == "digits":
        from .pipeline import Distiller

        d = Distiller.from_preset("digits", ipc=10)
        return Setup("digits", d.generator.dit, d.generator.vae, d.classifier, 2, *oversampling(model),
                     guidance_scale=d.config.guidance_scale)
    if model == "tiny":  # a few-second smoke run of every code path
        gen = DiTGenerator.random(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10))
        clf = random_classifier("test_resnet", 10, 32)
        return Setup("tiny", gen.dit, gen.vae, clf, 2, *oversampling(model))
    size = model.lower().replace("dit-", "").split("-")[0].upper()
    gen = DiTGenerator.random(DiTConfig.named(f"DiT-{size}/2", input_size=32), tiny_vae=False)
    clf = random_classifier("resnet18", 1000, 224)
    return Setup(model, gen.dit, gen.vae, clf, 6, *oversampling(model))


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


def _timed_pair(ref, fast, device, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of ``repeats`` runs of ``ref`` and of ``fast``, timed alternately (ref, fast, ref, fast, ...): a
    shared machine that slows down or speeds up during the measurement moves both paths alike, not their ratio.
    Run i of one list and run i of the other form round i."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((ref, fast), times):
            out.append(_timed(fn, device))
    return times


def _timed_scaled(fns, device, repeats: int, scale: float) -> tuple[list[list[float]], list[list[float]]]:
    """Each of ``fns`` (called with a :class:`_Clock`) run in turn ``repeats`` times; per run, the time outside the
    clock is multiplied by ``scale`` and the time inside it kept. Returns, per fn, those totals run by run and the
    times inside its clock run by run."""
    totals, inside = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for fn, tot, ins in zip(fns, totals, inside):
            clock = _Clock(device)
            wall = _timed(lambda: fn(clock), device)
            tot.append((wall - clock.total) * scale + clock.total)
            ins.append(clock.total)
    return totals, inside


def spread(values) -> dict:
    """The spread of per-run figures: ``min``, ``max``, the quartiles ``q1`` and ``q3`` (inclusive method; None
    below 4 runs, where quartiles say nothing the extremes do not) and ``n``."""
    v = sorted(values)
    q1 = q3 = None
    if len(v) >= 4:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return {"min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v)}


def _peak_of(fn, device) -> tuple[float, str]:
    """(GiB, how it was measured) for one more run of ``fn``: on CUDA the peak memory allocated during it (models
    included); on CPU the growth of the resident set during it (:func:`rss_growth`)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30, "peak CUDA memory allocated during one run (models included)"
    return rss_growth(fn)


def _status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> None:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``; elsewhere nothing), so that the
    resident set measured next is live memory, not blocks an earlier path freed and the allocator kept."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler:
    """The largest resident set seen by a thread that reads /proc/self/statm every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak_kib = interval, 0
        self._stop = threading.Event()
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // 1024

    def _read(self) -> None:
        try:
            with open("/proc/self/statm") as f:
                self.peak_kib = max(self.peak_kib, int(f.read().split()[1]) * self._page_kib)
        except (OSError, ValueError, IndexError):
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self):
        self._read()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()


def rss_growth(fn) -> tuple[float, str]:
    """(GiB, how) by which one run of ``fn`` raised this process's resident set above where it stood just before:
    the heap's free memory is handed back first, then the kernel's peak-RSS mark is reset (/proc/self/clear_refs,
    Linux 4.0 on) and read after the run; where it cannot be reset, the resident set is sampled every 2 ms; without
    /proc, the growth of the lifetime peak (``ru_maxrss``), a lower bound."""
    _trim_heap()
    base = _status_kib("VmRSS")
    if base is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, after - before) / 2**20, "growth of the lifetime peak RSS during one run (a lower bound)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak-RSS mark (VmHWM) to the current resident set
        reset = True
    except OSError:
        reset = False
    if reset:
        fn()
        peak = _status_kib("VmHWM") or base
        how = "peak RSS during one run (VmHWM, reset before it) less the RSS before it"
    else:
        with _RssSampler() as sampler:
            fn()
        peak = sampler.peak_kib
        how = "peak RSS during one run (sampled every 2 ms) less the RSS before it"
    return max(0, peak - base) / 2**20, how  # KiB -> GiB


def machine_load(bench_threads: int) -> dict:
    """The machine's 1-, 5- and 15-minute load averages now (None where the platform has none), its CPU count,
    the CPUs this process may run on, and the threads the bench itself keeps busy."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    try:
        usable = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        usable = None
    return {"loadavg": load, "cpus": os.cpu_count(), "usable_cpus": usable, "bench_threads": bench_threads}


BUSY_MARGIN = 0.5  # of a CPU: what a shell and the system's own daemons add to the load average on an idle machine


def is_busy(snapshot: dict, bench_ran: bool) -> bool:
    """Whether other work held cores the bench needs: the 1-minute load average, less the bench's own threads when
    the average covers its run (``bench_ran``), above the CPU count less those threads (by more than
    :data:`BUSY_MARGIN`, the background of an idle machine)."""
    load, cpus, own = snapshot["loadavg"], snapshot["cpus"], snapshot["bench_threads"]
    if not load or not cpus:
        return False
    return load[0] - (own if bench_ran else 0) > cpus - own + BUSY_MARGIN


def load_summary(before: dict, warn: Callable[[str], None]) -> dict:
    """What the rows record of the machine's load: ``before`` (a :func:`machine_load` taken before the bench) and
    ``after`` (one taken now: its load averages cover the bench's last minutes), with whether each found the machine
    busy (:func:`is_busy`); ``warn`` hears if it was busy during the bench."""
    after = machine_load(before["bench_threads"])
    busy_during = is_busy(after, bench_ran=True)
    if busy_during:
        warn(busy_warning(after, "during"))
    return {"before": before, "after": after, "busy_before": is_busy(before, bench_ran=False),
            "busy_during": busy_during}


def busy_warning(snapshot: dict, when: str) -> str:
    return (f"the machine was busy {when} the bench (1-minute load average {snapshot['loadavg'][0]:.2f} on "
            f"{snapshot['cpus']} CPUs; the bench runs {snapshot['bench_threads']} threads): throughputs and ratios "
            f"may be off, re-run on a quieter machine to trust them")


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _peak_tflops(device) -> tuple[float | None, str]:
    """The hardware peak to divide by: the bf16 matmul rate measured on on H100/H200; on CPU an fp32 matmul measured
    now (so the CPU 'MFU' is relative to what this machine's BLAS reaches)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v, f"bf16 matmul measured on {key}"
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


def check_count(name: str, v, least: int = 1) -> None:
    """A bench setting that counts something: None (its default) or a whole number of at least ``least``, else one
    ``UserError`` line."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
        raise UserError(f"{name} must be a whole number of at least {least} (got {v!r})")


def start_run(device, log: Callable[[str], None], warn: Callable[[str], None] | None):
    """What every bench run does first: on CPU, keep freed memory for reuse (both paths run under it: freed
    activations are reused instead of faulted in again); read the machine's load and warn if it is busy. Returns
    (the device, the load before, the warn function)."""
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    if not on_cuda:
        from .cpu import keep_freed_memory

        keep_freed_memory()
    warn = warn or (lambda m: log(f"warning: {m}"))
    load = machine_load(1 if on_cuda else torch.get_num_threads())
    if is_busy(load, bench_ran=False):
        warn(busy_warning(load, "before"))
    return dev, load, warn


def run_bench(model: str = "digits", device: str = "cpu", fast_dtype: str | None = None, steps1: int = 5,
              steps2: int = 5, ref_images: int = 2, fast_batch: int | None = None, classes: int | None = None,
              ops: str | None = None, cuda_graph: bool | None = None, compile_stage2: bool = False,
              compile_stage1: bool = False, repeats: int = 3, early_step=None, early_keep=None,
              sampler: str | None = None, sample_steps: int | None = None, log=print,
              warn: Callable[[str], None] | None = None) -> list[dict]:
    """Measure both paths for stage 1 and stage 2 and project the whole job. Returns JSON-ready rows. ``log`` gets a
    line as each phase begins and ends (and the notes of a halved batch); ``warn`` (default: ``log`` with a
    ``warning:`` prefix) the busy-machine warnings.

    ``early_step``/``early_keep``: early rejection as in :class:`cao2_fast.config.DistillConfig` (check after
    ``early_step`` of 50 steps, keep ``early_keep`` candidates per class; tuples for several checks). Stage 1 and
    the job then get a third path, ``fast+early``: the fast stage 1 that stops sampling all but the kept
    candidates at each check (their x̂0 decoded, scored and ranked by the released rule, most confident correct
    first), timed in the same alternation. ``steps1`` is raised, where needed, to the least count that puts every
    check on a whole step of the shortened schedule.

    ``sampler``/``sample_steps``: a few-step stage-1 sampler (``ddim``/``dpmpp``, :mod:`cao2_fast.schedulers`) over
    ``sample_steps`` steps; stage 1 and the job get the path ``fast+SAMPLER``, the fast stage 1 on it (``steps1`` of
    50 becomes the same share of its steps, raised to a whole count), and its job row the ImageNet-1K IPC10
    projection on one H100 beside the exact method's.

    ``compile_stage2``: the fast stage 2 on the ``compile`` engine. ``compile_stage1``: stage 1 and the job get the
    path ``fast-compile``, the fast stage 1 with its DiT on the ``compile`` engine (what ``--engine compile`` runs:
    CUDA graphs on CUDA); its first run, where the compiling happens, is timed apart as the row's ``compile_s``."""
    b = _prepare(model, device, fast_dtype, steps1, steps2, ref_images, fast_batch, classes, ops, cuda_graph,
                 compile_stage2, repeats, early_step, early_keep, log, warn, sampler, sample_steps, compile_stage1)
    rows = _bench_stage1(b)
    rows += _bench_stage2(b)
    rows += _project(b, rows)
    _finish(b, rows)
    return rows


@dataclass
class _Run:
    """One bench run: its settings, the models and inputs every path shares, and the fields every row carries."""

    model: str
    dev: torch.device
    setup: Setup
    fast_dtype: str
    steps1: int
    steps2: int
    ref_images: int
    fast_batch: int | None
    classes: int
    ops: str | None
    cuda_graph: bool
    compile_stage2: bool
    repeats: int
    early: list
    sampler: tuple[str, int] | None  # (kind, steps) of a few-step stage-1 sampler, timed as fast+KIND
    peak: float | None
    base: dict
    log: Callable[[str], None]
    warn: Callable[[str], None]
    load_before: dict
    g: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    fast_dit: torch.nn.Module | None = None  # the fast path's DiT, built with stage 1's paths
    compile_stage1: bool = False  # time the fast-compile stage-1 path too

    @property
    def fdt(self) -> torch.dtype:
        return getattr(torch, self.fast_dtype)

    @property
    def latent(self) -> tuple[int, int, int]:
        cfg = self.setup.dit.cfg
        return cfg.in_channels, cfg.input_size, cfg.input_size

    @property
    def flop_fwd(self) -> float:
        return self.setup.dit.cfg.flops_per_forward()

    @property
    def n_cand(self) -> int:
        return self.setup.k * self.setup.ipc


def _prepare(model, device, fast_dtype, steps1, steps2, ref_images, fast_batch, classes, ops, cuda_graph,
             compile_stage2, repeats, early_step, early_keep, log, warn, sampler=None, sample_steps=None,
             compile_stage1=False) -> _Run:
    """Check the settings, note the machine's load (warning when it is busy), build the models (the reference's in
    fp32 with the released kernels; :func:`_stage1_paths` copies them for the fast path) and measure the peak to
    divide by."""
    for name, v in (("steps1", steps1), ("steps2", steps2), ("ref_images", ref_images), ("repeats", repeats),
                    ("fast_batch", fast_batch), ("classes", classes)):
        check_count(name, v)
    k, ipc = oversampling(model)
    early = early_check_list(early_step, early_keep, 50, ipc, k * ipc)  # [] when off; bad values: UserError
    few = check_sampler(sampler, sample_steps)
    dev, load, warn = start_run(device, log, warn)
    on_cuda = dev.type == "cuda"
    log(f"building the {model} models on {device}")
    s = build_setup(model, device)
    peak, peak_source = _peak_tflops(device)
    if early or few:  # the shortened schedule must land on every check, and the sampler's share on a whole step
        need = math.lcm(steps1, *(50 // math.gcd(50, step) for step, _ in early),
                        *([50 // math.gcd(50, few[1])] if few else []))
        if need != steps1:
            what = " and ".join(w for w, on in (("the checks", early), ("the sampler's share of its steps", few)) if on)
            log(f"stage 1: timing {need} steps instead of {steps1}, so that {what} land on whole steps")
        steps1 = need
    s.dit.to(dev, torch.float32).set_kernels(RELEASED_KERNELS)  # the reference: torch's GELU and SDPA, as released
    s.vae.to(dev, torch.float32)
    s.classifier.to(dev, torch.float32)
    fast_dtype = fast_dtype or ("bfloat16" if on_cuda else "float32")
    base = {"device": _device_name(device), "model": model, "torch": torch.__version__,
            "triton": _version("triton"), "commit": _commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "peak_tflops": peak, "peak_source": peak_source, "repeats": repeats}
    return _Run(model, dev, s, fast_dtype, steps1, steps2, ref_images, fast_batch, classes or s.classes_per_batch,
                ops, on_cuda if cuda_graph is None else cuda_graph, compile_stage2, repeats, early, few, peak, base,
                log, warn, load, compile_stage1=compile_stage1)


def check_sampler(sampler: str | None, steps: int | None) -> tuple[str, int] | None:
    """(kind, steps) of the few-step sampler to time, or None; bad settings raise :class:`UserError`."""
    from .config import SAMPLERS, max_sample_steps

    if sampler in (None, "ddpm"):
        if steps is not None:
            raise UserError("--sample-steps times a few-step sampler: add --sampler ddim or dpmpp (the exact "
                            "stage 1 is always timed at 50)")
        return None
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps is None:
        raise UserError(f"--sampler {sampler} needs --sample-steps N")
    check_count("sample_steps", steps)
    if steps > max_sample_steps(sampler):
        raise UserError(f"--sample-steps {steps}: {sampler} takes at most {max_sample_steps(sampler)} steps")
    return sampler, steps


def _stage1_paths(b: _Run) -> list[tuple[str, Callable]]:
    """The stage-1 paths as (name, fn(clock)) on the same classes and noise. Each runs its decodes and classifier
    calls inside ``clock``: only the sampling part of its time is scaled from ``steps1`` to 50 steps (a candidate is
    decoded and scored once, however many steps it was sampled for)."""
    s, dev, fdt, cfg = b.setup, b.dev, b.fdt, b.setup.dit.cfg
    n_cand = b.n_cand
    diffusion_short = Diffusion.create(respacing=b.steps1)  # timing only: a step costs the same at any respacing
    noises = [stage1.Stage1Noise.draw(n_cand, b.latent, b.steps1, b.g) for _ in range(b.classes)]

    def ref_stage1(clock):
        with tf32(RELEASED_TF32, dev):  # the released scripts: fp32 weights, TF32 matmuls and convolutions
            for c, nz in enumerate(noises):
                z = reference.stage1_class(s.dit, diffusion_short, nz.initial, nz.steps, c, cfg.num_classes,
                                           s.guidance_scale, 3, dev)
                with torch.no_grad(), clock:
                    s.classifier(s.vae.decode(z))

    fast_dit = _copy_model(s.dit, dev, fdt).set_kernels(fast_kernels(dev))
    vae_f = _copy_model(s.vae, dev, fdt)
    clf_f = _copy_model(s.classifier, dev, fdt)
    allnoise = stage1.Stage1Noise.cat(noises)
    labels = torch.tensor([c for c in range(b.classes) for _ in range(n_cand)])
    b.fast_dit = fast_dit  # stage 2's fast path starts from the same copy

    def sampled(schedule, stop: int = 0, dit=fast_dit):
        """The fast stage 1 on ``schedule`` (its steps down to ``stop``), decoded and scored inside the clock."""
        def run(clock):
            with torch.no_grad():
                z = stage1.generate(lambda x, t, y: dit(x, t, y), schedule, allnoise, labels, cfg.num_classes,
                                    s.guidance_scale, 3, dev, fdt, batch=len(labels), stop=stop)
                with clock:
                    selection.decode_and_score(vae_f.decode, clf_f, z, dev, fdt, batch=min(64, len(labels)))
        return run

    fast_stage1 = sampled(diffusion_short)

    checks_short = [(step * b.steps1 // 50, keep) for step, keep in b.early]

    def early_stage1(clock):
        def score(x0):
            with clock:
                _, probs = selection.decode_and_score(vae_f.decode, clf_f, x0, dev, fdt, batch=min(64, len(x0)))
            return probs, probs.isfinite().all(1)

        def rank(j, idx, probs, finite):  # class j is label j here
            return selection.early_rank(probs, j, "confident", "desc", valid=finite)

        with torch.no_grad():
            z, _, _ = stage1.generate_early(lambda x, t, y: fast_dit(x, t, y), diffusion_short, allnoise, labels,
                                            n_cand, cfg.num_classes, s.guidance_scale, 3, dev, fdt, len(labels),
                                            checks_short, score, rank)
            with clock:
                selection.decode_and_score(vae_f.decode, clf_f, z, dev, fdt, batch=min(64, len(z)))

    paths = [("reference", ref_stage1), ("fast", fast_stage1)] + ([("fast+early", early_stage1)] if b.early else [])
    if b.sampler:
        kind, n_steps = b.sampler
        timed = b.steps1 * n_steps // 50  # the same share of its steps as steps1 is of 50
        paths.append((f"fast+{kind}", sampled(SchedulerSampler(kind, n_steps), stop=n_steps - timed)))
    if b.compile_stage1:  # the DiT engine that --engine compile builds (reduce-overhead: CUDA graphs on CUDA)
        from .engines import build_engine

        compiled = build_engine("compile", dit_spec(fast_dit), dev, b.fast_dtype)
        paths.append(("fast-compile", sampled(diffusion_short, dit=compiled)))
    return paths


def _measured_row(b: _Run, stage: str, path: str, dtype: str, batch: int, unit: str, seconds_runs: list[float],
                  items: int, flop: float, mem: tuple[float, str], **extra) -> dict:
    """A measured row: the median per-item time of the runs (each run did ``items`` items), the figures derived
    from it, and their spread over the runs."""
    per = [t / items for t in seconds_runs]
    per_item = statistics.median(per)
    return dict(b.base, stage=stage, path=path, projected=False, dtype=dtype, batch=batch, unit=unit,
                throughput=1 / per_item, seconds_per_item=per_item, flop_per_item=flop,
                tflops=flop / per_item / 1e12, peak_mem_gib=round(mem[0], 3), mem_measure=mem[1],
                seconds_per_item_runs=per,
                spread={"seconds_per_item": spread(per), "throughput": spread([1 / p for p in per]),
                        "tflops": spread([flop / p / 1e12 for p in per])}, **extra)


def _bench_stage1(b: _Run) -> list[dict]:
    """Warm up each stage-1 path, time them in alternation, measure each one's memory; one row per path."""
    paths = _stage1_paths(b)
    n1 = b.classes * b.n_cand
    b.log(f"stage 1: warm-up, then {b.repeats} timed runs of each path ({n1} candidates, {b.steps1} steps"
          + (f"; fast+early checks {', '.join(f'keep {m} after {st}/50' for st, m in b.early)}" if b.early else "")
          + ")")
    warm = [_timed(lambda fn=fn: fn(_Clock(b.dev)), b.dev) for _, fn in paths]  # warm-ups (and compilation)
    totals, inside = _timed_scaled([fn for _, fn in paths], b.dev, b.repeats, 50 / b.steps1)  # to 50 steps each
    mems = [_peak_of(lambda fn=fn: fn(_Clock(b.dev)), b.dev) for _, fn in paths]
    flop1 = 50 * 2 * b.flop_fwd  # per candidate (guided: 2 forwards per step)
    rows = []
    for (path, _), tot, ins, mem, warm_s in zip(paths, totals, inside, mems, warm):
        early = path == "fast+early"
        # fast+early: the DiT forwards it runs per candidate it starts, every step guided as in flop1
        flop = stage1.dit_forwards(b.n_cand, 50, b.early, 2.0) * b.flop_fwd / b.n_cand if early else flop1
        few = b.sampler is not None and path == f"fast+{b.sampler[0]}"
        if few:
            flop = b.sampler[1] * 2 * b.flop_fwd
        rows.append(_measured_row(
            b, "1", path, "float32" if path == "reference" else b.fast_dtype,
            2 * b.n_cand if path == "reference" else 2 * n1, "candidates/s", tot, n1, flop, mem,
            decode_score_share=statistics.median(ins) / statistics.median(tot), steps_timed=b.steps1,
            **({"early_reject": [list(c) for c in b.early]} if early else {}),
            **({"sampler": b.sampler[0], "sample_steps": b.sampler[1]} if few else {}),
            **({"engine": "compile", "compile_s": warm_s} if path == "fast-compile" else {})))
    b.log("stage 1: " + ", ".join(f"{r['path']} {r['throughput']:.2f}" for r in rows) + " candidates/s ("
          + ", ".join(f"{rows[0]['seconds_per_item'] / r['seconds_per_item']:.2f}x" for r in rows[1:]) + ")")
    return rows


def _bench_stage2(b: _Run) -> list[dict]:
    """The released one-image stage 2 (weight gradients on) against the batched one, warmed up (and compiled, with
    ``compile_stage2``), timed in alternation; one row per path."""
    dev, cfg = b.dev, b.setup.dit.cfg
    b.log(f"stage 2: warm-up{' and compilation' if b.compile_stage2 else ''}, then {b.repeats} timed runs of each path")
    diffusion = Diffusion.create(respacing=50)
    x0 = torch.randn(b.ref_images, *b.latent, generator=b.g)
    nz2 = stage2.Stage2Noise.draw(b.ref_images, b.latent, b.steps2, 11, b.g, 0.0)
    y_null = torch.full((b.ref_images,), cfg.num_classes)

    def run_ref2():
        with tf32(RELEASED_TF32, dev):
            return reference.stage2(b.setup.dit, diffusion, x0, y_null, nz2, b.steps2, 6e-4, 10.0, "official", False,
                                    dev, weight_grads=True)

    run_ref2()  # warm-up
    dit2, compile_s = b.fast_dit, None
    if b.compile_stage2:  # the compiled stage-2 engine; its compile time is measured on the warm-up and kept apart
        from .engines import stage2_engine

        dit2 = stage2_engine("compile", b.fast_dit, dev, b.fast_dtype)
    batch2, run_fast2, warm_s = _fast_stage2(dit2, diffusion, b.latent, b.steps2, b.fast_batch, dev, b.fdt, b.g, cfg,
                                             b.ops, b.cuda_graph, b.log)
    if b.compile_stage2:
        compile_s = warm_s
    t_ref2, t_fast2 = _timed_pair(run_ref2, run_fast2, dev, b.repeats)
    mem_ref2, mem_fast2 = _peak_of(run_ref2, dev), _peak_of(run_fast2, dev)
    flop2 = 2 * b.flop_fwd
    rows = [_measured_row(b, "2", "reference", "float32", 1, "latent-steps/s", t_ref2, b.ref_images * b.steps2,
                          flop2, mem_ref2, engine="eager", compile_s=None),
            _measured_row(b, "2", "fast", b.fast_dtype, batch2, "latent-steps/s", t_fast2, batch2 * b.steps2, flop2,
                          mem_fast2, engine="compile" if b.compile_stage2 else "eager", compile_s=compile_s)]
    r2ref, r2fast = rows
    b.log(f"stage 2: reference {r2ref['throughput']:.1f}, fast {r2fast['throughput']:.1f} latent-steps/s "
          f"({r2ref['seconds_per_item'] / r2fast['seconds_per_item']:.2f}x, fast batch {batch2})")
    return rows


def _project(b: _Run, rows: list[dict]) -> list[dict]:
    """The whole job's time per path, projected from the stage rows (cost model: candidates × stage-1 time per
    candidate + latent-steps × stage-2 time per latent-step; ``fast+early`` uses the fast stage 2): rows marked
    ``projected``, with the projection of each round of runs as their spread, and no measured-looking fields."""
    job = IMAGENET_IPC10 if b.model.startswith("dit-") else {"candidates": 10 * 20, "latents": 10 * 10}

    def seconds(s1: float, s2: float) -> float:
        return job["candidates"] * s1 + job["latents"] * 100 * s2

    out = []
    for r1 in [r for r in rows if r["stage"] == "1"]:
        path = r1["path"]
        stage2_path = "reference" if path == "reference" else "fast"  # every fast stage 1 with the fast stage 2
        r2 = next(r for r in rows if r["stage"] == "2" and r["path"] == stage2_path)
        sec = seconds(r1["seconds_per_item"], r2["seconds_per_item"])
        runs = [seconds(a, c) for a, c in zip(r1["seconds_per_item_runs"], r2["seconds_per_item_runs"])]
        flop = job["candidates"] * r1["flop_per_item"] + job["latents"] * 100 * r2["flop_per_item"]
        out.append(dict(b.base, stage="e2e", path=path, projected=True, dtype=r2["dtype"], unit="jobs/h",
                        throughput=3600 / sec, seconds_per_item=sec, flop_per_item=flop, job=job,
                        projected_minutes=sec / 60, projected_from=[f"stage 1 {path}", f"stage 2 {r2['path']}"],
                        seconds_per_item_runs=runs, spread={"projected_minutes": spread([t / 60 for t in runs])},
                        floor_minutes=(flop / (b.peak * 1e12) / 60) if b.peak else None,
                        **({"early_reject": r1["early_reject"]} if "early_reject" in r1 else {})))
        if "sampler" in r1:
            from .bench_early import imagenet_projection

            out[-1].update(sampler=r1["sampler"], sample_steps=r1["sample_steps"],
                           imagenet_ipc10=imagenet_projection([], None, "H100", r1["sampler"], r1["sample_steps"]))
    return out


def _finish(b: _Run, rows: list[dict]) -> None:
    """Add what needs every row: the fast/reference ratios (of the medians, with the per-round ratios as their
    spread), MFU on measured rows, and the machine's load before and after, with a warning if it was busy."""
    for r in rows:
        ref = next(x for x in rows if x["stage"] == r["stage"] and x["path"] == "reference")
        r["ratio"] = ref["seconds_per_item"] / r["seconds_per_item"]  # fast / reference speed
        r["spread"]["ratio"] = spread([a / c for a, c in zip(ref["seconds_per_item_runs"], r["seconds_per_item_runs"])])
        if not r["projected"]:
            r["mfu"] = r["tflops"] / b.peak if b.peak else None
            t = r["spread"]["tflops"]
            r["spread"]["mfu"] = ({k: (v / b.peak if v is not None and k != "n" else v) for k, v in t.items()}
                                  if b.peak else None)
    load = load_summary(b.load_before, b.warn)
    for r in rows:
        r["machine_load"] = load


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


def check_destination(out_dir: Path, tag: str) -> tuple[Path, Path]:
    """The JSON and chart paths of ``tag`` in ``out_dir``, refused with one line where writing them would replace
    something the bench did not write: ``out_dir`` must be a folder (or not exist yet), an existing JSON file there
    must hold bench rows and an existing chart must be a PNG."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file, not a folder; pass --out with a folder for the bench results")
    jpath, ppath = out_dir / f"{tag}.json", out_dir / f"{tag}.png"
    for path, ours, what in ((jpath, _is_bench_json, "bench results"), (ppath, _is_png, "a PNG chart")):
        if path.is_symlink() or (path.exists() and not ours(path)):
            raise UserError(f"{path}: exists and is not {what} the bench wrote; move it away or choose another "
                            f"--out (nothing is overwritten)")
    return jpath, ppath


def _is_bench_json(path: Path) -> bool:
    """Whether ``path`` holds rows as :func:`write_results` writes them: a JSON list of objects with a stage, a path
    and a device."""
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return False
        rows = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and bool(rows) and all(
        isinstance(r, dict) and {"stage", "path", "device"} <= set(r) for r in rows)


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def write_results(rows: list[dict], out_dir: Path, tag: str) -> tuple[Path, Path]:
    """JSON rows + their chart (:func:`plot_results`), each replaced atomically. The chart is drawn before either
    file is written; a destination the bench did not write is refused (:func:`check_destination`)."""
    from .fileio import atomic_write, json_bytes

    jpath, ppath = check_destination(out_dir, tag)
    png = chart_png(rows)
    try:
        atomic_write(jpath, json_bytes(rows, indent=1))
        atomic_write(ppath, png)
    except OSError as e:
        raise UserError(f"{Path(out_dir)}: cannot write the bench results ({e.strerror or e})") from None
    return jpath, ppath


STAGE_AXES = {  # what each stage's panel shows: the row field, its label, and a reader's name for the stage
    "1": ("throughput", "candidates/s", "stage 1: sample + select"),
    "2": ("throughput", "latent-steps/s", "stage 2: optimise latents"),
    "e2e": ("projected_minutes", "minutes (lower is better)", "whole job, projected"),
}


def plot_results(rows: list[dict], path: Path) -> None:
    """The chart of one bench run (:func:`chart_png`) written to ``path``. Reads rows as written to JSON, so a
    chart can be redrawn from a results file: ``plot_results(json.load(open(f)), Path("x.png"))``."""
    from .fileio import atomic_write

    atomic_write(Path(path), chart_png(rows))


def _err(rows: list[dict], field_: str):
    """Asymmetric error bars (2, n) from each row's min–max spread of ``field_``; None if a row has none (results
    written before the bench recorded spreads)."""
    lo, hi = [], []
    for r in rows:
        sp = (r.get("spread") or {}).get(field_)
        if not sp:
            return None
        lo.append(max(0.0, r[field_] - sp["min"]))
        hi.append(max(0.0, sp["max"] - r[field_]))
    return [lo, hi]


def _bars(ax, names, vals, colors, err, labels, projected) -> None:
    """Bars with their min–max range as error bars, each value written above the bar or its range; projected
    figures hatched."""
    ax.bar(names, vals, color=colors, yerr=err, capsize=3, error_kw={"lw": 0.8},
           hatch=["//" if p else None for p in projected], edgecolor="white")
    for i, (v, text) in enumerate(zip(vals, labels)):
        top = v + (err[1][i] if err else 0)
        ax.annotate(text, (i, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)


def chart_png(rows: list[dict]) -> bytes:
    """The chart of one bench run as PNG bytes: per stage, the absolute throughput of the reference and fast paths
    (and fast+early where timed; the end-to-end panel: the projected job time), and beside them the fast/reference
    speed ratios; error bars span the min–max over the timed runs (per round for the ratios) where the rows record
    it. The title names the model, device, dtype and the fast stage-2 engine (eager or torch.compile)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["stage"], r["path"]): r for r in rows}
    stages = [s for s in STAGE_AXES if (s, "reference") in by and (s, "fast") in by]
    colors = {"reference": "#999999", "fast": "#2a7f62", "fast+early": "#d08a2e"}
    other = iter(["#4a90c0", "#8e6bb8", "#c05a5a", "#b0a040"])  # further paths (attribution rows), in row order
    for r in rows:
        if r["path"] not in colors:
            colors[r["path"]] = next(other, "#666666")
    ratio_bars = sum(1 for r in rows if r["stage"] in stages and r["path"] != "reference")
    wide = max(1.0, ratio_bars / 4)  # the speed-up panel grows with its bars
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(3.0 * (len(stages) + wide), 3.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1.0] * len(stages) + [wide]})
    for ax, stage in zip(axes, stages):
        field_, unit, name = STAGE_AXES[stage]
        job = by[stage, "fast"].get("job")
        if stage == "e2e" and job:
            name += f"\n({job['candidates']:,} candidates, {job['latents']:,} latents)"
        sel = [r for r in rows if r["stage"] == stage]  # the rows' order: reference, then each path
        vals = [r[field_] for r in sel]
        _bars(ax, [_path_label(r["path"]) for r in sel], vals, [colors[r["path"]] for r in sel],
              _err(sel, field_), [_short(v) for v in vals], [_projected(r) for r in sel])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.margins(y=0.18)  # room for the value labels above the bars
        ax.tick_params(labelsize=8)
    ax = axes[-1]
    sel = [r for s in stages for r in rows if r["stage"] == s and r["path"] != "reference"]
    names = [(f"stage {r['stage']}" if r["stage"] != "e2e" else "job")
             + {"fast": "", "fast+early": "\n+early"}.get(r["path"], "\n" + _path_label(r["path"])) for r in sel]
    ratios = [r["ratio"] for r in sel]
    _bars(ax, names, ratios, [colors[r["path"]] for r in sel], _err(sel, "ratio"), [f"{v:.1f}×" for v in ratios],
          [_projected(r) for r in sel])
    ax.axhline(1, color="k", lw=0.8)
    ax.set_title("speed-up of fast over reference", fontsize=9)
    ax.set_ylabel("fast / reference speed", fontsize=8)
    ax.margins(y=0.18)
    ax.tick_params(labelsize=8)
    fast2 = by.get(("2", "fast"), {})
    engine = "torch.compile" if fast2.get("engine") == "compile" else "eager"
    also = [("stage-1 " if r["stage"] == "1" else "") + r["path"] for r in rows if r.get("engine") == "compile"
            and r["stage"] in ("1", "2") and (r["stage"], r["path"]) != ("2", "fast")]
    if also:  # further paths on the compiled engine (the stage-1 or MAR stage-2 fast-compile)
        engine += f" ({', '.join(also)}: torch.compile)"
    r0 = rows[0]
    early = by.get(("1", "fast+early"), {}).get("early_reject")
    early = ("; early: " + ", ".join(f"keep {m} after {st}/50" for st, m in early)) if early else ""
    bars = "; bars: min–max; hatched: projected" if any("spread" in r for r in rows) else ""
    busy = "; machine busy" if (r0.get("machine_load") or {}).get("busy_during") else ""
    fig.suptitle(f"cao2-fast bench: {r0['model']} on {r0['device']}; fast path {fast2.get('dtype', '?')}, "
                 f"stage 2 {engine}{early}; medians of {r0.get('repeats', '?')} runs{bars}{busy}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _path_label(path: str) -> str:
    """A path's name on an axis: ``fast+early`` as ``fast`` over ``+early``, longer names wrapped at hyphens."""
    import textwrap

    return path.replace("+", "\n+") if "+" in path else "\n".join(textwrap.wrap(path, 10, break_on_hyphens=True))


def _short(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def _decimals(v: float) -> int:
    """Decimals that give ``v`` four significant digits (none from 1000 on)."""
    return 0 if not v or abs(v) >= 1000 else max(0, 3 - math.floor(math.log10(abs(v))))


def _num(v: float | None, decimals: int | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:,.{_decimals(v) if decimals is None else decimals}f}"


def _range(sp: dict | None, decimals: int, quartiles: bool = False) -> str:
    """``lo–hi`` of a spread at the median's decimals; "-" where there is none (quartiles below 4 runs)."""
    if not sp:
        return "-"
    lo, hi = (sp["q1"], sp["q3"]) if quartiles else (sp["min"], sp["max"])
    if lo is None:
        return "-"
    return f"{_num(lo, decimals)}–{_num(hi, decimals)}"


def _projected(r: dict) -> bool:
    return r.get("projected", r["stage"] == "e2e")  # rows written before the field existed: e2e was projected


def format_table(rows: list[dict]) -> str:
    """The printed table: per row the median figure, its min–max range and IQR over the timed runs, TFLOP/s, MFU,
    memory and the fast/reference ratio with its per-round range. Projected rows show the projected job minutes
    and no batch, TFLOP/s, MFU or memory; footnotes say how each figure was obtained."""
    pw = max([10, *(len(r["path"]) for r in rows)])  # the path column fits the longest path
    lines = [f"{'stage':>5} {'path':>{pw}} {'dtype':>8} {'batch':>5} {'median':>9} {'unit':<17} {'min–max':>17} "
             f"{'IQR':>17} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7} {'ratio':>6} {'ratio min–max':>13}"]
    for r in rows:
        sp = r.get("spread") or {}
        if _projected(r):
            key, value, unit = "projected_minutes", r["projected_minutes"], "min (projected)"
            batch = tflops = mfu = mem = "-"
        else:
            key, value, unit, batch = "throughput", r["throughput"], r["unit"], str(r["batch"])
            tflops, mem = f"{r['tflops']:.3g}", _num(r["peak_mem_gib"], 3)
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        d = _decimals(value)
        ratio_range = "-" if r["path"] == "reference" else _range(sp.get("ratio"), 2)
        lines.append(f"{r['stage']:>5} {r['path']:>{pw}} {r['dtype']:>8} {batch:>5} {_num(value, d):>9} {unit:<17} "
                     f"{_range(sp.get(key), d):>17} {_range(sp.get(key), d, quartiles=True):>17} {tflops:>8} "
                     f"{mfu:>6} {mem:>7} {r['ratio']:>5.2f}× {ratio_range:>13}")
    r0 = rows[0]
    hows = sorted({r["mem_measure"] for r in rows if r.get("mem_measure")})
    lines.append(f"median of {r0.get('repeats', '?')} timed runs per path, the paths alternating; min–max over the "
                 "runs, IQR (middle half) from 4 runs on; ratio = fast/reference speed of the medians, its range over "
                 "the rounds (each round runs every path once)")
    if hows:
        lines.append(f"mem: {'; '.join(hows)}")
    for r in rows:
        if r["stage"] == "e2e":
            floor = f", floor {r['floor_minutes']:.1f} min at peak" if r.get("floor_minutes") else ""
            what = "ImageNet-1K IPC10" if r["job"] == IMAGENET_IPC10 else f"{r['model']} IPC10 (10 classes)"
            lines.append(f"projected {what} ({r['job']['candidates']} candidates, {r['job']['latents']} latents), "
                         f"{r['path']}: {r['projected_minutes']:.2f} min{floor} (from the stage rows, not measured)")
            p = r.get("imagenet_ipc10")
            if p:
                lines.append(f"{r['path']} ({p['sampler']}, {p['sample_steps']} steps): stage-1 FLOPs "
                             f"{100 * p['stage1_flop_saved']:.0f} % below the exact 50-step stage 1; ImageNet-1K "
                             f"IPC10 on one {p['gpu']} at peak {p['minutes_at_peak']:.1f} min against the exact "
                             f"method's {p['exact_minutes_at_peak']:.1f} min (FLOP model: a floor, not measured)")
    compiled = [f"stage {r['stage']} {r['path']} {r['compile_s']:.0f} s" for r in rows if r.get("compile_s")]
    if compiled:
        lines.append("torch.compile: first run (compiling) " + ", ".join(compiled) + ", not in the medians")
    load = r0.get("machine_load")
    if load and load["before"].get("loadavg") and load["after"].get("loadavg"):
        busy = load["busy_before"] or load["busy_during"]
        lines.append(f"machine: 1-minute load average {load['before']['loadavg'][0]} before, "
                     f"{load['after']['loadavg'][0]} after, {load['before']['cpus']} CPUs, the bench on "
                     f"{load['before']['bench_threads']} threads" + ("; busy: the figures may be off" if busy else ""))
    return "\n".join(lines)
