"""Parity of the fused stage-2 Triton kernels with their PyTorch references (and Adam with torch.optim.Adam).

Runs natively on CUDA when present, otherwise on CPU through Triton's interpreter (see kernels_env).

Tolerances. fp32: both sides compute the same fp32 expression; they may differ in reduction order (loss sums) and
in fused multiply-adds, i.e. by a few ulp, so rtol 1e-6 with an absolute floor of 1e-6 × the tensor's scale (for
entries that cancel to near zero). bf16 *inputs* are upcast exactly, so results computed from them keep the fp32
tolerance. bf16 *outputs* are rounded once from fp32 on both sides; the rounding may land on neighbouring bf16 values
(torch rounds to nearest-even; Triton's CPU interpreter truncates fp32 → bf16, and a few-ulp fp32 difference can
cross a rounding boundary), so they may differ by one bf16 ulp, at most 2**-7 relative (8 significant bits).
"""

from __future__ import annotations

import kernels_env  # noqa: F401  (must precede the kernel imports: sets TRITON_INTERPRET without CUDA)

import pytest
import torch

from cao2_fast.kernels import (
    latent_adam_step_,
    latent_adam_step_reference,
    latent_loss_grad,
    latent_loss_grad_eager,
    latent_loss_grad_reference,
    noise_latents,
    noise_latents_reference,
    triton_available,
)

DEVICE = kernels_env.DEVICE
BF16_RTOL = 2.0**-7

