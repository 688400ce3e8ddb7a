"""``compile``: ``torch.compile`` with Inductor, applied here and nowhere else.

On CUDA the default mode is ``reduce-overhead``: Inductor kernels replayed through CUDA graphs, one graph per input
shape (stage 1 calls the DiT with a fixed batch, so one or two shapes per run). Outputs of a CUDA-graph replay live
in memory the next replay overwrites, so they are cloned before they leave the engine. Compilation happens on the
first call at each shape; :class:`~cao2_fast.engines.base.Engine` times those calls apart from the rest.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import COMPILE_MODES, Engine, EngineSettings, module_as
from .registry import PRECISIONS, Backend
from .specs import ModelSpec


def resolve_mode(mode: str | None, device: torch.device) -> str:
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if mode not in COMPILE_MODES:
        raise UserError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def compiled_callable(module: torch.nn.Module, mode: str, dynamic: bool | None, device: torch.device):
    compiled = torch.compile(module, mode=mode, dynamic=dynamic)
    if not uses_cuda_graphs(mode, device):
        return compiled

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    return run


def build(backend: Backend, spec: ModelSpec, device: torch.device, precision: str, cache, settings: EngineSettings,
          batch) -> Engine:
    mode = resolve_mode(settings.compile_mode, device)
    module = module_as(spec.module, device, PRECISIONS[precision])
    fn = compiled_callable(module, mode, settings.compile_dynamic, device)
    return Engine(backend, spec.name, fn, device, precision,
                  details={"compile_mode": mode, "cuda_graphs": uses_cuda_graphs(mode, device)})
