"""``cao2-fast bench --backbone mar``: the MAR generator's released execution (``reference``) against this project's
(``fast``), stage by stage, on the embedded ``digits-mar`` preset under the official recipe, in one process, on the
same models and draws; with attribution rows that say how much of each ratio one removal earns.

Stage 1 (unit: candidates/s; an item is one candidate sampled over the preset's sampling iterations, then decoded and
scored twice, as the recipe does):

* ``reference``: one class at a time, its 2·IPC candidates per batch (every DiffLoss step of the few tokens a class
  reveals per iteration a call of its own), the teacher seeing each decode through an 8-bit JPEG (quality 75) read
  back, as released;
* ``fast``: every timed class's candidates in one batch, still through the JPEG round trip (the official recipe);
* ``fast-no-jpeg`` (attribution): ``fast`` with the teacher's view made in memory (recipe field
  ``mar_teacher_io="tensor"``; the picks can then differ from the official recipe's).

Stage 2 (unit: latent-steps/s; an item is one Adam step of one latent: the loss's forward and its gradient):

* ``reference``: one image at a time, a fresh ``torch.optim.Adam`` per image, the model's weights trainable (their
  gradients computed, never used), fp32, as released (:func:`~cao2_fast.generators.mar.released_stage2_image`);
* ``per-image-no-wgrad`` (attribution): one image at a time on the same fp32 model, gradients for the tokens only
  (:func:`~cao2_fast.generators.mar.optimise_tokens` on a batch of 1);
* ``fast``: :func:`~cao2_fast.generators.mar.optimise_tokens` on the stage-2 batch;
* ``fast-compile`` (with ``compile_stage2``, ``cao2-fast bench --backbone mar --compile``): ``fast`` with the loss on
  the torch.compile engine, what ``--stage2-engine compile`` runs (its compile time, spent on the warm-up, is the
  row's ``compile_s``); the digits and ImageNet-1K jobs are then also projected on it.

Rows have the fields of the DiT bench's (:mod:`cao2_fast.benchmark`: they are made by its ``_measured_row`` and
``_finish``), so its ``write_results``, ``format_table`` and chart take them as they are; timing follows it too:
warm-up outside the timed region, the paths alternating run by run, medians with the spread of the runs, ratios to
``reference`` with the spread of the per-round ratios. FLOPs per item come from the generator's cost model
(``stage1_flops`` per class over its candidates, ``stage2_flops`` per image over its steps); the reference's
weight-gradient work is not counted as useful. Stage 1's memory is measured on each path's warm-up run (one MAR
stage-1 run is long; the DiT bench measures on one more run), stage 2's on one more run.

``steps1`` sets the sampling iterations timed (default: the preset's full schedule). A candidate's work is not
uniform over the iterations (the encoder sees more tokens as they are revealed, and each iteration reveals a
different count of tokens for the DiffLoss head), so a shorter schedule is a different schedule, not a prefix: its
sampling time is scaled to the full one by the ratio of their FLOP counts, and the decode and score time (twice per
candidate whatever the schedule) is counted once, unscaled.

Projected rows (``"projected": true``, no batch, TFLOP/s, MFU or memory):

* stage ``e2e``: the digits job ``cao2-fast distill --backbone mar`` runs (10 classes at IPC 10: 200 candidates,
  100 latents × 100 steps) from the stage rows' per-item times;
* stage ``in1k``: ImageNet-1K at IPC 10 on ``mar_base`` (20,000 candidates, 10,000 latents × 100 steps, the FLOPs
  of ``mar_base``'s own cost model under the official recipe) at the TFLOP/s each path reached on this device (its
  MFU times this device's peak), with the floors at this device's peak and at an H100's (``PEAK_TFLOPS``).
"""

from __future__ import annotations

import datetime as _dt
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .benchmark import (PEAK_TFLOPS, _Clock, _commit, _device_name, _finish, _measured_row, _peak_of, _peak_tflops,
                        _timed, _timed_scaled, _version, check_count, format_table, spread, start_run, write_results)
from .errors import UserError

PRESET = "digits-mar"
STAGE1_PATHS = ("reference", "fast", "fast-no-jpeg")
STAGE2_PATHS = ("reference", "per-image-no-wgrad", "fast")
E2E_PATHS = {"reference": ("reference", "reference"), "fast": ("fast", "fast"),
             "fast-no-jpeg": ("fast-no-jpeg", "fast")}  # job path: (its stage-1 row, its stage-2 row)
