"""``cao2-fast distill``: the two-stage job, on the digits preset or on real checkpoints."""

from __future__ import annotations

import json
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import distributed
from ..config import FAMILIES
from ..errors import UserError, require_file
from ..fileio import overlaps
from .common import (ENGINE_DIR_DEFAULT, Device, DType, EngineName, RecipeName, Stage2EngineName, check_real_models,
                     make_progress, parse_counts, resolve_device, set_threads)
from .main import app


class Dataset(str, Enum):
    digits = "digits"
    imagenet_1k = "imagenet-1k"
    imagenette = "imagenette"
    imagewoof = "imagewoof"
    imagenet_100 = "imagenet-100"


class EngineBuild(str, Enum):
    auto = "auto"
    never = "never"


class SelectionRule(str, Enum):
    confident = "confident"
    el2n = "el2n"
    random = "random"
    stability = "stability"
    stable_correct = "stable-correct"


class Backbone(str, Enum):
    dit = "dit"
    mar = "mar"


class GuidanceSchedule(str, Enum):
    constant = "constant"
    linear = "linear"


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    dpmpp = "dpmpp"


class Order(str, Enum):
    desc = "desc"
    asc = "asc"


class Label(str, Enum):
    true = "true"
    null = "null"


EXAMPLES = """
Examples:

  cao2-fast distill                  # digits preset -> cao2-out/digits-ipc10

  cao2-fast distill --dit facebook/DiT-XL-2-256 \\
      --classifier resnet18.tv_in1k --dataset imagenet-1k --ipc 10

  cao2-fast distill --dit DiT-XL-2-256x256.pt --vae sd-vae-ft-mse/ \\
      --classifier resnet18:resnet18.pth --dataset imagenet-1k --ipc 10

  cao2-fast distill --backbone mar    # the digits MAR preset

  cao2-fast distill --mar pretrained_models/mar/mar_base --vae kl16.ckpt \\
      --classifier resnet18.tv_in1k --dataset imagenet-1k --ipc 10

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
        path = require_file(text[1:], "a class list file, one class id per line")
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
    dit: Annotated[str | None, typer.Option(help="DiT checkpoint: original .pt / .safetensors, a diffusers dir, or a Hugging Face Hub id ORG/NAME[@REVISION] (e.g. facebook/DiT-XL-2-256, fetched into the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only). A local path that exists wins.", show_default="the digits preset's", rich_help_panel=MODELS)] = None,
    mar: Annotated[str | None, typer.Option(help="MAR checkpoint (local): a folder holding checkpoint-last.pth (its EMA weights are used), the file itself, or .safetensors. Pair it with --vae kl16.ckpt.", rich_help_panel=MODELS)] = None,
    backbone: Annotated[Backbone | None, typer.Option(help="Generator family: dit or mar.", show_default="the family of --dit/--mar; dit without either", rich_help_panel=MODELS)] = None,
    vae: Annotated[str | None, typer.Option(help="The generator's VAE: a diffusers AutoencoderKL directory or Hub id; for MAR also kl16.ckpt (LDM layout).", show_default="the digits preset's; with --dit, the VAE of a diffusers DiT pipeline", rich_help_panel=MODELS)] = None,
    classifier: Annotated[str | None, typer.Option(help="timm NAME:CHECKPOINT (local weights, e.g. resnet18:resnet18.pth), a pretrained NAME (resnet18.tv_in1k, hf-hub:timm/..., from the Hugging Face cache) or random:NAME (random weights, for tests).", show_default="the digits preset's", rich_help_panel=MODELS)] = None,
    ipc: Annotated[int, typer.Option(help="Images per class.", rich_help_panel=RECIPE)] = 10,
    recipe: Annotated[RecipeName, typer.Option(help="official: the released code's behaviour; consistent: its quirks fixed.", rich_help_panel=RECIPE)] = RecipeName.official,
    seed: Annotated[int, typer.Option("--seed", help="Master seed; a class's randomness depends on (seed, class id) only.", rich_help_panel=RECIPE)] = 0,
    k: Annotated[int | None, typer.Option("--k", help="Oversampling: K·IPC candidates per class.", show_default="4; 2 for imagenette, imagenet-100, digits", rich_help_panel=STAGE1)] = None,
    selection: Annotated[SelectionRule | None, typer.Option(help="Which candidates to keep: confident, el2n, random; MAR also stability, stable-correct.", show_default="confident; MAR official stability, consistent stable-correct", rich_help_panel=STAGE1)] = None,
    order: Annotated[Order | None, typer.Option(help="Selection order by classifier confidence.", show_default="asc for imagenet-100, else desc", rich_help_panel=STAGE1)] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.", show_default="2.7; MAR 2.9; a preset's own", rich_help_panel=STAGE1)] = None,
    sampler: Annotated[Sampler | None, typer.Option(help="DiT stage-1 sampler: ddpm (released: the DiT's ancestral sampler, respaced), ddim or dpmpp (diffusers' DDIM and DPM-Solver++ schedulers; stage 2 keeps the 50-step schedule).", show_default="ddpm", rich_help_panel=STAGE1)] = None,
    sample_steps: Annotated[int | None, typer.Option(help="Stage-1 sampling steps: the DDPM respacing (which stage 2's schedule follows, as released), or the ddim/dpmpp steps (MAR: sampling iterations).", show_default="50; MAR 32; a preset's own", rich_help_panel=STAGE1)] = None,
    guidance_schedule: Annotated[GuidanceSchedule | None, typer.Option(help="MAR: linear ramps guidance from 1 as tokens are revealed (released); constant keeps it.", show_default="MAR linear", rich_help_panel=STAGE1)] = None,
    temperature: Annotated[float | None, typer.Option(help="MAR: the token sampler's noise scale.", show_default="MAR 1.0", rich_help_panel=STAGE1)] = None,
    token_steps: Annotated[int | None, typer.Option(help="MAR: diffusion steps per sampled token.", show_default="MAR 100", rich_help_panel=STAGE1)] = None,
    stage1_batch: Annotated[int | None, typer.Option(help="Candidates per DiT call (the guided call runs twice this).", show_default="256; digits 4·IPC", rich_help_panel=STAGE1)] = None,
    early_reject: Annotated[str | None, typer.Option("--early-reject", metavar="STEP", help="Early rejection: after STEP sampling steps score every candidate's x0 prediction and let only the best --early-keep per class finish (saves DiT work; may change a few picks). 'S1,S2' checks twice.", show_default="off", rich_help_panel=STAGE1)] = None,
    early_keep: Annotated[str | None, typer.Option("--early-keep", metavar="M", help="Candidates per class that survive --early-reject (IPC..K·IPC); 'M1,M2' for two checks.", rich_help_panel=STAGE1)] = None,
    guidance_interval: Annotated[str | None, typer.Option("--guidance-interval", metavar="LO,HI", help="Guide only the steps whose noise level sigma is in (LO, HI]; the rest run the conditional model alone.", show_default="every step", rich_help_panel=STAGE1)] = None,
    stage2_steps: Annotated[int | None, typer.Option(help="Adam steps per latent.", show_default="100; imagenette official 0", rich_help_panel=STAGE2)] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.", rich_help_panel=STAGE2)] = 6e-4,
    lam: Annotated[float, typer.Option(help="Weight of the L-inf term.", rich_help_panel=STAGE2)] = 10.0,
    t_max: Annotated[int | None, typer.Option(help="Timesteps uniform over {1..t_max}.", show_default="11; imagenet-100 5", rich_help_panel=STAGE2)] = None,
    stage2_respacing: Annotated[int | None, typer.Option(help="The respaced schedule stage 2's timesteps count in (e.g. 50 to keep stage 2 the exact run's while --sampler ddpm --sample-steps 25 shortens stage 1).", show_default="stage 1's DDPM respacing; 50 with ddim/dpmpp", rich_help_panel=STAGE2)] = None,
    stage2_label: Annotated[Label | None, typer.Option(help="Condition: the true class or the null class.", show_default="official null, consistent true", rich_help_panel=STAGE2)] = None,
    stage2_batch: Annotated[int, typer.Option(help="Latents optimised together.", rich_help_panel=STAGE2)] = 64,
    out: Annotated[str | None, typer.Option("--out", metavar="PATH", help="Output folder.", show_default="cao2-out/DATASET-ipcIPC, plus -consistent for that recipe", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output folder made with a different config.", rich_help_panel=OUTPUT)] = False,
    save_stage1: Annotated[bool, typer.Option("--save-stage1", help="Also write the stage-1 picks (before stage 2) as their own ImageFolder tree beside --out (OUT-stage1, or --stage1-out).", rich_help_panel=OUTPUT)] = False,
    stage1_out: Annotated[str | None, typer.Option(metavar="PATH", help="Folder for --save-stage1's tree (implies --save-stage1).", show_default="OUT-stage1 beside OUT", rich_help_panel=OUTPUT)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve and print the config and the plan; write nothing.", rich_help_panel=OUTPUT)] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress report (also CAO2_FAST_NO_PROGRESS=1). Bars are drawn on a terminal only, otherwise a few log lines.", rich_help_panel=OUTPUT)] = False,
    device: Annotated[Device, typer.Option("--device", help="Where to run: auto picks CUDA when present.", rich_help_panel=RUNTIME)] = Device.auto,
    dtype: Annotated[DType, typer.Option(metavar="DTYPE", help="Model compute dtype: float32, bfloat16 or float16.", rich_help_panel=RUNTIME)] = DType.float32,
    engine: Annotated[EngineName, typer.Option("--engine", metavar="NAME", help="Stage-1 engine (DiT sampling, VAE decode, classifier): eager, compile, onnx (ONNX Runtime) or trt (TensorRT).", rich_help_panel=RUNTIME)] = EngineName.eager,
    stage2_engine: Annotated[Stage2EngineName | None, typer.Option("--stage2-engine", help="Stage-2 DiT engine (it needs gradients).", show_default="compile on CUDA, eager on CPU", rich_help_panel=RUNTIME)] = None,
    engine_dir: Annotated[Path | None, typer.Option("--engine-dir", help=f"Engine cache folder (default: {ENGINE_DIR_DEFAULT}).", rich_help_panel=RUNTIME)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (1 is fastest for tiny models on a busy machine).", show_default="torch's", rich_help_panel=RUNTIME)] = None,
    engine_build: Annotated[EngineBuild, typer.Option("--engine-build", help="auto: export/build a stage-1 engine missing from the engine cache; never: fail on a cache miss instead (offline clusters, engines exported ahead with `cao2-fast export`).", rich_help_panel=RUNTIME)] = EngineBuild.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (folders, fingerprint, summary) as JSON on stdout; with --dry-run the plan is JSON anyway.", rich_help_panel=OUTPUT)] = False,
    rank_timeout: Annotated[float, typer.Option(help="Seconds a rank waits at a barrier for the others before it stops naming the missing ranks (torchrun).", rich_help_panel=RUNTIME)] = 1800.0,
) -> None:
    """Distill a dataset into IPC synthetic images per class (stage 1: sample + select, stage 2: optimise latents)."""
    from .. import output
    from ..engines import check_engines, default_stage2

    set_threads(threads)
    dev = resolve_device(device)
    check_engines(engine.value, stage2_engine.value if stage2_engine else None, dev, dtype.value)
    out_given = output.check_out_path(out) if out is not None else None
    s1_given = output.check_out_path(stage1_out, "--stage1-out") if stage1_out is not None else None
    class_ids = parse_classes(classes) if classes is not None else None
    overrides = dict(k=k, selection=selection.value if selection else None, order=order.value if order else None,
                     guidance_scale=guidance, temperature=temperature, token_steps=token_steps,
                     guidance_schedule=guidance_schedule.value if guidance_schedule else None,
                     sample_steps=sample_steps, stage2_steps=stage2_steps, lr=lr, lam=lam, t_max=t_max,
                     stage2_label=stage2_label.value if stage2_label else None, seed=seed, dtype=dtype.value,
                     stage1_batch=stage1_batch, stage2_batch=stage2_batch,
                     early_reject_step=parse_counts("--early-reject", early_reject),
                     early_reject_keep=parse_counts("--early-keep", early_keep),
                     guidance_interval=_interval(guidance_interval), sampler=sampler.value if sampler else None,
                     stage2_respacing=stage2_respacing)
    state = distributed.join(dev, rank_timeout)  # after every cheap check: bad input never waits on a rendezvous
    rank, world = (state.rank, state.world) if state else (0, 1)
    from ..generators import backbone_of

    family = backbone_of(dit, mar, backbone.value if backbone else None)
    distiller = _distiller(dataset.value if dataset else None, family, dit or mar, vae, classifier, class_ids, ipc,
                           recipe.value, dev, make_progress(no_progress),
                           {k_: v for k_, v in overrides.items() if v is not None})
    out_dir, s1_dir = _folders(distiller.config, out_given, s1_given, save_stage1, engine.value, engine_dir)
    if dry_run:
        if rank == 0:
            _print_plan(distiller, out_dir, rank, world)
        return
    if dev == "cpu":
        from ..cpu import keep_freed_memory

        keep_freed_memory()
    stage2 = stage2_engine.value if stage2_engine else default_stage2(dev)
    if rank == 0:  # a folder that would be refused is refused before any engine is built for it
        distiller.check_folders(out_dir, overwrite, s1_dir, engine=engine.value, stage2_engine=stage2)
    distiller.use_engines(engine.value, stage2, engine_dir, build=engine_build == EngineBuild.auto)
    barrier = distributed.BoundedBarrier(rank_timeout) if state else None
    manifest = distiller.run(out_dir, overwrite=overwrite, rank=rank, world_size=world, barrier=barrier,
                             stage1_out=s1_dir,
                             log=(lambda m: print(m, file=sys.stderr)) if rank == 0 else None)
    if manifest is not None:
        _report(manifest, distiller, out_dir, s1_dir, world, as_json)


PRESET_OF = {"dit": "digits", "mar": "digits-mar"}  # the embedded preset of each backbone


def _distiller(ds, family, model, vae, classifier, class_ids, ipc, recipe, dev, progress, overrides):
    """The Distiller for the models given: real checkpoints (the generator, its VAE, a classifier), or the
    backbone's embedded digits preset."""
    from ..pipeline import Distiller

    option = f"--{family}"
    real = [n for n, v in ((option, model), ("--vae", vae), ("--classifier", classifier)) if v is not None]
    if real:
        check_real_models(model, classifier, option)
        if ds == "digits":
            raise UserError(f"--dataset digits uses the embedded preset models; drop {option}/--vae/--classifier or "
                            "pick an ImageNet dataset")
        ds = ds or ("custom" if class_ids else "imagenet-1k")
        return Distiller.from_paths(**{family: model}, vae=vae, classifier=classifier, dataset=ds, ipc=ipc,
                                    recipe=recipe, class_ids=class_ids, device=dev, progress=progress, **overrides)
    if ds not in (None, "digits"):
        raise UserError(f"--dataset {ds} needs real checkpoints: {option} and --classifier (and --vae unless the "
                        "DiT is a diffusers pipeline holding its VAE)")
    return Distiller.from_preset(PRESET_OF[family], ipc=ipc, recipe=recipe, device=dev, progress=progress,
                                 class_ids=class_ids, **overrides)


