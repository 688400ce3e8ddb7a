"""``cao2-fast info`` (versions, devices, presets) and ``cao2-fast train-preset`` (rebuild the embedded models)."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..fileio import overlaps
from .common import EngineDirOpt, bars_enabled
from .main import app


def gather_info(engine_dir: Path | None = None) -> dict:
    import torch

    from ..engines import EngineCache
    from ..pipeline import PRESETS, preset_dir

    info = {"versions": _versions()}  # python's version is among them
    info["devices"] = {
        "cpu_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    info["optional"] = {m: importlib.util.find_spec(m) is not None  # engines, launchers, then `convert`'s formats
                        for m in ("onnxruntime", "tensorrt", "triton", "accelerate", "webdataset", "datasets")}
    info["presets"] = {name: str(preset_dir(name)) if (preset_dir(name) / "preset.json").is_file() else "missing"
                       for name in PRESETS}
    info["hub"] = _hub_models()
    cache = EngineCache(engine_dir)
    info["engines"] = {"dir": str(cache.root), **{e["name"]: _describe_entry(e) for e in cache.entries()}}
    return info


def _hub_models() -> dict:
    """Every model repository in the Hugging Face Hub cache (``HF_HOME``/``HF_HUB_CACHE``), each revision with the
    options that can take it (``--dit``, ``--vae``, ``--classifier`` for timm's ``hf-hub:`` models)."""
    from .. import generators, hub

    data = hub.cached_models()
    data["listed"] = "every model repository in the cache; 'use' names the options that take a revision"
    for repo in data["repos"]:
        for rev in repo["revisions"]:
            folder, names = Path(rev["path"]), set(rev["files"])
            rev["use"] = generators.hub_uses(folder, names)
            if _is_timm(folder, names):
                rev["use"].append(f"--classifier hf-hub:{repo['repo']}")
    return data


def _is_timm(folder: Path, names: set[str]) -> bool:
    """A timm model on the Hub: a config.json naming its ``architecture`` beside its weights."""
    if "config.json" not in names:
        return False
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    weights = any(n.startswith(("model.", "pytorch_model.")) for n in names)
    return isinstance(cfg, dict) and "architecture" in cfg and weights


def _versions() -> dict:
    """The versions a manifest records (``pipeline.versions``), read from the installed metadata: importing
    diffusers and timm only to ask would double this command's start-up."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    import torch

    out = {"cao2_fast": __version__, "torch": torch.__version__}
    for dist in ("diffusers", "timm"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    try:
        out["numpy"] = version("numpy")
    except PackageNotFoundError:
        out["numpy"] = None
    out["platform"] = sys.platform
    return out


def _describe_entry(e: dict) -> str:
    """One line per cached engine: backend, which model (role, architecture, weights digest), size, state."""
    model = f"{e.get('model', '?')} ({_model_of(Path(e['path']))})"
    created = f", built {e['created']}" if e.get("created") else ""
    return f"{e.get('kind', '?')} {model}, {e.get('precision', '?')}, {e['bytes'] / 1e6:.1f} MB, {e['state']}{created}"


def _entries_json(engine_dir: Path | None) -> list[dict]:
    """Each cached engine with its contract (what it takes and returns), the model identity it was built from,
    backend, precision and path; the contract comes from the entry's metadata and artefact, no model is loaded."""
    from ..engines import EngineCache
    from ..engines.load import describe

    return [{**describe(Path(e["path"]), e), "description": _describe_entry(e)}
            for e in EngineCache(engine_dir).entries()]


def _model_of(folder: Path) -> str:
    """The model an engine was built from, as its metadata records it: class, a few sizes, the weights' digest."""
    try:
        fields = json.loads((folder / "meta.json").read_text())["fields"]
        fields = fields.get("onnx", fields)  # a TensorRT entry keeps the ONNX file's fields inside its own
        sig, cfg = fields["signature"], fields["signature"].get("config") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unknown model"
    keys = {"depth": "depth", "hidden_size": "width", "num_classes": "classes", "input_size": "latent side",
            "latent_channels": "latent channels", "sample_size": "image side"}
    sizes = [f"{label} {cfg[k]}" for k, label in keys.items() if isinstance(cfg, dict) and k in cfg]
    if "input_size" in sig and not sizes:
        sizes.append(f"input {sig['input_size']}")
    return ", ".join([str(sig.get("class", "?")), *sizes, f"weights sha256 {str(fields.get('weights', '?'))[:12]}"])


@app.command(epilog="\nExamples:\n\n  cao2-fast info\n\n  cao2-fast info --json --engine-dir /scratch/cao2-engines\n")
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
         engine_dir: EngineDirOpt = None) -> None:
    """Library versions, devices, optional backends, presets, the models in the Hugging Face Hub cache and cached
    engines (which model each belongs to)."""
    data = gather_info(engine_dir)
    if as_json:
        data["engines"] = {"dir": data["engines"]["dir"], "entries": _entries_json(engine_dir)}
        print(json.dumps(data, indent=1))
        return
    v = data["versions"]
    print(f"cao2-fast {v.get('cao2_fast', '?')}")
    print("versions  " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "cao2_fast"))
    dev = data["devices"]
    print(f"devices   cpu ({dev['cpu_threads']} torch threads); cuda: {', '.join(dev['cuda']) or 'none'}")
    print("optional  " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in data["optional"].items()))
    for name, where in data["presets"].items():
        print(f"preset    {name}: {where}")
    _print_hub(data["hub"])
    engines = dict(data["engines"])
    root = engines.pop("dir")
    print(f"engines   {root} ({len(engines)} cached)")
    for name, desc in engines.items():  # full paths on lines of their own: nothing is cut at the terminal's width
        print(f"  {desc}")
        print(f"    {Path(root) / name}")


