"""Load a built engine by path, without the PyTorch model: what a data pipeline embeds.

:func:`load` takes an engine-cache entry folder, an ``.onnx`` file or a TensorRT plan, and returns an
:class:`~cao2_fast.engines.base.Engine` whose ``contract`` says what it takes and returns: each tensor's name, shape
(``"N"`` marks the dynamic batch axis), dtype and meaning — for the DiT, the timestep convention, the class ids and
the null id, and the layout of its 2·C output channels. A call with the wrong number of inputs, a wrong shape or
dtype, or a class id or timestep out of range is one ``UserError`` line, not a runtime's message.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .base import Engine
from .cache import META
from .registry import BACKENDS
from .specs import FLOAT, ModelSpec, TensorSpec

ORDER = {"dit": ("x", "t", "y"), "vae_decode": ("latents",), "classifier": ("images",)}  # the call's positions


@dataclass(frozen=True)
class TensorContract:
    name: str
    shape: tuple  # "N" first: the dynamic batch axis
    dtype: str
    meaning: str


@dataclass(frozen=True)
class Contract:
    """What an engine takes and returns, and what it was built from."""

    model: str
    backend: str
    precision: str
    inputs: tuple[TensorContract, ...]
    outputs: tuple[TensorContract, ...]
    built_from: dict = field(default_factory=dict)  # the model identity recorded at build (weights digest, config)
    path: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _meanings(model: str, sig: dict) -> tuple[dict, str]:
    cfg = sig.get("config") or {}
    if model == "dit":
        n = cfg.get("num_classes")
        c = cfg.get("in_channels")
        return {
            "x": "noisy latents x_t, scaled as the VAE's encoder mean x scaling factor",
            "t": "timestep per sample on the DiT's 1000-step training schedule (0..999, float32); a respaced "
                 "sampler passes each step's original timestep",
            "y": f"class id per sample (int64, 0..{n - 1 if n else 'num_classes-1'}); {n if n else 'num_classes'} "
                 "is the null class (the unconditional half of guidance)",
        }, (f"{2 * c if c else '2C'} channels: the predicted noise eps in the first {c or 'C'}, then the learned "
            "variance interpolation values" if cfg.get("learn_sigma", True) else "the predicted noise eps")
    if model == "vae_decode":
        return {"latents": f"latents x scaling factor ({sig.get('scaling_factor', 'the VAE config')}) as the "
                           "DiT samples them"}, "decoded images, about [-1, 1] (clamp before use)"
    if model == "classifier":
        return {"images": f"images in [-1, 1] already at the classifier's input size ({sig.get('input_size')}); "
                          "the recipe's normalisation is inside, the antialiased resize is not (do it first)"}, \
            "logits over the classifier's classes"
    return {}, ""


def _from_meta(folder: Path) -> tuple[dict, dict]:
    try:
        meta = json.loads((folder / META).read_text())
        fields = meta["fields"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}: not a complete engine-cache entry (no readable {META})") from None
    return meta, fields.get("onnx", fields)  # a TensorRT entry keeps the ONNX file's fields inside its own


def _spec(model: str, inputs: dict, output: str) -> ModelSpec:
    order = ORDER.get(model, tuple(inputs))
    if set(order) != set(inputs):
        order = tuple(inputs)
    return ModelSpec(model, None, tuple(TensorSpec(n, tuple(inputs[n]["shape"]), inputs[n]["dtype"]) for n in order),
                     output)


def _onnx_io(path: Path) -> tuple[str, dict, str]:
    """(model name guess, inputs {name: {shape, dtype}}, output name) read off an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    inputs = {}
    for i in proto.graph.input:
        if i.name in init:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim][1:]
        dtype = "int64" if t.elem_type == onnx.TensorProto.INT64 else ("float32" if len(dims) == 0 else FLOAT)
        inputs[i.name] = {"shape": dims, "dtype": dtype}
    model = next((m for m, names in ORDER.items() if set(names) == set(inputs)), path.stem)
    return model, inputs, proto.graph.output[0].name


def describe(folder: Path, entry: dict | None = None) -> dict:
    """An engine-cache entry as ``cao2-fast info --json`` lists it: name, model, backend, precision, path, state,
    size, the model identity it was built from, and its contract (``None`` with the reason if unreadable)."""
    row = {k: (entry or {}).get(k) for k in ("name", "bytes", "state", "created")}
    try:
        kind, artefact, model, spec, sig, built_from, precision = _read(folder)
        contract = _contract(kind, artefact, model, spec, sig, built_from, precision)
        row.update(model=model, backend=contract.backend, precision=precision, path=str(artefact),
                   built_from=built_from, contract={"inputs": [asdict(t) for t in contract.inputs],
                                                    "outputs": [asdict(t) for t in contract.outputs]})
    except UserError as e:
        row.update(path=str(folder), contract=None, problem=str(e))
    return row


