"""``cao2-fast eval``: train students on a distilled set under the soft- or hard-label protocol, test on real images.

Closed choices (--protocol, --dataset, --optimizer, --schedule, --norm) are plain strings checked by the config, not
Enums: a wrong value then goes through the UserError path and prints one line with the valid names, where click's
own Enum check would print the usage block.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError, require_dir
from .common import Device, DeviceOpt, NoProgressOpt, bars_enabled, progress_enabled, resolve_device
from .main import app

EXAMPLES = """
Examples:

  cao2-fast eval --dataset digits --distilled cao2-out/digits-ipc10

  cao2-fast eval --dataset digits --distilled cao2-out/digits-ipc10 \\
      --protocol hard --repeats 1

  cao2-fast eval --distilled out/imagenette-ipc10 --val imagenette/val \\
      --teacher resnet18:imagenette_rn18.pth --student resnet18

  cao2-fast eval --distilled out/woof-ipc50 --val woof/val \\
      --train woof/train --teacher resnet18:woof_rn18.pth --student resnet50

  cao2-fast eval --distilled out/woof-ipc50 --val woof/val --protocol hard \\
      --epochs 300 --no-progress

  cao2-fast eval --distilled out/nette-ipc10 --val nette/val \\
      --teacher resnet18:t.pth --dry-run