def _folders(cfg, out: Path | None, stage1_out: Path | None, save_stage1: bool, engine: str,
             engine_dir: Path | None) -> tuple[Path, Path | None]:
    """The set's folder (named after the config unless given) and the stage-1 tree's, if asked for; the engine
    cache, where stage 1 writes files, must lie outside both."""
    from ..engines import EngineCache

    suffix = "" if cfg.recipe.name == "official" else f"-{cfg.recipe.name}"
    family = "" if cfg.family == FAMILIES[0] else f"-{cfg.family}"  # the first family's folders keep their names
    out = out if out is not None else Path("cao2-out") / f"{cfg.dataset}{family}-ipc{cfg.ipc}{suffix}"
    if stage1_out is None and save_stage1:  # named after the folder itself, also for `--out .`
        whole = Path(os.path.abspath(out))
        stage1_out = whole.parent / f"{whole.name}-stage1"
    cache = EngineCache(engine_dir).root
    for root in (out, stage1_out):
        if root is not None and engine in ("onnx", "trt") and overlaps(cache, root):
            raise UserError(f"{cache}: the engine cache must lie outside the output folder {root} (engine files are "
                            "not part of a distilled set); pass another --engine-dir")
    return out, stage1_out


def _report(manifest: dict, distiller, out_dir: Path, s1_dir: Path | None, world: int, as_json: bool) -> None:
    s = manifest["summary"]
    done = distiller.last_run.get("distilled", 0)
    if as_json:
        print(json.dumps({"out": str(out_dir), "stage1_out": None if s1_dir is None else str(s1_dir),
                          "fingerprint": manifest["config"]["fingerprint"], "distilled_by_this_process": done,
                          "engines": manifest["engines"], "summary": s}, indent=1))
        return
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


def _print_plan(distiller, out_dir: Path, rank: int, world: int) -> None:
    cfg, gen = distiller.config, distiller.generator
    n_cand = len(cfg.class_ids) * cfg.num_candidates
    n_lat = len(cfg.class_ids) * cfg.ipc
    blocks = distiller.blocks()
    plan = {
        "out": str(out_dir),
        "fingerprint": cfg.fingerprint(),
        "generator": gen.family,
        "classes": len(cfg.class_ids),
        "candidates": n_cand,
        "latents": n_lat,
        "groups": len(distiller.groups()),
        "blocks": len(blocks),
        "ranks": world,
        "classes_per_rank": [sum(len(b) for b in blocks[r::world]) for r in range(world)],
        "tflop_stage1": round(len(cfg.class_ids) * gen.stage1_flops(cfg) / 1e12, 3),
        "tflop_stage2": round(n_lat * gen.stage2_flops(cfg) / 1e12, 3),
        "config": cfg.to_json(),
    }
    print(json.dumps(plan, indent=1))
