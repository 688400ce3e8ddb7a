"""Where the Triton kernels can run, and the error raised where they cannot."""

from __future__ import annotations

import importlib.util

import torch

INSTALL = 'pip install "cao2-fast[triton]"'


class _TritonMissing:
    """Stands in for ``triton`` and ``triton.language`` where Triton is not installed (it has no wheels for macOS or
    Windows): ``@triton.jit`` leaves the function undecorated, so a kernel module still imports and its PyTorch
    reference and eager forms work; a launcher never reaches the kernel, because :func:`check_triton_device`
    refuses first. Any other attribute names the missing package."""

    @staticmethod
    def jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str):
        raise ImportError(f"triton.{name}: Triton is not installed ({INSTALL})")


def import_triton():
    """(triton, triton.language), or stand-ins for both where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        missing = _TritonMissing()
        return missing, missing
    import triton
    import triton.language as tl

    return triton, tl


def _kernels_interpreted() -> bool:
    """True when this package's kernels were decorated in interpreter mode.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` once, when the kernel module is imported, so the kernel objects
    themselves (not the current environment) say which mode is in force.
    """
    from triton.runtime.interpreter import InterpretedFunction

    from .noising import _noise_latents_kernel

    return isinstance(_noise_latents_kernel, InterpretedFunction)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels in ``cao2_fast.kernels`` can run on tensors that live on ``device``.

    Compiled kernels need a CUDA device (ROCm builds of torch also report ``cuda``). Under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before ``cao2_fast.kernels`` imports its kernels) they run on CPU tensors too, slowly.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    device = torch.device(device)
    if _kernels_interpreted():
        return device.type in ("cpu", "cuda")
    return device.type == "cuda" and torch.cuda.is_available()


def check_triton_device(name: str, *tensors: torch.Tensor) -> torch.device:
    """Raise unless all ``tensors`` share one device on which Triton can run; return that device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{name}: Triton is not installed ({INSTALL}); use {name}_reference from the same module "
                           "for the plain PyTorch implementation")
    if not triton_available(device):
        raise RuntimeError(
            f"{name}: the Triton kernel cannot run on {device} tensors here. It needs a CUDA device, or "
            "TRITON_INTERPRET=1 set in the environment before cao2_fast.kernels is imported (CPU, slow). "
            f"Use {name}_reference from the same module for the plain PyTorch implementation."
        )
    return device


def check_contiguous(name: str, **tensors: torch.Tensor) -> None:
    """Raise for non-contiguous tensors that a kernel writes in place (a silent copy would drop the update)."""
    for arg, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: `{arg}` must be contiguous (it is updated in place)")