"""

OPT = "Training (default: the protocol's published value)"
DATA, MODELS, RUN = "Data", "Protocol, student and teacher", "Run and output"


@app.command("eval", epilog=EXAMPLES)
def eval_command(
    distilled: Annotated[Path | None, typer.Option("--distilled", help="Distilled set: an ImageFolder (DIR/CLASS/IMAGE).", rich_help_panel=DATA)] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Real validation ImageFolder (same class folders); not needed with --dataset digits.", rich_help_panel=DATA)] = None,
    train: Annotated[Path | None, typer.Option("--train", help="Real training ImageFolder: only a few images per class, for the teacher class-order check (default: --val).", rich_help_panel=DATA)] = None,
    protocol: Annotated[str, typer.Option("--protocol", metavar="soft|hard", help="soft: RDED-style teacher KL; hard: IDC-style labels + instance norm.", rich_help_panel=MODELS)] = "soft",
    student: Annotated[str | None, typer.Option("--student", help="timm model trained from scratch (default resnet18; digits: the preset's small ResNet).", rich_help_panel=MODELS)] = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Soft protocol: timm NAME:CHECKPOINT trained on the real data, outputs in sorted folder order (digits: preset classifier).", rich_help_panel=MODELS)] = None,
    teacher_size: Annotated[int | None, typer.Option("--teacher-size", help="Teacher input side (default: --image-size).", rich_help_panel=MODELS)] = None,
    teacher_normalize: Annotated[bool, typer.Option("--teacher-normalize/--teacher-raw", show_default="normalize", help="Normalise teacher input with ImageNet mean/std, or feed [-1, 1] as is.", rich_help_panel=MODELS)] = True,
    dataset: Annotated[str, typer.Option("--dataset", metavar="folder|digits", help="digits: the embedded preset's real val split and teacher, short schedules.", rich_help_panel=DATA)] = "folder",
    repeats: Annotated[int, typer.Option("--repeats", help="Students trained (seeds seed, seed+1, ...); mean ± std over them.", rich_help_panel=MODELS)] = 3,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Soft 300; hard 2000/1500/1000 for IPC ≤10/≤50/more.", rich_help_panel=OPT)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Soft 1e-3 (AdamW); hard 0.01, 0.1 above 100 classes (SGD).", rich_help_panel=OPT)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Soft 50 (IPC ≤10) / 100, doubled for ≥100 classes; hard 64.", rich_help_panel=OPT)] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="Soft 0.01; hard 5e-4.", rich_help_panel=OPT)] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum (0.9).", rich_help_panel=OPT)] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", metavar="adamw|sgd", help="Soft adamw; hard sgd.", rich_help_panel=OPT)] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", metavar="rded-cosine|cosine|step|constant", help="Soft rded-cosine (RDED's quarter cosine); hard step at 2/3, 5/6, gamma 0.2.", rich_help_panel=OPT)] = None,
    gamma: Annotated[float | None, typer.Option("--gamma", help="Step schedule factor (0.2).", rich_help_panel=OPT)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Soft-label KL temperature (20).", rich_help_panel=OPT)] = None,
    t2_scale: Annotated[bool | None, typer.Option("--t2-scale/--no-t2-scale", help="Multiply the KL by T² (RDED does not).", rich_help_panel=OPT)] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Student input side (224; digits 32).", rich_help_panel=OPT)] = None,
    crop_scale_min: Annotated[float | None, typer.Option("--crop-scale-min", help="RandomResizedCrop minimum area fraction (0.5).", rich_help_panel=OPT)] = None,
    crop_scale_max: Annotated[float | None, typer.Option("--crop-scale-max", help="RandomResizedCrop maximum area fraction (1.0).", rich_help_panel=OPT)] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Random horizontal flips (on).", rich_help_panel=OPT)] = None,
    patch_factor: Annotated[int | None, typer.Option("--patch-factor", help="Patch shuffling factor×factor (soft 2; hard 1 = off).", rich_help_panel=OPT)] = None,
    cutmix_beta: Annotated[float | None, typer.Option("--cutmix-beta", help="CutMix Beta(β, β) (1.0).", rich_help_panel=OPT)] = None,
    cutmix_prob: Annotated[float | None, typer.Option("--cutmix-prob", help="Chance a batch is CutMixed (1.0; 0 turns CutMix off).", rich_help_panel=OPT)] = None,
    norm: Annotated[str | None, typer.Option("--norm", metavar="batch|instance", help="Student norm layers (soft batch; hard instance).", rich_help_panel=OPT)] = None,
    output_stride: Annotated[int | None, typer.Option("--output-stride", help="timm ResNet output stride 8/16/32: dilate late stages to keep maps large at small inputs (digits hard: 16).", rich_help_panel=OPT)] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Test every n epochs in the last part of the run (10).", rich_help_panel=OPT)] = None,
    eval_from: Annotated[float | None, typer.Option("--eval-from", help="Start testing after this fraction of the epochs (0.8); the best test is reported.", rich_help_panel=OPT)] = None,
    eval_batch_size: Annotated[int | None, typer.Option("--eval-batch-size", help="Real images per test forward (256).", rich_help_panel=OPT)] = None,
    val_crop_ratio: Annotated[float | None, typer.Option("--val-crop-ratio", help="Real images: resize to size/ratio, centre-crop size (0.875; digits 1).", rich_help_panel=OPT)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first repeat; repeat r uses seed + r.", rich_help_panel=RUN)] = 0,
    device: DeviceOpt = Device.auto,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for training (default: torch's; 1 for digits on CPU).", rich_help_panel=RUN)] = None,
    class_check: Annotated[bool, typer.Option("--class-check/--no-class-check", help="Check the teacher's class order on real images first.", rich_help_panel=MODELS)] = True,
    check_per_class: Annotated[int, typer.Option("--check-per-class", help="Real images per class for the class-order check.", rich_help_panel=MODELS)] = 5,
    out: Annotated[Path | None, typer.Option("--out", help="JSON result file (default: beside the distilled set, NAME-eval-PROTOCOL-STUDENT.json). Never inside the distilled set; an existing file is replaced only if it holds an eval record, a JSON object whose \"kind\" is \"cao2-fast eval record\" (what eval writes).", rich_help_panel=RUN)] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run even if the JSON file already holds this exact evaluation.", rich_help_panel=RUN)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Load the data, check the teacher, print the settings; train nothing.", rich_help_panel=RUN)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON instead of a table.", rich_help_panel=RUN)] = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train students on a distilled ImageFolder and report real top-1 plus a JSON record: per repeat the best top-1
    over the periodic checks on the held-out set (RDED's convention) and the final-epoch top-1, their mean ± sample
    std (ddof 1) over --repeats, and the mean seconds per repeat."""
    from ..eval.api import check_record_path, default_json_path, prepare, reusable, run, write_record

    if distilled is None:
        raise UserError("--distilled DIR is required (the distilled ImageFolder to evaluate)")
    require_dir(distilled, "the distilled set, an ImageFolder tree <dir>/<class>/<image>")
    crop_scale = None
    if crop_scale_min is not None or crop_scale_max is not None:
        crop_scale = (0.5 if crop_scale_min is None else crop_scale_min, 1.0 if crop_scale_max is None else
        crop_scale_max)
    if protocol == "hard" and teacher is not None:
        typer.echo("note: the hard-label protocol does not use --teacher; ignoring it", err=True)
        teacher = None
    from ..models.classifier import check_student, split_spec

    if student is not None:  # a checkpoint, or an hf-hub: name with no network and no cached config, fails here
        student = check_student(student)
    if teacher is not None:
        split_spec(teacher, "teacher")  # a malformed spec fails before any data is read
    dev = resolve_device(device)
    overrides = {
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum,
        "optimizer": optimizer, "schedule": schedule, "gamma": gamma, "temperature": temperature,
        "t2_scale": t2_scale, "image_size": image_size, "crop_scale": crop_scale, "flip": flip,
        "patch_factor": patch_factor, "cutmix_beta": cutmix_beta, "cutmix_prob": cutmix_prob, "norm": norm,
        "output_stride": output_stride, "eval_every": eval_every, "eval_from": eval_from,
        "eval_batch_size": eval_batch_size, "val_crop_ratio": val_crop_ratio,
    }
    if check_per_class < 1:
        raise UserError(f"--check-per-class must be at least 1 (got {check_per_class})")
    if out is not None:  # before any data is read or student trained
        check_record_path(out, distilled)
    job = prepare(distilled, val, protocol, student=student, teacher=teacher, train=train, dataset=dataset,
                  repeats=repeats, seed=seed, device=dev, class_check=class_check, check_per_class=check_per_class,
                  teacher_size=teacher_size, teacher_normalize=teacher_normalize, threads=threads, **overrides)
    path = check_record_path(out or default_json_path(Path(distilled).resolve(), protocol, job.cfg.student),
                             distilled)
    if dry_run:
        _print_plan(job, path)
        return
    old = None if force else reusable(path, job.key)
    if old is not None:
        typer.echo(f"{path}: already holds this evaluation (use --force to run it again)", err=True)
        record = old
        if json.loads(path.read_text()) != json.loads(json.dumps(old)):  # statistics of an older format updated
            write_record(record, path, distilled)
    else:
        record = run(job, progress=bars_enabled(no_progress),
                     log=(lambda m: print(m, file=sys.stderr, flush=True)) if progress_enabled(no_progress) else None)
        write_record(record, path, distilled)
    if as_json:
        print(json.dumps(record, indent=1))
    else:
        _print_result(record, path)


