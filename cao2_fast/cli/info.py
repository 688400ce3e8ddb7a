"""``cao2-fast info`` (versions, devices, presets) and ``cao2-fast train-preset`` (rebuild the embedded models)."""

from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .common import EngineDirOpt
from .main import app


def gather_info(engine_dir: Path | None = None) -> dict:
    import torch

    from ..engines import EngineCache
    from ..pipeline import preset_dir, versions

    info = {"versions": versions(), "python": platform.python_version()}
    info["devices"] = {
        "cpu_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    info["optional"] = {m: importlib.util.find_spec(m) is not None
                        for m in ("onnxruntime", "tensorrt", "triton", "accelerate")}
    d = preset_dir("digits")
    info["presets"] = {"digits": str(d) if (d / "preset.json").is_file() else "missing"}
    cache = EngineCache(engine_dir)
    info["engines"] = {"dir": str(cache.root), **{
        e["name"]: f"{e.get('kind', '?')} {e.get('model', '?')} {e['bytes'] / 1e6:.1f} MB, {e['state']}"
                   f"{', ' + e['created'] if e.get('created') else ''}" for e in cache.entries()}}
    return info


@app.command(epilog="Examples:\n\n  cao2-fast info\n\n  cao2-fast info --json")
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
         engine_dir: EngineDirOpt = None) -> None:
    """Library versions, devices, optional backends, presets and cached engines."""
    data = gather_info(engine_dir)
    if as_json:
        print(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cao2-fast", show_header=False)
    for section, values in data.items():
        if isinstance(values, dict):
            for k, v in values.items():
                table.add_row(section, k, str(v))
        else:
            table.add_row(section, "", str(values))
    Console().print(table)


@app.command("train-preset", epilog="Examples:\n\n  cao2-fast train-preset digits --out /tmp/digits-preset")
def train_preset(
    name: Annotated[str, typer.Argument(help="Preset to train (digits).")] = "digits",
    out: Annotated[Path | None, typer.Option(help="Where to write the weights (default: the installed preset folder).")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    quick: Annotated[bool, typer.Option(help="A few steps per model (smoke test), not the shipped quality.")] = False,
) -> None:
    """Train the embedded preset's VAE, classifier and DiT from scratch with fixed seeds."""
    if name != "digits":
        raise UserError(f"unknown preset {name!r}: only 'digits' can be trained")
    from ..pipeline import preset_dir
    from ..presets.train_digits import train_digits

    report = train_digits(out or preset_dir("digits"), seed=seed, quick=quick)
    print(json.dumps(report, indent=1, default=str))
