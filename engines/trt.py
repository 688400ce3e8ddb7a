"""``trt``: TensorRT engines built from the cached ONNX export, run with torch tensors as I/O.

The ONNX file is the one the ``onnx`` backend exports and checks against ONNX Runtime (:func:`onnx_input`); the
engine adds an optimisation profile over the batch axis (min/opt/max), the precision flags (float16 / bfloat16 on top
of float32) and a timing cache shared by all builds for one TensorRT version and GPU. Plans are cached like every
other artefact, keyed additionally by the TensorRT version, the GPU name and its compute capability.

Execution binds each tensor's address with ``set_tensor_address`` and enqueues ``execute_async_v3`` on the current
torch CUDA stream, so no copy and no synchronisation is added around a call.

``tensorrt`` is optional (``pip install "cao2-fast[trt]"``) and imported only inside this module's functions.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

from ..errors import UserError
from .base import Engine, EngineSettings
from ..fileio import atomic_write
from .cache import CacheEntry, EngineCache, never_build
from .onnx_ort import MODEL_FILE, onnx_entry, onnx_fields
from .specs import FLOAT, ModelSpec

log = logging.getLogger("cao2_fast.engines")

PLAN_FILE = "engine.plan"
INSTALL = 'pip install "cao2-fast[trt]"'


def available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _trt():
    if not available():
        raise UserError(f"--engine trt needs the tensorrt package ({INSTALL})")
    import tensorrt

    return tensorrt


def gpu_fingerprint(device: torch.device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def batch_profile(batch) -> dict:
    """(min, opt, max) of the batch axis; a single number N means (1, N, N)."""
    if batch is None:
        raise UserError("a TensorRT engine needs the batch range it will serve (min, opt, max)")
    lo, opt, hi = (1, batch, batch) if isinstance(batch, int) else tuple(batch)
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"TensorRT batch profile {lo}/{opt}/{hi}: need 1 <= min <= opt <= max")
    return {"min": lo, "opt": opt, "max": hi}


def trt_fields(spec: ModelSpec, settings: EngineSettings, precision: str, profile: dict, gpu: dict,
               trt_version: str) -> dict:
    """Everything that changes the plan: the ONNX file's own key fields, the profile, the precision, the builder
    settings, TensorRT's version and the GPU."""
    return {"artefact": "tensorrt", "onnx": onnx_fields(spec, settings), "profile": profile, "precision": precision,
            "workspace_gb": settings.trt_workspace_gb, "optimization_level": settings.trt_optimization_level,
            "tensorrt": trt_version, "gpu": gpu}


def onnx_input(spec: ModelSpec, cache: EngineCache, settings: EngineSettings) -> Path:
    """The ONNX file the TensorRT builder reads: the ``onnx`` backend's cached export of ``spec`` (exported now if
    the cache lacks it)."""
    path, _ = onnx_entry(spec, cache, settings)
    return path


def onnx_input_path(spec: ModelSpec, cache: EngineCache, settings: EngineSettings) -> Path:
    """Where :func:`onnx_input` keeps that file, without looking at it (a cached plan does not need it)."""
    fields = onnx_fields(spec, settings)
    return cache.entry_path("onnx", spec.name, cache.key(fields)) / MODEL_FILE


def timing_cache_path(cache: EngineCache, trt_version: str, gpu: dict) -> Path:
    cc = gpu["compute_capability"].replace(".", "")
    return cache.root / f"timing-trt{trt_version}-sm{cc}.cache"