# (shape, block): a batch of 1, odd sizes, and rows that are not a multiple of the block (100 = 3·32 + 4,
# 189 = 5·32 + 29), so masked tails and multi-block rows are both exercised.
SHAPES = [((1, 4, 5, 5), 32), ((3, 4, 5, 5), 32), ((2, 3, 7, 9), 32)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().item()
    atol = rtol * scale if expected.dtype == torch.bfloat16 else 1e-6 * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def out_rtol(dtype: torch.dtype) -> float:
    return BF16_RTOL if dtype == torch.bfloat16 else 1e-6


def schedule(T: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ᾱ) and sqrt(1 − ᾱ) of a linear-beta DDPM schedule, on the test device."""
    ac = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    return ac.sqrt().float().to(DEVICE), (1.0 - ac).sqrt().float().to(DEVICE)


def randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)


def test_triton_runs_on_test_device():
    assert triton_available(DEVICE)


def test_launchers_refuse_devices_triton_cannot_run_on():
    assert not triton_available("meta")
    x = torch.zeros(2, 3, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(RuntimeError, match="noise_latents_reference"):
        noise_latents(x, x, t, torch.ones(4, device="meta"), torch.ones(4, device="meta"))
    with pytest.raises(RuntimeError, match="latent_loss_grad_reference"):
        latent_loss_grad(x, x, 10.0)
    with pytest.raises(RuntimeError, match="latent_adam_step_reference"):
        latent_adam_step_(x, x, torch.ones(2, device="meta"), x, x, step=1, lr=1e-3)


# --------------------------------------------------------------------------------------------- noising


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize(
    "eps_dtype,out_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.bfloat16, torch.bfloat16)],
)
def test_noise_latents_matches_reference(shape, block, eps_dtype, out_dtype, gen):
    sqrt_ac, sqrt_1m_ac = schedule()
    x0, eps = randn(shape, gen), randn(shape, gen, eps_dtype)
    t = torch.randperm(len(sqrt_ac), generator=gen)[: shape[0]].to(DEVICE)  # distinct timesteps per image
    out = noise_latents(x0, eps, t, sqrt_ac, sqrt_1m_ac, out_dtype=out_dtype, block=block)
    ref = noise_latents_reference(x0, eps, t, sqrt_ac, sqrt_1m_ac, out_dtype=out_dtype)
    assert_close(out, ref, rtol=out_rtol(out_dtype))


def test_noise_latents_uses_each_images_timestep(gen):
    sqrt_ac, sqrt_1m_ac = schedule()
    x0, eps = randn((2, 4, 3, 3), gen), randn((2, 4, 3, 3), gen)
    t = torch.tensor([3, 40], device=DEVICE)
    out = noise_latents(x0, eps, t, sqrt_ac, sqrt_1m_ac)
    for b in range(2):
        single = sqrt_ac[t[b]] * x0[b] + sqrt_1m_ac[t[b]] * eps[b]
        assert_close(out[b], single)


# ----------------------------------------------------------------------------------------- latent loss

LOSS_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize(
    "shape,block",
    SHAPES + [((2, 1, 16, 16), 1024), ((2, 4, 32, 32), 1024)],  # digits-preset rows (256) and ImageNet rows (4096)
)
@pytest.mark.parametrize("eps_dtype,hat_dtype", LOSS_DTYPES)
def test_latent_loss_grad_matches_autograd(shape, block, eps_dtype, hat_dtype, gen):
    eps, eps_hat = randn(shape, gen, eps_dtype), randn(shape, gen, hat_dtype)
    loss, grad = latent_loss_grad(eps, eps_hat, 10.0, block=block)
    ref_loss, ref_grad = latent_loss_grad_reference(eps, eps_hat, 10.0)
    assert loss.shape == (shape[0],) and loss.dtype == torch.float32
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad, rtol=out_rtol(hat_dtype))


def _tied_inputs(dtype: torch.dtype, gen: torch.Generator):
    """eps, eps_hat whose difference d has exact ties of |d| at the per-image maximum, of both signs.

    Everything is a multiple of 1/16 below 8 in magnitude (7 significant bits), so eps − eps_hat = d exactly, in bf16
    as in fp32. Image 0: max attained at +M, +M, −M, −M, −M (5 ties, mixed signs); image 1: at +M and −M; image 2:
    once; image 3: d ≡ 0 (max 0 attained everywhere, where autograd's gradient of |d| is 0).
    """
    B, C, H, W = 4, 3, 5, 7  # 105 elements per image
    M = 2.0
    d = torch.randint(-15, 16, (B, C * H * W), generator=gen).double() / 16  # |d| < M off the ties
    d[0, [0, 17, 40, 41, 104]] = torch.tensor([M, M, -M, -M, -M], dtype=torch.float64)
    d[1, [3, 99]] = torch.tensor([M, -M], dtype=torch.float64)
    d[2, 50] = -M
    d[3] = 0.0
    eps = torch.randint(-40, 41, (B, C * H * W), generator=gen).double() / 16
    eps_hat = eps - d
    cast = lambda x: x.view(B, C, H, W).to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(eps), cast(eps_hat), d.view(B, C, H, W).to(DEVICE), M


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_loss_grad_splits_linf_gradient_among_ties_like_autograd(dtype, gen):
    lam = 10.0
    eps, eps_hat, d, M = _tied_inputs(dtype, gen)
    assert torch.equal(eps.double() - eps_hat.double(), d)  # the ties are exact in this dtype
    loss, grad = latent_loss_grad(eps, eps_hat, lam, block=32)
    ref_loss, ref_grad = latent_loss_grad_reference(eps, eps_hat, lam)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad, rtol=out_rtol(dtype))

    # The L-inf share, restated: −λ·sign(d)/k on the k entries with |d| = max, 0 elsewhere (and 0 when max = 0).
    n = d[0].numel()
    flat = d.flatten(1)
    amax = flat.abs().amax(1, keepdim=True)
    ties = flat.abs() == amax
    assert ties.sum(1).tolist() == [5, 2, 1, n]
    linf = -lam * flat.sign() * ties / ties.sum(1, keepdim=True)
    expected = (-2.0 * flat / n + linf).view_as(d)
    for g in (grad, ref_grad):
        assert_close(g.double(), expected.to(g.dtype).double(), rtol=max(out_rtol(dtype), 1e-6))
    assert torch.equal(loss[3], torch.zeros((), device=DEVICE)) and not grad[3].any()


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES] + [(2, 4, 8, 8), (2, 4, 32, 32)])
@pytest.mark.parametrize("eps_dtype,hat_dtype", LOSS_DTYPES)
@pytest.mark.parametrize("lam", [10.0, 0.3, 0.0])
def test_latent_loss_grad_eager_is_the_reference_bit_for_bit(shape, eps_dtype, hat_dtype, lam, gen):
    """The written-out gradient (the CPU step's) repeats autograd's ops in autograd's order: the same bits."""
    tied = _tied_inputs(hat_dtype, gen)[:2]  # exact ties of max|d|, both signs, and an image with d = 0
    for eps, eps_hat in ((randn(shape, gen, eps_dtype), randn(shape, gen, hat_dtype)), tied):
        loss, grad = latent_loss_grad_eager(eps, eps_hat, lam)
        ref_loss, ref_grad = latent_loss_grad_reference(eps, eps_hat, lam)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad) and grad.dtype == ref_grad.dtype


# ---------------------------------------------------------------------------------------------- Adam


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
# The second case makes eps large enough to matter (a misplaced eps shows above the tolerance) and takes torch.lerp's
# weight >= 0.5 formula (beta1 < 0.5).
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.3, 0.99), 1e-2)])
def test_latent_adam_matches_torch_adam_over_steps(shape, block, grad_dtype, betas, eps, gen):
    # grad_xt in bf16 is upcast exactly and all state is fp32, so bf16 keeps the fp32 tolerance.
    lr, steps = 1e-2, 6
    sqrt_ac, _ = schedule()
    x0 = randn(shape, gen)
    param = torch.nn.Parameter(x0.clone())
    opt = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    m, v = torch.zeros_like(x0), torch.zeros_like(x0)
    x_ref, m_ref, v_ref = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    for step in range(1, steps + 1):
        t = torch.randint(1, 12, (shape[0],), generator=gen).to(DEVICE)  # a fresh timestep per image and step
        a_t = sqrt_ac[t]
        grad_xt = randn(shape, gen, grad_dtype)
        latent_adam_step_(x0, grad_xt, a_t, m, v, step, lr, beta1=betas[0], beta2=betas[1], eps=eps, block=block)
        latent_adam_step_reference(x_ref, grad_xt, a_t, m_ref, v_ref, step, lr, beta1=betas[0], beta2=betas[1], eps=eps)
        param.grad = a_t.view(-1, 1, 1, 1) * grad_xt.float()
        opt.step()
        state = opt.state[param]
        assert int(state["step"]) == step
        for ours in ((x0, m, v), (x_ref, m_ref, v_ref)):
            assert_close(ours[0], param.detach())
            assert_close(ours[1], state["exp_avg"])
            assert_close(ours[2], state["exp_avg_sq"])


