"""``evaluate``: a distilled set in, top-1 mean ± std over repeats out (the Python side of ``cao2-fast eval``).

Inputs are ImageFolder trees or in-memory sets; ``dataset="digits"`` takes the real held-out split and the teacher from
the embedded digits preset (docs/method.md, the embedded digits preset), and shortens the schedules so that a whole
protocol runs in about a minute on two CPU cores (``DIGITS_SETTINGS``).

The record names its statistics (``statistics``): ``top1`` is, per repeat, the best top-1 over the periodic checks
on the held-out set (RDED's convention), ``final_top1`` the top-1 after the last epoch; ``std`` and ``final_std`` are
sample standard deviations (``std_ddof``: 1; None for one repeat); ``seconds_mean`` is the mean wall time of a
repeat and ``seconds_total`` that of all of them. A record is a JSON object whose ``kind`` is :data:`RECORD_KIND`;
an existing file is replaced only if it holds one (:func:`is_eval_record`), and never inside the distilled set.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fileio import json_bytes, overlaps
from .data import ImageSet, load_image_folder
from .protocols import Protocol, TrainConfig, TrainResult, build_student, default_config, fit_student
from .teacher import ClassOrderReport, check_class_order, check_num_classes, load_teacher

# The digits preset, scaled down so that a whole protocol (3 repeats) on an IPC-10 set takes about a minute on 2 CPU
# cores. Its images are 16×16 (8×8 scans upsampled); crops are resized to 32 (at 16 the soft protocol lost ~15 points).
# The student is timm's ``test_resnet`` (a 4-stage ResNet, 0.4 M parameters): a 50-image step at 32×32 costs ~0.1 s on
# one core against ~0.8 s for ``resnet18``. Soft: 60 epochs instead of 300. Hard: 100 epochs instead of 2000, so the LR
# is the published large-dataset 0.1 rather than 0.01 (at 0.01 an instance-norm student is still near chance after 100
# epochs), and ``output_stride`` 16 keeps the last maps 2×2 at 32 px (instance norm on 1×1 maps is constant).
DIGITS_STUDENT = "test_resnet"
# Digits are not mirror-symmetric (a flipped 2, 3, 4, 7 or 9 is no digit), so neither protocol flips them.
DIGITS_SETTINGS: dict[str, dict] = {
    "soft": {"epochs": 60, "image_size": 32, "eval_every": 5, "val_crop_ratio": 1.0, "flip": False},
    "hard": {"epochs": 100, "image_size": 32, "eval_every": 10, "val_crop_ratio": 1.0, "lr": 0.1, "output_stride": 16,
             "flip": False},
}
# Intra-op CPU threads for the digits preset. Models this small gain little from a second thread, and when anything
# else runs on a 2-core machine two OpenMP threads stall each other: one 60-epoch soft repeat took 15–24 s on one
# thread and 110–160 s on two, on the same busy machine.
DIGITS_CPU_THREADS = 1
DATASETS = ("folder", "digits")
RECORD_KIND = "cao2-fast eval record"
STATISTICS = {
    "top1": "per repeat, the best top-1 (percent) over the periodic checks on the held-out set (every eval_every "
            "epochs from eval_from of the run, and the last epoch): the RDED convention",
    "final_top1": "per repeat, the top-1 (percent) on the held-out set after the last epoch",
    "mean": "mean of top1 over the repeats", "final_mean": "mean of final_top1 over the repeats",
    "std": "sample standard deviation (ddof 1) of top1 over the repeats; null for one repeat",
    "final_std": "sample standard deviation (ddof 1) of final_top1; null for one repeat",
    "seconds_mean": "mean wall seconds of one repeat (training and checks)",
    "seconds_total": "wall seconds of all repeats together",
}


def versions() -> dict:
    import numpy
    import PIL
    import timm

    from .. import __version__

    return {"cao2_fast": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def digits_val() -> ImageSet:
    from ..presets.digits_data import CLASS_NAMES, digits_split

    x, y = digits_split("val")
    return ImageSet(x, y, list(CLASS_NAMES))


def digits_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the digits train split in [0, 1] (the students' input normalisation)."""
    from ..presets.digits_data import digits_split

    x = (digits_split("train")[0] + 1) / 2
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