def _print_hub(hub: dict) -> None:
    repos = hub["repos"]
    state = f"unreadable: {hub['error']}" if "error" in hub else f"{len(repos)} model repos cached, all listed"
    print(f"hub       {hub['cache']} ({state})")
    for repo in repos:
        print(f"  {repo['repo']}  {repo['bytes'] / 1e6:.1f} MB")
        for rev in repo["revisions"]:
            refs = f" ({', '.join(rev['refs'])})" if rev["refs"] else ""
            use = f", use as {', '.join(rev['use'])}" if rev["use"] else ""
            print(f"    {rev['commit'][:12]}{refs}: {len(rev['files'])} files, {rev['bytes'] / 1e6:.1f} MB{use}")
        print(f"    {repo['path']}")


class PresetName(str, Enum):
    digits = "digits"
    digits_mar = "digits-mar"


TRAIN_EXAMPLES = """
Examples:

  cao2-fast train-preset digits --out /tmp/digits-preset    # a fresh copy

  cao2-fast train-preset digits --replace-shipped    # over the shipped one

  cao2-fast train-preset digits-mar --replace-shipped    # the digits MAR
"""


@app.command("train-preset", epilog=TRAIN_EXAMPLES)
def train_preset(
    name: Annotated[PresetName, typer.Argument(help="Preset to train.")] = PresetName.digits,
    out: Annotated[Path | None, typer.Option(help="Folder for the new weights (required unless --replace-shipped).", show_default=False)] = None,
    replace_shipped: Annotated[bool, typer.Option("--replace-shipped", help="Write into the installed preset folder, replacing the weights every later `distill` uses (they are bitwise reproducible only at the same thread count).")] = False,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    quick: Annotated[bool, typer.Option(help="A few steps per model (smoke test), not the shipped quality.")] = False,
) -> None:
    """Train an embedded preset from scratch with fixed seeds (into --out): digits (VAE, classifier and DiT) or
    digits-mar (a tiny MAR on the shipped digits VAE, whose VAE and classifier it reuses)."""
    from ..pipeline import preset_dir

    shipped = preset_dir(name.value)
    if replace_shipped and out is not None:
        raise UserError("--out and --replace-shipped exclude each other: pick where the weights go")
    if out is None and not replace_shipped:
        raise UserError(f"train-preset needs --out DIR; to overwrite the shipped {name.value} preset in {shipped} "
                        "(what every later `distill` uses) pass --replace-shipped instead")
    if out is not None and overlaps(out.expanduser(), shipped):
        raise UserError(f"--out {out} is the shipped preset folder (or inside it, or around it, under another name): "
                        "pass --replace-shipped to overwrite the shipped preset, or choose another --out")
    if name is PresetName.digits_mar:
        from ..presets.train_digits_mar import BASE_PRESET, prepare_out_dir, train_digits_mar as train

        base = preset_dir(BASE_PRESET)
        if out is not None and overlaps(out.expanduser(), base):
            raise UserError(f"--out {out} is the shipped {BASE_PRESET} preset folder (or inside it, or around it), "
                            f"whose VAE and classifier {name.value} reads: choose another --out")
    else:
        from ..presets.train_digits import prepare_out_dir, train_digits as train
    if out is not None:
        prepare_out_dir(out.expanduser())  # refusals (foreign files, not writable) before minutes of training

    target = shipped if replace_shipped else out.expanduser()
    report = train(target, seed=seed, quick=quick, progress=bars_enabled(False))
    print(json.dumps(report, indent=1, default=str))
    print(f"wrote the {name.value} preset to {target}", file=sys.stderr)
