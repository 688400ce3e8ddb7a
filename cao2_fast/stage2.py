"""Stage 2 — condition-aware latent optimisation, batched over images (and classes).

Per image: x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, ε̂ = first C channels of DiT(x_t, t', y),
loss = mean((ε − ε̂)²) + λ·max|ε − ε̂|, Adam on x0. The batch loss is the sum of the per-image losses, so each image's
gradient is its own, and Adam is elementwise: one batched run equals B one-image runs, provided every image keeps its
own ε, timestep draws and dropout draws — which is why they are inputs here (:class:`Stage2Noise`).

An image whose loss or latent turns non-finite stops: it keeps its last finite latent and is reported, the rest go on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .config import NOISE_BANK_SEED, NOISE_BANK_SIZE
from .diffusion import Diffusion

Fn = Callable[..., torch.Tensor]
T = TypeVar("T")


@dataclass
class Stage2Noise:
    """Per-image randomness: ε (B, C, H, W), respaced timesteps (B, steps) in {1..t_max}, dropout mask (B, steps)."""

    eps: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor

    @classmethod
    def draw(cls, n: int, latent_shape: tuple[int, ...], steps: int, t_max: int, generator: torch.Generator,
             dropout_prob: float, eps: torch.Tensor | None = None) -> "Stage2Noise":
        drawn_eps = torch.randn((n, *latent_shape), generator=generator)
        t = torch.randint(1, t_max + 1, (n, steps), generator=generator)
        drop = torch.rand((n, steps), generator=generator) < dropout_prob
        return cls(drawn_eps if eps is None else eps, t, drop)

    @staticmethod
    def cat(parts: list["Stage2Noise"]) -> "Stage2Noise":
        return Stage2Noise(*(torch.cat([getattr(p, f) for p in parts]) for f in ("eps", "t", "drop")))

    def slice(self, start: int, stop: int) -> "Stage2Noise":
        return Stage2Noise(self.eps[start:stop], self.t[start:stop], self.drop[start:stop])


_BANKS: dict[tuple, torch.Tensor] = {}


def noise_bank(latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed bank of stage-2 noises (1024 entries, seed 42), shared by all classes."""
    key = tuple(latent_shape)
    if key not in _BANKS:
        g = torch.Generator().manual_seed(NOISE_BANK_SEED)
        _BANKS[key] = torch.randn((NOISE_BANK_SIZE, *latent_shape), generator=g)
    return _BANKS[key]


@dataclass
class Stage2Result:
    latents: torch.Tensor  # optimised x0 (B, C, H, W), float32 on CPU
    loss_first: torch.Tensor  # (B,) loss at the first step
    loss_last: torch.Tensor  # (B,) loss at the last step taken
    steps_done: torch.Tensor  # (B,) steps applied before a stop (== steps when all went well)
    finite: torch.Tensor  # (B,) False where the image stopped on a non-finite loss or latent


def per_image_loss(eps: torch.Tensor, eps_hat: torch.Tensor, lam: float) -> torch.Tensor:
    """mean((ε − ε̂)²) + λ·max|ε − ε̂| over each image's whole latent, in float32."""
    d = (eps.float() - eps_hat.float()).flatten(1)
    return d.pow(2).mean(dim=1) + lam * d.abs().amax(dim=1)


@dataclass(frozen=True)
class StepOps:
    """The three elementwise pieces of a stage-2 step: noising, loss + dL/dε̂, and the Adam update through a_t.
    ``triton`` uses the fused kernels of ``cao2_fast.kernels``; ``torch`` their plain PyTorch references, the loss
    gradient written out (:func:`~cao2_fast.kernels.latent_loss.latent_loss_grad_eager`, the same bits)."""

    name: str
    noise: Fn
    loss_grad: Fn
    adam: Fn


def step_ops(name: str) -> StepOps:
    """``torch`` (reference ops, any device) or ``triton`` (fused kernels: CUDA, or CPU under TRITON_INTERPRET=1)."""
    from cao2_fast import kernels as K

    if name == "torch":
        return StepOps("torch", K.noise_latents_reference, K.latent_loss_grad_eager, K.latent_adam_step_reference)
    if name == "triton":
        return StepOps("triton", K.noise_latents, K.latent_loss_grad, K.latent_adam_step_)
    raise ValueError(f"unknown stage-2 step ops {name!r}: torch or triton")


def default_ops(device) -> str:
    from cao2_fast.kernels import triton_available

    return "triton" if torch.device(device).type == "cuda" and triton_available(device) else "torch"


