"""One Adam step on the clean latents x0, from the gradient with respect to the noised latents x_t.

x_t = a_t·x0 + s_t·ε with a_t = sqrt(ᾱ_t) per image, so ∂L/∂x0 = a_t·∂L/∂x_t; the kernel applies that chain rule and
then exactly ``torch.optim.Adam``'s default update (no AMSGrad, no weight decay, bias-corrected), in place:
m ← lerp(m, g, 1−β1); v ← β2·v + (1−β2)·g²; x0 ← x0 − (lr/(1−β1^step))·m / (sqrt(v)/sqrt(1−β2^step) + eps).
Adam is elementwise, so one step over a (B, C, H, W) batch equals B separate optimisers stepped in lockstep.

NOTE: what the fusion saves (counted, not timed: no GPU was available when this was written). The eager path is
the chain-rule multiply (plus a cast when grad_xt is bf16) and then torch's Adam step: lerp, mul, addcmul, sqrt, div,
add, addcdiv — 8 launches (the foreach variant groups tensors, not these ops, so with one parameter tensor the count is
the same) and 20 latent-sized passes over memory (each op reads its operands and writes its result). The kernel is
1 launch and 7 passes: read x0, grad_xt, m, v; write x0, m, v.
"""

from __future__ import annotations

import torch
from ._runtime import check_contiguous, check_triton_device, import_triton

triton, tl = import_triton()


@triton.jit
def _latent_adam_kernel(
    x_ptr, g_ptr, a_ptr, m_ptr, v_ptr,
    N,  # elements per image
    w1,  # 1 - beta1, lerp weight
    beta2,
    w2,  # 1 - beta2
    neg_step_size,  # -lr / (1 - beta1**step)
    bc2_sqrt,  # sqrt(1 - beta2**step)
    s_ptr,  # with SCALARS_IN_MEMORY: the two values above, read from device memory (a CUDA graph replays them)
    eps,
    BLOCK: tl.constexpr,
    SCALARS_IN_MEMORY: tl.constexpr,
):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    if SCALARS_IN_MEMORY:
        neg_step_size = tl.load(s_ptr)
        bc2_sqrt = tl.load(s_ptr + 1)
    a = tl.load(a_ptr + b).to(tl.float32)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    idx = b.to(tl.int64) * N + offs
    g = a * tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))  # torch.lerp's two branches
    v = v * beta2 + (w2 * g) * g  # mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    x = x + neg_step_size * tl.div_rn(m, denom)  # addcdiv_(m, denom, value=-step_size)
    tl.store(m_ptr + idx, m, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)
    tl.store(x_ptr + idx, x, mask=mask)


def adam_schedule(steps: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, device=None) -> torch.Tensor:
    """The step-dependent Adam scalars of steps 1..``steps`` as a (steps, 2) float32 table: row k holds
    (−lr/(1−β1^(k+1)), sqrt(1−β2^(k+1))), computed in double on the host like ``torch.optim.Adam``. Passing a row as
    ``step`` lets a CUDA graph captured once replay every step: the kernel reads the row from memory."""
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    table = torch.stack([-lr / (1 - beta1**k), (1 - beta2**k).sqrt()], dim=1)
    return table.to(device=device, dtype=torch.float32)


