"""The soft-label teacher: loading it, and checking that its output order matches the dataset's class folders.

A subset teacher (ImageNette, ImageWoof, ImageNet-100) is trained with some class order; the ImageFolder order is the
sorted folder names. When the two differ, every soft label is wrong and the student learns nothing useful, with no error
anywhere (a known trap with subset teachers, docs/evaluation.md). The check runs the teacher on a few real images per
class and compares its argmax with the folder labels: it must agree clearly above chance, and no other one-to-one
mapping of folders to teacher outputs may fit the images clearly better.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, load_classifier
from .data import to_float


def load_teacher(spec: str, num_classes: int, input_size: int, normalize: bool = True, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, device: str = "cpu") -> Classifier:
    """A frozen ``Classifier`` (images in [−1, 1]) with ``num_classes`` outputs: ``NAME:CHECKPOINT`` (trained
    weights on disk), ``NAME`` (timm's pretrained weights, whose head must already have ``num_classes`` outputs) or
    ``random:NAME`` (random weights, for tests and timing)."""
    teacher = load_classifier(spec, input_size=input_size, normalize=normalize, num_classes=num_classes, mean=mean,
                              std=std, device=device, what="teacher")
    check_num_classes(teacher, num_classes)
    return teacher


def check_num_classes(teacher: nn.Module, num_classes: int) -> None:
    n = getattr(teacher, "num_classes", None)
    if n is not None and int(n) != num_classes:
        raise UserError(f"the teacher has {n} output classes, but the dataset has {num_classes} class folders")


@dataclass
class ClassOrderReport:
    """The teacher against the folder labels on ``n_images`` real images.

    accuracy: fraction whose teacher argmax is the folder's index. best_accuracy: the same under ``mapping``, the
    one-to-one folder -> teacher-output assignment that fits the images best (Hungarian method on ``confusion``,
    rows = folder class, columns = teacher argmax). mismatches: (folder class, teacher class, images of the folder
    predicted as that teacher class, images of the folder) for folders whose best match is another output and that
    output takes most of their images. threshold: the accuracy needed, max(2 / classes, 0.3).
    """

    accuracy: float
    best_accuracy: float
    mapping: list[int]
    confusion: torch.Tensor
    n_images: int
    threshold: float
    mismatches: list[tuple[int, int, int, int]]

    @property
    def ok(self) -> bool:
        return self.accuracy >= self.threshold and not self.mismatches

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "best_permutation_accuracy": self.best_accuracy, "images": self.n_images,
                "threshold": self.threshold, "ok": self.ok,
                "mismatches": [{"folder": f, "teacher": t, "hits": h, "images": n} for f, t, h, n in self.mismatches]}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device: str = "cpu", batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size].to(device))
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext():
            out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def class_order_report(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       device: str = "cpu") -> ClassOrderReport:
    """Compare ``teacher``'s argmax on real ``images`` with their folder ``labels`` (see ``ClassOrderReport``)."""
    from scipy.optimize import linear_sum_assignment

    check_num_classes(teacher, num_classes)
    pred = predict(teacher, images, device)
    labels = labels.cpu()
    k = num_classes
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    n = len(labels)
    acc = float(confusion.diag().sum()) / max(n, 1)
    rows, cols = linear_sum_assignment(confusion.numpy(), maximize=True)
    mapping = [int(c) for _, c in sorted(zip(rows, cols))]
    best = float(sum(confusion[i, mapping[i]] for i in range(k))) / max(n, 1)
    per_class = confusion.sum(1)
    mismatches = []
    for i, t in enumerate(mapping):
        hits, own, total = int(confusion[i, t]), int(confusion[i, i]), int(per_class[i])
        if t != i and hits > own and 2 * hits >= total:
            mismatches.append((i, t, hits, total))
    return ClassOrderReport(acc, best, mapping, confusion, n, max(2.0 / k, 0.3), mismatches)


def check_class_order(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                      device: str = "cpu", source: str = "real") -> ClassOrderReport:
    """``class_order_report``, raising a one-line ``UserError`` that names the mismatch when it fails."""
    report = class_order_report(teacher, images, labels, len(class_names), device)
    if report.ok:
        return report
    parts = []
    if report.mismatches:
        shown = [f"folder {class_names[f]!r} (#{f}) is predicted as teacher class {t} ({h}/{n} images)"
                 for f, t, h, n in report.mismatches[:4]]
        more = len(report.mismatches) - len(shown)
        parts.append(", ".join(shown) + (f" and {more} more folders" if more > 0 else ""))
    parts.append(f"the teacher agrees with the folder labels on {100 * report.accuracy:.0f}% of {report.n_images} "
                 f"{source} images (needs ≥ {100 * report.threshold:.0f}%; the best reordering would give "
                 f"{100 * report.best_accuracy:.0f}%)")
    head = "teacher class order does not match the dataset" if report.mismatches or \
        report.best_accuracy >= report.threshold else "the teacher does not recognise the dataset's classes"
    raise UserError(f"{head}: {'; '.join(parts)}; reorder the teacher's outputs or rename the folders so that "
                    f"sorted folder order is the teacher's order, or skip the check with --no-class-check")
