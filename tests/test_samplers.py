"""Few-step stage-1 samplers (``--sampler ddim|dpmpp``): each against an independent float64 restatement of its
update, resumable and rebatchable like the DDPM sampler, wired through config, CLI and stage 1.

Tolerance against the restatement: diffusers keeps its schedule in float32 and our run steps in float32, the
restatement is float64 throughout. The tiny model is no denoiser, so its latents end far from O(1) (up to ~200);
the two agree to float32 rounding relative to the largest value (observed ≤ 3e-7), held to 1e-5 of it.
"""

from __future__ import annotations

import math

import pytest
import torch

from cao2_fast import schedulers, stage1
from cao2_fast.config import build_config, max_sample_steps, with_overrides
from cao2_fast.diffusion import apply_guidance, guided_steps
from cao2_fast.errors import UserError
from cao2_fast.generators.dit import DiTGenerator
from cao2_fast.models.dit import DiTConfig
from cao2_fast.models.random import random_models
from cao2_fast.pipeline import Distiller
from helpers import run_cli

RTOL = 1e-5
C, H, NULL, SCALE, GUIDED = 4, 4, 5, 2.7, 3


class TinyModel:
    """A smooth deterministic stand-in for a DiT: (x, t, y) -> 2C channels (eps, variance values), in x's dtype."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(2 * C, C, generator=g, dtype=torch.float64) * 0.3
        self.emb = torch.randn(NULL + 1, 2 * C, generator=g, dtype=torch.float64) * 0.5
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(x.shape[0])
        w, emb = self.w.to(x.dtype), self.emb.to(x.dtype)
        tt = (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("oc,nchw->nohw", w, x) + emb[y][:, :, None, None] * (1 + tt)) + 0.1 * tt


def schedule64():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def guided_eps(model, x, t, y):
    n = x.shape[0]
    tt = torch.full((2 * n,), t, dtype=torch.long)
    out = model(torch.cat([x, x]), tt, torch.cat([y, torch.full_like(y, NULL)]))
    return apply_guidance(out[:n], out[n:], SCALE, GUIDED)[:, :C]


def ddim64(model, x, y, steps):
    """DDIM, η = 0, 'leading' spacing (t_k = k·⌊1000/N⌋), ᾱ after the last step = 1."""
    ac = schedule64()
    ratio = 1000 // steps
    for k in reversed(range(steps)):
        t = k * ratio
        a, a_prev = ac[t], (ac[t - ratio] if t - ratio >= 0 else torch.tensor(1.0, dtype=torch.float64))
        eps = guided_eps(model, x, t, y)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def dpmpp64(model, x, y, steps):
    """DPM-Solver++ 2M (midpoint), 'linspace' spacing, first order at the first and the last step (the last
    step lands on σ = 0: x = x̂0)."""
    ac = schedule64()
    ts = [int(v) for v in torch.linspace(0, 999, steps + 1, dtype=torch.float64).round().flip(0)[:-1]]
    sig = [((1 - ac[t]) / ac[t]).sqrt() for t in ts] + [torch.tensor(0.0, dtype=torch.float64)]
    alpha = [1 / (s * s + 1).sqrt() for s in sig]
    sigma = [s * a for s, a in zip(sig, alpha)]
    lam = [torch.log(a) - torch.log(s) if s > 0 else torch.tensor(math.inf, dtype=torch.float64)
           for a, s in zip(alpha, sigma)]
    prev = None
    for k, t in enumerate(ts):
        eps = guided_eps(model, x, t, y)
        x0 = (x - sigma[k] * eps) / alpha[k]
        h = lam[k + 1] - lam[k]
        phi = torch.exp(-h) - 1
        if prev is None or k == steps - 1:
            x = (sigma[k + 1] / sigma[k]) * x - alpha[k + 1] * phi * x0
        else:
            r = (lam[k] - lam[k - 1]) / h
            d1 = (x0 - prev) / r
            x = (sigma[k + 1] / sigma[k]) * x - alpha[k + 1] * phi * x0 - 0.5 * alpha[k + 1] * phi * d1
        prev = x0
    return x


@pytest.fixture(scope="module")
def start():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, C, H, H, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("kind,steps", [("ddim", 10), ("ddim", 25), ("dpmpp", 7), ("dpmpp", 25)])
def test_sampler_equals_float64_restatement(start, kind, steps):
    x, y = start
    model = TinyModel()
    sampler = schedulers.SchedulerSampler(kind, steps)
    ours, _, _ = schedulers.sample(model, sampler, x.float(), y, NULL, SCALE, GUIDED)
    ref = (ddim64 if kind == "ddim" else dpmpp64)(model, x, y, steps)
    assert ours.dtype == torch.float32
    tol = RTOL * ref.abs().max()
    assert (ours.double() - ref).abs().max() <= tol
    assert model.calls == [12] * (2 * steps)  # one guided call (cond + uncond) per step, 2·6 rows
    # the restatement is sensitive: the 'trailing' spacing or a missing second-order term is far off
    assert (ref - (ddim64 if kind == "dpmpp" else dpmpp64)(model, x, y, steps)).abs().max() > 100 * tol


@pytest.mark.parametrize("kind", ["ddim", "dpmpp"])
def test_split_and_rebatched_runs_equal_one_run(start, kind):
    x, y = start
    model, steps = TinyModel(), 9
    sampler = schedulers.SchedulerSampler(kind, steps)
    noise = stage1.Stage1Noise(x.float(), torch.zeros(0, 6, C, H, H))
    full = stage1.generate(model, sampler, noise, y, NULL, SCALE, GUIDED, "cpu", torch.float32, batch=6)
    x1, x0, state = stage1.generate(model, sampler, noise, y, NULL, SCALE, GUIDED, "cpu", torch.float32, batch=4,
                                    stop=5, return_x0=True, return_state=True)
    assert (state is None) == (kind == "ddim")
    # drop candidate 2 (as a rejection would) and go on in other batches: the others end where the full run does
    keep = torch.tensor([0, 1, 3, 4, 5])
    rest = stage1.generate(model, sampler, stage1.Stage1Noise(noise.initial[keep], noise.steps[:, keep]), y[keep],
                           NULL, SCALE, GUIDED, "cpu", torch.float32, batch=2, x=x1[keep], start=5,
                           state=None if state is None else state[keep])
    assert (rest - full[keep]).abs().max() <= 1e-6
    assert x0.shape == x1.shape and torch.isfinite(x0).all()
    if kind == "dpmpp":  # resuming without the solver's history would silently fall to first order: refused
        with pytest.raises(ValueError, match="previous step"):
            stage1.generate(model, sampler, noise, y, NULL, SCALE, GUIDED, "cpu", torch.float32, batch=6,
                            x=x1, start=5)


def test_guidance_interval_uses_the_schedulers_noise_levels():
    s = schedulers.SchedulerSampler("dpmpp", 25)
    t = torch.tensor([s.model_timestep(i) for i in range(25)])
    ac = schedule64()[t]
    sigma = s.sqrt_recipm1_alphas_cumprod
    assert torch.allclose(sigma, ((1 - ac) / ac).sqrt())
    guided = guided_steps(s, (0.0, 5.0))
    assert guided.any() and not guided.all() and torch.equal(guided, sigma <= 5.0)
    assert guided_steps(s, None).all()


def test_step_limits():
    assert len(schedulers.make_scheduler("ddim", 1000).timesteps) == 1000
    assert max_sample_steps("dpmpp") == 999
    with pytest.raises(ValueError, match="distinct"):
        schedulers.make_scheduler("dpmpp", 1000)


# -- configuration, fingerprint, stage 2 untouched ------------------------------------------------------------------

def make(**kw):
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    opts = dict(k=2, stage1_batch=8, stage2_batch=4, stage2_steps=3, sample_steps=50, t_max=11,
                classifier_input_size=32)
    opts.update(kw)
    cfg = build_config("custom", 2, "official", class_ids=[0, 3], num_model_classes=5, **opts)
    return Distiller(DiTGenerator(dit, vae), clf, cfg)


def test_fingerprint_and_stage2_schedule():
    base = make().config
    assert base.sampler == "ddpm" and base.stage2_schedule_steps == 50
    assert with_overrides(base, stage2_respacing=50).fingerprint() == base.fingerprint()  # the same run
    fast = with_overrides(base, sampler="dpmpp", sample_steps=10)
    assert fast.stage2_schedule_steps == 50 and fast.fingerprint() != base.fingerprint()
    assert with_overrides(base, sample_steps=25).stage2_schedule_steps == 25  # ddpm: coupled, as released
    short = with_overrides(base, sample_steps=25, stage2_respacing=50)
    assert short.stage2_schedule_steps == 50
    assert short.fingerprint() != with_overrides(base, sample_steps=25).fingerprint()


def test_few_step_sampler_changes_stage1_only(single_thread):
    exact, fast = make(), make(sampler="dpmpp", sample_steps=10)
    c1, c2 = exact.stage1([0, 3]), fast.stage1([0, 3])
    # the same candidates start from the same noise, and end elsewhere
    n1, n2 = (d.generator.stage1_noise(d.config, [0, 3]) for d in (exact, fast))
    assert torch.equal(n1.initial, n2.initial) and n2.steps.shape[0] == 0
    assert not torch.equal(c1[0]["latents"], c2[0]["latents"])
    # stage 2 on the same latents is the same computation under both configs
    lat = c1[0]["latents"]
    ids = torch.zeros(len(lat), dtype=torch.long)
    a = exact.generator.optimise(lat, ids, exact.config, "cpu", torch.float32)
    b = fast.generator.optimise(lat, ids, fast.config, "cpu", torch.float32)
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize("opts", [dict(sampler="ddim", sample_steps=6, early_reject_step=2, early_reject_keep=3),
                                  dict(sampler="dpmpp", sample_steps=6, early_reject_step=(2, 4),
                                       early_reject_keep=(3, 2)),
                                  dict(sampler="dpmpp", sample_steps=6, guidance_interval=(0.0, 3.0))])
def test_survivors_follow_the_full_run_and_calls_are_counted(single_thread, opts):
    full = make(sampler=opts["sampler"], sample_steps=6)
    full_out = full.stage1([0, 3])
    d = make(**opts)
    calls = []
    inner = d.generator.sampler
    d.generator.sampler = lambda x, *a: (calls.append(x.shape[0]), inner(x, *a))[1]
    out = d.stage1([0, 3])
    assert sum(calls) == 2 * d.generator.stage1_forwards(d.config)
    if "guidance_interval" in opts:
        assert d.generator.stage1_forwards(d.config) < full.generator.stage1_forwards(full.config)
        return
    shared = 0
    for c in (0, 3):
        a, b = full_out[c]["candidate_index"].tolist(), out[c]["candidate_index"].tolist()
        for i, cand in enumerate(b):
            if cand in a:
                shared += 1
                assert (out[c]["latents"][i] - full_out[c]["latents"][a.index(cand)]).abs().max() <= 1e-5
    assert shared > 0


@pytest.mark.parametrize("opts,message", [
    (dict(sampler="dpmpp", sample_steps=1000), "at most 999 steps"),
    (dict(sampler="ddim", sample_steps=1001), "at most 1000 steps"),
    (dict(sampler="ddim", sample_steps=25, early_reject_step=25, early_reject_keep=2), "1 to 24 of the 25"),
    (dict(stage2_respacing=8), "must be below the 8 respaced steps"),
    (dict(stage2_respacing=0), "from 1 to 1000"),
    (dict(sampler="euler"), "sampler 'euler'"),
])
def test_impossible_settings_are_refused(opts, message):
    with pytest.raises(UserError, match=message):
        make(**opts)


def test_cli_takes_the_sampler_and_refuses_impossible_ones(capsys, tmp_path):
    code, out, err = run_cli(["distill", "--sampler", "dpmpp", "--sample-steps", "20", "--ipc", "1", "--dry-run",
                              "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert '"sampler": "dpmpp"' in out or "dpmpp" in out
    code, out, err = run_cli(["distill", "--sampler", "ddim", "--sample-steps", "20", "--early-reject", "20",
                              "--early-keep", "15", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "1 to 19 of the 20" in err
    assert not (tmp_path / "o").exists()
    code, out, err = run_cli(["distill", "--backbone", "mar", "--sampler", "dpmpp", "--dry-run"], capsys)
    assert code == 2 and "MAR" in err and len(err.strip().splitlines()) == 1