def _read(path: Path):
    """(kind, artefact, model, spec, signature, built_from, precision) of an engine path, without loading it."""
    sig, built_from, precision = {}, {}, "float32"
    if path.is_dir():
        meta, fields = _from_meta(path)
        kind = meta.get("kind")
        model, output = fields.get("model", meta.get("model")), fields.get("output")
        inputs, sig = fields.get("inputs", {}), fields.get("signature", {})
        built_from = {"weights": fields.get("weights"), "signature": sig}
        artefact = path / ("engine.plan" if kind == "trt" else "model.onnx")
        precision = meta["fields"].get("precision", "float32") if kind == "trt" else "float32"
        if not inputs or not output or not artefact.is_file():
            raise UserError(f"{path}: the entry's metadata lacks its inputs/output or its artefact is missing")
    elif path.suffix == ".onnx":
        kind, artefact = "onnx", path
        model, inputs, output = _onnx_io(path)
    elif path.suffix in (".plan", ".engine", ".trt"):
        kind, artefact = "trt", path
        model, inputs, output = _trt_io(path)
    else:
        raise UserError(f"{path}: not an engine (expected an engine-cache folder, an .onnx file or a .plan)")
    return kind, artefact, model, _spec(model, inputs, output), sig, built_from, precision


def _contract(kind, artefact, model, spec, sig, built_from, precision) -> Contract:
    meanings, out_meaning = _meanings(model, sig)
    return Contract(
        model, "trt" if kind == "trt" else "onnx", precision,
        tuple(TensorContract(t.name, ("N", *t.shape), "float32" if t.dtype == FLOAT else t.dtype,
                             meanings.get(t.name, "")) for t in spec.inputs),
        (TensorContract(spec.output_name, ("N", "..."), "float32", out_meaning),), built_from, str(artefact))


def load(path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """The engine at ``path`` (a cache entry folder, an ``.onnx`` file or a TensorRT ``.plan``) on ``device``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such engine (expected an engine-cache folder, an .onnx file or a TensorRT plan)")
    device = torch.device(device)
    kind, artefact, model, spec, sig, built_from, precision = _read(path)
    backend = BACKENDS["trt" if kind == "trt" else "onnx"]
    from .registry import require

    require(backend.name, device, precision)
    contract = _contract(kind, artefact, model, spec, sig, built_from, precision)
    if kind == "trt":
        from .trt import TrtRunner

        runner = TrtRunner(artefact, spec, device)
    else:
        from .onnx_ort import OrtRunner

        runner = OrtRunner(artefact, spec, device)
    null = (sig.get("config") or {}).get("num_classes")
    return Engine(backend, model, _checked(runner, spec, null), device, precision, artefact=artefact, cache_hit=True,
                  contract=contract)


def _checked(runner, spec: ModelSpec, null_id: int | None):
    """``runner`` behind one-line checks of what it is called with."""
    names = [t.name for t in spec.inputs]

    def call(*args):
        if len(args) != len(spec.inputs):
            raise UserError(f"{spec.name} engine takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        for a, t in zip(args, spec.inputs):
            if not isinstance(a, torch.Tensor):
                raise UserError(f"{spec.name} engine: input {t.name} must be a torch tensor, got {type(a).__name__}")
            want = tuple(t.shape)
            if tuple(a.shape[1:]) != want or a.dim() != len(want) + 1:
                raise UserError(f"{spec.name} engine: input {t.name} has shape {tuple(a.shape)}, expected "
                                f"(N, {', '.join(map(str, want))})".replace(", )", ")"))
            if t.dtype == "int64" and (a.is_floating_point() or a.dtype == torch.bool):
                raise UserError(f"{spec.name} engine: input {t.name} must be an integer tensor, got {a.dtype}")
            if t.dtype != "int64" and not a.is_floating_point():
                raise UserError(f"{spec.name} engine: input {t.name} must be a float tensor, got {a.dtype}")
        if spec.name == "dit":
            t, y = args[1], args[2]
            if len({len(a) for a in args}) != 1:
                raise UserError(f"dit engine: x, t and y must share the batch size, got {[len(a) for a in args]}")
            if null_id is not None and len(y) and (int(y.min()) < 0 or int(y.max()) > null_id):
                raise UserError(f"dit engine: class ids must lie in 0..{null_id} ({null_id} is the null class), "
                                f"got {int(y.min())}..{int(y.max())}")
            if len(t) and not (bool(torch.isfinite(t).all()) and float(t.min()) >= 0 and float(t.max()) < 1000):
                raise UserError("dit engine: timesteps must be finite and in [0, 1000) (the training schedule)")
        out = runner(*args)
        first = next((a for a, s in zip(args, spec.inputs) if s.dtype == FLOAT), None)
        return out if first is None else out.to(first.dtype)

    return call


def _trt_io(path: Path) -> tuple[str, dict, str]:
    """(model guess, inputs, output) of a bare TensorRT plan, read from the deserialised engine."""
    from .trt import _trt

    trt = _trt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise UserError(f"{path}: TensorRT cannot deserialise this plan (built by another TensorRT version or GPU?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if n not in ins]
    inputs = {}
    for n in ins:
        dims = list(engine.get_tensor_shape(n))[1:]
        is_int = engine.get_tensor_dtype(n) in (trt.DataType.INT64, trt.DataType.INT32)
        inputs[n] = {"shape": dims, "dtype": "int64" if is_int else ("float32" if not dims else FLOAT)}
    model = next((m for m, order in ORDER.items() if set(order) == set(inputs)), path.stem)
    return model, inputs, outs[0]

