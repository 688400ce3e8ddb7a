"""Stage-2 per-image loss and its gradient with respect to the DiT output, in one kernel.

loss_b = mean((ε_b − ε̂_b)²) + λ·max|ε_b − ε̂_b|, each over the whole latent of image b, and
grad = ∂(Σ_b loss_b)/∂ε̂ — the tensor handed to the DiT's backward. The L∞ gradient is split evenly among tied maxima,
as autograd does for ``torch.amax``/``torch.max``: with d = ε − ε̂, m = max|d| and k = #{i : |d_i| = m},
∂loss/∂ε̂_i = −(2·d_i/n + λ·sign(d_i)·[|d_i| = m]/k). Entries tied in |d| with opposite signs are all counted in k and
get opposite-signed shares; when m = 0 the L∞ term contributes nothing (sign(0) = 0), as in autograd.

NOTE: what the fusion saves (counted, not timed: no GPU was available when this was written). The reference
(eager forward + autograd) dispatches 22 compute ops, each a launch: 7 forward (sub, pow, mean, abs, amax, mul, add),
the loss sum and its seed, and 13 backward (lam scale, tie mask ``|d| == m``, its count, the division and masking,
sgn and its product, mean's scale, pow's three ops, the accumulation, the negation), plus 2 casts when ε̂ is bf16;
together about 30 latent-sized passes over memory. The kernel is 1 launch, one program per image: a first sweep reads
ε and ε̂ and reduces Σd², max|d| and the tie count together (per-lane running max and count, merged at the end); a
second sweep re-reads them (a 16 KiB row at 4×32×32, still in cache) and writes the gradient: 2 reads + 1 write from
DRAM, no intermediates.
"""

from __future__ import annotations

import torch
from ._runtime import check_triton_device, import_triton

triton, tl = import_triton()


@triton.jit
def _latent_loss_grad_kernel(
    eps_ptr, eps_hat_ptr, loss_ptr, grad_ptr,
    N,  # elements per image
    n_f,  # N as fp32 (exact below 2**24)
    lam,  # fp32 weight of the L-inf term
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    base = b.to(tl.int64) * N
    # Sweep 1: Σd², and per lane the running max|d| with the number of times it was attained. (0, 0) is a valid
    # identity: |d| >= 0, and a lane that only ever saw padding keeps count 0.
    sumsq = tl.zeros([BLOCK], dtype=tl.float32)
    lane_max = tl.zeros([BLOCK], dtype=tl.float32)
    lane_cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(eps_hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d = e - h
        sumsq += d * d
        ad = tl.where(mask, tl.abs(d), -1.0)
        lane_cnt = tl.where(ad > lane_max, 1, lane_cnt + (ad == lane_max).to(tl.int32))
        lane_max = tl.maximum(lane_max, ad)
    m = tl.max(lane_max, axis=0)
    cnt = tl.sum(tl.where(lane_max == m, lane_cnt, 0), axis=0)
    loss = tl.div_rn(tl.sum(sumsq, axis=0), n_f) + lam * m
    tl.store(loss_ptr + b, loss)
    # Sweep 2: the gradient, in autograd's order of operations: (1/n)·(2d) from the mean of squares,
    # (λ/k)·sign(d) on the tied maxima from the L-inf term, negated by ε̂'s sign in d.
    inv_n = tl.div_rn(1.0, n_f)
    share = tl.div_rn(lam, cnt.to(tl.float32))
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(eps_hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d = e - h
        sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        g_inf = tl.where(tl.abs(d) == m, share * sgn, 0.0)
        g = -(inv_n * (2.0 * d) + g_inf)
        tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def latent_loss_grad(
    eps: torch.Tensor, eps_hat: torch.Tensor, lam: float, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image stage-2 loss (B,) fp32 and its gradient w.r.t. ``eps_hat`` (same shape and dtype as ``eps_hat``).

    eps, eps_hat: (B, ...) of one shape, any of fp32/bf16/fp16; arithmetic is fp32. ``block`` (a power of 2) is the
    tile a program sweeps its image with; rows that are not a multiple of it are masked.
    """
    name = "latent_loss_grad"
    check_triton_device(name, eps, eps_hat)
    if eps.shape != eps_hat.shape or eps.dim() < 1:
        raise ValueError(
            f"{name}: eps {tuple(eps.shape)} and eps_hat {tuple(eps_hat.shape)} must have one shape (B, ...)"
        )
    if block < 1 or block & (block - 1):
        raise ValueError(f"{name}: block must be a power of 2, got {block}")
    eps, eps_hat = eps.contiguous(), eps_hat.contiguous()
    B = eps.shape[0]
    n = eps.numel() // B if B else 0
    loss = torch.empty(B, dtype=torch.float32, device=eps.device)
    grad = torch.empty_like(eps_hat)
    if n == 0:
        if B:
            raise ValueError(f"{name}: each image must have at least one element")
        return loss, grad
    if n >= 2**24:
        raise ValueError(f"{name}: {n} elements per image is beyond the fp32-exact count this kernel assumes")
    block = min(block, triton.next_power_of_2(n))
    # enable_fp_fusion=False: no FMA contraction, so products round as in torch's separate ops.
    _latent_loss_grad_kernel[(B,)](
        eps, eps_hat, loss, grad, n, float(n), float(lam), BLOCK=block, enable_fp_fusion=False
    )
    return loss, grad


def latent_loss_grad_eager(
    eps: torch.Tensor, eps_hat: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`latent_loss_grad_reference` without autograd: the loss the same way, and the gradient written out as
    the reference's backward computes it, op for op (mean's 1/n times pow's 2·d; λ over the tie count on the tied
    maxima, times sign(d); the sum, negated, cast to ``eps_hat``'s dtype), so the bits are the same. It skips
    building and walking a graph, which on CPU cost more than the arithmetic. The stage-2 step's ``torch`` ops."""
    d = (eps.float() - eps_hat.float()).flatten(1)
    a = d.abs()
    m = a.amax(dim=1, keepdim=True)
    loss = (d**2).mean(dim=1) + lam * m.squeeze(1)
    ties = a == m
    share = torch.full_like(m, lam) / ties.sum(dim=1, keepdim=True) * ties
    inv_n = torch.ones((), dtype=d.dtype, device=d.device) / d.shape[1]
    grad = (2.0 * d).mul_(inv_n).add_(share.mul_(d.sgn())).neg_()
    return loss, grad.view(eps_hat.shape).to(eps_hat.dtype)


def latent_loss_grad_reference(
    eps: torch.Tensor, eps_hat: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd on the plain formula, in fp32; the gradient is returned in ``eps_hat``'s dtype."""
    eps_hat = eps_hat.detach().requires_grad_(True)
    with torch.enable_grad():
        d = (eps.float() - eps_hat.float()).flatten(1)
        loss = (d**2).mean(dim=1) + lam * d.abs().amax(dim=1)
        (grad,) = torch.autograd.grad(loss.sum(), eps_hat)
    return loss.detach(), grad
