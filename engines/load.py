"""Load a built engine by path, without the PyTorch model: what a data pipeline embeds.

:func:`load` takes an engine-cache entry folder, an ``.onnx`` file or a TensorRT plan, and returns an
:class:`~cao2_fast.engines.base.Engine` whose ``contract`` says what it takes and returns: each tensor's name, shape
(``"N"`` marks the dynamic batch axis), dtype and meaning — for the DiT, the timestep convention, the class ids and
the null id, and the layout of its 2·C output channels. A call with the wrong number of inputs, a wrong shape or
dtype, or a class id or timestep out of range is one ``UserError`` line, not a runtime's message.

Calls work like the model's own: positional or by name (the DiT also takes diffusers' names), integer or float
timesteps, int32 or int64 class ids, one timestep or class id for the whole batch, float16/bfloat16/float32/float64
inputs with the output in the dtype of the first (``x``, ``latents`` or ``images``).

What was recorded at build is verified before anything runs: every file an entry's ``meta.json`` lists (sizes and
sha256), and for an ``.onnx`` copied out of its entry, the external weights file its own metadata records. A file
inside an entry folder is loaded through that entry, so it keeps the entry's guards and contract.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .base import Engine
from .cache import FORMAT, META, EngineCache, file_sha256, files_table_problem, listed_files
from .registry import BACKENDS
from .specs import FLOAT, ModelSpec, TensorSpec

ORDER = {"dit": ("x", "t", "y"), "vae_decode": ("latents",), "classifier": ("images",),  # the call's positions
         "mar_mae": ("tokens", "mask", "cond"), "mar_head": ("x", "t", "z")}
ALIASES = {"dit": {"hidden_states": "x", "timestep": "t", "class_labels": "y"},  # diffusers' DiT names
           "vae_decode": {"z": "latents"}, "classifier": {}}  # diffusers' AutoencoderKL.decode(z)
BROADCAST = {"dit": ("t", "y"), "mar_head": ("t",)}  # inputs where one number (or a 0-d tensor) stands for the whole batch
FLOATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
INTS = {torch.int64: "int64", torch.int32: "int32"}
PLAN_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass(frozen=True)
class TensorContract:
    """One tensor of the call. For an input, ``dtype`` is what the graph computes with and ``accepts`` what a call
    may pass (converted on the way in); for the output, ``dtype`` is what the call returns."""

    name: str
    shape: tuple  # "N" first: the dynamic batch axis ("..." when the graph does not say)
    dtype: str
    meaning: str
    accepts: tuple = ()  # torch dtypes a call may pass for this input
    aliases: tuple = ()  # other keyword names of this input
    broadcast: bool = False  # a Python number or a 0-d tensor stands for the whole batch


@dataclass(frozen=True)
class Contract:
    """What an engine takes and returns, and what it was built from. The output comes back in the dtype of the
    first floating-point input (``x``, ``latents`` or ``images``), on the engine's device."""

    model: str
    backend: str
    precision: str
    inputs: tuple[TensorContract, ...]
    outputs: tuple[TensorContract, ...]
    built_from: dict = field(default_factory=dict)  # the model identity recorded at build (weights digest, config)
    path: str = ""

    def to_json(self) -> dict:
        """The contract as plain JSON values (lists, not tuples): what ``json.dumps`` writes."""
        return json.loads(json.dumps(asdict(self)))


