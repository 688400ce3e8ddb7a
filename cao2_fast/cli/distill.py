"""``cao2-fast distill``: the two-stage job, on the digits preset or on real checkpoints."""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import distributed
from ..errors import UserError
from .common import (ENGINE_DIR_DEFAULT, Device, DType, EngineName, RecipeName, Stage2EngineName, make_progress,
                     parse_counts, resolve_device, set_threads)
from .main import app


class Dataset(str, Enum):
    digits = "digits"
    imagenet_1k = "imagenet-1k"
    imagenette = "imagenette"
    imagewoof = "imagewoof"
    imagenet_100 = "imagenet-100"


class SelectionRule(str, Enum):
    confident = "confident"
    el2n = "el2n"
    random = "random"


class Order(str, Enum):
    desc = "desc"
    asc = "asc"


class Label(str, Enum):
    true = "true"
    null = "null"


EXAMPLES = """
Examples:

  cao2-fast distill                  # digits preset -> cao2-out/digits-ipc10

  cao2-fast distill --dit DiT-XL-2-256x256.pt --vae sd-vae-ft-mse/ \\
      --classifier resnet18:resnet18.pth --dataset imagenet-1k --ipc 10

  cao2-fast distill --dit D --vae V --classifier C --classes 1,9,130 \\
      --ipc 1 --dry-run               # the plan only; writes nothing

  cao2-fast distill --engine onnx --engine-dir /scratch/cao2-engines

  torchrun --nproc_per_node 8 -m cao2_fast distill --dit D --vae V \\
      --classifier C --dataset imagenet-1k --ipc 50
"""


MAX_CLASS_IDS = 100_000  # far above any class-conditional DiT's class count; bounds what a typo can build


