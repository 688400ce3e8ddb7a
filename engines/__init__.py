"""How a model gets executed: eager PyTorch, ``torch.compile``, ONNX Runtime or TensorRT, behind one call.

* :mod:`.registry` — one frozen :class:`Backend` per engine and the checks that pick one by name.
* :mod:`.specs` — a model as engines see it (:class:`ModelSpec`), the decoder's and the classifier's specs; a
  generator supplies its own models' (``Generator.engine_specs``).
* :mod:`.cache` — the on-disk cache of exported and built artefacts; ``build=False`` uses it without building.
* :mod:`.load` — an exported engine loaded by path, without the PyTorch model (``docs/engines.md``).
* :mod:`.eager`, :mod:`.compiled`, :mod:`.onnx_ort`, :mod:`.trt` — one module per backend, each with ``build``.

Stage 2 differentiates through the generator's model, so it runs on a backend with ``supports_gradients`` (eager
or compile) whatever engine stage 1 uses: :func:`stage2_engine`. Nothing here knows a model family: engines take
modules and specs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .base import Engine, EngineSettings
from .cache import EngineCache, default_root
from .registry import BACKENDS, Backend, get_backend, require
from .load import Contract, load
from .specs import ModelSpec, stage1_specs

__all__ = ["BACKENDS", "Backend", "Contract", "Engine", "EngineCache", "EngineSettings", "ModelSpec", "build_engine",
"load",
           "check_engines", "default_root", "default_stage2", "get_backend", "require", "stage1_engines",
           "stage1_specs", "stage2_engine"]


CACHED = ("onnx", "trt")  # the backends whose artefacts live in the engine cache


def build_engine(name: str, spec: ModelSpec, device: str | torch.device = "cpu", precision: str = "float32",
                 cache: EngineCache | None = None, settings: EngineSettings | None = None, batch=None,
                 role: str = "--engine", build: bool = True) -> Engine:
    """``spec``'s model on backend ``name``. ``batch`` is the batch range it will serve, ``(min, opt, max)`` or
    one number N for ``(1, N, N)``; only TensorRT builds for it (the others accept any batch).

    ``build=False`` never exports or builds: an ``onnx``/``trt`` engine missing from the cache (or whose entry would
    have to be rebuilt) is a one-line ``UserError`` naming the model, the cache folder and the ``cao2-fast export``
    command that fills it. ``eager`` and ``compile`` have nothing to build ahead of time and ignore it."""
    device = torch.device(device)
    backend = require(name, device, precision, role)
    module = importlib.import_module(f".{backend.module}", __name__)
    extra = {"build": build} if backend.name in CACHED else {}
    engine = module.build(backend, spec, device, precision, cache or EngineCache(), settings or EngineSettings(), batch,
                          **extra)
    engine.prepare = spec.prepare
    return engine


def stage1_engines(name: str, specs: dict[str, ModelSpec], batches: dict[str, int], device,
                   precision: str = "float32", cache_dir: str | Path | None = None,
                   settings: EngineSettings | None = None, build: bool = True) -> dict[str, Engine]:
    """The stage-1 models ``specs`` (see :func:`stage1_specs`) on backend ``name``, by the same names. ``batches``
    gives each model's largest call (TensorRT builds for it). ``build=False``: use only what the engine cache holds
    (see :func:`build_engine`)."""
    cache = EngineCache(cache_dir)
    return {k: build_engine(name, s, device, precision, cache, settings, batches[k], build=build)
            for k, s in specs.items()}


def default_stage2(device: str | torch.device) -> str:
    """``compile`` on CUDA, ``eager`` on CPU (where Inductor's compile time outweighs what it saves)."""
    return "compile" if torch.device(device).type == "cuda" else "eager"


def stage2_engine(name: str | None, module, device, precision: str = "float32",
                  settings: EngineSettings | None = None, model: str = "dit_stage2") -> Engine:
    """The stage-2 call of a generator's ``module`` (the DiT's ``(x, t, y, drop) -> out``) with autograd, on
    ``eager`` or ``compile``."""
    device = torch.device(device)
    name = name or default_stage2(device)
    backend = require(name, device, precision, "--stage2-engine", gradients=True)
    settings = settings or EngineSettings()
    if backend.name == "compile":
        from .compiled import compiled_callable, resolve_mode

        mode = resolve_mode(settings.stage2_compile_mode, device)
        fn = compiled_callable(module, mode, settings.compile_dynamic, device)
        return Engine(backend, model, fn, device, precision, details={"compile_mode": mode})
    return Engine(backend, model, module, device, precision)


def check_engines(stage1: str, stage2: str | None, device, precision: str) -> None:
    """Reject an unusable engine choice before any model is loaded (one line each, see :func:`require`)."""
    require(stage1, device, precision, "--engine")
    require(stage2 or default_stage2(device), device, precision, "--stage2-engine", gradients=True)