DIGITS_JOB = {"classes": 10, "ipc": 10}  # what `cao2-fast distill --backbone mar` runs on the preset
IN1K = {"classes": 1000, "ipc": 10, "size": "mar_base"}
IN1K_STAGE = "in1k"
FLOOR_GPU = "H100"  # the GPU the ImageNet-1K projection also gives the floor of (its PEAK_TFLOPS entry)


def refuse_options(*, model=None, random_weights=False, preset=None, early_reject=None, early_keep=None,
                   early_reject_grid=False, ops=None) -> None:
    """One ``UserError`` for the first ``cao2-fast bench`` option that means nothing with ``--backbone mar``."""
    if model is not None:
        raise UserError(f"--model {model} builds a DiT architecture; --backbone mar benches the {PRESET} preset: "
                        "drop --model")
    if random_weights:
        raise UserError(f"--random-weights goes with --model (a DiT); --backbone mar benches the {PRESET} preset")
    if preset is not None and preset != PRESET:
        raise UserError(f"--preset {preset} is a DiT preset; --backbone mar benches {PRESET}: drop --preset")
    for flag, given in (("--early-reject", early_reject), ("--early-keep", early_keep),
                        ("--early-reject-grid", early_reject_grid)):
        if given:
            raise UserError(f"{flag}: early rejection is a DiT sampler option; MAR has no such check (drop {flag} "
                            "or bench --backbone dit)")
    if ops is not None and ops != "torch":
        raise UserError(f"--ops {ops}: the Triton stage-2 kernels are the DiT's; MAR's stages run torch ops "
                        "(drop --ops)")


def tag(device) -> str:
    """The results' file name (without suffix): ``bench_digits-mar_cuda`` or ``bench_digits-mar_cpu-<threads>t``
    (CPU results depend on the thread count); never a DiT bench's."""
    where = "cuda" if torch.device(device).type == "cuda" else f"cpu-{torch.get_num_threads()}t"
    return f"bench_{PRESET}_{where}"


@dataclass
class _Ctx:
    """What :func:`cao2_fast.benchmark._measured_row` and ``_finish`` read of a bench run."""

    base: dict
    peak: float | None
    load_before: dict
    warn: Callable[[str], None]


class _ScoreClock:
    """Times a Distiller's decode-and-score calls (its ``_score``) into ``clock`` while one is set."""

    def __init__(self, distiller):
        self.clock: _Clock | None = None
        score = distiller._score

        def timed(latents, io="tensor"):
            if self.clock is None:
                return score(latents, io=io)
            with self.clock:
                return score(latents, io=io)

        distiller._score = timed


def in1k_flops(recipe: str = "official") -> dict:
    """``mar_base``'s cost model for ImageNet-1K at IPC 10 under ``recipe``: FLOP per candidate (sampling, without
    the decodes and classifier calls), per latent-step, and the job's counts; from the generator's own
    ``stage1_flops``/``stage2_flops`` on ``MARConfig.named("mar_base")`` and the family's default config."""
    from types import SimpleNamespace

    from .config import build_config
    from .generators.mar import MARConfig, MARGenerator

    cost = SimpleNamespace(mar=SimpleNamespace(cfg=MARConfig.named(IN1K["size"])))  # the cost model needs the config
    cfg = build_config("imagenet-1k", IN1K["ipc"], recipe, num_model_classes=IN1K["classes"],
                       family_defaults=lambda rec: MARGenerator.config_defaults(cost, rec))
    return {"flop_per_candidate": MARGenerator.stage1_flops(cost, cfg) / cfg.num_candidates,
            "flop_per_latent_step": MARGenerator.stage2_flops(cost, cfg) / cfg.stage2_steps,
            "candidates": len(cfg.class_ids) * cfg.num_candidates, "latents": len(cfg.class_ids) * cfg.ipc,
            "stage2_steps": cfg.stage2_steps, "sample_steps": cfg.sample_steps, "token_steps": cfg.token_steps}