def _scalars(name, step, lr, beta1, beta2, device):
    """(neg_step_size, bc2_sqrt) as host floats for an int step, or the (2,) device row for a tensor step."""
    if isinstance(step, torch.Tensor):
        if step.shape != (2,) or step.dtype != torch.float32 or step.device != device:
            raise ValueError(f"{name}: a tensor step must be a (2,) float32 row of adam_schedule on {device}, got "
                             f"{tuple(step.shape)} {step.dtype} on {step.device}")
        return step
    return -lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def _check_adam_args(name, x0, grad_xt, a_t, exp_avg, exp_avg_sq, step, beta1, beta2):
    if not isinstance(step, torch.Tensor) and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ValueError(f"{name}: step must be an int >= 1 (the count after this update) or a row of "
                         f"adam_schedule, got {step!r}")
    if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{name}: betas must lie in [0, 1), got ({beta1}, {beta2})")
    for arg, t in (("x0", x0), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: `{arg}` must be float32, got {t.dtype}")
        if t.shape != x0.shape:
            raise ValueError(f"{name}: `{arg}` has shape {tuple(t.shape)}, x0 has {tuple(x0.shape)}")
    if grad_xt.shape != x0.shape:
        raise ValueError(f"{name}: grad_xt has shape {tuple(grad_xt.shape)}, x0 has {tuple(x0.shape)}")
    if x0.dim() < 1 or a_t.shape != (x0.shape[0],):
        raise ValueError(f"{name}: a_t must have shape (B,) = ({x0.shape[0]},), got {tuple(a_t.shape)}")


def latent_adam_step_(
    x0: torch.Tensor,
    grad_xt: torch.Tensor,
    a_t: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    block: int = 1024,
) -> None:
    """In place: g = a_t[b]·grad_xt[b], then one ``torch.optim.Adam`` step on x0 with state (exp_avg, exp_avg_sq).

    x0, exp_avg, exp_avg_sq: contiguous fp32 (B, ...); grad_xt: same shape, fp32 or bf16; a_t: (B,) per-image
    sqrt(ᾱ_t); step: this update's 1-based count (torch's ``state['step']`` after its increment), or that step's
    row of :func:`adam_schedule` on the device (``lr`` and the betas are then the table's).
    """
    name = "latent_adam_step"
    check_triton_device(name, x0, grad_xt, a_t, exp_avg, exp_avg_sq)
    _check_adam_args(name, x0, grad_xt, a_t, exp_avg, exp_avg_sq, step, beta1, beta2)
    check_contiguous(name, x0=x0, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if block < 1 or block & (block - 1):
        raise ValueError(f"{name}: block must be a power of 2, got {block}")
    grad_xt, a_t = grad_xt.contiguous(), a_t.contiguous()
    B = x0.shape[0]
    n = x0.numel() // B if B else 0
    if n == 0:
        return
    # Host-side scalars in double, as torch.optim.Adam computes them from a Python step count (or read on device).
    sc = _scalars(name, step, lr, beta1, beta2, x0.device)
    in_memory = isinstance(sc, torch.Tensor)
    neg_step_size, bc2_sqrt = (0.0, 1.0) if in_memory else sc
    block = min(block, triton.next_power_of_2(n))
    # enable_fp_fusion=False: no FMA contraction, so each step rounds as torch's separate ops do.
    _latent_adam_kernel[(B, triton.cdiv(n, block))](
        x0, grad_xt, a_t, exp_avg, exp_avg_sq, n,
        1 - beta1, beta2, 1 - beta2, neg_step_size, bc2_sqrt, sc if in_memory else x0, eps, BLOCK=block,
        SCALARS_IN_MEMORY=in_memory, enable_fp_fusion=False,
    )


def latent_adam_step_reference(
    x0: torch.Tensor,
    grad_xt: torch.Tensor,
    a_t: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """Plain PyTorch form of :func:`latent_adam_step_`: the same in-place update, written as torch.optim.Adam's ops."""
    name = "latent_adam_step_reference"
    _check_adam_args(name, x0, grad_xt, a_t, exp_avg, exp_avg_sq, step, beta1, beta2)
    neg_step_size, bc2_sqrt = _scalars(name, step, lr, beta1, beta2, x0.device)
    g = a_t.float().view((-1,) + (1,) * (x0.dim() - 1)) * grad_xt.float()
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    if isinstance(neg_step_size, torch.Tensor):  # a device-resident step: no host scalar to hand to addcdiv
        x0.add_(exp_avg.div(denom).mul_(neg_step_size))
    else:
        x0.addcdiv_(exp_avg, denom, value=neg_step_size)
