"""``cao2-fast bench --early-reject-grid``: what early candidate rejection and a guidance interval save in stage 1,
and what they cost in picks, measured on real runs of :meth:`cao2_fast.pipeline.Distiller.stage1`.

For each oversampling K and guidance scale, the exact stage 1 (every candidate sampled over every step) runs once;
then each setting of a grid runs the same classes, seeds and models with only that setting changed. Per setting:

* DiT image-forwards, VAE decodes and classifier calls, *counted* by wrapping the three callables the stage uses,
  turned into FLOPs with the DiT cost model (docs/method.md's cost model, a guided step is 2 forwards) and the
  decode/classify FLOPs of one image measured with ``torch.utils.flop_counter``;
* pick agreement: the share of the exact run's final picks that the setting also picks (over all classes), and the
  largest latent difference over the picks both runs share (survivors should follow the exact trajectory);
* wall time of the setting's stage 1 over the exact run's (medians of ``repeats`` runs; the exact run is timed at
  least 3 times, spread among the settings) — meaningful only on an otherwise idle machine.

The ImageNet-1K IPC10 projection applies the same counts to DiT-XL/2 (sd-vae-ft-mse decode and ResNet-18 at their
real sizes, FLOPs counted on the meta device) and divides by the H100 peak of docs/method.md's cost model.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from dataclasses import replace

import torch

from . import stage1
from .benchmark import (PEAK_TFLOPS, _commit, _device_name, _timed, busy_warning, is_busy, load_summary,
                        machine_load, spread)
from .config import validate

STEPS = (5, 10, 15, 20, 25)
INTERVALS = ((0.0, 10.0), (0.0, 5.0), (0.3, 5.0), (0.0, 2.0), (1.0, 200.0))  # σ ranges; 200 > σ_max ≈ 157
# two checks (progressive rejection): (step, keep as a multiple of IPC) pairs per K
PROGRESSIVE = {4: [((5, 3.0), (15, 1.5)), ((10, 3.0), (20, 1.5)), ((5, 2.5), (20, 1.2))],
               2: [((5, 1.6), (15, 1.2)), ((10, 1.6), (20, 1.2))]}
# (K, guidance, order) cells: the released desc order at K 2 and 4, and ImageNet-100's asc order at K 2
CELLS = ((2, 2.7, "desc"), (2, 1.0, "desc"), (4, 2.7, "desc"), (4, 1.0, "desc"), (2, 2.7, "asc"))
IMAGENET = {"classes": 1000, "k": 4, "ipc": 10, "steps": 50, "guidance": 2.7, "stage2_latent_steps": 10_000 * 100}


def keeps_for(k: int, ipc: int) -> list[int]:
    """M values to try: IPC, 1.5·IPC and 2·IPC, below K·IPC (K·IPC itself rejects nothing)."""
    return sorted({m for m in (ipc, ipc * 3 // 2, 2 * ipc) if m < k * ipc})


class _Counted:
    """A stage-1 callable that counts the images it is given (first dimension of its first argument)."""

    def __init__(self, fn):
        self.fn, self.images = fn, 0

    def __call__(self, x, *args):
        self.images += x.shape[0]
        return self.fn(x, *args)


def per_image_flops(vae, classifier, latent_shape, device="cpu") -> tuple[float, float]:
    """FLOPs of decoding one latent and classifying the image, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(vae.parameters())
    z = torch.zeros(1, *latent_shape, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            img = vae.decode(z)
        f_dec = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            classifier(img.to(next(classifier.parameters()).dtype))
    return float(f_dec), float(fc.get_total_flops())


def _stage1_all(d) -> dict:
    """The distiller's stage 1 over all its classes, group by group as a run does it."""
    out = {}
    for g in d.groups():
        out.update(d.stage1(g))
    return out


def _counted(d) -> tuple[dict, dict]:
    """One run of the distiller's stage 1 with its three callables counted: (result, images per callable)."""
    gen = d.generator
    base = (gen.sampler, gen.decoder, d.classify)
    gen.sampler, gen.decoder, d.classify = (_Counted(f) for f in base)
    try:
        res = _stage1_all(d)
        counts = {"dit": gen.sampler.images, "decode": gen.decoder.images, "classify": d.classify.images}
    finally:
        gen.sampler, gen.decoder, d.classify = base
    return res, counts


def _timed_counted(d, repeats: int) -> tuple[dict, dict, list[float]]:
    """:func:`_counted`, timed, then ``repeats`` − 1 more timed runs: (result, counts, seconds of each run).
    Counting adds one integer sum per call, nothing a timer sees."""
    out: list = []

    def once():
        out[:] = _counted(d)

    times = [_timed(once, d.device)]
    times += [_timed(lambda: _stage1_all(d), d.device) for _ in range(repeats - 1)]
    return out[0], out[1], times


def agreement(exact: dict, other: dict) -> tuple[float, float | None]:
    """(share of the exact picks also picked, max |latent difference| over the shared picks)."""
    shared, total, diff = 0, 0, None
    for c, r in exact.items():
        a, b = r["candidate_index"].tolist(), other[c]["candidate_index"].tolist()
        total += len(a)
        for i, cand in enumerate(a):
            if cand in b:
                shared += 1
                dv = float((r["latents"][i] - other[c]["latents"][b.index(cand)]).abs().max())
                diff = dv if diff is None else max(diff, dv)
    return shared / total, diff


def _settings(k: int, g: float, order: str, ipc: int, steps, intervals, progressive: bool) -> list[tuple]:
    """The grid's settings of one (K, guidance, order) cell as (kind, checks, interval)."""
    settings = [("early_reject", [(s, m)], None) for s in steps for m in keeps_for(k, ipc)]
    if progressive:  # two checks: a loose cut early, the final cut later
        n = k * ipc
        settings += [("early_reject", [(s, min(n, max(ipc, round(m * ipc)))) for s, m in pair], None)
                     for pair in PROGRESSIVE.get(k, [])]
    if g != 1.0 and order == "desc":
        settings += [("guidance_interval", [], iv) for iv in intervals]
    return settings


def run_early_grid(preset: str = "digits", cells=CELLS, steps=STEPS, ipc: int = 10,
                   seed: int = 0, repeats: int = 1, intervals=INTERVALS, progressive: bool = True,
                   device: str = "cpu", log=print, warn=None) -> list[dict]:
    """The grid's JSON rows: per (K, guidance, order) cell one ``exact`` row, one ``early_reject`` row per (STEP, M)
    and per progressive pair, and at guidance ≠ 1 in the desc order one ``guidance_interval`` row per interval.
    Timed settings carry their runs' spread (``seconds_runs``, ``seconds_spread``); every row the machine's load
    before and after the grid (``warn``, default ``log``, hears when it was busy)."""
    from .pipeline import Distiller

    warn = warn or (lambda m: log(f"warning: {m}"))
    threads = torch.get_num_threads()
    load = machine_load(1 if str(device).startswith("cuda") else threads)
    if is_busy(load, bench_ran=False):
        warn(busy_warning(load, "before"))
    base = {"device": None, "model": preset, "torch": torch.__version__, "commit": _commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "threads": threads,
            "repeats": repeats, "ipc": ipc, "seed": seed}
    rows = []
    for k, g, order in cells:
        d0 = Distiller.from_preset(preset, ipc=ipc, k=k, guidance_scale=g, seed=seed, stage2_steps=0,
                                   device=device, order=order)
        base["device"] = _device_name(d0.device)
        cfg = d0.config
        f_dit = d0.generator.dit.cfg.flops_per_forward()
        f_dec, f_clf = per_image_flops(d0.generator.vae, d0.classifier, d0.generator.latent_shape)
        t0 = time.perf_counter()
        exact, c0 = _counted(d0)
        log(f"K={k} guidance={g} {order}: exact run in {time.perf_counter() - t0:.0f} s")
        exact_acc = statistics.fmean(r["candidate_accuracy"] for r in exact.values())
        common = dict(base, k=k, guidance_scale=g, order=cfg.order, selection=cfg.selection,
                      sample_steps=cfg.sample_steps, candidates_per_class=cfg.num_candidates,
                      classes=len(cfg.class_ids), dit_flop_per_forward=f_dit, decode_flop_per_image=f_dec,
                      classify_flop_per_image=f_clf)

        def row(kind, counts, seconds, seconds_exact, res, **extra):
            dit = counts["dit"] * f_dit
            other = counts["decode"] * f_dec + counts["classify"] * f_clf
            dit0 = c0["dit"] * f_dit
            other0 = c0["decode"] * f_dec + c0["classify"] * f_clf
            agree, diff = agreement(exact, res)
            return dict(common, kind=kind, **extra, dit_forwards=counts["dit"], decoded_images=counts["decode"],
                        classified_images=counts["classify"], dit_flop=dit, decode_classify_flop=other,
                        dit_flop_saved=1 - dit / dit0, total_flop_saved=1 - (dit + other) / (dit0 + other0),
                        pick_agreement=agree, max_abs_latent_diff_shared=diff,
                        candidate_accuracy=statistics.fmean(r["candidate_accuracy"] for r in res.values()),
                        exact_candidate_accuracy=exact_acc,
                        mean_prob_picks=statistics.fmean(float(r["prob"].mean()) for r in res.values()),
                        seconds=seconds, seconds_exact=seconds_exact,
                        time_ratio=None if not seconds_exact else seconds / seconds_exact)

        rows.append(row("exact", c0, None, None, exact, step=None, keep=None, checks=None, interval=None))
        exact_times = []
        settings = _settings(k, g, order, ipc, steps, intervals, progressive)
        # the exact run is timed at least 3 times among the settings (a machine drifting during the grid shows as
        # spread there, not as a saving), and at least `repeats` times
        stride = max(1, -(-len(settings) // max(repeats, 3)))
        for i, (kind, checks, iv) in enumerate(settings):
            if i % stride == 0:
                exact_times.append(_timed(lambda: _stage1_all(d0), d0.device))
            step = keep = None
            if checks:
                step, keep = ((checks[0][0], checks[0][1]) if len(checks) == 1 else
                              (tuple(c[0] for c in checks), tuple(c[1] for c in checks)))
            new = replace(cfg, early_reject_step=step, early_reject_keep=keep, guidance_interval=iv)
            validate(new)
            d = Distiller(d0.generator, d0.classifier, new, device=d0.device)
            res, counts, runs = _timed_counted(d, repeats)
            r = row(kind, counts, statistics.median(runs), None, res, step=step if len(checks) == 1 else None,
                    keep=keep if len(checks) == 1 else None, checks=[list(c) for c in checks] or None,
                    interval=list(iv) if iv else None, seconds_runs=runs, seconds_spread=spread(runs))
            rows.append(r)
            what = f"checks {checks}" if checks else f"interval {iv}"
            log(f"K={k} guidance={g} {order} {what}: DiT FLOPs saved {100 * r['dit_flop_saved']:.1f} %, "
                f"pick agreement {100 * r['pick_agreement']:.1f} %, candidate accuracy "
                f"{r['candidate_accuracy']:.3f} (exact {exact_acc:.3f})")
        t_exact = statistics.median(exact_times)
        rows[len(rows) - len(settings) - 1]["seconds_exact_runs"] = exact_times
        rows[len(rows) - len(settings) - 1]["seconds_spread"] = spread(exact_times)
        for r in rows[len(rows) - len(settings) - 1:]:  # this (K, guidance)'s rows, its exact row first
            r["seconds_exact"] = t_exact
            r["time_ratio"] = (r["seconds"] or t_exact) / t_exact
        rows[len(rows) - len(settings) - 1]["seconds"] = t_exact
    summary = load_summary(load, warn)
    for r in rows:
        r["machine_load"] = summary
    return rows


def imagenet_projection(checks: list[tuple[int, int]], interval: tuple[float, float] | None = None,
                        gpu: str = "H100", sampler: str = "ddpm", steps: int | None = None) -> dict:
    """ImageNet-1K IPC10 (official recipe: K 4, 50 steps, guidance 2.7) under ``checks``/``interval`` and stage 1's
    ``sampler`` over ``steps`` steps (default: the released DDPM, 50) beside the exact method, from the FLOP model: DiT-XL/2 forwards (docs/method.md, cost model), plus sd-vae-ft-mse decodes and
    ResNet-18 calls at 256/224 (counted on the meta device), over the GPU's measured peak (docs/method.md, cost model).
    Minutes at peak are a floor, not a forecast: they assume every FLOP runs at the measured bf16 matmul rate."""
    from .diffusion import Diffusion, guided_steps
    from .generators.dit import DiTConfig
    from .models.random import random_classifier, random_vae
    from .schedulers import SchedulerSampler

    job = IMAGENET
    f_dit = DiTConfig.named("DiT-XL/2", input_size=32).flops_per_forward()
    with torch.device("meta"):
        vae, clf = random_vae(tiny=False), random_classifier("resnet18", 1000, 224)
    f_dec, f_clf = per_image_flops(vae, clf, (4, 32, 32))
    n = job["k"] * job["ipc"]
    steps = job["steps"] if steps is None else steps
    if interval is None:
        guided = None
    else:
        schedule = Diffusion.create(steps) if sampler == "ddpm" else SchedulerSampler(sampler, steps)
        guided = guided_steps(schedule, interval)

    def flops(chk, gi, count):
        fw = stage1.dit_forwards(n, count, chk, job["guidance"], gi)
        scored = n + sum(keep for _, keep in chk)  # all n at the first check (or at the end), then each cut's survivors
        s1 = job["classes"] * (fw * f_dit + scored * (f_dec + f_clf))
        s2 = job["stage2_latent_steps"] * 2 * f_dit
        return s1, s2

    peak = PEAK_TFLOPS[gpu] * 1e12
    e1, e2 = flops([], None, job["steps"])
    a1, a2 = flops(list(checks), guided, steps)
    return {"gpu": gpu, "peak_tflops": PEAK_TFLOPS[gpu], "checks": [list(c) for c in checks],
            "interval": list(interval) if interval else None, "sampler": sampler, "sample_steps": steps, "dit_flop_per_forward": f_dit,
            "decode_flop_per_image": f_dec, "classify_flop_per_image": f_clf,
            "exact_stage1_eflop": e1 / 1e18, "stage1_eflop": a1 / 1e18, "stage2_eflop": a2 / 1e18,
            "stage1_flop_saved": 1 - a1 / e1, "job_flop_saved": 1 - (a1 + a2) / (e1 + e2),
            "exact_minutes_at_peak": (e1 + e2) / peak / 60, "minutes_at_peak": (a1 + a2) / peak / 60}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'K':>2} {'g':>4} {'order':>5} {'setting':>24} {'DiT FLOPs saved':>15} {'all saved':>9} {'agreement':>9} "
             f"{'cand acc':>8} {'time ratio':>10}"]
    for r in rows:
        if r["kind"] == "projection":
            continue
        if r["kind"] == "exact":
            what = "exact"
        elif r["kind"] == "guidance_interval":
            what = f"σ in ({r['interval'][0]:g}, {r['interval'][1]:g}]"
        else:
            what = " then ".join(f"{s}→{m}" for s, m in r["checks"])
        tr = f"{r['time_ratio']:.2f}" if r.get("time_ratio") is not None else "-"
        lines.append(f"{r['k']:>2} {r['guidance_scale']:>4} {r['order']:>5} {what:>24} {100 * r['dit_flop_saved']:>14.1f}% "
                     f"{100 * r['total_flop_saved']:>8.1f}% {100 * r['pick_agreement']:>8.1f}% "
                     f"{r['candidate_accuracy']:>8.3f} {tr:>10}")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path) -> None:
    """Pick agreement against DiT FLOPs saved, one panel per (K, guidance); each point is an early-rejection
    setting (single checks labelled STEP→M), the dashed lines the issue's bar (35 % saved, 95 % agreement)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import save_figure

    rows = [r for r in rows if r["kind"] != "projection"]
    cells = sorted({(r["k"], r["guidance_scale"], r["order"]) for r in rows}, key=lambda c: (c[2] != "desc", c[0],
    -c[1]))
    fig, axes = plt.subplots(1, len(cells), figsize=(3.4 * len(cells), 3.6), sharey=True, layout="constrained")
    axes = [axes] if len(cells) == 1 else list(axes)
    for ax, (k, g, order) in zip(axes, cells):
        pts = [r for r in rows if (r["k"], r["guidance_scale"], r["order"]) == (k, g, order)
               and r["kind"] == "early_reject"]
        for r in pts:
            single = len(r["checks"]) == 1
            ax.scatter(100 * r["dit_flop_saved"], 100 * r["pick_agreement"], s=18,
                       color="#2a7f62" if single else "#c7702a", marker="o" if single else "s")
            ax.annotate(" / ".join(f"{s}→{m}" for s, m in r["checks"]),
                        (100 * r["dit_flop_saved"], 100 * r["pick_agreement"]), fontsize=5.5,
                        xytext=(2, 2), textcoords="offset points")
        ax.axvline(35, color="k", lw=0.6, ls="--")
        ax.axhline(95, color="k", lw=0.6, ls="--")
        ax.set_title(f"K = {k}, guidance {g}, {order}", fontsize=9)
        ax.set_xlabel("stage-1 DiT FLOPs saved (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("exact picks kept (%)", fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"early rejection on {r0['model']}, IPC {r0['ipc']}: label STEP→M (check after STEP of "
                 f"{r0['sample_steps']} steps, keep M per class); squares: two checks", fontsize=9)
    save_figure(fig, path, dpi=130)


def write(rows: list[dict], out_dir, tag: str):
    from pathlib import Path

    from .fileio import atomic_write, json_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out_dir / f"{tag}.json", out_dir / f"{tag}.png"
    atomic_write(jpath, json_bytes(rows, indent=1))
    plot_rows(rows, ppath)
    return jpath, ppath


def recommend(rows: list[dict], bar: float = 0.95) -> dict[tuple[int, float, str], dict]:
    """Per (K, guidance, order): the early-rejection setting that saves the most stage-1 DiT FLOPs with pick agreement
    at least ``bar``."""
    best: dict = {}
    for r in rows:
        if r["kind"] != "early_reject" or r["pick_agreement"] < bar:
            continue
        key = (r["k"], r["guidance_scale"], r["order"])
        if key not in best or r["dit_flop_saved"] > best[key]["dit_flop_saved"]:
            best[key] = r
    return best


# settings projected to ImageNet-1K whatever the grid finds: the digits-evaluated early rejection, the guidance
# interval with ≥ 95 % agreement at K 4, and both together
PROJECTED = (([(10, 20)], None), ([], (0.0, 5.0)), ([(10, 20)], (0.0, 5.0)))


def projections(rows: list[dict]) -> list[dict]:
    """``projection`` rows: ImageNet-1K IPC10 under :data:`PROJECTED` and under the grid's best K = 4, guidance 2.7
    setting that keeps ≥ 95 % of the picks (if any)."""
    head = {k: rows[0][k] for k in ("device", "model", "torch", "commit", "timestamp")}
    todo = list(PROJECTED)
    pick = recommend(rows).get((4, 2.7, "desc"))
    if pick is not None:
        todo.append(([tuple(c) for c in pick["checks"]], None))
    return [dict(head, kind="projection", projected=True, job="ImageNet-1K IPC10, official recipe",
                 **imagenet_projection(c, iv)) for c, iv in todo]


def run_and_write(preset: str, out_dir, repeats: int = 1, device: str = "cpu", log=print, warn=None) -> tuple:
    """The whole ``--early-reject-grid`` mode: the grid, the recommendation and the ImageNet-1K projection of the
    K = 4, guidance 2.7 pick (a ``projection`` row), written as ``early_reject_<preset>_cpu-<threads>t.json`` (or
    ``_cuda``) with its chart. Returns (rows, json path, chart path)."""
    rows = run_early_grid(preset, repeats=repeats, device=device, log=log, warn=warn)
    rows += projections(rows)
    dev = "cuda" if torch.cuda.is_available() and "cpu" not in rows[0]["device"] else f"cpu-{torch.get_num_threads()}t"
    jpath, ppath = write(rows, out_dir, f"early_reject_{preset}_{dev}")
    return rows, jpath, ppath
