"""``cao2-fast selftest``: what a user runs first on a new machine. Random weights at real shapes, no files needed.

Each check compares a fast path with its reference on the same inputs and says pass, fail or skip — with a figure
(the largest difference, or a throughput) and, for every skip or failure, the reason and what to do. Checks:

* every engine available here (compile, onnx on each usable ONNX Runtime provider, trt when importable) against
  eager on the DiT, the VAE decoder, the classifier, and MAR's encoder/decoder (in its fixed-shape form, against
  the released form) and diffusion head;
* the Triton kernels of stage 2 (noising, loss gradient, Adam) natively against their PyTorch references;
* one stage-2 step captured in a CUDA graph and replayed, against the same steps uncaptured;
* bf16 stage 2 against fp32;
* the MAR generator (a small random MAR): its fused attention against the released arithmetic, and its batched
  sampler and stage 2 against the same candidates and images run one at a time, and (on CUDA) its head's steps
  replayed from a CUDA graph against the same steps stepped;
* a short throughput figure for each stage.

Tolerances: fp32 engines 1e-4 (max abs, outputs of order 1; TF32 is off during the checks), VAE images 1e-3 (a
deeper graph), classifier logits 1e-3 and equal argmax; fused kernels and CUDA-graph replay 1e-4 after 5 steps; bf16
stage 2 within 10 % of fp32's movement (bf16 keeps 8 bits of mantissa in the DiT; x0, loss and Adam stay fp32).

Each check's ``figure`` is the line a reader sees; its numbers are kept as numbers too: ``metric`` (what was
measured: ``max_abs_diff``, ``relative_error`` or ``throughput``), ``value``, ``tol`` (the bound it must stay
within, None for a throughput) and ``unit``.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import torch

MODELS = ("tiny", "dit-s-2-256", "dit-b-2-256", "dit-l-2-256", "dit-xl-2-256")


@dataclass
class Check:
    name: str
    result: str  # "pass", "fail" or "skip"
    figure: str = ""
    reason: str = ""  # why it was skipped or failed, and what to do
    metric: str | None = None  # "max_abs_diff", "relative_error" or "throughput"; None when nothing was measured
    value: float | None = None
    tol: float | None = None
    unit: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


class _Runner:
    def __init__(self, log: Callable[[str], None]):
        self.checks: list[Check] = []
        self.log = log

    def run(self, name: str, fn: Callable[[], Check | tuple[bool, str, str]]) -> None:
        self.log(f"selftest: {name}")
        t0 = time.perf_counter()
        try:
            out = fn()
            check = out if isinstance(out, Check) else Check(name, "pass" if out[0] else "fail", out[1], out[2])
            check.name = name
        except Exception as e:  # noqa: BLE001  a check that crashes is a failure with its reason, not a crash
            line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            check = Check(name, "fail", "", f"{type(e).__name__}: {line}")
            if os.environ.get("CAO2_FAST_DEBUG"):
                traceback.print_exc()
        check.figure = check.figure or ""
        self.checks.append(check)
        self.log(f"selftest: {name}: {check.result} ({time.perf_counter() - t0:.1f} s)")


def skip(reason: str) -> Check:
    return Check("", "skip", "", reason)


def measured(ok: bool, figure: str, reason: str, metric: str, value: float, tol: float | None = None,
             unit: str | None = None) -> Check:
    """A check that measured ``value`` (of ``metric``, against ``tol``): its line and its numbers."""
    return Check("", "pass" if ok else "fail", figure, reason, metric, float(value),
                 None if tol is None else float(tol), unit)


def run_checks(device: str = "cpu", model: str = "tiny", with_compile: bool | None = None,
               log: Callable[[str], None] = lambda m: None) -> list[Check]:
    """All checks on ``device`` with random weights of ``model`` (see :data:`MODELS`). ``with_compile`` None checks
    torch.compile on CUDA only (on CPU it compiles for about a minute)."""
    from .benchmark import build_setup
    from .numerics import tf32

    dev = torch.device(device)
    with_compile = dev.type == "cuda" if with_compile is None else with_compile
    s = build_setup(model, device)
    dit = s.dit.to(dev, torch.float32)
    vae = s.vae.to(dev, torch.float32)
    clf = s.classifier.to(dev, torch.float32)
    r = _Runner(log)
    with tf32(False, dev), torch.no_grad():
        _engine_checks(r, dit, vae, clf, dev, with_compile)
    with tf32(False, dev), torch.no_grad():
        _sampler_checks(r, dit, dev)
    with tf32(False, dev):
        _stage2_checks(r, dit, dev)
        _mar_checks(r, dev)
        _throughput(r, s, dit, vae, clf, dev)
    return r.checks


# -- MAR -----------------------------------------------------------------------------------------------------------


def _mar_model(dev: torch.device):
    """The MAR the checks use: 64 tokens of 16 channels (MAR's own), small widths, random weights."""
    from .generators.mar import MARConfig, random_mar

    cfg = MARConfig(img_size=128, vae_stride=16, vae_embed_dim=16, buffer_size=8, encoder_embed_dim=64,
                    encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                    class_num=10, diffloss_d=2, diffloss_w=128)
    return random_mar(cfg, seed=3).to(dev)


def _mar_checks(r: _Runner, dev: torch.device) -> None:
    from .generators import mar as G
    from .generators.mar import MARDiffusion

    model = _mar_model(dev)
    cfg = model.cfg
    g = torch.Generator().manual_seed(4)
    n, seq, c = 4, cfg.seq_len, cfg.token_embed_dim
    labels = torch.arange(n, device=dev)

    def attention():
        tokens = torch.randn(n, seq, c, generator=g).to(dev)
        mask = (torch.rand(n, seq, generator=g) < 0.7).float().to(dev)
        emb = model.class_embedding(labels)
        with torch.no_grad():
            a = model.set_attention("math")(tokens, mask, emb)
            b = model.set_attention("sdpa")(tokens, mask, emb)
        model.set_attention("math")
        d = _max_diff(a, b)
        return measured(d <= 1e-4, f"max |diff| {d:.1e}", "" if d <= 1e-4 else
                        "fused attention differs from the released arithmetic; report it", "max_abs_diff", d, 1e-4)

    def sampler():
        diffusion = MARDiffusion.create("5")
        noise = G.MARStage1Noise.draw(n, seq, c, 5, g)
        emb = model.class_embedding(labels)
        whole = G.sample_tokens(model, diffusion, emb, noise, 4, 2.9)[3]
        parts = torch.cat([G.sample_tokens(model, diffusion, emb[i:i + 1], noise.slice(i, i + 1), 4, 2.9)[3]
                           for i in range(n)])
        d = _max_diff(whole, parts) / max(1.0, float(parts.abs().max()))
        return measured(d <= 1e-4, f"relative |diff| {d:.1e} (4 iterations)", "" if d <= 1e-4 else
                        "a candidate's tokens depend on its batch; report it", "relative_error", d, 1e-4)

    def optimise():
        noise = G.MARStage2Noise.draw(n, 3, seq, c, g)
        tokens = torch.randn(n, seq, c, generator=g)
        cond = model.class_embedding(labels)
        whole = G.optimise_tokens(model, tokens, cond, noise, 3, 6e-4, 10.0, device=dev)
        parts = torch.cat([G.optimise_tokens(model, tokens[i:i + 1], cond[i:i + 1], noise.slice(i, i + 1), 3, 6e-4,
                                             10.0, device=dev).tokens for i in range(n)])
        d = _max_diff(whole.tokens, parts)
        return measured(d <= 1e-4, f"max |diff| {d:.1e} after 3 steps", "" if d <= 1e-4 else
                        "an image's stage 2 depends on its batch; report it", "max_abs_diff", d, 1e-4)

    def head_loop():
        if dev.type != "cuda":
            return skip("the head's steps replay from a CUDA graph on CUDA only")
        diffusion = MARDiffusion.create("20")
        rows = 48
        x, z, zu = (torch.randn(rows, k, generator=g).to(dev) for k in (c, cfg.decoder_embed_dim,
                                                                          cfg.decoder_embed_dim))
        noise = torch.randn(rows, 20, c, generator=g).to(dev)
        d = 0.0
        for fp16 in (False, True):  # fp32, and the official recipe's fp16 autocast (its casts captured too)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                want = x
                for i in reversed(range(20)):
                    want = G.p_sample(model.diffloss.net, diffusion, want, i, z, noise[:, i], 1.0, 2.9, zu)
                loop = G.HeadLoop(model.diffloss.net, diffusion, guided=True)
                loop(x, z, zu, noise, 1.0, 2.9)  # the first call captures
                torch.cuda.empty_cache()  # what a freed cast would have held is reused: a stale graph shows
                got = loop(x + 0, z, zu, noise, 1.0, 2.9)
            if loop.failed is not None:
                break
            d = max(d, _max_diff(got.float(), want.float()) / max(1.0, float(want.abs().max())))
        if loop.failed is not None:  # it fell back to stepping: right numbers, no graph
            return measured(False, f"not captured: {loop.failed}", "the head's steps could not be captured in a "
                            "CUDA graph here, so stage 1 steps them uncaptured (slower, same numbers); report it",
                            "relative_error", d, 1e-4)
        return measured(d <= 1e-3, f"relative |diff| {d:.1e} (20 steps, replayed, fp32 and fp16 autocast)",
                        "" if d <= 1e-3 else "the CUDA-graph head loop differs from stepping it; run with --engine "
                        "onnx", "relative_error", d, 1e-3)

    r.run("MAR fused attention vs released", attention)
    r.run("MAR sampler batched vs one by one", sampler)
    r.run("MAR stage 2 batched vs one by one", optimise)
    r.run("MAR head steps as a CUDA graph vs stepped", head_loop)


# -- engines -------------------------------------------------------------------------------------------------------

TOL = {"dit": 1e-4, "vae_decode": 1e-3, "classifier": 1e-3, "mar_mae": 1e-4, "mar_head": 1e-4}


def _engine_checks(r: _Runner, dit, vae, clf, dev: torch.device, with_compile: bool) -> None:
    import importlib.util
    import tempfile

    from .engines import EngineCache, build_engine, stage1_specs
    from .generators.dit import DiTGenerator
    from .engines.registry import require
    from .errors import UserError

    def problem(on: torch.device):
        """(specs, inputs, eager outputs) with the models on ``on``."""
        models = [m if on == dev else copy.deepcopy(m).to(on) for m in (dit, vae, clf)]
        specs = stage1_specs(DiTGenerator(*models[:2]), models[2])
        g = torch.Generator().manual_seed(0)
        latent = specs["dit"].inputs[0].shape
        x = torch.randn(2, *latent, generator=g).to(on)
        z = torch.randn(2, *latent, generator=g).to(on)
        inputs = {"dit": (x, torch.tensor([10.0, 500.0], device=on), torch.tensor([1, dit.null_class], device=on)),
                  "vae_decode": (z,)}
        ref = {"dit": models[0](*inputs["dit"]), "vae_decode": models[1].decode(z)}
        inputs["classifier"] = (ref["vae_decode"].clamp(-1, 1),)
        ref["classifier"] = models[2](*inputs["classifier"])
        for part, more in zip((specs, inputs, ref), _mar_engine_problem(on, g)):
            part.update(more)
        return specs, inputs, ref

    problems = {}

    def check(engine_name: str, on: torch.device, label: str, fix: str) -> None:
        try:
            require(engine_name, on, "float32")
        except UserError as e:
            for m in TOL:
                r.run(f"{label}: {m}", lambda e=e: skip(str(e)))
            return
        if on not in problems:
            problems[on] = problem(on)
        specs, inputs, ref = problems[on]
        with tempfile.TemporaryDirectory(prefix="cao2-selftest-") as tmp:  # built to be checked, then removed
            cache = EngineCache(tmp)
            for m, spec in specs.items():
                def one(m=m, spec=spec):
                    out = build_engine(engine_name, spec, on, cache=cache, batch=(1, 2, 2))(*inputs[m])
                    d = _max_diff(out, ref[m])
                    ok = d <= TOL[m] and (m != "classifier" or torch.equal(out.argmax(1).cpu(),
                                                                          ref[m].argmax(1).cpu()))
                    return measured(ok, f"max |diff| {d:.1e} (tol {TOL[m]:.0e})",
                                    "" if ok else f"differs from eager; {fix}", "max_abs_diff", d, TOL[m])
                r.run(f"{label}: {m}", one)

    if with_compile:
        check("compile", dev, "engine compile", "run with --engine eager")
    else:
        for m in TOL:
            r.run(f"engine compile: {m}", lambda: skip("torch.compile on CPU compiles for about a minute; pass "
                                                       "--compile to include it"))
    cpu = torch.device("cpu")
    if dev.type == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            check("onnx", dev, "engine onnx (CUDA provider)", "run with --engine eager or compile")
        else:
            for m in TOL:
                r.run(f"engine onnx (CUDA provider): {m}", lambda: skip(
                    "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); --engine onnx runs on CPU "
                    "only here"))
    check("onnx", cpu, "engine onnx (CPU provider)", "run with --engine eager or compile")
    if importlib.util.find_spec("tensorrt") is None:
        for m in TOL:
            r.run(f"engine trt: {m}", lambda: skip('tensorrt is not installed (pip install "cao2-fast[trt]"); use '
                                                   "--engine onnx or compile"))
    else:
        check("trt", dev, "engine trt", "run with --engine onnx or compile")


def _mar_engine_problem(on: torch.device, g: torch.Generator) -> tuple[dict, dict, dict]:
    """(specs, inputs, eager outputs) of MAR's engines: its encoder/decoder in the fixed-shape form (against the
    released form, which drops the hidden tokens) and its diffusion head."""
    from .generators.mar import head_spec, mae_spec

    mar = _mar_model(on)
    seq, c, w = mar.cfg.seq_len, mar.cfg.token_embed_dim, mar.cfg.decoder_embed_dim
    mask = (torch.rand(2, seq, generator=g) < 0.7).float().to(on)
    inputs = {"mar_mae": (torch.randn(2, seq, c, generator=g).to(on), mask,
                          mar.class_embedding(torch.tensor([1, 2], device=on))),
              "mar_head": (torch.randn(4, c, generator=g).to(on), torch.tensor([0.0, 10.0, 500.0, 999.0], device=on),
                           torch.randn(4, w, generator=g).to(on))}
    x, t, z = inputs["mar_head"]
    ref = {"mar_mae": mar(*inputs["mar_mae"]), "mar_head": mar.diffloss.net(x, t.long(), z)}
    return {"mar_mae": mae_spec(mar), "mar_head": head_spec(mar)}, inputs, ref


# -- stage 2 -------------------------------------------------------------------------------------------------------


def _stage2_problem(dit, dev, b: int = 4, steps: int = 5):
    from . import stage2
    from .diffusion import Diffusion

    cfg = dit.cfg
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    g = torch.Generator().manual_seed(1)
    diffusion = Diffusion.create(respacing=50)
    x0 = torch.randn(b, *latent, generator=g)
    noise = stage2.Stage2Noise.draw(b, latent, steps, 11, g, dropout_prob=0.0)
    y = torch.full((b,), dit.null_class)

    def run(model, dtype=torch.float32, **kw):
        return stage2.optimize(lambda *a: model(*a), diffusion, x0, y, noise, steps, 6e-4, 10.0, "official", False,
                               dev, dtype, **kw)

    return x0, run


def _sampler_checks(r: _Runner, dit, dev: torch.device) -> None:
    """The few-step stage-1 samplers on ``dev``, run in two halves with the solver state carried across and the
    batch split differently, against one uninterrupted run on the CPU."""
    from . import stage1
    from .schedulers import SchedulerSampler

    cpu_dit = dit if dev.type == "cpu" else copy.deepcopy(dit).to("cpu")
    g = torch.Generator().manual_seed(0)
    latent = (dit.cfg.in_channels, dit.cfg.input_size, dit.cfg.input_size)
    noise = stage1.Stage1Noise(torch.randn(4, *latent, generator=g), torch.zeros(0, 4, *latent))
    y = torch.tensor([0, 1, 2, 3]) % dit.null_class

    def one(kind: str):
        def check():
            steps = 8
            sampler = SchedulerSampler(kind, steps)
            args = (noise, y, dit.null_class, 2.7, 3)
            ref = stage1.generate(cpu_dit, sampler, *args, "cpu", torch.float32, batch=4)
            x, _, state = stage1.generate(dit, sampler, *args, dev, torch.float32, batch=2, stop=steps // 2,
                                          return_x0=True, return_state=True)
            out = stage1.generate(dit, sampler, *args, dev, torch.float32, batch=3, x=x, start=steps // 2,
                                  state=state)
            rel = _max_diff(out, ref) / max(float(ref.abs().max()), 1e-12)
            ok = rel <= 1e-3 and bool(torch.isfinite(out).all())
            return measured(ok, f"max |diff| {rel:.1e} of the largest value (tol 1e-03)", "" if ok else
                            f"--sampler {kind} strays on this device; use --sampler ddpm (the default)",
                            "relative_error", rel, 1e-3, "fraction of the largest latent value")
        return check

    for kind in ("ddim", "dpmpp"):
        r.run(f"stage-1 sampler {kind}: split on {dev.type} vs one run on the CPU", one(kind))


def _stage2_checks(r: _Runner, dit, dev: torch.device) -> None:
    import warnings

    from .kernels import triton_available

    x0, run = _stage2_problem(dit, dev)

    def kernels():
        if not triton_available(dev):
            why = ("Triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU, as the test suite runs them)"
                   if dev.type != "cuda" else "Triton cannot compile for this GPU; stage 2 uses the torch ops")
            return skip(why)
        a = run(dit, ops="triton")
        b = run(dit, ops="torch")
        d = _max_diff(a.latents, b.latents)
        return measured(d <= 1e-4, f"max |diff| {d:.1e} after 5 steps", "" if d <= 1e-4 else
                        "fused kernels differ from their references; report it with this output", "max_abs_diff", d,
                        1e-4)

    def graph():
        if dev.type != "cuda":
            return skip("CUDA graphs need a CUDA device")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a capture that fails would warn and fall back
            a = run(dit, cuda_graph=True)
        b = run(dit, cuda_graph=False)
        d = _max_diff(a.latents, b.latents)
        return measured(d <= 1e-4, f"max |diff| {d:.1e} after 5 steps", "" if d <= 1e-4 else
                        "the captured step differs from the plain one; report it", "max_abs_diff", d, 1e-4)

    def bf16():
        ref = run(dit)
        low = run(copy.deepcopy(dit).to(torch.bfloat16), torch.bfloat16)
        moved = float((ref.latents - x0).flatten(1).norm(dim=1).min())
        err = float((low.latents - ref.latents).flatten(1).norm(dim=1).max())
        ok = moved > 0 and err <= 0.1 * moved and bool(low.finite.all())
        rel = err / moved if moved > 0 else float("inf")
        return measured(ok, f"{100 * rel:.1f} % of the movement (tol 10 %)", "" if ok else
                        "bf16 stage 2 strays from fp32; run with --dtype float32", "relative_error", rel, 0.1,
                        "fraction of the fp32 movement")

    r.run("stage-2 Triton kernels vs references", kernels)
    r.run("stage-2 step in a CUDA graph vs uncaptured", graph)
    r.run("stage 2 bf16 vs fp32", bf16)


def _throughput(r: _Runner, s, dit, vae, clf, dev: torch.device) -> None:
    from . import selection, stage1
    from .benchmark import _sync
    from .diffusion import Diffusion

    cfg = dit.cfg
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    n = 4

    def stage1_rate():
        g = torch.Generator().manual_seed(2)
        noise = stage1.Stage1Noise.draw(n, latent, 3, g)
        labels = torch.zeros(n, dtype=torch.long)
        diffusion = Diffusion.create(respacing=3)

        def go():
            with torch.no_grad():
                z = stage1.generate(dit, diffusion, noise, labels, dit.null_class, 2.7, 3, dev, torch.float32, n)
                selection.decode_and_score(vae.decode, clf, z, dev, torch.float32, n)

        go()
        _sync(dev)
        t0 = time.perf_counter()
        go()
        _sync(dev)
        per = (time.perf_counter() - t0) / n * 50 / 3  # one candidate, 50 steps
        return measured(True, f"{1 / per:.2f} candidates/s (fp32, eager, batch {n})", "", "throughput", 1 / per,
                        unit="candidates/s")

    def stage2_rate():
        _, run = _stage2_problem(dit, dev, b=n, steps=3)
        run(dit)
        _sync(dev)
        t0 = time.perf_counter()
        run(dit)
        _sync(dev)
        rate = n * 3 / (time.perf_counter() - t0)
        return measured(True, f"{rate:.1f} latent-steps/s (fp32, batch {n})", "", "throughput", rate,
                        unit="latent-steps/s")

    r.run("throughput stage 1", stage1_rate)
    r.run("throughput stage 2", stage2_rate)
