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
             progress: Callable[[], None] | None = None, *, x: torch.Tensor | None = None, start: int | None = None,
             stop: int = 0, return_x0: bool = False, guidance_interval: tuple[float, float] | None = None):
    """Sample latents for ``labels`` in chunks of ``batch`` candidates (the model sees 2·batch with guidance).

    ``x``/``start``/``stop``/``return_x0``/``guidance_interval`` as in :func:`cao2_fast.diffusion.sample`: resume
    from the latents ``x`` (default: the initial noise) over respaced steps start−1..stop, and also return the last
    step's x̂0 (both float32 on the CPU)."""
    out, x0s = [], []
    for first in range(0, len(labels), batch):
        part = noise.slice(first, first + batch)
        x_in = part.initial if x is None else x[first:first + batch]
        res = sample(dit, diffusion, x_in.to(device, dtype), labels[first:first + batch].to(device), null_class,
                     guidance_scale, guided_channels, step_noise=part.steps.to(device, dtype), progress=progress,
                     start=start, stop=stop, return_x0=return_x0, guidance_interval=guidance_interval)
        if return_x0:
            res, x0 = res
            x0s.append(x0.float().cpu())
        out.append(res.float().cpu())
    return (torch.cat(out), torch.cat(x0s)) if return_x0 else torch.cat(out)


# -- early candidate rejection ---------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Ranker = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def early_rank(probs: torch.Tensor, target: int, rule: str = "confident", order: str = "desc",
               generator: torch.Generator | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Every candidate of one class (indices into ``probs``), the likeliest final pick first, from scores taken
    part-way through sampling: the early rejection keeps a prefix of this order.

    confident: the candidates whose early argmax is ``target`` first, in :func:`select`'s order (``desc`` most
        confident first, ``asc`` least confident first); then the others by their probability of ``target``, highest
        first — a candidate that is wrong early earns a pick mainly by turning correct, and the one nearest to it is
        the likeliest to.
    el2n: :func:`select`'s EL2N order. random: ``generator``'s permutation, the one :func:`select` draws (so the
        final random picks are its first IPC and any prefix of at least IPC keeps them).
    Candidates marked False in ``valid`` (non-finite early scores) come last, by index. Ties go by index.
    """
    n = probs.shape[0]
    idx = torch.arange(n)
    ok = torch.ones(n, dtype=torch.bool) if valid is None else valid.bool()
    if rule == "random":
        perm = torch.randperm(n, generator=generator)
        ranked = perm[ok[perm]]
    elif rule == "el2n":
        onehot = torch.zeros_like(probs)
        onehot[:, target] = 1
        ranked = _ordered(idx[ok], (probs[ok] - onehot[ok]).norm(dim=1), descending=order == "desc")
    elif rule == "confident":
        conf, pred = probs.max(dim=1)
        correct = (pred == target) & ok
        wrong = ~(pred == target) & ok
        ranked = torch.cat([_ordered(idx[correct], conf[correct], descending=order == "desc"),
                            _ordered(idx[wrong], probs[wrong, target], descending=True)])
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return torch.cat([ranked, idx[~ok]])


def generate_early(dit: Fn, diffusion: Diffusion, noise: Stage1Noise, labels: torch.Tensor, per_class: int,
                   null_class: int, guidance_scale: float, guided_channels: int, device, dtype, batch: int,
                   checks: list[tuple[int, int]], score: Scorer, rank: Ranker,
                   progress: Callable[[], None] | None = None,
                   guidance_interval: tuple[float, float] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`generate` with early rejection. ``labels`` hold whole classes of ``per_class`` candidates each, class
    by class. At each check ``(step, keep)`` — after ``step`` of the sampling steps, steps increasing, keeps
    shrinking — the x̂0 of every live candidate is scored (``score(x0) -> (probs, finite)``), class ``j``'s live
    candidates are ordered by ``rank(j, candidate_index_in_class, probs, finite)`` (positions, best first), and
    the first ``keep`` of each class sample on; the others are dropped. Survivors keep their own noise rows, so a
    survivor's arithmetic is the full run's (only batch composition differs, which may change float rounding).

    Returns (latents of the survivors, their indices into ``labels`` in increasing order, a mask over ``labels`` of
    the candidates whose early scores were not finite)."""
    steps = diffusion.num_steps
    alive = torch.arange(len(labels))
    x, done, nonfinite = None, 0, torch.zeros(len(labels), dtype=torch.bool)
    for step, keep in [*checks, (steps, None)]:
        res = generate(dit, diffusion, Stage1Noise(noise.initial[alive], noise.steps[:, alive]), labels[alive],
                       null_class, guidance_scale, guided_channels, device, dtype, batch, progress, x=x,
                       start=steps - done, stop=steps - step, return_x0=keep is not None,
                       guidance_interval=guidance_interval)
        done = step
        if keep is None:
            return res, alive, nonfinite
        x, x0 = res
        probs, finite = score(x0)
        nonfinite[alive[~finite]] = True
        survivors = []
        for j in range(len(labels) // per_class):
            pos = torch.nonzero(alive // per_class == j).flatten()
            order = rank(j, alive[pos] - j * per_class, probs[pos], finite[pos])
            survivors.append(pos[order[:keep]].sort().values)
        pos = torch.cat(survivors)
        alive, x = alive[pos], x[pos]
    raise AssertionError("unreachable")


def early_checks(step, keep) -> list[tuple[int, int]]:
    """A config's early-rejection checks as ``(step, keep)`` pairs: none when off, one for ints, and for tuples of
    equal length (progressive rejection) one per entry."""
    if step is None:
        return []
    if isinstance(step, int):
        return [(step, keep)]
    return list(zip(step, keep))


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
