"""``onnx``: export a model to ONNX once (cached), run it with ONNX Runtime, torch tensors in and out.

Export: ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis, from the model as its spec exports it
(:meth:`~cao2_fast.engines.specs.ModelSpec.exported_module`: float32 on the CPU, in the forms the spec names, e.g. a
DiT's released forms whatever the exporting machine runs eagerly); the
TorchScript exporter is tried only when the dynamo exporter fails, and the metadata records which one wrote the file.
Before the file enters the cache, ONNX Runtime loads it and its output on the trace inputs is compared with PyTorch's,
so an export that runs but computes something else never gets cached.

The file carries its own identity in the ONNX model's ``metadata_props``: ``cao2_fast.identity`` (model role, weights
digest, signature with the architecture config, inputs, output) and ``cao2_fast.files`` (size and sha256 of each
external-data file it references), so a copy loaded on its own (:func:`cao2_fast.engines.load`) keeps the guards
and the contract of its cache entry and is refused when its weights file changed.

The exported file does not depend on the device that runs it: its cache key holds the weights, the input profile,
the opset and the library versions, not the GPU. The TensorRT backend builds its engines from this same file.

Execution: an ``InferenceSession`` (CPUExecutionProvider with torch's thread count, or CUDAExecutionProvider for
``cuda``) with IO binding: inputs are bound by their data pointers and the output is written into a torch tensor
allocated here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import Engine, EngineSettings
from .cache import CacheEntry, EngineCache, file_sha256, never_build, no_space, normalise, remove
from .specs import FLOAT, ModelSpec

log = logging.getLogger("cao2_fast.engines")

MODEL_FILE = "model.onnx"
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so the trace batch is 2; the axis stays dynamic
MAX_BATCH = 1 << 16
CHECK_TOLERANCE = 1e-2  # of max(1, |output|): catches a wrong graph, not float rounding
IDENTITY_KEY, FILES_KEY = "cao2_fast.identity", "cao2_fast.files"  # the ONNX file's metadata_props


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


def onnx_fields(spec: ModelSpec, settings: EngineSettings) -> dict:
    """Everything that changes the exported file (its cache key)."""
    return {"artefact": "onnx", **spec.identity(), "precision": "float32", "opset": settings.opset,
            "exporters": ["dynamo", "torchscript"], "example_batch": EXAMPLE_BATCH, "versions": library_versions()}


def export_onnx(spec: ModelSpec, folder: Path, opset: int | None = None) -> dict:
    """Write ``folder/model.onnx`` (+ external weight data) and check it with ONNX Runtime; returns metadata."""
    module = spec.exported_module()
    args = tuple(t.example(EXAMPLE_BATCH) for t in spec.inputs)
    path = folder / MODEL_FILE
    info: dict = {}
    try:
        _export_dynamo(module, args, spec, path, opset)
        info["exporter"] = "dynamo"
    except Exception as e:
        if no_space(e):  # another exporter would fill the same disk: the cache reports it
            raise
        reason = f"{type(e).__name__}: {_first_line(e)}"
        log.warning("ONNX export of %s: the dynamo exporter failed (%s); using the TorchScript exporter", spec.name,
                    reason)
        _clear(folder)
        try:
            _export_torchscript(module, args, spec, path, opset)
        except Exception as e2:
            if no_space(e2):
                raise
            raise UserError(f"ONNX export of {spec.name} failed with both exporters (dynamo: {reason}; torchscript: "
                            f"{type(e2).__name__}: {_first_line(e2)}); run this model with --engine eager or compile"
                            ) from None
        info.update(exporter="torchscript", dynamo_error=reason)
    proto = _stamp(path, spec)
    info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    info["check_max_abs_diff"] = _check(path, module, args, spec)  # on the final file, identity included
    return info


def external_files(proto) -> list[str]:
    """The external-data file names an ONNX model references (its weights stored beside it)."""
    import onnx

    names = set()

    def tensor(t):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in t.external_data if e.key == "location")

    def nodes(ns):
        for node in ns:
            for a in node.attribute:
                for t in [a.t, *a.tensors] if a.HasField("t") else a.tensors:
                    tensor(t)
                for g in [a.g, *a.graphs] if a.HasField("g") else a.graphs:
                    graph(g)

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for sp in g.sparse_initializer:
            tensor(sp.values)
            tensor(sp.indices)
        nodes(g.node)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
    return sorted(names)


def _stamp(path: Path, spec: ModelSpec):
    """Write the model identity and the external-data files' sizes and checksums into ``path``'s metadata_props
    (see the module docstring); returns the model proto without its weights."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    files = {}
    for name in external_files(proto):
        f = path.parent / name
        files[name] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    props = {IDENTITY_KEY: json.dumps(normalise(spec.identity()), sort_keys=True),
             FILES_KEY: json.dumps(files, sort_keys=True)}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        proto.metadata_props.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())
    return proto


def _export_dynamo(module, args, spec: ModelSpec, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with _quiet():
        torch.onnx.export(module, args, str(path), dynamo=True, external_data=True, optimize=True,
                          input_names=[t.name for t in spec.inputs], output_names=[spec.output_name],
                          dynamic_shapes=tuple({0: batch} for _ in spec.inputs), opset_version=opset, verbose=False)


def _export_torchscript(module, args, spec: ModelSpec, path: Path, opset: int | None) -> None:
    names = [t.name for t in spec.inputs]
    with _quiet():
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=[spec.output_name],
                          dynamic_axes={n: {0: "batch"} for n in [*names, spec.output_name]},
                          opset_version=opset or 17)


