"""Stage-1 sampling with a denoising DiT: every candidate's guided trajectory from its pre-drawn noise (the DDPM
sampler, or a few-step diffusers scheduler: :mod:`cao2_fast.schedulers`), in batches across classes, optionally
cut by early-rejection checks (what the DiT generator runs; selection is :mod:`cao2_fast.selection`'s).

The model enters as a plain callable so that any engine (eager, compiled, ONNX Runtime, TensorRT) can serve:
``dit(x, t, y) -> (N, 2C, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import schedulers
from .diffusion import Diffusion, sample
from .schedulers import SchedulerSampler

Fn = Callable[..., torch.Tensor]


@dataclass
class Stage1Noise:
    """Pre-drawn randomness of one class's candidates: initial noise (n, C, H, W) and per-step noise
    (steps, n, C, H, W). Drawing it up front makes the result independent of how candidates are batched."""

    initial: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def draw(cls, n: int, latent_shape: tuple[int, ...], steps: int, generator: torch.Generator) -> "Stage1Noise":
        initial = torch.randn((n, *latent_shape), generator=generator)
        per_step = torch.randn((steps, n, *latent_shape), generator=generator)
        return cls(initial, per_step)

    @staticmethod
    def cat(parts: list["Stage1Noise"]) -> "Stage1Noise":
        return Stage1Noise(torch.cat([p.initial for p in parts]), torch.cat([p.steps for p in parts], dim=1))

    def slice(self, start: int, stop: int) -> "Stage1Noise":
        return Stage1Noise(self.initial[start:stop], self.steps[:, start:stop])


def generate(dit: Fn, diffusion: Diffusion | SchedulerSampler, noise: Stage1Noise, labels: torch.Tensor,
             null_class: int, guidance_scale: float, guided_channels: int, device, dtype, batch: int,
             progress: Callable[[], None] | None = None, *, x: torch.Tensor | None = None, start: int | None = None,
             stop: int = 0, return_x0: bool = False, guidance_interval: tuple[float, float] | None = None,
             state: torch.Tensor | None = None, return_state: bool = False):
    """Sample latents for ``labels`` in chunks of ``batch`` candidates (the model sees 2·batch with guidance), with
    the DDPM sampler of ``diffusion`` or a diffusers scheduler (:class:`~cao2_fast.schedulers.SchedulerSampler`).

    ``x``/``start``/``stop``/``return_x0``/``guidance_interval`` as in :func:`cao2_fast.diffusion.sample`: resume
    from the latents ``x`` (default: the initial noise) over steps start−1..stop, and also return the last
    step's x̂0 (both float32 on the CPU). A scheduler's solver state enters as ``state`` (one row per label) and
    comes back last with ``return_state`` (None for DDPM and DDIM)."""
    out, x0s, states = [], [], []
    for first in range(0, len(labels), batch):
        part = noise.slice(first, first + batch)
        x_in = (part.initial if x is None else x[first:first + batch]).to(device, dtype)
        y = labels[first:first + batch].to(device)
        if isinstance(diffusion, SchedulerSampler):
            s_in = None if state is None else state[first:first + batch].to(device)
            res, x0, s_out = schedulers.sample(dit, diffusion, x_in, y, null_class, guidance_scale,
                                               guided_channels, progress, start=start, stop=stop, state=s_in,
                                               guidance_interval=guidance_interval)
            if s_out is not None:
                states.append(s_out.float().cpu())
        else:
            res = sample(dit, diffusion, x_in, y, null_class, guidance_scale, guided_channels,
                         step_noise=part.steps.to(device, dtype), progress=progress, start=start, stop=stop,
                         return_x0=return_x0, guidance_interval=guidance_interval)
            if return_x0:
                res, x0 = res
        if return_x0:
            x0s.append(x0.float().cpu())
        out.append(res.float().cpu())
    result = (torch.cat(out), torch.cat(x0s)) if return_x0 else (torch.cat(out),)
    if return_state:
        result = (*result, torch.cat(states) if states else None)
    return result if len(result) > 1 else result[0]


# -- early candidate rejection ---------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Ranker = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def generate_early(dit: Fn, diffusion: Diffusion, noise: Stage1Noise, labels: torch.Tensor, per_class: int,
                   null_class: int, guidance_scale: float, guided_channels: int, device, dtype, batch: int,
                   checks: list[tuple[int, int]], score: Scorer, rank: Ranker,
                   progress: Callable[[], None] | None = None,
                   guidance_interval: tuple[float, float] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`generate` with early rejection (any sampler; a survivor's solver state follows it). ``labels`` hold
    whole classes of ``per_class`` candidates each, class by class. At each check ``(step, keep)`` — after ``step``
    of the sampling steps, steps increasing, keeps shrinking — the x̂0 of every live candidate is scored
    (``score(x0) -> (probs, finite)``), class ``j``'s live candidates are ordered by ``rank(j,
    candidate_index_in_class, probs, finite)`` (positions, best first), and the first ``keep`` of each class
    sample on; the others are dropped. Survivors keep their own noise rows, so a survivor's arithmetic is the full
    run's (only batch composition differs, which may change float rounding).

    Returns (latents of the survivors, their indices into ``labels`` in increasing order, a mask over ``labels`` of
    the candidates whose early scores were not finite)."""
    steps = diffusion.num_steps
    alive = torch.arange(len(labels))
    x, state, done, nonfinite = None, None, 0, torch.zeros(len(labels), dtype=torch.bool)
    for step, keep in [*checks, (steps, None)]:
        res = generate(dit, diffusion, Stage1Noise(noise.initial[alive], noise.steps[:, alive]), labels[alive],
                       null_class, guidance_scale, guided_channels, device, dtype, batch, progress, x=x,
                       start=steps - done, stop=steps - step, return_x0=keep is not None,
                       guidance_interval=guidance_interval, state=state, return_state=True)
        done = step
        if keep is None:
            return res[0], alive, nonfinite
        x, x0, state = res
        probs, finite = score(x0)
        nonfinite[alive[~finite]] = True
        survivors = []
        for j in range(len(labels) // per_class):
            pos = torch.nonzero(alive // per_class == j).flatten()
            order = rank(j, alive[pos] - j * per_class, probs[pos], finite[pos])
            survivors.append(pos[order[:keep]].sort().values)
        pos = torch.cat(survivors)
        alive, x = alive[pos], x[pos]
        state = None if state is None else state[pos]
    raise AssertionError("unreachable")


def dit_forwards(per_class: int, sample_steps: int, checks: list[tuple[int, int]] = (), guidance_scale: float = 2.7,
                 guided: torch.Tensor | None = None) -> int:
    """Image-forwards of the DiT to sample one class's ``per_class`` candidates (docs/method.md, cost model: a guided
    step costs 2):
    every step runs on the candidates still alive (all before the first check, ``keep`` after it); ``guided``
    (bool per respaced step, see :func:`cao2_fast.diffusion.guided_steps`) marks the guided steps (default: all)."""
    total, done, alive = 0, 0, per_class
    for step, keep in [*checks, (sample_steps, per_class)]:
        for k in range(done, step):  # the k-th step taken is respaced step sample_steps − 1 − k
            g = guidance_scale != 1.0 and (guided is None or bool(guided[sample_steps - 1 - k]))
            total += alive * (2 if g else 1)
        done, alive = step, keep
    return total
