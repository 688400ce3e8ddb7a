"""``cao2-fast export``: build the stage-1 engines ahead of time into the engine cache.

The models are set up exactly as ``cao2-fast distill`` sets them up for the same options, so a later distill with
the same ``--engine``, ``--dtype``, ``--batch``/``--stage1-batch`` and ``--engine-dir`` loads what this command
built instead of exporting again.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .common import ENGINE_DIR_DEFAULT, Device, DType, PresetName, RecipeName, check_real_models, resolve_device
from .distill import PRESET_OF, Backbone
from .main import app


class ExportEngine(str, Enum):
    onnx = "onnx"
    trt = "trt"


EXAMPLES = """
Examples:

  cao2-fast export --engine onnx           # the digits preset's three models

  cao2-fast export --engine onnx --backbone mar   # digits MAR: 4 models

  cao2-fast export --engine trt --dit DiT-XL-2-256x256.pt \\
      --vae sd-vae-ft-mse/ --classifier resnet18:resnet18.pth \\
      --batch 64 --dtype bfloat16
  (then: cao2-fast distill ... --engine trt --stage1-batch 64)

  cao2-fast export --engine onnx --engine-dir /scratch/cao2-engines --json
"""


MODELS, BUILD = "Models (as distill would set them up)", "What to build"


@app.command(epilog=EXAMPLES)
def export(
    engine: Annotated[ExportEngine, typer.Option(help="ONNX files (run by ONNX Runtime) or TensorRT engines (built from those ONNX files).", rich_help_panel=BUILD)] = ExportEngine.onnx,
    dtype: Annotated[DType, typer.Option(metavar="DTYPE", help="Precision: float32 (both), bfloat16 or float16 (TensorRT).", rich_help_panel=BUILD)] = DType.float32,
    batch: Annotated[int | None, typer.Option("--batch", "--stage1-batch", help="Candidates per stage-1 DiT call, as distill's --stage1-batch (TensorRT profiles are built for it; ONNX files serve any batch).", show_default="distill's", rich_help_panel=BUILD)] = None,
    engine_dir: Annotated[Path | None, typer.Option("--engine-dir", help=f"Engine cache folder (default: {ENGINE_DIR_DEFAULT}).", rich_help_panel=BUILD)] = None,
    device: Annotated[Device, typer.Option("--device", help="Where to build: auto picks CUDA when present.", rich_help_panel=BUILD)] = Device.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per model instead of text.", rich_help_panel=BUILD)] = False,
    preset: Annotated[PresetName | None, typer.Option(help="Embedded preset whose models to export.", show_default="digits without --dit/--vae/--classifier", rich_help_panel=MODELS)] = None,
    backbone: Annotated[Backbone | None, typer.Option(help="Generator family: dit or mar.", show_default="the family of --dit/--mar; dit without either", rich_help_panel=MODELS)] = None,
    mar: Annotated[str | None, typer.Option(help="MAR checkpoint (local): a folder holding checkpoint-last.pth, the file itself, or .safetensors; pair it with --vae kl16.ckpt.", rich_help_panel=MODELS)] = None,
    dit: Annotated[str | None, typer.Option(help="DiT checkpoint: original .pt / .safetensors, a diffusers dir, or a Hugging Face Hub id ORG/NAME[@REVISION] (e.g. facebook/DiT-XL-2-256). A local path that exists wins.", rich_help_panel=MODELS)] = None,
    vae: Annotated[str | None, typer.Option(help="diffusers AutoencoderKL directory or Hub id.", show_default="with --dit, the VAE of a diffusers DiT pipeline", rich_help_panel=MODELS)] = None,
    classifier: Annotated[str | None, typer.Option(help="timm NAME:CHECKPOINT (local weights), a pretrained NAME (resnet18.tv_in1k, from the Hugging Face cache) or random:NAME.", rich_help_panel=MODELS)] = None,
    recipe: Annotated[RecipeName, typer.Option(help="It decides the classifier's input normalisation, part of its graph.", rich_help_panel=MODELS)] = RecipeName.official,
    ipc: Annotated[int, typer.Option(help="Images per class: the digits preset's default batch depends on it.", rich_help_panel=MODELS)] = 10,
) -> None:
    """Export the stage-1 models (the generator's: a DiT, or MAR's encoder/decoder and diffusion head; the VAE
    decoder; the classifier) and build their engines into the engine cache."""
    from ..engines import EngineCache, check_engines
    from ..generators import backbone_of
    from ..pipeline import Distiller

    dev = resolve_device(device)
    check_engines(engine.value, "eager", dev, dtype.value)
    if batch is not None and batch < 1:
        raise UserError(f"--batch must be at least 1 (got {batch})")
    overrides = {"dtype": dtype.value, **({"stage1_batch": batch} if batch is not None else {})}
    family = backbone_of(dit, mar, backbone.value if backbone else None)
    model = dit if family == "dit" else mar
    real = [n for n, v in ((f"--{family}", model), ("--vae", vae), ("--classifier", classifier)) if v is not None]
    if real:
        check_real_models(model, classifier, f"--{family}")
        if preset is not None:
            raise UserError(f"--preset and --{family}/--vae/--classifier exclude each other: pick one set of models")
        distiller = Distiller.from_paths(**{family: model}, vae=vae, classifier=classifier, dataset="custom",
                                         class_ids=[0], ipc=ipc, recipe=recipe.value, **overrides)
    else:
        if preset is not None and family == "mar":
            raise UserError(f"--preset {preset.value} is a DiT preset; --backbone mar exports the digits MAR preset")
        distiller = Distiller.from_preset(PRESET_OF[family] if preset is None else preset.value, ipc=ipc,
                                          recipe=recipe.value, **overrides)
    distiller.to(dev)
    built = distiller.use_engines(engine.value, "eager", engine_dir)
    root = EngineCache(engine_dir).root
    for name, e in built.items():
        if name == "stage2":
            continue
        if as_json:
            print(json.dumps(e.describe()))
        else:
            state = "cached" if e.cache_hit else f"built in {e.build_seconds:.1f} s"
            print(f"{name:<11} {engine.value} {e.precision} {state:<16} {e.artefact}")
    if not as_json:
        print(f"engine cache: {root}")