def _check(path: Path, module, args, spec: ModelSpec) -> float:
    runner = OrtRunner(path, spec, torch.device("cpu"))
    with torch.no_grad():
        want = module(*args).float()
    got = runner(*args)
    if got.shape != want.shape:
        raise UserError(f"ONNX export of {spec.name}: ONNX Runtime returns shape {tuple(got.shape)}, PyTorch "
                        f"{tuple(want.shape)}; run this model with --engine eager or compile")
    diff = float((got - want).abs().max())
    if not diff <= CHECK_TOLERANCE * max(1.0, float(want.abs().max())):
        raise UserError(f"ONNX export of {spec.name}: ONNX Runtime's output differs from PyTorch's by {diff:.3g} on "
                        "the trace inputs; run this model with --engine eager or compile")
    return diff


class OrtRunner:
    """An ONNX Runtime session called with torch tensors; float inputs are fed as float32, the output is float32."""

    def __init__(self, path: Path, spec: ModelSpec, device: torch.device):
        import onnxruntime as ort

        self.spec, self.device = spec, device
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("--engine onnx on CUDA needs onnxruntime with the CUDAExecutionProvider "
                                "(pip install onnxruntime-gpu), or run with --device cpu")
            # TF32 off: an fp32 engine must equal the fp32 eager model to float rounding (ORT's default is on)
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": "0"})]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failed call is this module's exception, not stderr text
        if device.type == "cpu":  # the same CPU threads as torch, so engines compare (and share a machine) fairly
            options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if device.type == "cuda" and self.session.get_providers()[:1] != ["CUDAExecutionProvider"]:
            # ORT falls back to CPU when the CUDA provider cannot load (CUDA/cuDNN libraries); binding CUDA
            # pointers to a CPU session would then read device memory as host memory
            raise UserError("--engine onnx on CUDA: onnxruntime could not load its CUDA provider (it fell back to "
                            f"{', '.join(self.session.get_providers())}); check that onnxruntime-gpu matches the "
                            "installed CUDA and cuDNN, or use --engine eager/compile")
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(t.name for t in spec.inputs):
            raise ValueError(f"{path}: inputs {names}, expected {[t.name for t in spec.inputs]}")
        out = self.session.get_outputs()
        if len(out) != 1 or out[0].name != spec.output_name:
            raise ValueError(f"{path}: outputs {[o.name for o in out]}, expected [{spec.output_name!r}]")
        tail = out[0].shape[1:]
        self.out_tail = tuple(tail) if all(isinstance(d, int) for d in tail) else None
        self.device_type = "cuda" if device.type == "cuda" else "cpu"
        self.device_id = (device.index or 0) if device.type == "cuda" else 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        binding = self.session.io_binding()
        keep = []
        for t, ts in zip(args, self.spec.inputs):
            dtype = torch.int64 if ts.dtype == "int64" else torch.float32
            t = t.to(self.device, dtype).contiguous()
            keep.append(t)
            binding.bind_input(ts.name, self.device_type, self.device_id, _NP[dtype], tuple(t.shape), t.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch before ORT reads them
        if self.out_tail is None:
            binding.bind_output(self.spec.output_name, self.device_type, self.device_id)
            self.session.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)
        out = torch.empty((args[0].shape[0], *self.out_tail), dtype=torch.float32, device=self.device)
        binding.bind_output(self.spec.output_name, self.device_type, self.device_id, np.float32, tuple(out.shape),
                            out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


_NP = {torch.float32: np.float32, torch.int64: np.int64}


def onnx_entry(spec: ModelSpec, cache: EngineCache, settings: EngineSettings, load=None, build: bool = True):
    """Get (or export) the cached ONNX file of ``spec``. ``load(entry)`` turns the entry into what the caller needs;
    by default the path of the ONNX file. ``build=False``: never export; a cache miss is a ``UserError``."""
    load = load or (lambda entry: entry.file(MODEL_FILE))
    return cache.get_or_build("onnx", spec.name, onnx_fields(spec, settings),
                              lambda folder: export_onnx(spec, folder, settings.opset), load,
                              refuse=None if build else never_build(cache, spec.name, "onnx"))


def build(backend, spec: ModelSpec, device: torch.device, precision: str, cache: EngineCache,
          settings: EngineSettings, batch, build: bool = True) -> Engine:
    timing = {}

    def load(entry: CacheEntry) -> OrtRunner:
        t0 = time.perf_counter()
        runner = OrtRunner(entry.file(MODEL_FILE), spec, device)
        timing["load"] = time.perf_counter() - t0
        return runner

    runner, entry = onnx_entry(spec, cache, settings, load, build)
    return Engine(backend, spec.name, _with_dtype(runner, spec), device, precision,
                  build_seconds=0.0 if entry.hit else entry.meta["build_seconds"], load_seconds=timing["load"],
                  cache_hit=entry.hit, artefact=entry.file(MODEL_FILE),
                  details={"exporter": entry.meta.get("exporter"), "opset": entry.meta.get("opset"),
                           "providers": runner.session.get_providers()})


def _with_dtype(runner, spec: ModelSpec):
    """The output in the dtype of the first engine-precision input (float32 under this backend)."""
    first = next(i for i, t in enumerate(spec.inputs) if t.dtype == FLOAT)

    def run(*args):
        return runner(*args).to(args[first].dtype)

    return run


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and emit warnings; a command's output should be its own."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _clear(folder: Path) -> None:
    for f in folder.iterdir():
        remove(f) if f.is_dir() else f.unlink()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