def _print_plan(job, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    r = job.record
    table = Table(title=f"cao2-fast eval --dry-run: {r['protocol']}-label protocol", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("distilled", (f"{r['distilled_dir']} ({r['distilled_images']} images, {r['num_classes']} classes, "
                           f"IPC {r['ipc']})")),
            ("val", f"{r['val_dir']} ({r['val_images']} images)"),
            ("teacher", (r["teacher"] or {}).get("spec", "-")),
            ("class check", "-" if not r["class_check"] else
             f"ok: {100 * r['class_check']['accuracy']:.0f}% agreement on {r['class_check']['images']} images"),
            ("repeats / seeds", f"{r['repeats']} / {r['seeds']}"),
            ("result file", str(path))]
    rows += [(k, str(v)) for k, v in r["hyperparameters"].items()]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _print_result(record: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    hp = record.get("hyperparameters") or {}
    table = Table(title=f"{record['protocol']}-label protocol, student {record['student']}, "
                        f"{record['num_classes']} classes, IPC {record['ipc']}, {record['epochs']} epochs",
                  caption=("best top-1: the best of the periodic checks on the held-out set (every "
                           f"{hp.get('eval_every', '?')} epochs from {hp.get('eval_from', '?')} of the run, and the "
                           "last epoch), the RDED convention; final top-1: after the last epoch; ± is the sample "
                           "std (ddof 1) over the repeats; seconds: per repeat, the mean on the last line"),
                  caption_justify="left")
    for col in ("repeat", "seed", "best top-1 % (RDED)", "at epoch", "final top-1 %", "seconds"):
        table.add_column(col, justify="right")
    for i, seed in enumerate(record["seeds"]):
        table.add_row(str(i + 1), str(seed), f"{record['top1'][i]:.2f}", str(record["best_epoch"][i]),
                      f"{record['final_top1'][i]:.2f}", f"{record['seconds_per_repeat'][i]:.1f}")
    table.add_section()

    def pm(mean, std) -> str:
        return f"{mean:.2f} ± " + ("n/a (one repeat)" if std is None else f"{std:.2f}")

    final_mean = record.get("final_mean")
    table.add_row("mean ± std", "", pm(record["mean"], record.get("std")), "",
                  "" if final_mean is None else pm(final_mean, record.get("final_std")),
                  "" if record.get("seconds_mean") is None else f"{record['seconds_mean']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"record: {path}")
