"""The Gaussian diffusion of the DiT codebase against plain float64 restatements of the DDPM formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cao2_fast.diffusion import (
    Diffusion,
    apply_guidance,
    guided_model_output,
    linear_betas,
    sample,
    space_timesteps,
)


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------------------------
# float64 numpy restatement


def np_base_betas(n: int = 1000) -> np.ndarray:
    return np.linspace(1e-4, 0.02, n, dtype=np.float64)


def np_kept(count: int, n: int = 1000) -> list[int]:
    """improved-diffusion's space_timesteps for one section: a running float stride, rounded."""
    stride = (n - 1) / (count - 1) if count > 1 else 1
    cur, out = 0.0, []
    for _ in range(count):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


def np_process(respacing: int | None) -> dict:
    betas = np_base_betas()
    if respacing is not None:
        ac = np.cumprod(1.0 - betas)
        kept = np_kept(respacing)
        kept_ac = ac[kept]
        prev = np.concatenate([[1.0], kept_ac[:-1]])
        betas = 1.0 - kept_ac / prev
        tmap = np.array(kept)
    else:
        tmap = np.arange(1000)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "ac": ac,
        "ac_prev": ac_prev,
        "tmap": tmap,
        "post_log_var_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def np_step(proc: dict, model_out: np.ndarray, x: np.ndarray, t: np.ndarray, noise: np.ndarray):
    """Returns (mean, log_var, pred_x0, x_prev) per DiT's p_mean_variance / p_sample (learned range, no clipping)."""
    c = x.shape[1]
    eps, v = model_out[:, :c], model_out[:, c:]
    bc = lambda a: a[t].reshape(-1, 1, 1, 1)  # noqa: E731
    min_log = bc(proc["post_log_var_clipped"])
    max_log = np.log(bc(proc["betas"]))
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    ac = bc(proc["ac"])
    x0 = np.sqrt(1.0 / ac) * x - np.sqrt(1.0 / ac - 1.0) * eps
    mean = bc(proc["coef1"]) * x0 + bc(proc["coef2"]) * x
    nonzero = (t != 0).astype(np.float64).reshape(-1, 1, 1, 1)
    return mean, log_var, x0, mean + nonzero * np.exp(0.5 * log_var) * noise


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def test_space_timesteps_50():
    kept = space_timesteps(1000, 50)
    assert kept == [round(i * 999 / 49) for i in range(50)]
    assert kept[0] == 0 and kept[1] == 20 and kept[2] == 41 and kept[-1] == 999
    assert len(kept) == 50 and all(b > a for a, b in zip(kept, kept[1:]))


@pytest.mark.parametrize("count", [2, 10, 25, 100, 250, 999])
def test_space_timesteps_other_counts(count):
    kept = space_timesteps(1000, count)
    assert kept == np_kept(count)
    assert kept[0] == 0 and kept[-1] == 999 and len(set(kept)) == count


def test_space_timesteps_running_sum_at_ties():
    kept = space_timesteps(1000, 999)
    closed_form = round(499 * 999 / 998)  # exactly 499.5
    assert kept[499] == np_kept(999)[499] != closed_form  # the reference's running sum lands just below 499.5


def test_space_timesteps_edges():
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


def test_linear_betas():
    b = linear_betas(1000)
    assert b.dtype == torch.float64
    assert np.allclose(b.numpy(), np_base_betas(), rtol=0, atol=1e-15)
    b250 = linear_betas(250).numpy()
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08) and len(b250) == 250


@pytest.mark.parametrize("respacing", [50, 250, 10])
def test_respaced_alphas_cumprod(respacing):
    base = Diffusion.create()
    d = Diffusion.create(respacing)
    kept = np_kept(respacing)
    assert d.num_steps == respacing
    assert d.timestep_map.tolist() == kept
    assert torch.allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    ref = np_process(respacing)
    assert np.allclose(d.betas.numpy(), ref["betas"], rtol=1e-12, atol=0)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert torch.all(d.betas > 0) and torch.all(d.betas < 1)


def test_full_process_tables():
    d = Diffusion.create()
    ref = np_process(None)
    assert d.num_steps == 1000 and d.timestep_map.tolist() == list(range(1000))
    assert np.allclose(d.alphas_cumprod.numpy(), ref["ac"], rtol=1e-12, atol=0)
    assert np.allclose(d.posterior_log_variance_clipped.numpy(), ref["post_log_var_clipped"], rtol=1e-12, atol=0)
    assert np.allclose(d.posterior_mean_coef1.numpy(), ref["coef1"], rtol=1e-12, atol=0)
    assert np.allclose(d.posterior_mean_coef2.numpy(), ref["coef2"], rtol=1e-12, atol=0)


