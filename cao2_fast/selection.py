"""Stage-1 selection, whatever the generator: score candidates with the classifier, rank them, keep IPC.

:func:`select` keeps a class's IPC candidates by the configured rule (the released rule: the correctly classified
ones first, ordered by confidence, filled with wrong ones in the same order); :func:`early_rank` orders a class's
candidates at an early-rejection check; :func:`decode_and_score` decodes latents and classifies the images.
"""

from __future__ import annotations

from typing import Callable

import torch

Fn = Callable[..., torch.Tensor]


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


def early_checks(step, keep) -> list[tuple[int, int]]:
    """A config's early-rejection checks as ``(step, keep)`` pairs: none when off, one for ints, and for tuples of
    equal length (progressive rejection) one per entry."""
    if step is None:
        return []
    if isinstance(step, int):
        return [(step, keep)]
    return list(zip(step, keep))


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