def test_latent_adam_rejects_bad_step_and_non_contiguous_state(gen):
    x0 = randn((2, 3, 4), gen)
    args = (x0, torch.zeros_like(x0), torch.ones(2, device=DEVICE), torch.zeros_like(x0), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="step"):
        latent_adam_step_(*args, step=0, lr=1e-3)
    bad = torch.zeros(2, 4, 3, device=DEVICE).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        latent_adam_step_(x0, torch.zeros_like(x0), torch.ones(2, device=DEVICE), bad, torch.zeros_like(x0),
                          step=1, lr=1e-3)


@pytest.mark.parametrize("shape,block", SHAPES[:2])
def test_latent_adam_reads_its_step_from_a_schedule_row_as_from_an_int(shape, block, gen):
    """The form a CUDA graph replays: the step's scalars read from a device-resident adam_schedule row."""
    from cao2_fast.kernels import adam_schedule

    lr, steps, betas = 1e-2, 5, (0.9, 0.999)
    sqrt_ac, _ = schedule()
    table = adam_schedule(steps, lr, *betas, device=DEVICE)
    assert table.shape == (steps, 2) and table.dtype == torch.float32
    assert table[0, 0].item() == pytest.approx(-lr / (1 - betas[0]), rel=1e-6)
    assert table[2, 1].item() == pytest.approx((1 - betas[1] ** 3) ** 0.5, rel=1e-6)
    x0 = randn(shape, gen)
    runs = {name: [x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)] for name in ("int", "row", "ref_row")}
    for step in range(1, steps + 1):
        t = torch.randint(1, 12, (shape[0],), generator=gen).to(DEVICE)
        grad_xt = randn(shape, gen)
        latent_adam_step_(*runs["int"][:1], grad_xt, sqrt_ac[t], *runs["int"][1:], step, lr, block=block)
        latent_adam_step_(*runs["row"][:1], grad_xt, sqrt_ac[t], *runs["row"][1:], table[step - 1], lr, block=block)
        latent_adam_step_reference(*runs["ref_row"][:1], grad_xt, sqrt_ac[t], *runs["ref_row"][1:], table[step - 1],
                                   lr)
    for name in ("row", "ref_row"):
        for ours, want in zip(runs[name], runs["int"]):
            assert_close(ours, want)
    assert (runs["int"][0] - x0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="adam_schedule"):
        latent_adam_step_(x0, x0, sqrt_ac[:shape[0]], torch.zeros_like(x0), torch.zeros_like(x0), table[:, 0], lr)