def digits_teacher(device: str = "cpu") -> tuple[nn.Module, dict]:
    """The preset's classifier as a [−1, 1]-input teacher, and a description of it for the record."""
    from ..models.classifier import load_classifier
    from ..pipeline import preset_dir, read_preset, weights_id

    meta = read_preset("digits")
    d = preset_dir("digits")
    c = meta["classifier"]
    ckpt = d / c.get("weights", "classifier.safetensors")
    teacher = load_classifier(f"{c['model']}:{ckpt}", input_size=c["input_size"], normalize=True,
                              mean=c["mean"], std=c["std"], num_classes=len(meta["class_names"]), device=device)
    ident = weights_id(ckpt)
    ident["path"] = f"<preset digits>/{ckpt.name}"
    return teacher, {"spec": f"{c['model']}:<preset digits>", "model": c["model"], "input_size": c["input_size"],
                     "weights": ident}


def _as_imageset(obj, what: str, **load) -> ImageSet:
    if isinstance(obj, ImageSet):
        return obj
    if isinstance(obj, (str, Path)):
        return load_image_folder(obj, what=what, **load)
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        images, labels = obj[0], obj[1]
        names = list(obj[2]) if len(obj) == 3 else [str(i) for i in range(int(torch.as_tensor(labels).max()) + 1)]
        return ImageSet(images, labels, names)
    raise UserError(f"{what}: expected a folder path, an ImageSet or (images, labels[, class_names])")


