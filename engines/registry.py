"""The backends an engine can run on, each described by one frozen dataclass, and the checks that pick one.

Asked for by name, a backend either runs where and how it was asked to or raises a one-line ``UserError`` that says
what is missing; nothing falls back to another backend.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..errors import UserError

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Backend:
    """How a model can be executed.

    devices / precisions: where and in which compute dtype it runs. supports_gradients: whether autograd flows
    through it (stage 2 differentiates the DiT with respect to its input, so only such backends can serve it).
    requires: importable modules it needs; install: the pip line that provides them.
    """

    name: str
    summary: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    supports_gradients: bool
    requires: tuple[str, ...] = ()
    install: str = ""
    module: str = ""  # the engines module whose ``build`` makes an Engine


EAGER = Backend("eager", "plain PyTorch", ("cpu", "cuda"), ("float32", "bfloat16", "float16"), True, module="eager")
COMPILE = Backend("compile", "torch.compile with Inductor (CUDA graphs for fixed shapes on CUDA)", ("cpu", "cuda"),
                  ("float32", "bfloat16", "float16"), True, module="compiled")
ONNX = Backend("onnx", "an ONNX export run by ONNX Runtime", ("cpu", "cuda"), ("float32",), False,
               requires=("onnx", "onnxscript", "onnxruntime"),
               install='pip install "cao2-fast[onnx]" (and onnxruntime-gpu for CUDA)', module="onnx_ort")
TRT = Backend("trt", "a TensorRT engine built from the ONNX export", ("cuda",), ("float32", "float16", "bfloat16"),
              False, requires=("tensorrt", "onnx", "onnxscript", "onnxruntime"),  # built from the ONNX export
              install='pip install "cao2-fast[trt]"', module="trt")

BACKENDS: dict[str, Backend] = {b.name: b for b in (EAGER, COMPILE, ONNX, TRT)}


def get_backend(name: str, role: str = "--engine") -> Backend:
    """The backend called ``name``; an unknown name is a one-line error listing the valid ones."""
    if name not in BACKENDS:
        raise UserError(f"{role} {name!r}: unknown engine, choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def require(name: str, device: str | torch.device, precision: str = "float32", role: str = "--engine",
            gradients: bool = False) -> Backend:
    """The backend ``name`` if it can run on ``device`` in ``precision`` (and differentiate, with ``gradients``),
    else a one-line ``UserError`` naming everything that is missing and how to get it."""
    backend = get_backend(name, role)
    if gradients and not backend.supports_gradients:
        raise UserError(f"{role} {name}: {backend.summary} has no backward pass, and stage 2 needs gradients through "
                        f"the DiT to its input; use {role} "
                        f"{' or '.join(b.name for b in BACKENDS.values() if b.supports_gradients)}")
    device = torch.device(device)
    problems = []
    modules = [m for m in backend.requires if importlib.util.find_spec(m) is None]
    if modules:
        problems.append(f"the {' and '.join(modules)} package{'s' if len(modules) > 1 else ''} ({backend.install})")
    if device.type not in backend.devices:
        if "cuda" in backend.devices and torch.cuda.is_available():
            problems.append(f"--device cuda (it runs on {', '.join(backend.devices)} only, not {device.type})")
        elif "cuda" in backend.devices and len(backend.devices) == 1:
            problems.append("a CUDA device (none is available)")
        else:
            problems.append(f"one of the devices {', '.join(backend.devices)} (got {device.type})")
    if problems:
        raise UserError(f"{role} {name} needs {' and '.join(problems)}")
    if precision not in backend.precisions:
        others = [b.name for b in BACKENDS.values() if precision in b.precisions]
        raise UserError(f"{role} {name} runs {', '.join(backend.precisions)}, not {precision}: use --dtype "
                        f"{backend.precisions[0]}, or an engine that runs {precision} ({', '.join(others)})")
    return backend
