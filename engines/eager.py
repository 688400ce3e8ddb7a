"""``eager``: the model as it is, in plain PyTorch (the reference every other backend is compared with)."""

from __future__ import annotations

import torch

from .base import Engine, EngineSettings, module_as
from .registry import PRECISIONS, Backend
from .specs import ModelSpec


def build(backend: Backend, spec: ModelSpec, device: torch.device, precision: str, cache, settings: EngineSettings,
          batch) -> Engine:
    module = module_as(spec.module, device, PRECISIONS[precision])
    return Engine(backend, spec.name, module, device, precision)
