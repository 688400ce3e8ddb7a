"""Fused Triton kernels for the elementwise work around the DiT call in one stage-2 step.

Each module holds one fused operation: the ``@triton.jit`` kernel, its launcher and the plain PyTorch reference it
must equal (``<launcher>_reference``). Launchers raise where Triton cannot run (see :func:`triton_available`); the
caller picks the implementation, nothing falls back silently.

Modules are imported on first use, so ``import cao2_fast.kernels`` and :func:`triton_available` work where Triton is
not installed. To run the kernels on CPU through Triton's interpreter, set ``TRITON_INTERPRET=1`` before the first
use: ``@triton.jit`` reads it when a kernel module is imported.
"""

from __future__ import annotations

import importlib

from ._runtime import triton_available

_EXPORTS = {
    "noise_latents": "noising",
    "noise_latents_reference": "noising",
    "latent_loss_grad": "latent_loss",
    "latent_loss_grad_reference": "latent_loss",
    "latent_loss_grad_eager": "latent_loss",
    "latent_adam_step_": "latent_adam",
    "latent_adam_step_reference": "latent_adam",
    "adam_schedule": "latent_adam",
}

__all__ = ["triton_available", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