def parse_classes(text: str) -> list[int]:
    """``1,2,5-9`` or ``@file`` (one id per line) -> class ids. Only ASCII digits count (no ``1_0``, no other
    scripts' digits), a range must not run backwards, and at most ``MAX_CLASS_IDS`` ids are built."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise UserError(f"{path}: no such class list file (expected one class id per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file (expected one class id per line)") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read the class list ({e.strerror or e})") from None
        text = ",".join(line.strip() for line in lines if line.strip())
    bad = UserError(f"--classes {text[:60]!r}: expected comma-separated class ids or ranges, e.g. 1,7,100-109")
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = _RANGE.fullmatch(part)
        if m is None:
            raise bad
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UserError(f"--classes {part!r}: the range runs backwards (write {b}-{a})")
        if len(ids) + (b - a + 1) > MAX_CLASS_IDS:
            raise UserError(f"--classes {text[:60]!r}: more than {MAX_CLASS_IDS} class ids")
        ids.extend(range(a, b + 1))
    if not ids:
        raise UserError("--classes is empty")
    return ids


_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)


MODELS, RECIPE, STAGE1, STAGE2, OUTPUT, RUNTIME = ("Models", "Recipe", "Stage 1: sample and select",
                                                   "Stage 2: optimise latents", "Output", "Engines & runtime")


@app.command(epilog=EXAMPLES)
def distill(
    dataset: Annotated[Dataset | None, typer.Option(metavar="NAME", help="Class list and per-dataset settings: digits, imagenet-1k, imagenette, imagewoof or imagenet-100.", show_default="digits; imagenet-1k with --dit; custom with --classes", rich_help_panel=MODELS)] = None,
    classes: Annotated[str | None, typer.Option(help="Your own class ids: '1,7,100-109' or '@file'.", rich_help_panel=MODELS)] = None,
    dit: Annotated[Path | None, typer.Option(help="DiT checkpoint: original .pt / .safetensors, or a diffusers dir.", show_default="the digits preset's", rich_help_panel=MODELS)] = None,
    vae: Annotated[Path | None, typer.Option(help="diffusers AutoencoderKL directory.", show_default="the digits preset's", rich_help_panel=MODELS)] = None,
    classifier: Annotated[str | None, typer.Option(help="timm NAME[:CHECKPOINT], e.g. resnet18:resnet18.pth.", show_default="the digits preset's", rich_help_panel=MODELS)] = None,
    ipc: Annotated[int, typer.Option(help="Images per class.", rich_help_panel=RECIPE)] = 10,
    recipe: Annotated[RecipeName, typer.Option(help="official: the released code's behaviour; consistent: its quirks fixed.", rich_help_panel=RECIPE)] = RecipeName.official,
    seed: Annotated[int, typer.Option("--seed", help="Master seed; a class's randomness depends on (seed, class id) only.", rich_help_panel=RECIPE)] = 0,
    k: Annotated[int | None, typer.Option("--k", help="Oversampling: K·IPC candidates per class.", show_default="4; 2 for imagenette, imagenet-100, digits", rich_help_panel=STAGE1)] = None,
    selection: Annotated[SelectionRule, typer.Option(help="Which candidates to keep.", rich_help_panel=STAGE1)] = SelectionRule.confident,
    order: Annotated[Order | None, typer.Option(help="Selection order by classifier confidence.", show_default="asc for imagenet-100, else desc", rich_help_panel=STAGE1)] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.", rich_help_panel=STAGE1)] = 2.7,
    sample_steps: Annotated[int, typer.Option(help="Respaced DDPM sampling steps.", rich_help_panel=STAGE1)] = 50,
    stage1_batch: Annotated[int | None, typer.Option(help="Candidates per DiT call (the guided call runs twice this).", show_default="256; digits 4·IPC", rich_help_panel=STAGE1)] = None,
    early_reject: Annotated[str | None, typer.Option("--early-reject", metavar="STEP", help="Early rejection: after STEP sampling steps score every candidate's x0 prediction and let only the best --early-keep per class finish (saves DiT work; may change a few picks). 'S1,S2' checks twice.", show_default="off", rich_help_panel=STAGE1)] = None,
    early_keep: Annotated[str | None, typer.Option("--early-keep", metavar="M", help="Candidates per class that survive --early-reject (IPC..K·IPC); 'M1,M2' for two checks.", rich_help_panel=STAGE1)] = None,
    guidance_interval: Annotated[str | None, typer.Option("--guidance-interval", metavar="LO,HI", help="Guide only the steps whose noise level sigma is in (LO, HI]; the rest run the conditional model alone.", show_default="every step", rich_help_panel=STAGE1)] = None,
    stage2_steps: Annotated[int | None, typer.Option(help="Adam steps per latent.", show_default="100; imagenette official 0", rich_help_panel=STAGE2)] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.", rich_help_panel=STAGE2)] = 6e-4,
    lam: Annotated[float, typer.Option(help="Weight of the L-inf term.", rich_help_panel=STAGE2)] = 10.0,
    t_max: Annotated[int | None, typer.Option(help="Timesteps uniform over {1..t_max}.", show_default="11; imagenet-100 5", rich_help_panel=STAGE2)] = None,
    stage2_label: Annotated[Label | None, typer.Option(help="Condition: the true class or the null class.", show_default="official null, consistent true", rich_help_panel=STAGE2)] = None,
    stage2_batch: Annotated[int, typer.Option(help="Latents optimised together.", rich_help_panel=STAGE2)] = 64,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder.", show_default="cao2-out/DATASET-ipcIPC, plus -consistent for that recipe", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output folder made with a different config.", rich_help_panel=OUTPUT)] = False,
    save_stage1: Annotated[bool, typer.Option("--save-stage1", help="Also write the stage-1 picks (before stage 2) as their own ImageFolder tree beside --out (OUT-stage1, or --stage1-out).", rich_help_panel=OUTPUT)] = False,
    stage1_out: Annotated[Path | None, typer.Option(help="Folder for --save-stage1's tree (implies --save-stage1).", show_default="OUT-stage1 beside OUT", rich_help_panel=OUTPUT)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve and print the config and the plan; write nothing.", rich_help_panel=OUTPUT)] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress report (also CAO2_FAST_NO_PROGRESS=1). Bars are drawn on a terminal only, otherwise a few log lines.", rich_help_panel=OUTPUT)] = False,
    device: Annotated[Device, typer.Option("--device", help="Where to run: auto picks CUDA when present.", rich_help_panel=RUNTIME)] = Device.auto,
    dtype: Annotated[DType, typer.Option(metavar="DTYPE", help="Model compute dtype: float32, bfloat16 or float16.", rich_help_panel=RUNTIME)] = DType.float32,
    engine: Annotated[EngineName, typer.Option("--engine", metavar="NAME", help="Stage-1 engine (DiT sampling, VAE decode, classifier): eager, compile, onnx (ONNX Runtime) or trt (TensorRT).", rich_help_panel=RUNTIME)] = EngineName.eager,
    stage2_engine: Annotated[Stage2EngineName | None, typer.Option("--stage2-engine", help="Stage-2 DiT engine (it needs gradients).", show_default="compile on CUDA, eager on CPU", rich_help_panel=RUNTIME)] = None,
    engine_dir: Annotated[Path | None, typer.Option("--engine-dir", help=f"Engine cache folder (default: {ENGINE_DIR_DEFAULT}).", rich_help_panel=RUNTIME)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (1 is fastest for tiny models on a busy machine).", show_default="torch's", rich_help_panel=RUNTIME)] = None,
    rank_timeout: Annotated[float, typer.Option(help="Seconds a rank waits at a barrier for the others before it stops naming the missing ranks (torchrun).", rich_help_panel=RUNTIME)] = 1800.0,
) -> None:
    """Distill a dataset into IPC synthetic images per class (stage 1: sample + select, stage 2: optimise latents)."""
    from ..engines import check_engines
    from ..pipeline import Distiller

    if ipc < 1:
        raise UserError(f"--ipc must be at least 1 (got {ipc})")
    for name, value in (("--stage1-batch", stage1_batch), ("--stage2-batch", stage2_batch)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1 (got {value})")
    if not rank_timeout > 0:
        raise UserError(f"--rank-timeout must be positive (got {rank_timeout:g})")
    set_threads(threads)
    dev = resolve_device(device)
    check_engines(engine.value, stage2_engine.value if stage2_engine else None, dev, dtype.value)
    state = distributed.join(dev)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    overrides = dict(k=k, selection=selection.value, order=order.value if order else None, guidance_scale=guidance,
                     sample_steps=sample_steps, stage2_steps=stage2_steps, lr=lr, lam=lam, t_max=t_max,
                     stage2_label=stage2_label.value if stage2_label else None, seed=seed, dtype=dtype.value,
                     stage1_batch=stage1_batch, stage2_batch=stage2_batch,
                     early_reject_step=parse_counts("--early-reject", early_reject),
                     early_reject_keep=parse_counts("--early-keep", early_keep),
                     guidance_interval=_interval(guidance_interval))
    overrides = {k_: v for k_, v in overrides.items() if v is not None}
    class_ids = parse_classes(classes) if classes else None
    real = [n for n, v in (("--dit", dit), ("--vae", vae), ("--classifier", classifier)) if v is not None]
    ds = dataset.value if dataset else None
    if real:
        if len(real) < 3:
            missing = sorted({"--dit", "--vae", "--classifier"} - set(real))
            raise UserError(f"real checkpoints need all of --dit, --vae and --classifier (missing {', '.join(missing)})")
        if ds == "digits":
            raise UserError("--dataset digits uses the embedded preset models; drop --dit/--vae/--classifier or pick "
                            "an ImageNet dataset")
        ds = ds or ("custom" if class_ids else "imagenet-1k")
        distiller = Distiller.from_paths(dit, vae, classifier, dataset=ds, ipc=ipc, recipe=recipe.value,
                                         class_ids=class_ids, device=dev, progress=make_progress(no_progress),
                                         **overrides)
    else:
        if ds not in (None, "digits"):
            raise UserError(f"--dataset {ds} needs real checkpoints: --dit, --vae and --classifier")
        distiller = Distiller.from_preset("digits", ipc=ipc, recipe=recipe.value, device=dev,
                                          progress=make_progress(no_progress), class_ids=class_ids, **overrides)
    cfg = distiller.config
    suffix = "" if cfg.recipe.name == "official" else f"-{cfg.recipe.name}"
    out_dir = out or Path("cao2-out") / f"{cfg.dataset}-ipc{cfg.ipc}{suffix}"
    s1_dir = stage1_out or (out_dir.parent / f"{out_dir.name}-stage1" if save_stage1 else None)
    if dry_run:
        if rank == 0:
            _print_plan(distiller, out_dir, world)
        return
    if dev == "cpu":
        from ..cpu import keep_freed_memory

        keep_freed_memory()
    distiller.to(dev)
    distiller.use_engines(engine.value, stage2_engine.value if stage2_engine else None, engine_dir)
    barrier = distributed.BoundedBarrier(rank_timeout) if state and world > 1 else None
    manifest = distiller.run(out_dir, overwrite=overwrite, rank=rank, world_size=world, barrier=barrier,
                             stage1_out=s1_dir,
                             log=(lambda m: print(m, file=sys.stderr)) if rank == 0 else None)
    if manifest is not None:
        s = manifest["summary"]
        done = distiller.last_run.get("distilled", 0)
        if world == 1 and done == 0:
            head = f"{s['classes']} classes already complete in {out_dir}, nothing to do"
        else:
            head = f"wrote {s['images']} images of {s['classes']} classes to {out_dir}"
        print(f"{head} (stage-1 candidate accuracy {_fmt(s['stage1_candidate_accuracy'])}, "
              f"p(class) {_fmt(s['mean_prob_before'])} -> {_fmt(s['mean_prob_after'])})")
        if s1_dir is not None:
            print(f"stage-1 picks (before stage 2) in {s1_dir}")


def _interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval {text!r}: expected LO,HI noise levels, e.g. 0.3,5") from None
    return lo, hi


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _print_plan(distiller, out_dir: Path, world: int) -> None:
    cfg = distiller.config
    dcfg = distiller.dit.cfg
    n_cand = len(cfg.class_ids) * cfg.num_candidates
    n_lat = len(cfg.class_ids) * cfg.ipc
    f = dcfg.flops_per_forward()
    plan = {
        "out": str(out_dir),
        "fingerprint": cfg.fingerprint(),
        "classes": len(cfg.class_ids),
        "candidates": n_cand,
        "latents": n_lat,
        "groups": len(distiller.groups()),
        "ranks": world,
        "dit_tflop_stage1": round(len(cfg.class_ids) * distiller.stage1_forwards() * f / 1e12, 3),
        "dit_tflop_stage2": round(n_lat * cfg.stage2_steps * 2 * f / 1e12, 3),
        "config": cfg.to_json(),
    }
    print(json.dumps(plan, indent=1))
