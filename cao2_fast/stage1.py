"""Stage 1 — objective-guided sampling: oversample candidates with the DiT, score them, keep the useful ones.

The three models enter as plain callables so that any engine (eager, compiled, ONNX Runtime, TensorRT) can serve:
``dit(x, t, y) -> (N, 2C, H, W)``, ``decode(latents) -> images in [−1, 1]``, ``classify(images) -> logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .diffusion import Diffusion, sample

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


def generate(dit: Fn, diffusion: Diffusion, noise: Stage1Noise, labels: torch.Tensor, null_class: int,
             guidance_scale: float, guided_channels: int, device, dtype, batch: int,
             progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Sample latents for ``labels`` in chunks of ``batch`` candidates (the model sees 2·batch with guidance)."""
    out = []
    for start in range(0, len(labels), batch):
        part = noise.slice(start, start + batch)
        x = sample(dit, diffusion, part.initial.to(device, dtype), labels[start:start + batch].to(device), null_class,
                   guidance_scale, guided_channels, step_noise=part.steps.to(device, dtype), progress=progress)
        out.append(x.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_and_score(decode: Fn, classify: Fn, latents: torch.Tensor, device, dtype, batch: int):
    """Decode latents and classify them. Returns (images in [−1, 1] float32 on CPU, softmax probs float32 on CPU)."""
    images, probs = [], []
    for start in range(0, len(latents), batch):
        z = latents[start:start + batch].to(device, dtype)
        img = decode(z)
        probs.append(torch.softmax(classify(img).float(), dim=-1).cpu())
        images.append(img.float().cpu())
    return torch.cat(images), torch.cat(probs)


def select(probs: torch.Tensor, target: int, ipc: int, rule: str = "confident", order: str = "desc",
           generator: torch.Generator | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``ipc`` kept candidates of one class, in keeping order.

    confident: candidates whose argmax is ``target``, by max softmax probability (``desc`` most confident first,
        ``asc`` least confident among the correct); if fewer than ``ipc`` are correct, the rest are wrong ones
        taken in the *same* order (``desc``: most confident wrong first; ``asc``: least confident wrong first).
    el2n: all candidates by EL2N = ‖softmax − onehot(target)‖₂; ``desc`` keeps the hardest, ``asc`` the easiest.
    random: a uniform random subset drawn from ``generator``.
    Ties are broken by candidate index, so the choice is deterministic. ``valid`` (bool, per candidate) excludes the
    candidates marked False from every rule (non-finite ones); the returned indices still index all of ``probs``.
    """
    if valid is not None and not bool(valid.all()):
        kept = torch.nonzero(valid).flatten()
        return kept[select(probs[kept], target, ipc, rule, order, generator)]
    n = probs.shape[0]
    if ipc > n:
        raise ValueError(f"cannot keep {ipc} of {n} candidates")
    idx = torch.arange(n)
    if rule == "random":
        return torch.randperm(n, generator=generator)[:ipc]
    if rule == "el2n":
        onehot = torch.zeros_like(probs)
        onehot[:, target] = 1
        score = (probs - onehot).norm(dim=1)
        return _ordered(idx, score, descending=order == "desc")[:ipc]
    if rule != "confident":
        raise ValueError(f"unknown selection rule {rule!r}")
    conf, pred = probs.max(dim=1)
    correct = pred == target
    chosen = _ordered(idx[correct], conf[correct], descending=order == "desc")
    if len(chosen) < ipc:
        # the released scripts fill with wrong ones in the order they rank the correct ones (ImageNet-100: asc)
        fill = _ordered(idx[~correct], conf[~correct], descending=order == "desc")
        chosen = torch.cat([chosen, fill[: ipc - len(chosen)]])
    return chosen[:ipc]


def _ordered(idx: torch.Tensor, score: torch.Tensor, descending: bool) -> torch.Tensor:
    # a stable sort on the score keeps index order among equal scores
    order = torch.sort(score.double(), descending=descending, stable=True).indices
    return idx[order]
