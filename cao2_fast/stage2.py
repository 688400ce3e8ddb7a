"""Stage 2 — condition-aware latent optimisation, batched over images (and classes).

Per image: x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, ε̂ = first C channels of DiT(x_t, t', y),
loss = mean((ε − ε̂)²) + λ·max|ε − ε̂|, Adam on x0. The batch loss is the sum of the per-image losses, so each image's
gradient is its own, and Adam is elementwise: one batched run equals B one-image runs, provided every image keeps its
own ε, timestep draws and dropout draws — which is why they are inputs here (:class:`Stage2Noise`).

An image whose loss or latent turns non-finite stops: it keeps its last finite latent and is reported, the rest go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .config import NOISE_BANK_SEED, NOISE_BANK_SIZE
from .diffusion import Diffusion

Fn = Callable[..., torch.Tensor]


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


def adam_update_(x, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1=0.9, beta2=0.999, eps=1e-8):
    """torch.optim.Adam's update (no weight decay, no amsgrad), elementwise and in place; returns the new x."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return x.addcdiv(exp_avg, denom, value=-lr / (1 - beta1**step))


def optimize(dit: Fn, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor, noise: Stage2Noise, steps: int,
             lr: float, lam: float, timestep_mode: str, label_dropout: bool, device, dtype=torch.float32,
             progress: Callable[[], None] | None = None) -> Stage2Result:
    """Optimise latents ``x0`` (B, C, H, W) under labels ``y`` (B,) for ``steps`` Adam steps.

    ``timestep_mode``: ``official`` tells the DiT the raw respaced index t (the released quirk), ``consistent`` the
    original timestep that matches ᾱ_t. ``dtype`` is the DiT's compute dtype; x0, the loss and Adam stay float32.
    """
    b = x0.shape[0]
    x = x0.detach().float().clone().to(device)
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    eps = noise.eps.to(device).float()
    y = y.to(device)
    loss_first = torch.full((b,), float("nan"))
    loss_last = torch.full((b,), float("nan"))
    steps_done = torch.zeros(b, dtype=torch.long)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for k in range(steps):
        t = noise.t[:, k].to(device)
        t_model = t if timestep_mode == "official" else diffusion.model_timesteps(t)
        drop = noise.drop[:, k].to(device) if label_dropout else None
        xin = x.detach().requires_grad_(True)
        xt = diffusion.q_sample(xin, t, eps)
        out = dit(xt.to(dtype), t_model, y, drop)
        loss = per_image_loss(eps, out[:, : x.shape[1]], lam)
        (grad,) = torch.autograd.grad(loss.sum(), xin)
        finite = torch.isfinite(loss) & torch.isfinite(grad).flatten(1).all(dim=1)
        alive &= finite
        lc = loss.detach().cpu()
        if k == 0:
            loss_first = lc.clone()
        keep = alive.cpu()
        loss_last[keep] = lc[keep]
        if not bool(alive.any()):
            break
        grad = torch.where(alive.view(shape), grad, torch.zeros_like(grad))
        new_m, new_v = exp_avg.clone(), exp_avg_sq.clone()
        new_x = adam_update_(x, grad, new_m, new_v, k + 1, lr)
        alive &= torch.isfinite(new_x).flatten(1).all(dim=1)
        sel = alive.view(shape)
        x = torch.where(sel, new_x, x)
        exp_avg, exp_avg_sq = torch.where(sel, new_m, exp_avg), torch.where(sel, new_v, exp_avg_sq)
        steps_done += alive.cpu().long()
        if progress is not None:
            progress()
    return Stage2Result(x.detach().cpu(), loss_first, loss_last, steps_done, alive.cpu())