def _fingerprint(s: ImageSet) -> str:
    h = hashlib.sha256()
    if s.root is not None:
        for p in sorted(s.root.rglob("*")):
            if p.is_file() and p.parent != s.root:
                st = p.stat()
                h.update(f"{p.relative_to(s.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        h.update(s.images.contiguous().numpy().tobytes())
        h.update(s.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def default_json_path(distilled_root: Path, protocol: str, student: str) -> Path:
    """``<parent>/<name>-eval-<protocol>-<student>.json``: beside the distilled folder, never inside it, so the folder
    stays a clean ImageFolder; one file per protocol and student."""
    safe = student.replace("/", "_").replace(":", "_")
    return distilled_root.parent / f"{distilled_root.name}-eval-{protocol}-{safe}.json"


@dataclass
class EvalJob:
    """Everything ``run`` needs, resolved and loaded; ``record`` is the JSON record without the results."""

    cfg: TrainConfig
    distilled: ImageSet
    val: ImageSet
    teacher: nn.Module | None
    repeats: int
    seeds: list[int]
    device: str
    record: dict = field(default_factory=dict)
    class_report: ClassOrderReport | None = None
    threads: int | None = None

    @property
    def key(self) -> str:
        return self.record["key"]


def prepare(distilled, val=None, protocol: str = "soft", *, student: str | None = None, teacher=None, train=None,
            dataset: str = "folder", repeats: int = 3, seed: int = 0, device: str = "cpu", class_check: bool = True,
            check_per_class: int = 5, teacher_size: int | None = None, teacher_normalize: bool = True,
            teacher_mean=None, teacher_std=None, threads: int | None = None, **overrides) -> EvalJob:
    """Load and check everything, resolve the training config; train nothing. Arguments as for ``evaluate``."""
    if protocol not in {p.value for p in Protocol}:
        raise UserError(f"protocol {protocol!r}: expected one of {', '.join(p.value for p in Protocol)}")
    if dataset not in DATASETS:
        raise UserError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if repeats < 1:
        raise UserError(f"repeats must be at least 1 (got {repeats})")
    digits = dataset == "digits"
    soft = protocol == Protocol.soft.value

    ds = _as_imageset(distilled, "the distilled set (an ImageFolder tree <dir>/<class>/<image>)")
    k = ds.num_classes
    ipc = max(ds.per_class_counts())
    settings = dict(DIGITS_SETTINGS[protocol]) if digits else {}
    if digits:
        mean, std = digits_norm()
        settings.update(mean=mean, std=std)
    settings.update({key: v for key, v in overrides.items() if v is not None})
    settings["student"] = student or (DIGITS_STUDENT if digits else "resnet18")
    settings["seed"] = seed
    cfg = default_config(protocol, ipc, k, **settings)
    build_student(cfg, k)  # an unknown model, or instance norm it cannot take, fails here rather than after loading

    if val is None:
        if not digits:
            raise UserError("no real validation set: give --val DIR (an ImageFolder of real images), or --dataset digits")
        vs = digits_val()
    else:
        vs = _as_imageset(val, "the real validation set (an ImageFolder tree <dir>/<class>/<image>)",
                          size=cfg.image_size, crop_ratio=cfg.val_crop_ratio)
    if ds.class_names != vs.class_names:
        missing = [c for c in vs.class_names if c not in ds.class_names]
        extra = [c for c in ds.class_names if c not in vs.class_names]
        detail = (f"missing in the distilled set: {missing[:5]}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"not in the val set: {extra[:5]}" if extra else "")
        raise UserError(f"class folders differ between the distilled set ({k}) and the val set "
                        f"({vs.num_classes}): {detail or 'same names, different order'}")

    teacher_info: dict | None = None
    tmodel: nn.Module | None = None
    report = None
    if soft:
        if teacher is None and digits:
            tmodel, teacher_info = digits_teacher(device)
        elif teacher is None:
            raise UserError("the soft-label protocol needs a teacher: --teacher NAME:CHECKPOINT (a classifier trained "
                            "on the real dataset, outputs in sorted class-folder order)")
        elif isinstance(teacher, str):
            from ..models.classifier import IMAGENET_MEAN, IMAGENET_STD, parse_spec
            from ..pipeline import weights_id

            size = teacher_size or cfg.image_size
            tmodel = load_teacher(teacher, k, size, teacher_normalize, teacher_mean or IMAGENET_MEAN,
                                  teacher_std or IMAGENET_STD, device)
            name, ckpt = parse_spec(teacher)
            teacher_info = {"spec": teacher, "model": name, "input_size": size, "normalize": teacher_normalize,
                            "weights": weights_id(Path(ckpt)) if ckpt else None}
        else:
            tmodel = teacher.to(device).eval()
            teacher_info = {"spec": type(teacher).__name__, "model": type(getattr(teacher, "model", teacher)).__name__}
        check_num_classes(tmodel, k)
        if class_check:
            if train is not None:
                check = _as_imageset(train, "the real training set (an ImageFolder tree <dir>/<class>/<image>)",
                                     size=cfg.image_size, crop_ratio=cfg.val_crop_ratio, per_class=check_per_class)
                source = "train"
                if check.class_names != ds.class_names:
                    raise UserError(f"class folders differ between the distilled set and --train "
                                    f"({k} vs {check.num_classes})")
            else:
                check, source = vs, "val"
            check = check.take_per_class(check_per_class)
            report = check_class_order(tmodel, check.images, check.labels, ds.class_names, device, source)

    if threads is None and digits and not device.startswith("cuda"):
        threads = DIGITS_CPU_THREADS
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1 (got {threads})")
    seeds = [seed + r for r in range(repeats)]
    record = {
        "protocol": protocol, "student": cfg.student, "teacher": teacher_info, "dataset": dataset,
        "num_classes": k, "ipc": ipc, "distilled_images": len(ds.images), "val_images": len(vs.images),
        "distilled_dir": str(ds.root.resolve()) if ds.root else None,
        "val_dir": str(vs.root.resolve()) if vs.root else ("<preset digits: val split>" if digits else None),
        "train_dir": str(Path(train).resolve()) if isinstance(train, (str, Path)) else None,
        "repeats": repeats, "seeds": seeds, "epochs": cfg.epochs,
        "hyperparameters": {k_: v for k_, v in cfg.hyperparameters().items() if k_ != "seed"},
        "class_check": report.as_dict() if report else None,
    }
    key_src = {k_: record[k_] for k_ in ("protocol", "student", "teacher", "dataset", "repeats", "seeds",
                                          "hyperparameters", "val_dir", "val_images")}
    key_src["distilled"] = _fingerprint(ds)
    record["key"] = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return EvalJob(cfg, ds, vs, tmodel, repeats, seeds, device, record, report, threads)


def run(job: EvalJob, progress: bool = False, log=None) -> dict:
    """Train ``job.repeats`` students and return the full record (``top1`` per repeat, ``mean``, ``std``; ``std``
    is None for a single repeat, where there is no spread to report). ``log`` gets one line per finished repeat."""
    from dataclasses import replace

    results: list[TrainResult] = []
    t0 = time.perf_counter()
    saved_threads = torch.get_num_threads()
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    try:
        for r, s in enumerate(job.seeds):
            cfg = replace(job.cfg, seed=s)
            results.append(fit_student(job.distilled.images, job.distilled.labels, job.teacher, job.val.images,
                                       job.val.labels, cfg, device=job.device, num_classes=job.distilled.num_classes,
                                       progress=progress, desc=f"{cfg.protocol} {r + 1}/{job.repeats}"))
            if log is not None:
                res = results[-1]
                log(f"{cfg.protocol}-label repeat {r + 1}/{job.repeats} (seed {s}): best top-1 {res.best_top1:.2f} % "
                    f"at epoch {res.best_epoch}, {res.seconds:.0f} s")
    finally:
        torch.set_num_threads(saved_threads)
    record = dict(job.record)
    record.update({
        "kind": RECORD_KIND,
        "top1": [res.best_top1 for res in results], "final_top1": [res.final_top1 for res in results],
        "best_epoch": [res.best_epoch for res in results],
        "evals": [res.evals for res in results], "seconds_per_repeat": [round(res.seconds, 2) for res in results],
        "seconds_total": round(time.perf_counter() - t0, 2),
        "device": torch.cuda.get_device_name(job.device) if job.device.startswith("cuda") else job.device,
        "cpu_threads": job.threads or saved_threads,
        "versions": versions(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "top1_unit": "percent",
    })
    return summarise(record)


def summarise(record: dict) -> dict:
    """Fill in ``record``'s statistics from its per-repeat lists (see :data:`STATISTICS`), in place, and return
    it. A record written before these fields existed (population std, a ``seconds`` total) is brought up to date."""
    top1, final = record["top1"], record.get("final_top1") or []
    per = record.get("seconds_per_repeat") or []
    if "seconds" in record and "seconds_total" not in record:
        record["seconds_total"] = record.pop("seconds")
    record.update({
        "kind": RECORD_KIND,
        "mean": statistics.fmean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else None, "std_ddof": 1,
        "final_mean": statistics.fmean(final) if final else None,
        "final_std": statistics.stdev(final) if len(final) > 1 else None,
        "seconds_mean": round(statistics.fmean(per), 2) if per else None,
        "statistics": STATISTICS,
    })
    return record


def is_eval_record(obj) -> bool:
    """Whether ``obj`` (parsed JSON) is a record ``eval`` wrote: an object whose ``kind`` is :data:`RECORD_KIND`,
    or one from before that field (``key``, ``protocol``, ``top1``, ``seeds``, ``hyperparameters`` and the cao2_fast
    version)."""
    if not isinstance(obj, dict):
        return False
    if obj.get("kind") == RECORD_KIND:
        return True
    return ({"key", "protocol", "top1", "seeds", "hyperparameters"} <= set(obj)
            and isinstance(obj.get("versions"), dict) and "cao2_fast" in obj["versions"])


def check_record_path(path: Path, distilled_root: Path | None = None) -> Path:
    """Refuse (one-line ``UserError``) a record path that would overwrite what ``eval`` did not write or land inside
    the distilled set: ``path`` must not lie in ``distilled_root`` (compared resolved, and by device and inode of
    each existing folder on the way, so ``..``, links and bind mounts do not get around it), must not be a link or a
    folder, and an existing file there must hold an eval record (:func:`is_eval_record`). Returns ``path``."""
    path = Path(path).expanduser()
    if distilled_root is not None and overlaps(path, Path(distilled_root).expanduser()):
        raise UserError(f"{path}: the eval record must lie outside the distilled set {distilled_root} (it must stay "
                        "an ImageFolder); choose another --out")
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link; eval writes its record only to a plain file (nothing is "
                        "overwritten)")
    if path.exists():
        if path.is_dir():
            raise UserError(f"{path}: is a folder; --out takes the path of a JSON file")
        if not is_eval_record(read_record(path)):
            raise UserError(f"{path}: exists and is not an eval record (a JSON object with \"kind\": "
                            f"\"{RECORD_KIND}\"); eval replaces only its own records: move it away or choose "
                            "another --out")
    return path


def write_record(record: dict, path: Path, distilled_root: Path | None = None) -> Path:
    """Write atomically (temp file beside it, then rename), after :func:`check_record_path` once more: the file may
    have appeared while the students trained."""
    from ..fileio import atomic_write

    check_record_path(path, distilled_root)
    try:
        atomic_write(Path(path), json_bytes(record, status_key="status") + b"\n")
    except OSError as e:
        raise UserError(f"{path}: cannot write the eval record ({e.strerror or e})") from None
    return path


def read_record(path: Path) -> dict | None:
    try:
        if Path(path).stat().st_size > 64 << 20:  # no record is this large: not ours, and not worth reading
            return None
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def reusable(path: Path, key: str) -> dict | None:
    """The record at ``path`` if it is an eval record of this exact evaluation (same ``key``: data, teacher,
    settings, seeds), with its statistics brought up to date, else None."""
    old = read_record(path)
    if not (is_eval_record(old) and old.get("key") == key and old.get("top1")):
        return None
    try:
        return summarise(old)
    except (TypeError, ValueError, KeyError):  # per-repeat lists damaged by hand: evaluate again
        return None


def evaluate(distilled, val=None, protocol: str = "soft", *, student: str | None = None, teacher=None, train=None,
             dataset: str = "folder", repeats: int = 3, seed: int = 0, device: str = "cpu", progress: bool = False,
             class_check: bool = True, check_per_class: int = 5, teacher_size: int | None = None,
             teacher_normalize: bool = True, teacher_mean=None, teacher_std=None, out: str | Path | None = None,
             force: bool = False, threads: int | None = None, **overrides) -> dict:
    """Train ``repeats`` students on ``distilled`` under ``protocol`` ("soft" | "hard"), test on ``val``, and return
    the record: per repeat the best top-1 over the periodic checks on the held-out set (percent; RDED's convention)
    and the final-epoch top-1, their means and sample stds (ddof 1), every hyper-parameter, seeds, versions.

    distilled, val, train: ImageFolder paths, ``ImageSet``s or ``(images, labels[, class_names])`` with images uint8
        or float in [−1, 1]. Real folders are read at ``image_size`` (resize + centre crop, ``val_crop_ratio``).
        ``train`` (optional) only supplies the real images for the teacher's class-order check (default: ``val``).
    teacher: ``NAME:CHECKPOINT`` (timm), or a module mapping [−1, 1] images to logits; soft protocol only.
        ``teacher_size`` (default ``image_size``), ``teacher_normalize``/``teacher_mean``/``teacher_std`` describe
        its input transform (ImageNet statistics by default).
    dataset: "folder", or "digits" (preset val split and teacher, ``DIGITS_SETTINGS``, ``DIGITS_STUDENT``).
    class_check / check_per_class: run the teacher on that many real images per class first and refuse a teacher
        whose output order does not match the class folders.
    threads: CPU intra-op threads while training (default: torch's, or ``DIGITS_CPU_THREADS`` for digits on CPU).
    out: write the record there as JSON; if it already holds a record with the same key (same data, teacher,
        settings and seeds) that record is returned without training, unless ``force``. An existing file that is
        not an eval record, and a path inside the distilled set, are refused before anything trains.
    overrides: any ``TrainConfig`` field (epochs, lr, batch_size, temperature, image_size, ...).
    """
    job = prepare(distilled, val, protocol, student=student, teacher=teacher, train=train, dataset=dataset,
                  repeats=repeats, seed=seed, device=device, class_check=class_check, check_per_class=check_per_class,
                  teacher_size=teacher_size, teacher_normalize=teacher_normalize, teacher_mean=teacher_mean,
                  teacher_std=teacher_std, threads=threads, **overrides)
    root = job.distilled.root
    if out is not None:
        check_record_path(Path(out), root)
        old = None if force else reusable(Path(out), job.key)
        if old is not None:
            return old
    record = run(job, progress)
    if out is not None:
        write_record(record, Path(out), root)
    return record
