"""Process-wide numeric switches, applied only for the duration of a call and always restored.

A library must not leave torch's global flags changed, yet the released recipe runs with TF32 on: :func:`tf32`
sets both TF32 flags for a block on CUDA and puts back whatever the caller had, also when the block raises.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _on_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


@contextmanager
def tf32(enabled: bool, device):
    """TF32 for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) and convolutions
    (``torch.backends.cudnn.allow_tf32``) set to ``enabled`` on a CUDA ``device`` inside the block; on other devices
    nothing changes (the flags only act on CUDA)."""
    if not _on_cuda(device):
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