def test_model_timesteps_map_to_original_scale():
    d = Diffusion.create(50)
    t = torch.tensor([0, 1, 2, 49])
    assert d.model_timesteps(t).tolist() == [0, 20, 41, 999]


# ---------------------------------------------------------------------------------------------------------------
# One sampler step


def _random_step_inputs(batch: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 4, 5, 5, generator=g, dtype=torch.float64)
    v = torch.rand(batch, 4, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(batch, 4, 5, 5, generator=g, dtype=torch.float64)
    return torch.cat([eps, v], 1).to(dtype), x.to(dtype), noise.to(dtype)


@pytest.mark.parametrize("respacing", [None, 50])
@pytest.mark.parametrize("which", ["first", "second", "middle", "last", "mixed"])
def test_p_sample_step_float64(respacing, which):
    d = Diffusion.create(respacing)
    n = d.num_steps
    steps = {"first": [0, 0], "second": [1, 1], "middle": [n // 2, n // 2 + 1], "last": [n - 1, n - 1],
             "mixed": [0, n - 1, 7, 1]}[which]
    t = torch.tensor(steps)
    out, x, noise = _random_step_inputs(len(steps), seed=len(steps) + n)
    proc = np_process(respacing)
    ref_mean, ref_log_var, ref_x0, ref_prev = np_step(proc, out.numpy(), x.numpy(), t.numpy(), noise.numpy())
    mean, log_var, x0 = d.p_mean_variance(out, x, t)
    prev = d.p_sample_step(out, x, t, noise)
    for got, ref in ((mean, ref_mean), (log_var, ref_log_var), (x0, ref_x0), (prev, ref_prev)):
        assert got.dtype == torch.float64
        assert np.allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
    zero = t == 0
    if zero.any():
        assert torch.equal(prev[zero], mean[zero])  # no noise at the last step
    if (~zero).any():
        assert (prev[~zero] - mean[~zero]).abs().max() > 1e-4


@pytest.mark.parametrize("respacing", [None, 50])
def test_p_sample_step_float32(respacing):
    d = Diffusion.create(respacing)
    n = d.num_steps
    t = torch.tensor([0, 1, n // 3, n - 1])
    out, x, noise = _random_step_inputs(4, seed=99)
    proc = np_process(respacing)
    *_, ref_prev = np_step(proc, out.numpy(), x.numpy(), t.numpy(), noise.numpy())
    prev = d.p_sample_step(out.float(), x.float(), t, noise.float())
    assert prev.dtype == torch.float32
    assert np.allclose(prev.double().numpy(), ref_prev, rtol=1e-4, atol=1e-4)


def test_learned_range_extremes():
    d = Diffusion.create(50)
    t = torch.tensor([10, 10])
    _, x, _ = _random_step_inputs(2, seed=3)
    eps = torch.zeros_like(x)
    out = torch.cat([eps, torch.stack([torch.full_like(x[0], 1.0), torch.full_like(x[0], -1.0)])], 1)
    _, log_var, _ = d.p_mean_variance(out, x, t)
    proc = np_process(50)
    assert np.allclose(log_var[0].numpy(), np.log(proc["betas"][10]), rtol=1e-12)
    assert np.allclose(log_var[1].numpy(), proc["post_log_var_clipped"][10], rtol=1e-12)


def test_q_sample_formula():
    for respacing in (None, 50):
        d = Diffusion.create(respacing)
        proc = np_process(respacing)
        g = torch.Generator().manual_seed(5)
        x0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
        t = torch.tensor([0, 5, d.num_steps - 1])
        ac = proc["ac"][t.numpy()].reshape(-1, 1, 1, 1)
        ref = np.sqrt(ac) * x0.numpy() + np.sqrt(1 - ac) * noise.numpy()
        got = d.q_sample(x0, t, noise)
        assert np.allclose(got.numpy(), ref, rtol=1e-12, atol=1e-14)
        got32 = d.q_sample(x0.float(), t, noise.float())
        assert got32.dtype == torch.float32 and np.allclose(got32.double().numpy(), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Guidance


class RecordingModel:
    """A deterministic fake DiT: output depends on x, the timestep and the label; records every call."""

    def __init__(self, channels: int = 4):
        self.calls = []
        self.c = channels

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1)
        yy = y.to(x.dtype).reshape(-1, 1, 1, 1)
        eps = torch.tanh(x * (1 + 0.1 * yy) + 0.001 * tt + 0.05 * torch.arange(self.c).reshape(1, -1, 1, 1))
        var = torch.tanh(0.3 * x + 0.02 * yy - 0.0005 * tt)
        return torch.cat([eps, var], 1)


def test_guidance_three_channels():
    m = RecordingModel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([999, 20, 0])
    y = torch.tensor([1, 2, 3])
    out = guided_model_output(m, x, t, y, null_class=10, scale=2.7, guided_channels=3)
    assert len(m.calls) == 1
    cx, ct, cy = m.calls[0]
    assert torch.equal(cx, torch.cat([x, x])) and torch.equal(ct, torch.cat([t, t]))
    assert cy.tolist() == [1, 2, 3, 10, 10, 10]
    cond = RecordingModel()(x, t, y)
    uncond = RecordingModel()(x, t, torch.full_like(y, 10))
    assert torch.allclose(out[:, :3], uncond[:, :3] + 2.7 * (cond[:, :3] - uncond[:, :3]), atol=1e-6)
    assert torch.equal(out[:, 3:], cond[:, 3:])
    assert (out[:, 3] - (uncond[:, 3] + 2.7 * (cond[:, 3] - uncond[:, 3]))).abs().max() > 1e-3
    assert out.shape == (3, 8, 4, 4)


def test_guidance_all_eps_channels():
    m = RecordingModel()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 1])
    y = torch.tensor([0, 9])
    out = guided_model_output(m, x, t, y, null_class=10, scale=4.0, guided_channels=4)
    cond = RecordingModel()(x, t, y)
    uncond = RecordingModel()(x, t, torch.full_like(y, 10))
    assert torch.allclose(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-6)
    assert torch.equal(out[:, 4:], cond[:, 4:])


def test_guidance_scale_one_single_call():
    m = RecordingModel()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([7, 7])
    y = torch.tensor([4, 10])
    out = guided_model_output(m, x, t, y, null_class=10, scale=1.0)
    assert len(m.calls) == 1
    cx, ct, cy = m.calls[0]
    assert cx.shape[0] == 2 and torch.equal(cx, x) and torch.equal(ct, t) and torch.equal(cy, y)
    assert torch.equal(out, RecordingModel()(x, t, y))


def test_apply_guidance_direct():
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(2, 8, 3, 3, generator=g)
    uncond = torch.randn(2, 8, 3, 3, generator=g)
    out = apply_guidance(cond, uncond, 1.5, 3)
    assert torch.allclose(out[:, :3], uncond[:, :3] * (1 - 1.5) + 1.5 * cond[:, :3], atol=1e-6)
    assert torch.equal(out[:, 3:], cond[:, 3:])
    same = apply_guidance(cond, uncond, 1.0, 4)
    assert torch.allclose(same, cond, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Whole sampler


def _hand_loop(model, kept, d, noise, y, null, scale, g, step_noise):
    x = noise
    for i in reversed(range(len(kept))):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        tm = torch.full((x.shape[0],), kept[i], dtype=torch.long)
        out = model(torch.cat([x, x]), torch.cat([tm, tm]), torch.cat([y, torch.full_like(y, null)]))
        c, u = out[: x.shape[0]], out[x.shape[0] :]
        guided = torch.cat([u[:, :g] + scale * (c[:, :g] - u[:, :g]), c[:, g:]], 1)
        x = d.p_sample_step(guided, x, t, step_noise[i])
    return x


@pytest.mark.parametrize("guided_channels", [3, 4])
def test_sample_equals_hand_loop(guided_channels):
    d = Diffusion.create(10)
    kept = np_kept(10)
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    step_noise = torch.randn(10, 2, 4, 4, 4, generator=g)
    y = torch.tensor([3, 5])
    m = RecordingModel()
    a = sample(m, d, noise, y, 10, 2.7, guided_channels, step_noise=step_noise)
    told = [c[1][0].item() for c in m.calls]
    assert told == kept[::-1]
    b = sample(RecordingModel(), d, noise, y, 10, 2.7, guided_channels, step_noise=step_noise)
    ref = _hand_loop(RecordingModel(), kept, d, noise, y, 10, 2.7, guided_channels, step_noise)
    assert torch.equal(a, b)
    assert torch.allclose(a, ref, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(a).all() and (a - noise).abs().max() > 1e-2


def test_sample_with_generator_is_reproducible():
    d = Diffusion.create(5)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2])
    a = sample(RecordingModel(), d, noise, y, 10, 2.0, generator=torch.Generator().manual_seed(11))
    b = sample(RecordingModel(), d, noise, y, 10, 2.0, generator=torch.Generator().manual_seed(11))
    c = sample(RecordingModel(), d, noise, y, 10, 2.0, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_sample_progress_called_per_step():
    d = Diffusion.create(6)
    ticks = []
    sample(RecordingModel(), d, torch.zeros(1, 4, 2, 2), torch.tensor([0]), 10, 1.0,
           generator=torch.Generator().manual_seed(0), progress=lambda: ticks.append(1))
    assert len(ticks) == 6


# ---------------------------------------------------------------------------------------------------------------
# Training objective


def _np_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _np_approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_decoder_nll(x, mean, log_scale):
    centered = x - mean
    inv = np.exp(-log_scale)
    cdf_plus = _np_approx_cdf(inv * (centered + 1 / 255))
    cdf_min = _np_approx_cdf(inv * (centered - 1 / 255))
    lp = np.where(
        x < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    return -lp


def test_training_losses_formula_and_stop_gradient():
    d = Diffusion.create()
    proc = np_process(None)
    g = torch.Generator().manual_seed(6)
    b, c = 4, 4
    x0 = torch.rand(b, c, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(b, c, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 400, 999])
    y = torch.tensor([0, 1, 2, 3])
    fixed = torch.cat([torch.randn(b, c, 4, 4, generator=g, dtype=torch.float64),
                       torch.rand(b, c, 4, 4, generator=g, dtype=torch.float64) * 2 - 1], 1)
    out = fixed.clone().requires_grad_(True)
    seen = []

    def model(xt, tm, yy):
        seen.append((xt.detach().clone(), tm.clone(), yy.clone()))
        return out

    losses = d.training_losses(model, x0, t, y, noise)
    assert losses.shape == (b,) and torch.isfinite(losses).all()
    assert seen[0][1].tolist() == t.tolist() and torch.equal(seen[0][2], y)

    xn, nn_, fn = x0.numpy(), noise.numpy(), fixed.numpy()
    ac = proc["ac"][t.numpy()].reshape(-1, 1, 1, 1)
    xt = np.sqrt(ac) * xn + np.sqrt(1 - ac) * nn_
    assert np.allclose(seen[0][0].numpy(), xt, rtol=1e-12, atol=1e-12)
    eps = fn[:, :c]
    mse = ((nn_ - eps) ** 2).mean(axis=(1, 2, 3))
    mean, log_var, _, _ = np_step(proc, fn, xt, t.numpy(), np.zeros_like(xt))
    tn = t.numpy().reshape(-1, 1, 1, 1)
    true_mean = proc["coef1"][tn] * xn + proc["coef2"][tn] * xt
    true_log_var = proc["post_log_var_clipped"][tn]
    kl = _np_kl(true_mean, true_log_var, mean, log_var).mean(axis=(1, 2, 3)) / math.log(2)
    nll = _np_decoder_nll(xn, mean, 0.5 * log_var).mean(axis=(1, 2, 3)) / math.log(2)
    vb = np.where(t.numpy() == 0, nll, kl)
    assert np.allclose(losses.detach().numpy(), mse + vb, rtol=1e-9, atol=1e-12)

    losses.sum().backward()
    grad = out.grad
    mse_grad = -2.0 * (noise - fixed[:, :c]) / (c * 4 * 4)
    assert torch.allclose(grad[:, :c], mse_grad, rtol=1e-9, atol=1e-14)  # VB adds nothing to the eps channels
    assert grad[:, c:].abs().amax(dim=(1, 2, 3)).min() > 0  # the variance channels learn from the VB term


def test_training_losses_with_a_module():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 8, 3, padding=1)
    d = Diffusion.create()
    x0 = torch.rand(3, 4, 6, 6) * 2 - 1
    noise = torch.randn(3, 4, 6, 6)
    t = torch.tensor([0, 10, 999])
    losses = d.training_losses(lambda x, tm, y: torch.tanh(net(x)), x0, t, torch.tensor([0, 1, 2]), noise)
    assert losses.shape == (3,) and losses.dtype == torch.float32 and torch.isfinite(losses).all()
    losses.mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all() and net.weight.grad.abs().sum() > 0