def _config_int(sig: dict, key: str) -> int | None:
    """An integer of the recorded architecture config (None when it is not one)."""
    cfg = sig.get("config") if isinstance(sig, dict) else None
    v = cfg.get(key) if isinstance(cfg, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _meanings(model: str, sig: dict) -> tuple[dict, str]:
    cfg = sig.get("config") if isinstance(sig.get("config"), dict) else {}
    if model == "dit":
        n = _config_int(sig, "num_classes")
        c = _config_int(sig, "in_channels")
        return {
            "x": "noisy latents x_t, scaled as the VAE's encoder mean x scaling factor",
            "t": "timestep per sample on the DiT's 1000-step training schedule (0..999; integer or float, run as "
                 "float32); a respaced sampler passes each step's original timestep; one number serves the whole batch",
            "y": f"class id per sample (0..{n - 1 if n else 'num_classes-1'}); {n if n else 'num_classes'} is the "
                 "null class (the unconditional half of guidance); one id serves the whole batch",
        }, (f"{2 * c if c else '2C'} channels: the predicted noise eps in the first {c or 'C'}, then the learned "
            "variance interpolation values" if cfg.get("learn_sigma", True) else "the predicted noise eps")
    if model == "mar_mae":
        n, w = _config_int(sig, "buffer_size"), _config_int(sig, "decoder_embed_dim")
        return {
            "tokens": "the token grid (patchified VAE latents x scale); hidden positions may hold anything",
            "mask": "1 where a token is hidden (to be predicted), 0 where it is visible",
            "cond": f"the class embedding that fills the {n or 'buffer'} buffer rows (a class_emb row, the learned "
                    "null fake_latent for guidance's unconditional half, or a label vector @ class_emb)",
        }, (f"z: the diffusion head's condition of every token ({w or 'decoder width'} values each, the buffer "
            "rows dropped)")
    if model == "mar_head":
        return {
            "x": "noisy token rows x_t",
            "t": "timestep per row on the head's 1000-step training schedule (0..999; a respaced sampler passes "
                 "each step's original timestep); one number serves the whole batch",
            "z": "each row's condition from mar_mae's z",
        }, "the predicted noise eps in the first C channels, then the learned variance interpolation values"
    if model == "vae_decode":
        return {"latents": f"latents x scaling factor ({sig.get('scaling_factor', 'the VAE config')}) as the "
                           "DiT samples them"}, "decoded images, about [-1, 1] (clamp before use)"
    if model == "classifier":
        return {"images": f"images in [-1, 1] already at the classifier's input size ({sig.get('input_size')}); "
                          "the recipe's normalisation is inside, the antialiased resize is not (do it first)"}, \
            "logits over the classifier's classes"
    return {}, ""


@dataclass
class _Found:
    """What an engine path holds, read without loading it."""

    kind: str  # "onnx" or "trt"
    artefact: Path
    model: str
    spec: ModelSpec
    signature: dict
    built_from: dict
    precision: str
    out_tail: tuple | None  # the output's shape after the batch axis, when the graph states it


def _rebuild_hint(folder: Path, kind: str) -> str:
    return (f"rebuild the entry (delete {folder}, then run cao2-fast export --engine {kind} with the models and "
            "options it was built from) or load another")


def _entry(folder: Path, artefact: Path | None = None, checksums: bool = True) -> _Found:
    """An engine-cache entry, checked against its ``meta.json``: format, key, and every listed file's size (and
    sha256 with ``checksums``). ``artefact``: a file of the entry to run, instead of its usual one."""
    try:
        meta = json.loads((folder / META).read_text())
        fields = meta["fields"]
        kind = meta["kind"]
        if not isinstance(fields, dict) or kind not in ("onnx", "trt"):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}: not a complete engine-cache entry (no readable {META})") from None
    hint = _rebuild_hint(folder, kind)
    inner = fields.get("onnx", fields)  # a TensorRT entry keeps the ONNX file's fields inside its own
    inner = inner if isinstance(inner, dict) else {}
    model, output, inputs, sig = inner.get("model", meta.get("model")), inner.get("output"), inner.get("inputs"), \
        inner.get("signature") or {}
    if not isinstance(inputs, dict) or not inputs or not isinstance(output, str) or not isinstance(sig, dict):
        raise UserError(f"{folder}: the entry's metadata lacks its inputs/output; {hint}")
    if meta.get("format") != FORMAT or meta.get("key") != EngineCache.key(fields):
        raise UserError(f"{folder}: its {META} does not match the key it was built under (edited or from another "
                        f"cao2-fast version); {hint}")
    files = listed_files(meta)
    if files is None:
        raise UserError(f"{folder}: its {META} {files_table_problem(meta)}, so nothing in it can be verified; {hint}")
    name = artefact.name if artefact is not None else ("engine.plan" if kind == "trt" else "model.onnx")
    if name not in files:
        raise UserError(f"{folder}: its {META} does not list {name}; {hint}")
    for n, info in files.items():
        _verify(folder / n, info, checksums, f"its entry's {META} lists it", "when it was built", hint)
    artefact = folder / name
    precision = fields.get("precision", "float32") if kind == "trt" else "float32"
    out_tail = None
    if artefact.suffix == ".onnx":
        proto = _onnx_proto(artefact)
        kind, out_tail = "onnx", _proto_io(proto, artefact)[3]
    return _Found(kind, artefact, str(model), _spec(str(model), inputs, output, folder), sig,
                  {"weights": inner.get("weights"), "signature": sig}, precision, out_tail)


