"""scikit-learn's bundled handwritten digits (1 797 images, 8×8, 10 classes) as RGB tensors in [−1, 1].

The split is fixed (stratified, seed 0, a quarter held out): the preset's models are trained on ``train`` only, and
the evaluation protocols test on ``val``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
CLASS_NAMES = [str(i) for i in range(10)]
SPLIT_SEED = 0
VAL_FRACTION = 0.25


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from ..extras import require

    require("sklearn", what="the digits data (scikit-learn's bundled handwritten digits)")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1], ink = high
    x = F.interpolate(x[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (1.0 - x).clamp(0, 1)  # dark ink on white paper, like a photo of a page
    x = x.repeat(1, 3, 1, 1) * 2 - 1
    return x.contiguous(), torch.tensor(d.target, dtype=torch.long)


def split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: per class, a fixed random quarter goes to val."""
    _, y = _load()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, val = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * VAL_FRACTION))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 16, 16) in [−1, 1] and labels (N,) of ``split`` ∈ {"train", "val", "all"}."""
    x, y = _load()
    if split == "all":
        return x, y
    train, val = split_indices()
    idx = {"train": train, "val": val}[split]
    return x[idx], y[idx]