def build_plan(spec: ModelSpec, onnx_path: Path, folder: Path, precision: str, profile: dict,
               settings: EngineSettings, timing_path: Path) -> dict:
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path} ({errors[:300]}); run this model with --engine onnx")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.trt_workspace_gb * (1 << 30)))
    config.builder_optimization_level = settings.trt_optimization_level
    if precision == "float32":
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 means float32, as in the eager reference
    elif precision == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bfloat16":
        config.set_flag(trt.BuilderFlag.BF16)
    opt_profile = builder.create_optimization_profile()
    for t in spec.inputs:
        shapes = [(profile[k], *t.shape) for k in ("min", "opt", "max")]
        opt_profile.set_shape(t.name, *shapes)
    config.add_optimization_profile(opt_profile)
    blob = timing_path.read_bytes() if timing_path.is_file() else b""
    timing = config.create_timing_cache(blob)
    config.set_timing_cache(timing, ignore_mismatch=True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine for {spec.name} from {onnx_path} (see the TensorRT "
                        "messages above); run this model with --engine onnx")
    (folder / PLAN_FILE).write_bytes(bytes(plan))
    atomic_write(timing_path, bytes(config.get_timing_cache().serialize()))
    return {"onnx_file": str(onnx_path), "timing_cache": str(timing_path)}


class TrtRunner:
    """A deserialised plan and one execution context; tensors bound by address, enqueued on the torch stream."""

    def __init__(self, plan_path: Path, spec: ModelSpec, device: torch.device):
        trt = _trt()
        self.spec, self.device = spec, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise ValueError(f"{plan_path}: TensorRT cannot deserialise this plan")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        if sorted(self.inputs) != sorted(t.name for t in spec.inputs) or outputs != [spec.output_name]:
            raise ValueError(f"{plan_path}: tensors {names} do not match the model's inputs and output")
        self.output = outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.batch_range = plan_batch_range(self.engine, self.inputs[0])

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        n = args[0].shape[0] if args and args[0].dim() else None
        if self.batch_range is not None and n is not None and not self.batch_range[0] <= n <= self.batch_range[1]:
            lo, hi = self.batch_range
            raise UserError(f"{self.spec.name} engine: a batch of {n} is outside the batch range {lo}..{hi} this "
                            "TensorRT engine was built for; split the call, or rebuild it with a larger --batch")
        stream = torch.cuda.current_stream(self.device)
        keep = []
        for name, t in zip((ts.name for ts in self.spec.inputs), args):
            t = t.to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise UserError(f"{self.spec.name} engine: input {name} of shape {tuple(t.shape)} is outside the "
                                "engine's optimisation profile (rebuild it with a larger batch range)")
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.dtypes[self.output],
                          device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT execution failed")
        return out  # inputs in ``keep`` are stream-ordered: their memory is reused only after this enqueue


def plan_batch_range(engine, name: str) -> tuple[int, int] | None:
    """(min, max) batch a deserialised engine accepts: its fixed batch, or optimisation profile 0's range for a
    dynamic one; None when it cannot be read."""
    try:
        shape = tuple(engine.get_tensor_shape(name))
        if not shape:
            return None
        if shape[0] >= 0:
            return int(shape[0]), int(shape[0])
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        return int(lo[0]), int(hi[0])
    except Exception:
        return None


def build(backend, spec: ModelSpec, device: torch.device, precision: str, cache: EngineCache,
          settings: EngineSettings, batch, build: bool = True) -> Engine:
    """The plan for ``spec`` from the cache, built (from the cached ONNX export, exported first if need be) on a
    miss. ``build=False``: a miss is a ``UserError`` and nothing is exported or built; a cached plan is used even
    when the ONNX file it was built from is gone."""
    trt = _trt()
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError("--engine trt needs a CUDA device (none is available)")
    profile = batch_profile(batch)
    fields = trt_fields(spec, settings, precision, profile, gpu_fingerprint(device), trt.__version__)
    onnx_path = onnx_input_path(spec, cache, settings)
    timing_path = timing_cache_path(cache, trt.__version__, fields["gpu"])
    timing = {}

    def make(folder: Path) -> dict:
        return build_plan(spec, onnx_input(spec, cache, settings), folder, precision, profile, settings, timing_path)

    def load(entry: CacheEntry) -> TrtRunner:
        t0 = time.perf_counter()
        runner = TrtRunner(entry.file(PLAN_FILE), spec, device)
        timing["load"] = time.perf_counter() - t0
        return runner

    options = f" --dtype {precision} --device cuda and the --batch (--stage1-batch) that gives a batch range " \
              f"{profile['min']}..{profile['max']}"
    runner, entry = cache.get_or_build("trt", spec.name, fields, make, load,
                                       refuse=None if build else never_build(cache, spec.name, "trt", options))
    first = next(i for i, t in enumerate(spec.inputs) if t.dtype == FLOAT)

    def run(*args):
        return runner(*args).to(args[first].dtype)

    return Engine(backend, spec.name, run, device, precision,
                  build_seconds=0.0 if entry.hit else entry.meta["build_seconds"], load_seconds=timing["load"],
                  cache_hit=entry.hit, artefact=entry.file(PLAN_FILE),
                  details={"onnx_file": str(onnx_path), "profile": profile, "tensorrt": trt.__version__})
