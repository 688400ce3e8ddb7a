"""Forward noising of clean latents, x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, with one timestep per image.

NOTE: what the fusion saves (counted, not timed: no GPU was available when this was written). The eager form
``sqrt_ac[t].view(-1,1,1,1) * x0 + sqrt_1m_ac[t].view(-1,1,1,1) * eps`` is 5 launches (2 gathers, 2 multiplies, 1 add)
and 7 latent-sized passes over memory (reads x0, eps and both products; writes both products and x_t), plus a cast
launch and 2 more passes each when ε is bf16 or x_t must be bf16. The kernel is 1 launch and 3 passes (read x0, read ε,
write x_t), with the per-image table lookups done once per program. At stage-2 sizes (one 4×32×32 latent per image) the
step is launch-bound, so the launch count is what matters.
"""

from __future__ import annotations

import torch
from ._runtime import check_triton_device, import_triton

triton, tl = import_triton()

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _noise_latents_kernel(
    x0_ptr, eps_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, out_ptr,
    N,  # elements per image
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    t = tl.load(t_ptr + b)
    a = tl.load(sqrt_ac_ptr + t).to(tl.float32)
    s = tl.load(sqrt_1m_ac_ptr + t).to(tl.float32)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    x = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xt = a * x + s * e
    tl.store(out_ptr + base + offs, xt.to(out_ptr.dtype.element_ty), mask=mask)


def noise_latents(
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    sqrt_ac: torch.Tensor,
    sqrt_1m_ac: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block: int = 1024,
) -> torch.Tensor:
    """x_t[b] = sqrt_ac[t[b]]·x0[b] + sqrt_1m_ac[t[b]]·eps[b], computed in fp32, stored as ``out_dtype``.

    x0, eps: (B, ...) with the same shape (eps may be bf16); t: integer (B,) indices into the (T,) tables
    ``sqrt_ac``/``sqrt_1m_ac``. Indices are not range-checked (that would cost a host sync); the reference is.
    """
    name = "noise_latents"
    check_triton_device(name, x0, eps, t, sqrt_ac, sqrt_1m_ac)
    if x0.shape != eps.shape:
        raise ValueError(f"{name}: x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    if x0.dim() < 1 or t.shape != (x0.shape[0],):
        raise ValueError(f"{name}: t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: t must be int64 or int32 timestep indices, got {t.dtype}")
    if sqrt_ac.dim() != 1 or sqrt_ac.shape != sqrt_1m_ac.shape:
        raise ValueError(f"{name}: sqrt_ac and sqrt_1m_ac must be (T,) tables of one length")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{name}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"{name}: block must be a power of 2, got {block}")
    x0, eps, t = x0.contiguous(), eps.contiguous(), t.contiguous()
    sqrt_ac, sqrt_1m_ac = sqrt_ac.contiguous(), sqrt_1m_ac.contiguous()
    out = torch.empty(x0.shape, dtype=out_dtype, device=x0.device)
    B = x0.shape[0]
    n = x0.numel() // B if B else 0
    if out.numel() == 0:
        return out
    block = min(block, triton.next_power_of_2(n))
    # enable_fp_fusion=False: no FMA contraction, so a·x0 + s·ε rounds as torch's separate mul, mul, add do.
    _noise_latents_kernel[(B, triton.cdiv(n, block))](
        x0, eps, t, sqrt_ac, sqrt_1m_ac, out, n, BLOCK=block, enable_fp_fusion=False
    )
    return out


def noise_latents_reference(
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    sqrt_ac: torch.Tensor,
    sqrt_1m_ac: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain PyTorch form of :func:`noise_latents`."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = sqrt_ac[t].float().view(shape)
    s = sqrt_1m_ac[t].float().view(shape)
    return (a * x0.float() + s * eps.float()).to(out_dtype)
