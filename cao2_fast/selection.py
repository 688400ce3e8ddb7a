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
           generator: torch.Generator | None = None, valid: torch.Tensor | None = None,
           scores: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``ipc`` kept candidates of one class, in keeping order.

    confident: candidates whose argmax is ``target``, by max softmax probability (``desc`` most confident first,
        ``asc`` least confident among the correct); if fewer than ``ipc`` are correct, the rest are wrong ones
        taken in the *same* order (``desc``: most confident wrong first; ``asc``: least confident wrong first).
    el2n: all candidates by EL2N = ‖softmax − onehot(target)‖₂; ``desc`` keeps the hardest, ``asc`` the easiest.
    random: a uniform random subset drawn from ``generator``.
    stability: by the generator's per-candidate ``scores`` (MAR: how little the classifier's softmax moves between
        the last two sampling iterations), keeping the IPC highest in ascending order (the least stable kept one
        first), with no look at the class: the released MAR rule.
    stable-correct: the candidates whose argmax is ``target`` first, then the others, each part most stable first.
    Ties are broken by candidate index, so the choice is deterministic. ``valid`` (bool, per candidate) excludes the
    candidates marked False from every rule (non-finite ones); the returned indices still index all of ``probs``.
    """
    if valid is not None and not bool(valid.all()):
        kept = torch.nonzero(valid).flatten()
        return kept[select(probs[kept], target, ipc, rule, order, generator,
                           scores=None if scores is None else scores[kept])]
    n = probs.shape[0]
    if ipc > n:
        raise ValueError(f"cannot keep {ipc} of {n} candidates")
    idx = torch.arange(n)
    if rule in ("stability", "stable-correct"):
        if scores is None:
            raise ValueError(f"the {rule} rule needs the generator's candidate scores")
        if rule == "stability":
            return _ordered(idx, scores, descending=False)[n - ipc:]
        correct = probs.argmax(dim=1) == target
        return torch.cat([_ordered(idx[correct], scores[correct], descending=True),
                          _ordered(idx[~correct], scores[~correct], descending=True)])[:ipc]
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


def jpeg_view(images: torch.Tensor, size: int, quality: int = 75) -> torch.Tensor:
    """What a classifier sees of decoded images that went through files as the released MAR scoring does: each
    image in [−1, 1] to 8 bits (the PNG arithmetic), saved as a JPEG of ``quality`` (PIL's default, 75), read
    back, resized to ``size``×``size`` by PIL (bilinear) and mapped to [0, 1]. Returns float32 (N, 3, size, size)
    on the CPU; normalising is the caller's."""
    import io

    import numpy as np
    from PIL import Image

    from .output.folder import to_uint8

    views = []
    for arr in to_uint8(images.detach().float().cpu()):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            views.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
    return torch.stack(views).permute(0, 3, 1, 2).float().div(255)
