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
    ``triton`` uses the fused kernels of ``cao2_fast.kernels``; ``torch`` their plain PyTorch references."""

    name: str
    noise: Fn
    loss_grad: Fn
    adam: Fn


def step_ops(name: str) -> StepOps:
    """``torch`` (reference ops, any device) or ``triton`` (fused kernels: CUDA, or CPU under TRITON_INTERPRET=1)."""
    from cao2_fast import kernels as K

    if name == "torch":
        return StepOps("torch", K.noise_latents_reference, K.latent_loss_grad_reference, K.latent_adam_step_reference)
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
    DiT's weights are frozen). All per-step randomness is pre-drawn and moved to the device once, so a step never
    waits on the host; with ``cuda_graph`` the whole loop is captured once and replayed.
    """
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
    sqrt_ac = diffusion.sqrt_alphas_cumprod.float().to(device)
    sqrt_1m = diffusion.sqrt_one_minus_alphas_cumprod.float().to(device)
    first = torch.full((b,), float("nan"), device=device)
    last = torch.full((b,), float("nan"), device=device)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.long, device=device)
    view = (-1,) + (1,) * (x.dim() - 1)

    def step(k: int) -> None:
        t = t_all[:, k]
        xt = K.noise(x, eps, t, sqrt_ac, sqrt_1m, out_dtype=dtype).requires_grad_(True)
        with torch.enable_grad():
            eps_hat = dit(xt, tm_all[:, k], y, None if drop_all is None else drop_all[:, k])[:, :c]
        loss, g = K.loss_grad(eps, eps_hat.detach(), lam)
        (gx,) = torch.autograd.grad(eps_hat, xt, grad_outputs=g)
        if k == 0:
            first.copy_(loss)
        ok = alive & torch.isfinite(loss) & torch.isfinite(gx).flatten(1).all(dim=1)
        last.copy_(torch.where(ok, loss, last))
        prev = (x.clone(), exp_avg.clone(), exp_avg_sq.clone())
        K.adam(x, torch.where(ok.view(view), gx, torch.zeros_like(gx)).contiguous(), sqrt_ac[t], exp_avg,
               exp_avg_sq, k + 1, lr)
        ok &= torch.isfinite(x).flatten(1).all(dim=1)
        for cur, old in zip((x, exp_avg, exp_avg_sq), prev):  # a stopped image keeps its last finite state
            cur.copy_(torch.where(ok.view(view), cur, old))
        alive.copy_(ok)
        done.add_(ok.long())

    captured = False
    if cuda_graph and device.type == "cuda" and steps > 0:
        try:
            _run_captured(step, steps, (x, exp_avg, exp_avg_sq, first, last, alive, done))
            captured = True
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # an op the graph cannot hold: the state was restored, run the plain loop
            warnings.warn(f"stage 2: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); running the "
                          "steps uncaptured", RuntimeWarning, stacklevel=2)
        if captured and progress is not None:
            for _ in range(steps):
                progress()
    if not captured:
        for k in range(steps):
            step(k)
            if progress is not None:
                progress()
    return Stage2Result(x.detach().cpu(), first.cpu(), last.cpu(), done.cpu(), alive.cpu())


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


def _run_captured(step: Callable[[int], None], steps: int, state: tuple[torch.Tensor, ...]) -> None:
    """Capture all ``steps`` in one CUDA graph and replay it once. Warm-up runs on a side stream against a saved
    copy of ``state``, which is restored before capture (capture does not execute) and again if anything fails, so
    both the replay and a caller's fallback start from the caller's state."""
    saved = [s.clone() for s in state]

    def restore():
        for s, v in zip(state, saved):
            s.copy_(v)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(min(2, steps)):
                step(k)
        torch.cuda.current_stream().wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for k in range(steps):
                step(k)
    except BaseException:
        torch.cuda.synchronize()
        restore()
        raise
    restore()  # nothing ran during capture; this only guards the replay's starting point
    graph.replay()
    torch.cuda.synchronize()
