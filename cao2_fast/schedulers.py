"""Few-step stage-1 samplers: diffusers' ``DDIMScheduler`` (η = 0) and ``DPMSolverMultistepScheduler``
(DPM-Solver++, second order) stepping a DiT the way diffusers' ``DiTPipeline`` does, on the DiT's own training
schedule (1000 linear betas from 1e-4 to 0.02, the configuration the DiT pipelines ship).

As in ``DiTPipeline``, the learned-range variance channels are dropped before each step: the schedulers see the
(guided) eps only. Guidance itself is the run's rule (the recipe's guided eps channels), not the pipeline's.
Both samplers are deterministic: a candidate's trajectory is a function of its initial noise alone, so a candidate
starts from the same pre-drawn noise under every sampler.

Steps are indexed the way :func:`cao2_fast.diffusion.sample` indexes respaced steps: step ``i`` runs
``num_steps − 1 − i``-th, so ``start``/``stop`` split a run identically for every sampler.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .config import SCHEDULE_STEPS
from .diffusion import guided_model_output, guided_steps

# the scheduler configuration diffusers' DiT pipelines ship (DDIMScheduler; DPM-Solver++ takes it via from_config)
DIT_SCHEDULER_CONFIG = {"num_train_timesteps": SCHEDULE_STEPS, "beta_schedule": "linear", "beta_start": 1e-4,
                        "beta_end": 0.02, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                        "prediction_type": "epsilon"}


def make_scheduler(kind: str, steps: int):
    """A fresh diffusers scheduler of ``kind`` (``ddim`` or ``dpmpp``) set to ``steps`` steps."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        sched = DDIMScheduler(**DIT_SCHEDULER_CONFIG)
    elif kind == "dpmpp":
        sched = DPMSolverMultistepScheduler.from_config(DDIMScheduler(**DIT_SCHEDULER_CONFIG).config)
        if sched.config.algorithm_type != "dpmsolver++" or sched.config.solver_order != 2:
            raise AssertionError("diffusers' DPMSolverMultistepScheduler defaults changed")
    else:
        raise ValueError(f"no diffusers scheduler for sampler {kind!r}")
    with warnings.catch_warnings():  # diffusers' own numpy-2 deprecation noise, not the caller's concern
        warnings.simplefilter("ignore", DeprecationWarning)
        sched.set_timesteps(steps)
    if len(torch.unique(sched.timesteps)) != steps:
        raise ValueError(f"{kind} cannot take {steps} distinct steps of the {SCHEDULE_STEPS}-step schedule")
    return sched


class SchedulerSampler:
    """A diffusers scheduler driven one step at a time, with each candidate's solver state held outside it, so
    candidates can be split into batches, dropped (early rejection) and rebatched between steps without changing
    any candidate's arithmetic. The state of DPM-Solver++ is the previous step's x̂0 (its second-order update uses
    it); DDIM has none."""

    def __init__(self, kind: str, steps: int):
        self.kind, self.num_steps = kind, steps
        self.scheduler = make_scheduler(kind, steps)
        self.timesteps = self.scheduler.timesteps.clone()  # int64, the order they are taken
        ac = self.scheduler.alphas_cumprod.double()[self.timesteps]
        # noise level σ of step i (respaced-style index: i = num_steps − 1 − k for the k-th step taken), under the
        # name a Diffusion gives it, so that diffusion.guided_steps reads a guidance interval off either
        self.sqrt_recipm1_alphas_cumprod = ((1 - ac) / ac).sqrt().flip(0)

    def model_timestep(self, i: int) -> int:
        """The DiT's timestep at step ``i``."""
        return int(self.timesteps[self.num_steps - 1 - i])

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, prev_x0: torch.Tensor | None):
        """Step ``i`` from x with the model's eps: (x after the step, this step's x̂0, the state for the next step)."""
        k = self.num_steps - 1 - i
        t = self.timesteps[k]
        s = self.scheduler
        if self.kind == "ddim":
            out = s.step(eps, t, x, eta=0.0)
            return out.prev_sample, out.pred_original_sample, None
        if k > 0 and prev_x0 is None:
            raise ValueError("DPM-Solver++ resumed without the previous step's x0 prediction")
        # restore the candidates' solver state: the step counter, how many lower-order steps are done, the history
        s._step_index = k
        s.lower_order_nums = min(k, s.config.solver_order)
        s.model_outputs = [None] * (s.config.solver_order - 1) + [prev_x0]
        x_next = s.step(eps, t, x).prev_sample
        x0 = s.model_outputs[-1]
        return x_next, x0, x0


@torch.no_grad()
def sample(model: Callable, sampler: SchedulerSampler, x: torch.Tensor, y: torch.Tensor, null_class: int,
           guidance_scale: float, guided_channels: int, progress: Callable[[], None] | None = None, *,
           start: int | None = None, stop: int = 0, state: torch.Tensor | None = None,
           guidance_interval: tuple[float, float] | None = None):
    """Steps start−1 down to ``stop`` of ``sampler`` from ``x`` (default: all of them, from the initial noise) at
    labels ``y``; returns (x, the last step's x̂0, the solver state to resume from). The model sees the run's dtype;
    the schedulers step in float32 (diffusers' DPM-Solver++ upcasts, DDIM is kept alike)."""
    start = sampler.num_steps if start is None else start
    guided = guided_steps(sampler, guidance_interval)
    c = x.shape[1]
    dtype = x.dtype
    x, x0 = x.float(), None
    state = None if state is None else state.float()
    for i in reversed(range(stop, start)):
        t = torch.full((x.shape[0],), sampler.model_timestep(i), device=x.device, dtype=torch.long)
        scale = guidance_scale if guided[i] else 1.0
        out = guided_model_output(model, x.to(dtype), t, y, null_class, scale, guided_channels)
        eps = out[:, :c].float()  # the learned-range variance channels are dropped, as DiTPipeline does
        x, x0, state = sampler.step(i, eps, x, state)
        if progress is not None:
            progress()
    return x, x0, state