def run_bench_mar(device: str = "cpu", fast_dtype: str | None = None, steps1: int | None = None, steps2: int = 5,
                  ref_images: int = 2, fast_batch: int | None = None, repeats: int = 3, ipc: int = 10,
                  classes: int | None = None, compile_stage2: bool = False, log: Callable[[str], None] = print,
                  warn: Callable[[str], None] | None = None) -> list[dict]:
    """Measure the MAR paths of stage 1 and stage 2 on the digits MAR preset (official recipe) and project the
    digits and ImageNet-1K jobs. Returns JSON-ready rows (module docstring).

    ``steps1``: sampling iterations timed (default the preset's); ``steps2``: stage-2 steps timed per latent;
    ``ref_images``: images the one-image paths optimise per run; ``fast_batch``: the fast stage-2 batch (default
    the preset's stage-2 batch, halved on out-of-memory); ``ipc``: images per class timed (2·IPC candidates each);
    ``classes``: classes timed in stage 1 (default all 10: the reference runs them one at a time, the fast paths in
    one batch); ``fast_dtype``: the fast paths' dtype (default float32, the recipe's); ``compile_stage2``: also
    the ``fast-compile`` stage-2 path."""
    from .config import with_overrides
    from .generators.mar import MARStage2Noise, optimise_tokens, patchify, released_stage2_image
    from .numerics import tf32
    from .pipeline import Distiller, read_preset
    from .stage2 import halve_on_oom

    for name, v, least in (("steps2", steps2, 1), ("ref_images", ref_images, 1), ("repeats", repeats, 1),
                           ("fast_batch", fast_batch, 1), ("ipc", ipc, 1), ("classes", classes, 1),
                           ("steps1", steps1, 2)):
        check_count(name, v, least)
    meta = read_preset(PRESET)
    n_classes = len(meta["class_names"])
    if classes is not None and classes > n_classes:
        raise UserError(f"classes: the {PRESET} preset has {n_classes} classes (got {classes})")
    ids = list(range(classes or n_classes))
    dev, load, warn = start_run(device, log, warn)
    on_cuda = dev.type == "cuda"

    log(f"building the {PRESET} models on {device}")
    fast_dtype = fast_dtype or "float32"
    fast = Distiller.from_preset(PRESET, ipc=ipc, device=str(dev), class_ids=ids, dtype=fast_dtype)
    full_cfg = fast.config  # the preset's own sampling schedule: what an item is normalised to
    n = full_cfg.num_candidates
    timed_steps = full_cfg.sample_steps if steps1 is None else steps1
    seq_len = fast.generator.mar.cfg.seq_len
    if timed_steps > seq_len:
        raise UserError(f"steps1 {timed_steps}: MAR reveals at least one of its {seq_len} tokens per iteration, so "
                        f"it samples in at most {seq_len} iterations")
    cfg = with_overrides(full_cfg, sample_steps=timed_steps, stage1_batch=len(ids) * n)
    fast.config = cfg
    nojpeg = Distiller(fast.generator, fast.classifier,
                       with_overrides(cfg, recipe=replace(cfg.recipe, mar_teacher_io="tensor")), device=str(dev))
    ref = Distiller.from_preset(PRESET, ipc=ipc, device=str(dev), class_ids=ids, dtype="float32")
    ref.config = with_overrides(ref.config, sample_steps=timed_steps, stage1_batch=n)  # one class per batch
    ref.generator.graph_head_steps = False  # the released head: its MLP called once per step, on CUDA too
    gen, rec = fast.generator, cfg.recipe

    peak, peak_source = _peak_tflops(dev)
    base = {"device": _device_name(dev), "model": PRESET, "backbone": "mar", "recipe": rec.name,
            "torch": torch.__version__, "triton": _version("triton"), "commit": _commit(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "peak_tflops": peak, "peak_source": peak_source, "repeats": repeats}
    ctx = _Ctx(base, peak, load, warn)

    # -- stage 1 ---------------------------------------------------------------------------------------------------
    clocks = {name: _ScoreClock(d) for name, d in (("reference", ref), ("fast", fast), ("fast-no-jpeg", nojpeg))}
    picks: dict = {}

    def path1(name: str, runs: Callable[[], dict]):
        def run(clock):
            clocks[name].clock = clock
            try:
                picks[name] = runs()
            finally:
                clocks[name].clock = None
        return run

    def ref_stage1() -> dict:
        out = {}
        for c in ids:  # one class at a time, as released
            out.update(ref.stage1([c]))
        return out

    fns1 = [path1("reference", ref_stage1), path1("fast", lambda: fast.stage1(ids)),
            path1("fast-no-jpeg", lambda: nojpeg.stage1(ids))]
    flop_timed = gen.stage1_flops(cfg)
    flop_full = gen.stage1_flops(full_cfg)
    scale = flop_full / flop_timed  # sampling time of the timed schedule -> of the preset's (1 when it is the same)
    n1 = len(ids) * n
    log(f"stage 1: warm-up (memory measured on it), then {repeats} timed runs of each path ({len(ids)} classes, "
        f"{n1} candidates, {timed_steps} of {full_cfg.sample_steps} sampling iterations, {cfg.token_steps} head "
        f"steps per token)")
    mems1 = [_peak_of(lambda fn=fn: fn(_Clock(dev)), dev) for fn in fns1]
    totals, inside = _timed_scaled(fns1, dev, repeats, scale)
    guided = 2 if cfg.guidance_scale != 1.0 else 1
    flop1 = flop_full / n  # per candidate of the preset's schedule
    rows = []
    for path, tot, ins, (gib, how) in zip(STAGE1_PATHS, totals, inside, mems1):
        rows.append(_measured_row(
            ctx, "1", path, "float32" if path == "reference" else fast_dtype, guided * (n if path == "reference" else n1),
            "candidates/s", tot, n1, flop1, (gib, f"{how} (the warm-up run)"),
            decode_score_share=statistics.median(ins) / statistics.median(tot), steps_timed=timed_steps,
            sample_steps=full_cfg.sample_steps, sampling_scale=scale, token_steps=cfg.token_steps,
            classes=len(ids), candidates_per_class=n,
            teacher_io="tensor" if path == "fast-no-jpeg" else rec.mar_teacher_io,
            stage1_autocast="float16" if rec.mar_autocast and on_cuda else None))
    log("stage 1: " + ", ".join(f"{r['path']} {r['throughput']:.2f}" for r in rows) + " candidates/s ("
        + ", ".join(f"{rows[0]['seconds_per_item'] / r['seconds_per_item']:.2f}x" for r in rows[1:]) + ")")

    # -- stage 2 ---------------------------------------------------------------------------------------------------
    log(f"stage 2: warm-up, then {repeats} timed runs of each path ({steps2} steps per latent; the one-image paths "
        f"{ref_images} images)")
    latents = torch.cat([picks["fast"][c]["latents"] for c in ids])
    labels = torch.tensor([c for c in ids for _ in range(len(picks["fast"][c]["latents"]))])
    if not len(latents):
        raise UserError("stage 1 kept no latent to optimise (every candidate was not finite)")
    batch = fast_batch or cfg.stage2_batch
    count = max(batch, ref_images)
    take = torch.arange(count) % len(latents)  # the kept latents, repeated to fill the batch
    mc = gen.mar.cfg
    tokens, labels = patchify(latents[take].float(), mc.patch_size), labels[take]
    noise = MARStage2Noise.draw(count, steps2, mc.seq_len, mc.token_embed_dim, torch.Generator().manual_seed(0))
    attached, vb, rule = rec.mar_target_grad == "attached", rec.mar_stage2_vb, rec.mar_mask_rule
    ref_mar = ref.generator.mar
    cond_ref = ref.generator.stage2_condition(ref.config, labels[:ref_images])
    ones = [MARStage2Noise(*(getattr(noise, f)[i].to(dev) for f in ("orders", "u", "t", "eps")))
            for i in range(ref_images)]
    numerics = lambda: tf32(rec.tf32, dev)  # noqa: E731  (the recipe's TF32 on CUDA, for every path)

    def run_ref2():
        with numerics():
            for i in range(ref_images):
                released_stage2_image(ref_mar, tokens[i].to(dev), cond_ref[i:i + 1], ones[i], steps2, cfg.lr, cfg.lam,
                                      rule, attached, vb)

    def run_nowgrad2():
        with numerics():
            for i in range(ref_images):
                optimise_tokens(ref_mar, tokens[i:i + 1], cond_ref[i:i + 1], noise.slice(i, i + 1), steps2, cfg.lr,
                                cfg.lam, rule, attached, vb, dev)

    def attempt(b: int, objective=None):
        cond = gen.stage2_condition(cfg, labels[:b])
        nz = noise.slice(0, b)

        def run():
            with numerics():
                optimise_tokens(gen.mar, tokens[:b], cond, nz, steps2, cfg.lr, cfg.lam, rule, attached, vb, dev,
                                objective=objective)

        return run, _timed(run, dev)  # the warm-up (with a compiled objective, its compilation)

    run_ref2()
    run_nowgrad2()
    batch, (run_fast2, _) = halve_on_oom(attempt, batch, log)
    paths2, runs2, compile_s = list(STAGE2_PATHS), [run_ref2, run_nowgrad2, run_fast2], None
    if compile_stage2:
        from .engines import stage2_engine

        engine = stage2_engine("compile", gen.stage2_module(), dev, fast_dtype)
        log(f"stage 2: compiling the objective (fast-compile, batch {batch})")
        run_compiled, compile_s = attempt(batch, engine)
        paths2.append("fast-compile")
        runs2.append(run_compiled)
    totals2, _ = _timed_scaled([lambda c, fn=fn: fn() for fn in runs2], dev, repeats, 1.0)
    mems2 = [_peak_of(fn, dev) for fn in runs2]
    flop2 = gen.stage2_flops(cfg) / cfg.stage2_steps  # per latent-step
    for path, tot, mem in zip(paths2, totals2, mems2):
        one = not path.startswith("fast")
        rows.append(_measured_row(ctx, "2", path, "float32" if one else fast_dtype, 1 if one else batch,
                                  "latent-steps/s", tot, (ref_images if one else batch) * steps2, flop2, mem,
                                  engine="compile" if path == "fast-compile" else "eager",
                                  compile_s=compile_s if path == "fast-compile" else None,
                                  weight_grads=path == "reference", steps_timed=steps2))
    s2 = rows[-len(paths2):]
    log("stage 2: " + ", ".join(f"{r['path']} {r['throughput']:.1f}" for r in s2) + " latent-steps/s ("
        + ", ".join(f"{s2[0]['seconds_per_item'] / r['seconds_per_item']:.2f}x" for r in s2[1:])
        + f", fast batch {batch})")

    rows += project(ctx, rows, cfg.stage2_steps, in1k_flops(rec.name),
                    {**E2E_PATHS, "fast-compile": ("fast", "fast-compile")} if compile_stage2 else E2E_PATHS)
    _finish(ctx, rows)
    return rows


def project(ctx: _Ctx, rows: list[dict], stage2_steps: int, in1k: dict, paths: dict = E2E_PATHS) -> list[dict]:
    """The projected rows of each job path (``paths``, by default :data:`E2E_PATHS`): the digits job (stage
    ``e2e``) from the stage rows' per-item times, and ImageNet-1K IPC 10 on ``mar_base`` (stage ``in1k``) at the TFLOP/s each stage row reached
    (its per-item time scaled by mar_base's FLOPs over the digits model's). Marked ``projected``, with the projection
    of each round of runs as their spread, and no measured-looking fields."""
    n_digits = DIGITS_JOB["classes"] * 2 * DIGITS_JOB["ipc"]
    digits = {"candidates": n_digits, "latents": DIGITS_JOB["classes"] * DIGITS_JOB["ipc"]}
    big = {"candidates": in1k["candidates"], "latents": in1k["latents"]}
    out = []
    for stage, job, steps in (("e2e", digits, stage2_steps), (IN1K_STAGE, big, in1k["stage2_steps"])):
        for path, (p1, p2) in paths.items():
            r1 = next(r for r in rows if r["stage"] == "1" and r["path"] == p1)
            r2 = next(r for r in rows if r["stage"] == "2" and r["path"] == p2)
            if stage == "e2e":
                f1, f2 = r1["flop_per_item"], r2["flop_per_item"]
                k1 = k2 = 1.0
            else:  # mar_base's items at the rate the digits items ran at
                f1, f2 = in1k["flop_per_candidate"], in1k["flop_per_latent_step"]
                k1, k2 = f1 / r1["flop_per_item"], f2 / r2["flop_per_item"]

            def seconds(s1: float, s2: float) -> float:
                return job["candidates"] * k1 * s1 + job["latents"] * steps * k2 * s2

            sec = seconds(r1["seconds_per_item"], r2["seconds_per_item"])
            runs = [seconds(a, c) for a, c in zip(r1["seconds_per_item_runs"], r2["seconds_per_item_runs"])]
            flop = job["candidates"] * f1 + job["latents"] * steps * f2
            row = dict(ctx.base, stage=stage, path=path, projected=True, dtype=r2["dtype"], unit="jobs/h",
                       throughput=3600 / sec, seconds_per_item=sec, flop_per_item=flop, job=job,
                       projected_minutes=sec / 60, projected_from=[f"stage 1 {p1}", f"stage 2 {p2}"],
                       seconds_per_item_runs=runs, spread={"projected_minutes": spread([t / 60 for t in runs])},
                       floor_minutes=(flop / (ctx.peak * 1e12) / 60) if ctx.peak else None)
            if stage == IN1K_STAGE:
                row.update(projected_model=in1k_model(), flop_stage1=job["candidates"] * f1,
                           flop_stage2=job["latents"] * steps * f2,
                           floor_minutes_h100=flop / (PEAK_TFLOPS[FLOOR_GPU] * 1e12) / 60,
                           floor_h100_source=f"{PEAK_TFLOPS[FLOOR_GPU]:g} TFLOP/s, the bf16 matmul rate measured on "
                                             f"{FLOOR_GPU} (cao2_fast.benchmark.PEAK_TFLOPS)",
                           projected_at="the TFLOP/s each stage row reached on this device (its MFU × this "
                                        "device's peak); mar_base's decodes and classifier calls not counted")
            out.append(row)
    return out


def in1k_model() -> str:
    return f"{IN1K['size']} (ImageNet-1K, IPC {IN1K['ipc']}, official recipe)"


def format_mar_table(rows: list[dict]) -> str:
    """:func:`cao2_fast.benchmark.format_table` and what the MAR rows add: the attribution paths and the ImageNet-1K
    projection's FLOPs and floors."""
    lines = [format_table(rows),
             "paths: stage 1 reference = one class per batch, JPEG teacher view (released); fast = the timed classes "
             "in one batch, JPEG view (official recipe); fast-no-jpeg = fast with the teacher view in memory "
             "(attribution). stage 2 reference = one image at a time, weight gradients on (released); "
             "per-image-no-wgrad = one image at a time, token gradients only (attribution); fast = batched; "
             "fast-compile = fast on the torch.compile engine (with --compile)"]
    r1 = next((r for r in rows if r["stage"] == "1"), None)
    if r1 and r1.get("steps_timed") != r1.get("sample_steps"):
        lines.append(f"stage 1 timed over {r1['steps_timed']} of {r1['sample_steps']} sampling iterations, its "
                     f"sampling time scaled ×{r1['sampling_scale']:.3g} by the cost model (decodes counted once)")
    for r in rows:
        if r["stage"] != IN1K_STAGE:
            continue
        floor = (f"floor {r['floor_minutes']:,.1f} min at this device's peak" if r.get("floor_minutes") else
                 "no peak known for this device: its floor needs a GPU peak")
        lines.append(f"projected ImageNet-1K IPC10 on {IN1K['size']} ({r['job']['candidates']} candidates, "
                     f"{r['job']['latents']} latents; {r['flop_stage1'] / 1e18:.3f} + {r['flop_stage2'] / 1e18:.3f} "
                     f"EFLOP), {r['path']}: {r['projected_minutes']:,.1f} min at the TFLOP/s measured here; {floor}; "
                     f"{r['floor_minutes_h100']:.1f} min at 100 % of an {FLOOR_GPU} ({PEAK_TFLOPS[FLOOR_GPU]:g} "
                     f"TFLOP/s) (not measured)")
    return "\n".join(lines)


def run_and_write(out_dir: Path, device: str = "cpu", log: Callable[[str], None] = print,
                  warn: Callable[[str], None] | None = None, **kw) -> tuple[list[dict], Path, Path]:
    """:func:`run_bench_mar` (``kw``) and its rows written to ``out_dir`` as ``<tag>.json`` and ``<tag>.png``
    (:func:`tag`). The destination is checked before the run: a refused one costs no bench time."""
    from .benchmark import check_destination

    name = tag(device)
    check_destination(out_dir, name)
    rows = run_bench_mar(device, log=log, warn=warn, **kw)
    jpath, ppath = write_results(rows, out_dir, name)
    return rows, jpath, ppath