def optimize(dit: Fn, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor, noise: Stage2Noise, steps: int,
             lr: float, lam: float, timestep_mode: str, label_dropout: bool, device, dtype=torch.float32,
             progress: Callable[[], None] | None = None, ops: str | None = None,
             cuda_graph: bool = False) -> Stage2Result:
    """Optimise latents ``x0`` (B, C, H, W) under labels ``y`` (B,) for ``steps`` Adam steps.

    ``timestep_mode``: ``official`` tells the DiT the raw respaced index t (the released quirk), ``consistent`` the
    original timestep that matches ᾱ_t. ``dtype`` is the DiT's compute dtype; x0, the loss and Adam stay float32.
    Each step runs the DiT forward, the loss gradient w.r.t. ε̂ in closed form, and one backward to x_t only (the
    DiT's weights are frozen).

    Every per-step input lives on the device before the first step: each image's pre-drawn timesteps and dropout
    draws (B, steps), and the Adam scalars of every step (:func:`~cao2_fast.kernels.adam_schedule`). A step picks
    its column with a step counter that is itself a device tensor, so a step never waits on the host and one step's
    work is the same kernels with the same buffers at every step. With ``cuda_graph`` on CUDA, two steps run
    eagerly (they warm up every kernel), the third is captured in a CUDA graph and the graph is replayed for the rest.
    """
    from cao2_fast.kernels import adam_schedule

    device = torch.device(device)
    K = step_ops(ops or default_ops(device))
    b, c = x0.shape[0], x0.shape[1]
    x = x0.detach().to(device, torch.float32, copy=True).contiguous()  # updated in place: never the caller's tensor
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    eps = noise.eps.to(device).float().contiguous()
    y = y.to(device)
    t_all = noise.t.to(device)
    tm_all = t_all if timestep_mode == "official" else diffusion.model_timesteps(t_all)
    drop_all = noise.drop.to(device) if label_dropout else None
    adam_rows = adam_schedule(max(steps, 1), lr, device=device)
    k_dev = torch.zeros(1, dtype=torch.long, device=device)  # the step counter every step reads and advances
    sqrt_ac = diffusion.sqrt_alphas_cumprod.float().to(device)
    sqrt_1m = diffusion.sqrt_one_minus_alphas_cumprod.float().to(device)
    first = torch.full((b,), float("nan"), device=device)
    last = torch.full((b,), float("nan"), device=device)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.long, device=device)
    view = (-1,) + (1,) * (x.dim() - 1)

    def column(a: torch.Tensor) -> torch.Tensor:
        return a.index_select(1, k_dev).squeeze(1)

    def step(is_first: bool) -> None:
        t = column(t_all)
        xt = K.noise(x, eps, t, sqrt_ac, sqrt_1m, out_dtype=dtype).requires_grad_(True)
        with torch.enable_grad():
            eps_hat = dit(xt, column(tm_all), y, None if drop_all is None else column(drop_all))[:, :c]
        loss, g = K.loss_grad(eps, eps_hat.detach(), lam)
        (gx,) = torch.autograd.grad(eps_hat, xt, grad_outputs=g)
        if is_first:
            first.copy_(loss)
        ok = alive & torch.isfinite(loss) & torch.isfinite(gx).flatten(1).all(dim=1)
        last.copy_(torch.where(ok, loss, last))
        prev = (x.clone(), exp_avg.clone(), exp_avg_sq.clone())
        K.adam(x, torch.where(ok.view(view), gx, torch.zeros_like(gx)).contiguous(), sqrt_ac[t], exp_avg,
               exp_avg_sq, adam_rows.index_select(0, k_dev).squeeze(0), lr)
        ok &= torch.isfinite(x).flatten(1).all(dim=1)
        for cur, old in zip((x, exp_avg, exp_avg_sq), prev):  # a stopped image keeps its last finite state
            cur.copy_(torch.where(ok.view(view), cur, old))
        alive.copy_(ok)
        done.add_(ok.long())
        k_dev.add_(1)

    def tick() -> None:
        if progress is not None:
            progress()

    eager_from = 0
    if cuda_graph and device.type == "cuda" and steps > 2:
        graph = _capture_step(step)
        tick()
        tick()
        eager_from = 2  # the two warm-up steps were real
        if graph is not None:
            for _ in range(2, steps):
                graph.replay()
                tick()
            torch.cuda.synchronize(device)
            eager_from = steps
    for k in range(eager_from, steps):
        step(k == 0)
        tick()
    return Stage2Result(x.detach().cpu(), first.cpu(), last.cpu(), done.cpu(), alive.cpu())


def _capture_step(step: Callable[[bool], None]) -> torch.cuda.CUDAGraph | None:
    """Run steps 0 and 1 for real on a side stream (the warm-up capture needs), then capture one step. Returns the
    graph, or None (with a warning) when the step cannot be captured; out-of-memory propagates to the caller."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(True)
        step(False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step(False)  # recorded, not run: the state and the step counter are as the warm-up left them
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        if is_out_of_memory(e):  # capture_end reports it as a plain RuntimeError: halve the batch, don't give up
            raise torch.OutOfMemoryError(str(e).splitlines()[0]) from e
        warnings.warn(f"stage 2: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); running the remaining "
                      "steps uncaptured", RuntimeWarning, stacklevel=3)
        return None
    return graph


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory, whatever type it arrived as (inside CUDA-graph capture,
    the allocator's failure can surface from ``capture_end`` as a RuntimeError)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "cudaerrormemoryallocation" in text)


def halve_on_oom(fn: Callable[[int], T], batch: int, log: Callable[[str], None] | None = None) -> tuple[int, T]:
    """``fn(batch)``, retried at half the batch (down to 1) while it runs out of device memory.
    Returns (the batch that fitted, its result). Stage 2 is exact under batching, so the result does not depend on
    the batch that fitted."""
    while True:
        try:
            return batch, fn(batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            if log is not None:
                log(f"stage 2: a batch of {batch} ran out of device memory, retrying with {batch // 2}")
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
