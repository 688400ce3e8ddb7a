"""The released code's execution (docs/method.md, cost model), kept as the baseline that ``cao2-fast bench`` measures
against.

Stage 1: one class at a time, eager, the guided batch of 2·K·IPC. Stage 2: one image at a time, ``torch.optim.Adam``
on a (1, C, H, W) latent, weights left with ``requires_grad=True`` (so every backward also computes the weight
gradients it never uses), the timestep read on the host and sent to the device at every step. Numerically it is the
same method as :mod:`cao2_fast.stage2`; only the execution differs.
"""

from __future__ import annotations

from typing import Callable

import torch

from .diffusion import Diffusion, sample
from .stage2 import Stage2Noise


def stage1_class(dit: Callable, diffusion: Diffusion, noise_initial: torch.Tensor, step_noise: torch.Tensor,
                 class_id: int, null_class: int, guidance_scale: float, guided_channels: int, device) -> torch.Tensor:
    """Sample one class's K·IPC candidates in one guided batch."""
    y = torch.full((noise_initial.shape[0],), class_id, dtype=torch.long, device=device)
    with torch.no_grad():
        return sample(dit, diffusion, noise_initial.to(device), y, null_class, guidance_scale, guided_channels,
                      step_noise=step_noise.to(device))


def stage2_one_image(dit: torch.nn.Module, diffusion: Diffusion, x0: torch.Tensor, y: int, noise: Stage2Noise,
                     index: int, steps: int, lr: float, lam: float, timestep_mode: str, label_dropout: bool,
                     device) -> tuple[torch.Tensor, float, float]:
    """Optimise one latent (C, H, W) the released way. Returns (latent, first loss, last loss)."""
    x = x0[None].clone().to(device).requires_grad_(True)
    eps = noise.eps[index : index + 1].to(device)
    opt = torch.optim.Adam([x], lr=lr)
    ac = diffusion.alphas_cumprod
    first = last = float("nan")
    for k in range(steps):
        t_host = int(noise.t[index, k])  # host-side draw each step, as released
        t = torch.tensor([t_host], device=device)
        a = float(ac[t_host]) ** 0.5
        s = float(1 - ac[t_host]) ** 0.5
        xt = a * x + s * eps
        t_model = t if timestep_mode == "official" else diffusion.timestep_map[t_host].view(1).to(device)
        drop = noise.drop[index : index + 1, k].to(device) if label_dropout else None
        eps_hat = dit(xt, t_model, torch.tensor([y], device=device), drop)[:, : x.shape[1]]
        diff = eps - eps_hat
        loss = torch.mean(diff**2) + lam * torch.max(torch.abs(diff))
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()  # host sync every step, as released
        if k == 0:
            first = last
    return x.detach()[0].cpu(), first, last


def stage2(dit: torch.nn.Module, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor, noise: Stage2Noise,
           steps: int, lr: float, lam: float, timestep_mode: str, label_dropout: bool, device,
           weight_grads: bool = True) -> torch.Tensor:
    """Every latent of ``x0`` (B, C, H, W), one after the other. ``weight_grads`` keeps the released quirk (c)."""
    flags = [p.requires_grad for p in dit.parameters()]
    dit.requires_grad_(weight_grads)
    try:
        out = [stage2_one_image(dit, diffusion, x0[b], int(y[b]), noise, b, steps, lr, lam, timestep_mode,
                                label_dropout, device)[0] for b in range(x0.shape[0])]
    finally:
        for p, f in zip(dit.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None
    return torch.stack(out)
