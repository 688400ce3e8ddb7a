"""Gaussian diffusion as the DiT codebase defines it: linear betas, respacing, learned-range variance, guidance.

Schedules are computed in float64 (as the reference does with numpy) and gathered into the sample's dtype.
The sampler works on B latents; classifier-free guidance doubles the batch inside ``guided_model_output`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """The DDPM linear schedule, scaled to ``num_steps`` as in the DiT code (float64)."""
    scale = 1000 / num_steps
    return torch.linspace(scale * start, scale * end, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """Timesteps kept when respacing ``num_steps`` to ``count``: round(i·(num_steps−1)/(count−1)), accumulated the
    way the reference code does it (a running float sum, then Python's round)."""
    if count < 1 or count > num_steps:
        raise ValueError(f"cannot respace {num_steps} steps to {count}")
    if count == num_steps:
        return list(range(num_steps))
    stride = 1.0 if count <= 1 else (num_steps - 1) / (count - 1)
    taken, cur = [], 0.0
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return taken


@dataclass
class Diffusion:
    """A (possibly respaced) diffusion process. ``timestep_map[i]`` is the original timestep of respaced step i."""

    betas: torch.Tensor  # float64 (T,)
    timestep_map: torch.Tensor  # int64 (T,)

    @classmethod
    def create(cls, respacing: int | None = None, num_train_steps: int = 1000) -> "Diffusion":
        base = linear_betas(num_train_steps)
        if respacing is None or respacing == num_train_steps:
            return cls(base, torch.arange(num_train_steps))
        keep = space_timesteps(num_train_steps, respacing)
        ac = torch.cumprod(1.0 - base, 0)
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1.0 - ac[i].item() / last)
            last = ac[i].item()
        return cls(torch.tensor(new_betas, dtype=torch.float64), torch.tensor(keep))

    def __post_init__(self):
        b = self.betas
        self.num_steps = len(b)
        self.alphas_cumprod = torch.cumprod(1.0 - b, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=b.dtype), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 else torch.log(pv)
        self.posterior_mean_coef1 = b * ac_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - self.alphas_cumprod)

    @staticmethod
    def gather(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped to broadcast against ``like`` (N, ...), in ``like``'s dtype and device."""
        out = arr.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model is told for respaced step ``t`` (original scale)."""
        return self.timestep_map.to(t.device)[t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = self.gather(self.posterior_mean_coef1, t, xt) * x0 + self.gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, self.gather(self.posterior_log_variance_clipped, t, xt)

    def p_mean_variance(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, log-variance and x0 prediction from a learned-sigma output (2C channels: eps, variance values)."""
        c = xt.shape[1]
        eps, v = model_out[:, :c], model_out[:, c:]
        min_log = self.gather(self.posterior_log_variance_clipped, t, xt)
        max_log = self.gather(torch.log(self.betas), t, xt)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self.gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self.gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0

    def p_sample_step(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0."""
        mean, log_var, _ = self.p_mean_variance(model_out, xt, t)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    # -- training (used to train the digits preset) --------------------------------------------------------------

    def training_losses(self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """DiT's hybrid objective per sample: MSE on eps + the variational bound term for the learned variance
        (with the mean's gradient stopped), in bits per dim like the reference."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t), y)
        c = x0.shape[1]
        eps = out[:, :c]
        mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x0.dim())))
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=tuple(range(1, x0.dim()))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=tuple(range(1, x0.dim())))
        vb = torch.where(t == 0, nll / math.log(2.0), kl)
        return mse + vb


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def guided_model_output(model: ModelFn, x: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor, null_class: int,
                        scale: float, guided_channels: int = 3) -> torch.Tensor:
    """Classifier-free guidance the DiT way: one model call on [x; x] with labels [y; null]. The first
    ``guided_channels`` eps channels get uncond + scale·(cond − uncond); all other channels (the rest of eps and the
    variance values) are the conditional half's. ``guided_channels=3`` reproduces the released code, ``=C`` guides
    all eps channels. ``scale == 1`` skips the unconditional half."""
    if scale == 1.0:
        return model(x, t_model, y)
    n = x.shape[0]
    out = model(torch.cat([x, x]), torch.cat([t_model, t_model]), torch.cat([y, torch.full_like(y, null_class)]))
    return apply_guidance(out[:n], out[n:], scale, guided_channels)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, guided_channels: int) -> torch.Tensor:
    g = guided_channels
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


def guided_steps(diffusion, interval: tuple[float, float] | None) -> torch.Tensor:
    """Which respaced steps apply classifier-free guidance (bool, one per step): all of them without ``interval``,
    else those whose noise level σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) lies in (lo, hi] — guidance limited to an interval of
    noise levels (Kynkäänniemi et al., NeurIPS 2024); the other steps run the conditional model alone.
    ``diffusion``: a :class:`Diffusion` or a :class:`~cao2_fast.schedulers.SchedulerSampler` (both hold
    ``num_steps`` and σ per step as ``sqrt_recipm1_alphas_cumprod``)."""
    if interval is None:
        return torch.ones(diffusion.num_steps, dtype=torch.bool)
    lo, hi = interval
    sigma = diffusion.sqrt_recipm1_alphas_cumprod
    return (sigma > lo) & (sigma <= hi)


@torch.no_grad()
def sample(model: ModelFn, diffusion: Diffusion, noise: torch.Tensor, y: torch.Tensor, null_class: int,
           guidance_scale: float, guided_channels: int = 3, generator: torch.Generator | None = None,
           step_noise: torch.Tensor | None = None, progress: Callable[[], None] | None = None, *,
           start: int | None = None, stop: int = 0, return_x0: bool = False,
           guidance_interval: tuple[float, float] | None = None):
    """Ancestral sampling from ``noise`` (B, C, H, W) at class labels ``y`` over every step of ``diffusion``.

    Per-step noise comes from ``step_noise`` (steps, B, C, H, W; index = respaced step) when given, else from the
    CPU ``generator``.

    A run can be split: ``start``/``stop`` run only the respaced steps start−1 down to ``stop`` (default: all of
    them), from ``noise`` taken as the current x; a second call with ``start`` = the first's ``stop`` continues it
    with the same arithmetic. ``return_x0`` also returns the x̂0 prediction of the last step run (no extra model
    call). ``guidance_interval`` guides only the steps :func:`guided_steps` names.
    """
    start = diffusion.num_steps if start is None else start
    guided = guided_steps(diffusion, guidance_interval) if guidance_interval is not None else None
    x, x0 = noise, None
    for i in reversed(range(stop, start)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        scale = guidance_scale if guided is None or guided[i] else 1.0
        out = guided_model_output(model, x, diffusion.model_timesteps(t), y, null_class, scale, guided_channels)
        if step_noise is not None:
            z = step_noise[i]
        else:  # drawn on the host so the stream depends on the generator alone, not on the device
            z = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        if return_x0 and i == stop:
            x0 = diffusion.p_mean_variance(out.to(x.dtype), x, t)[2]
        x = diffusion.p_sample_step(out.to(x.dtype), x, t, z)
        if progress is not None:
            progress()
    return (x, x0) if return_x0 else x