def _verify(f: Path, info: dict, checksums: bool, listed: str, when: str, todo: str) -> None:
    """``f`` has the size and sha256 that ``info`` recorded ``when``, else one line naming it and saying what to
    do."""
    if not f.is_file():
        raise UserError(f"engine file {f} is missing ({listed}); {todo}")
    if f.stat().st_size != info.get("bytes") or checksums and file_sha256(f) != info.get("sha256"):
        raise UserError(f"engine file {f} does not match the checksum recorded {when}; {todo}")


def _spec(model: str, inputs: dict, output: str, where: Path) -> ModelSpec:
    order = ORDER.get(model, tuple(inputs))
    if set(order) != set(inputs):
        order = tuple(inputs)
    try:
        return ModelSpec(model, None, tuple(TensorSpec(n, tuple(inputs[n]["shape"]), inputs[n]["dtype"])
                                            for n in order), output)
    except (KeyError, TypeError):
        raise UserError(f"{where}: the recorded inputs are unreadable; load another engine") from None


def _onnx_proto(path: Path):
    """The ONNX model at ``path`` without its external weights; a missing, empty, truncated or corrupt file is one
    line."""
    import onnx

    again = "export it again (cao2-fast export --engine onnx) or load another"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if size == 0:
        raise UserError(f"{path}: the ONNX file is empty; {again}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception:
        raise UserError(f"{path}: not a readable ONNX model (truncated or corrupt); {again}") from None
    if not proto.HasField("graph") or not len(proto.graph.output) or not len(proto.graph.input):
        raise UserError(f"{path}: not an ONNX model with a graph (truncated or corrupt); {again}")
    return proto


def _proto_io(proto, path: Path) -> tuple[str, dict, str, tuple | None]:
    """(model name guess, inputs {name: {shape, dtype}}, output name, output shape after the batch axis or None)."""
    import onnx

    init = {i.name for i in proto.graph.initializer}
    inputs = {}
    for i in proto.graph.input:
        if i.name in init:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not i.type.HasField("tensor_type") or not dims:
            raise UserError(f"{path}: input {i.name} is not a tensor with a batch axis; not an engine cao2-fast runs")
        if t.elem_type not in (onnx.TensorProto.INT64, onnx.TensorProto.FLOAT):
            raise UserError(f"{path}: input {i.name} is {onnx.TensorProto.DataType.Name(t.elem_type).lower()}; "
                            "cao2-fast runs graphs with float32 and int64 inputs")
        dims = dims[1:]
        dtype = "int64" if t.elem_type == onnx.TensorProto.INT64 else ("float32" if len(dims) == 0 else FLOAT)
        inputs[i.name] = {"shape": dims, "dtype": dtype}
    model = next((m for m, names in ORDER.items() if set(names) == set(inputs)), path.stem)
    out = proto.graph.output[0]
    tail = [d.dim_value if d.HasField("dim_value") else None for d in out.type.tensor_type.shape.dim][1:]
    return model, inputs, out.name, (tuple(tail) if tail and None not in tail else None)


def _bare_onnx(path: Path) -> _Found:
    """An ``.onnx`` outside an entry. Exported by cao2-fast, it carries its identity and its external weights'
    checksums in ``metadata_props`` (see :mod:`.onnx_ort`): the same guards and contract as in its entry."""
    from .onnx_ort import FILES_KEY, IDENTITY_KEY, external_files

    proto = _onnx_proto(path)
    model, inputs, output, out_tail = _proto_io(proto, path)
    props = {p.key: p.value for p in proto.metadata_props}
    if IDENTITY_KEY not in props:  # not cao2-fast's: what the graph itself declares
        return _Found("onnx", path, model, _spec(model, inputs, output, path), {}, {}, "float32", out_tail)
    again = "export it again (cao2-fast export --engine onnx) or load another"
    try:
        identity, files = json.loads(props[IDENTITY_KEY]), json.loads(props.get(FILES_KEY, "{}"))
        recorded = {n: (identity["inputs"][n]["shape"], identity["inputs"][n]["dtype"]) for n in identity["inputs"]}
        sig = identity.get("signature") or {}
        ok = isinstance(sig, dict) and isinstance(files, dict) and all(
            isinstance(n, str) and "/" not in n and "\\" not in n and n not in ("", ".", "..") and isinstance(i, dict)
            for n, i in files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{path}: its cao2-fast metadata is unreadable; {again}")
    graph = {n: ([d for d in i["shape"]], i["dtype"]) for n, i in inputs.items()}
    if set(recorded) != set(graph) or identity.get("output") != output or any(
            list(recorded[n][0]) != graph[n][0] for n in graph):
        raise UserError(f"{path}: its graph does not match the inputs and output its metadata records; {again}")
    if set(external_files(proto)) != set(files):
        raise UserError(f"{path}: it references weight files its metadata does not record; {again}")
    for n, info in files.items():
        _verify(path.parent / n, info, True, f"{path.name} keeps its weights in it, beside it",
                f"when {path.name} was exported", f"copy it along from where {path.name} came from, or {again}")
    model = str(identity.get("model", model))
    return _Found("onnx", path, model, _spec(model, identity["inputs"], output, path), sig,
                  {"weights": identity.get("weights"), "signature": sig}, "float32", out_tail)


def _in_entry(path: Path) -> bool:
    """Whether ``path`` is a file that its folder's ``meta.json`` describes as an engine-cache entry's (a broken
    table of files counts: the entry then refuses it)."""
    try:
        meta = json.loads((path.parent / META).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or "key" not in meta or "kind" not in meta:
        return False
    files = listed_files(meta)
    return files is None or path.name in files


def describe(folder: Path, entry: dict | None = None) -> dict:
    """An engine-cache entry as ``cao2-fast info --json`` lists it: name, model, backend, precision, path, state,
    size, the model identity it was built from, and its contract (``None`` with the reason if unreadable). Sizes
    are checked, checksums are not (loading checks them)."""
    row = {k: (entry or {}).get(k) for k in ("name", "bytes", "state", "created")}
    try:
        found = _read(folder, checksums=False)
        contract = _contract(found)
        row.update(model=found.model, backend=contract.backend, precision=found.precision, path=str(found.artefact),
                   built_from=found.built_from, contract={"inputs": [asdict(t) for t in contract.inputs],
                                                          "outputs": [asdict(t) for t in contract.outputs]})
    except UserError as e:
        row.update(path=str(folder), contract=None, problem=str(e))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a listing never stops at one entry
        row.update(path=str(folder), contract=None, problem=f"{folder}: unreadable entry ({type(e).__name__})")
    return row


def _read(path: Path, checksums: bool = True) -> _Found:
    """What the engine at ``path`` is, verified against what was recorded at build, without loading it."""
    if path.is_dir():
        return _entry(path, checksums=checksums)
    if path.suffix in (".onnx", *PLAN_SUFFIXES) and _in_entry(path):
        return _entry(path.parent, path, checksums)
    if path.suffix == ".onnx":
        return _bare_onnx(path)
    if path.suffix in PLAN_SUFFIXES:
        model, inputs, output = _trt_io(path)
        return _Found("trt", path, model, _spec(model, inputs, output, path), {}, {}, "float32", None)
    raise UserError(f"{path}: not an engine (expected an engine-cache folder, an .onnx file or a .plan)")


def _accepts(t: TensorSpec) -> tuple[str, ...]:
    if t.dtype == "int64":
        return tuple(INTS.values())
    if t.dtype == "float32":  # a per-sample number such as the timestep: integers are exact in float32
        return (*FLOATS.values(), *INTS.values())
    return tuple(FLOATS.values())


def _contract(found: _Found) -> Contract:
    spec, model = found.spec, found.model
    meanings, out_meaning = _meanings(model, found.signature)
    aliases = ALIASES.get(model, {})
    first = next((t.name for t in spec.inputs if t.dtype == FLOAT), None)
    inputs = tuple(TensorContract(t.name, ("N", *t.shape), "float32" if t.dtype == FLOAT else t.dtype,
                                  meanings.get(t.name, ""), _accepts(t),
                                  tuple(a for a, n in aliases.items() if n == t.name),
                                  t.name in BROADCAST.get(model, ())) for t in spec.inputs)
    out = TensorContract(spec.output_name, ("N", *found.out_tail) if found.out_tail else ("N", "..."),
                         f"same as {first}" if first else "float32", out_meaning)
    return Contract(model, found.kind, found.precision, inputs, (out,), found.built_from, str(found.artefact))


def load(path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """The engine at ``path`` (a cache entry folder, an ``.onnx`` file or a TensorRT ``.plan``) on ``device``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such engine (expected an engine-cache folder, an .onnx file or a TensorRT plan)")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {device!r}: not a device torch knows (use cpu, cuda or cuda:N)") from None
    found = _read(path)
    backend = BACKENDS[found.kind]
    from .registry import require

    require(backend.name, device, found.precision)
    contract = _contract(found)
    try:
        if found.kind == "trt":
            from .trt import TrtRunner

            runner = TrtRunner(found.artefact, found.spec, device)
        else:
            from .onnx_ort import OrtRunner

            runner = OrtRunner(found.artefact, found.spec, device)
    except UserError:
        raise
    except Exception as e:
        runtime = "TensorRT" if found.kind == "trt" else "ONNX Runtime"
        raise UserError(f"{found.artefact}: {runtime} cannot load it ({_reason(e)}); export it again or load "
                        "another") from None
    null = _config_int(found.signature, "num_classes") if found.model == "dit" else None
    return Engine(backend, found.model, _checked(runner, found.spec, null), device, found.precision,
                  artefact=found.artefact, cache_hit=True, contract=contract)


def _reason(e: BaseException) -> str:
    """The first line of a runtime's exception, without its status prefix."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[0] if lines else type(e).__name__)
    return text[:200]


def _typename(a) -> str:
    t = type(a)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _bind(model: str, names: list[str], aliases: dict, args: tuple, kwargs: dict) -> dict:
    """The call's inputs by name, from positions and keywords (an input's own name or one of its aliases)."""
    takes = ", ".join(n + "".join(f" (or {a})" for a, m in aliases.items() if m == n) for n in names)
    if len(args) > len(names):
        raise UserError(f"{model} engine takes {len(names)} inputs ({takes}), got {len(args)} positional")
    bound = {n: (a, f"argument {i + 1}") for i, (n, a) in enumerate(zip(names, args))}
    for key, value in kwargs.items():
        name = key if key in names else aliases.get(key)
        if name is None:
            raise UserError(f"{model} engine: no input called {key!r}; it takes {takes}")
        if name in bound:
            raise UserError(f"{model} engine: input {name} is given twice (as {bound[name][1]} and as {key}=)")
        bound[name] = (value, f"{key}=")
    missing = [n for n in names if n not in bound]
    if missing:
        raise UserError(f"{model} engine takes {len(names)} inputs ({takes}), got {len(bound)}; missing "
                        f"{', '.join(missing)}")
    return {n: bound[n][0] for n in names}


def _expected(shape) -> str:
    return "(N" + "".join(f", {'?' if d is None else d}" for d in shape) + ")"


def _checked(runner, spec: ModelSpec, null_id: int | None):
    """``runner`` behind one-line checks of what it is called with, and the conversions the contract promises."""
    names = [t.name for t in spec.inputs]
    aliases = {a: n for a, n in ALIASES.get(spec.name, {}).items() if n in names}
    broadcast = set(BROADCAST.get(spec.name, ()))
    first = next((t.name for t in spec.inputs if t.dtype == FLOAT), None)
    where = f"{spec.name} engine"

    def tensor(t: TensorSpec, a):
        scalar = t.name in broadcast and (_is_number(a) or isinstance(a, torch.Tensor) and a.dim() == 0)
        if not isinstance(a, torch.Tensor) and not scalar:
            extra = " or a Python number" if t.name in broadcast else ""
            raise UserError(f"{where}: input {t.name} must be a torch tensor{extra} (got {_typename(a)}); convert it "
                            "with torch.as_tensor")
        if _is_number(a):
            try:
                a = torch.tensor(a)
            except (RuntimeError, OverflowError, ValueError):
                raise UserError(f"{where}: input {t.name} = {a!r} does not fit a tensor") from None
        accepts = _accepts(t)
        if FLOATS.get(a.dtype, INTS.get(a.dtype)) not in accepts:
            kind = {"int64": "an integer", "float32": "a float or integer"}.get(t.dtype, "a floating-point")
            raise UserError(f"{where}: input {t.name} must be {kind} tensor ({', '.join(accepts)}), got {a.dtype}")
        if not scalar:
            want = tuple(t.shape)
            if a.dim() != len(want) + 1 or any(w is not None and w != g for w, g in zip(want, a.shape[1:])):
                raise UserError(f"{where}: input {t.name} has shape {tuple(a.shape)}, expected {_expected(want)}")
        if t.dtype == "int64":
            a = a.to(torch.int64)
        elif t.dtype == "float32":
            a = a.to(torch.float32)
        return a, scalar

    def call(*args, **kwargs):
        bound = _bind(spec.name, names, aliases, args, kwargs)
        got = {t.name: tensor(t, bound[t.name]) for t in spec.inputs}
        sizes = {n: a.shape[0] for n, (a, scalar) in got.items() if not scalar}
        if len(set(sizes.values())) > 1:
            raise UserError(f"{where}: {' and '.join([', '.join(list(sizes)[:-1]), list(sizes)[-1]])} must share "
                            "the batch size, got "
                            f"{', '.join(f'{n} {b}' for n, b in sizes.items())}")
        n = next(iter(sizes.values()))
        if n == 0:
            raise UserError(f"{where}: the batch is empty (0 samples); call it with at least one")
        ins = {k: a.reshape(1).expand(n) if scalar else a for k, (a, scalar) in got.items()}
        if spec.name == "dit" and {"t", "y"} <= set(ins):
            y = ins["y"]
            if null_id is not None and (int(y.min()) < 0 or int(y.max()) > null_id):
                raise UserError(f"dit engine: class ids must lie in 0..{null_id} ({null_id} is the null class), "
                                f"got {int(y.min())}..{int(y.max())}")
        if spec.name in ("dit", "mar_head") and "t" in ins:
            t = ins["t"]
            if not (bool(torch.isfinite(t).all()) and float(t.min()) >= 0 and float(t.max()) < 1000):
                raise UserError(f"{where}: timesteps must be finite and in [0, 1000) (the training schedule)")
        try:
            out = runner(*(ins[k] for k in names))
        except UserError:
            raise
        except Exception as e:  # what the checks above cannot know of a graph without cao2-fast's metadata
            raise UserError(f"{where}: the runtime refused this call ({_reason(e)})") from None
        return out if first is None else out.to(bound[first].dtype)

    return call


def _trt_io(path: Path) -> tuple[str, dict, str]:
    """(model guess, inputs, output) of a bare TensorRT plan, read from the deserialised engine."""
    from .trt import _trt

    trt = _trt()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(data) if data else None
    if engine is None:
        raise UserError(f"{path}: TensorRT cannot deserialise this plan (empty, corrupt, or built by another "
                        "TensorRT version or GPU)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if n not in ins]
    if not ins or len(outs) != 1:
        raise UserError(f"{path}: a plan with inputs {ins} and outputs {outs}; cao2-fast runs one-output engines")
    inputs = {}
    for n in ins:
        dims = list(engine.get_tensor_shape(n))[1:]
        is_int = engine.get_tensor_dtype(n) in (trt.DataType.INT64, trt.DataType.INT32)
        inputs[n] = {"shape": dims, "dtype": "int64" if is_int else ("float32" if not dims else FLOAT)}
    model = next((m for m, order in ORDER.items() if set(order) == set(inputs)), path.stem)
    return model, inputs, outs[0]
