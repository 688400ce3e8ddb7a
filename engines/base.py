"""What every backend returns: an :class:`Engine`, a callable on torch tensors that keeps its own timings.

Build time (ONNX export, TensorRT build) and the first call at each input shape (where ``torch.compile`` compiles)
are measured apart from steady-state calls, so a benchmark can report them separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .registry import Backend


@dataclass(frozen=True)
class EngineSettings:
    """Build settings. Every field that changes a built artefact enters its cache key.

    compile_mode: ``torch.compile`` mode for stage 1; None picks ``reduce-overhead`` (CUDA graphs) on CUDA and
        ``default`` on CPU. ``max-autotune`` spends minutes searching kernels for a few percent more.
    compile_dynamic: ``torch.compile``'s ``dynamic``: None recompiles once for a second batch size and then
        generalises, False specialises on every batch size (what CUDA graphs want), True starts dynamic.
    stage2_compile_mode: mode of the stage-2 DiT (forward and backward). ``default`` keeps CUDA graphs out of
        autograd; stage 2 captures its own step in a CUDA graph and replays it.
    opset: ONNX opset; None takes the exporter's default (recorded in the cache metadata).
    trt_workspace_gb: TensorRT builder scratch memory; more lets it consider more tactics.
    trt_optimization_level: TensorRT builder optimisation level 0-5 (3 is TensorRT's default; 5 builds slowest).
    """

    compile_mode: str | None = None
    compile_dynamic: bool | None = None
    stage2_compile_mode: str = "default"
    opset: int | None = None
    trt_workspace_gb: float = 8.0
    trt_optimization_level: int = 3


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Engine:
    """``engine(*inputs) -> output``: one model on one backend, device and precision.

    build_seconds: time spent exporting/building the artefact in this process (0 when it came from the cache).
    load_seconds: time to load it (deserialise, create the session).
    first_calls: seconds of the first call at each distinct input shape (compilation for ``compile``, allocator and
        autotuning warm-up for the others); later calls at that shape are steady state.
    cache_hit: whether the artefact came from the cache (None for backends without an on-disk artefact).
    artefact: the cached file this engine runs (the ONNX model or the TensorRT plan).
    """

    backend: Backend
    model: str
    fn: Callable[..., torch.Tensor]
    device: torch.device
    precision: str
    build_seconds: float = 0.0
    load_seconds: float = 0.0
    cache_hit: bool | None = None
    artefact: Path | None = None
    details: dict = field(default_factory=dict)
    first_calls: dict = field(default_factory=dict)
    calls: int = 0
    prepare: Callable[..., torch.Tensor] | None = None  # the spec's torch pre-processing (e.g. the classifier resize)
    contract: object | None = None  # what it takes and returns, for an engine loaded by path (see .load)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """``fn(*args, **kwargs)``; an engine loaded by path also takes its inputs by name (see :mod:`.load`)."""
        self.calls += 1
        if self.prepare is not None:
            args, kwargs = (self.prepare(*args, **kwargs),), {}
        shape = tuple(_shape_key(a) for a in args) + tuple((k, _shape_key(v)) for k, v in kwargs.items())
        if shape in self.first_calls:
            return self.fn(*args, **kwargs)
        synchronize(self.device)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.first_calls[shape] = time.perf_counter() - t0
        return out

    @property
    def first_call_seconds(self) -> float | None:
        """Seconds of the very first call (for ``compile``: the first compilation)."""
        return next(iter(self.first_calls.values()), None)

    def describe(self) -> dict:
        return {"model": self.model, "engine": self.backend.name, "device": str(self.device),
                "precision": self.precision, "cache_hit": self.cache_hit,
                "artefact": str(self.artefact) if self.artefact else None,
                "build_seconds": round(self.build_seconds, 3), "load_seconds": round(self.load_seconds, 3),
                "first_call_seconds": None if self.first_call_seconds is None else round(self.first_call_seconds, 3),
                **self.details}


def _shape_key(a):
    """What tells two calls' inputs apart for first-call timing: a tensor's shape, a number's type (one timestep
    broadcast over the batch is the same call at every step), a tuple's items each so, else the value (or its
    type)."""
    if isinstance(a, torch.Tensor):
        return tuple(a.shape)
    if isinstance(a, tuple):
        return tuple(_shape_key(x) for x in a)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return type(a).__name__
    try:
        hash(a)
        return a
    except TypeError:
        return type(a).__name__


def synchronize(device: torch.device) -> None:
    """Wait for ``device``; a no-op on CPU and while a CUDA graph is being captured (syncing would break it)."""
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize(device)


def module_as(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when it already lives on ``device`` in ``dtype``, else a converted copy (the caller's
    module is never changed)."""
    p = next(iter(module.parameters()), None)
    if p is None or (p.device == device or (p.device.type == device.type and device.index is None)) and p.dtype == dtype:
        return module
    import copy

    return copy.deepcopy(module).to(device=device, dtype=dtype)
