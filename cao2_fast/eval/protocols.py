"""The two evaluation protocols (docs/evaluation.md): train a student on a distilled set, test it on real images.

* soft-label (RDED-style, the paper's headline numbers): the student learns the teacher's outputs on the same
  augmented batch (patch shuffle → random resized crop → flip → CutMix) through a KL divergence at temperature T;
  AdamW, RDED's cosine schedule, the distilled labels are not used.
* hard-label (IDC/Minimax style): a ResNet with instance norm learns the folder labels under CutMix (the mixed
  target is ``lam · y + (1 − lam) · y_partner`` with ``lam`` the pixel fraction kept); SGD with steps at 2/3 and 5/6.

Both test top-1 on the real set every ``eval_every`` epochs once ``eval_from`` of the run has passed, and at the
last epoch, and report the best of those (as the released RDED/IDC code does) along with the last.

The core, ``fit_student`` / ``train_student``, works on in-memory tensors; ``cao2_fast.eval.api.evaluate`` adds folders,
the digits preset, repeats and the JSON record.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from .data import cutmix, mixed_targets, patch_shuffle, random_resized_crop, to_float


class Protocol(str, Enum):
    soft = "soft"
    hard = "hard"


SCHEDULES = ("rded-cosine", "cosine", "step", "constant")
NORMS = ("batch", "instance")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Everything that decides a student's training run. ``default_config`` fills in the published values (see
    docs/evaluation.md).

    protocol: "soft" (teacher's outputs, KL at ``temperature``) or "hard" (folder labels, cross-entropy).
    student: timm model name, built from scratch with ``num_classes`` outputs.
    norm: "batch" keeps the model's BatchNorm; "instance" swaps every norm layer for instance norm with an affine
        (``GroupNorm(C, C)``, what IDC calls instance norm) — the hard-label protocol's ResNet-18. Instance norm
        over a 1×1 map outputs its bias whatever the input, so a student whose last stage is 1×1 at
        ``image_size`` is refused (ResNet-18 needs ≥ 64 px, or ``output_stride``).
    output_stride: timm ResNets' ``output_stride`` (8, 16 or 32 = the usual): later stages dilate instead of
        striding, which keeps feature maps larger at small inputs (the digits preset's hard protocol uses 8).
    epochs: passes over the distilled set. Few images ⇒ few steps per epoch, hence the long schedules.
    batch_size: distilled images per step; a last batch of one image is merged into the previous one (BatchNorm).
    optimizer / lr / weight_decay / momentum: "adamw" (betas 0.9, 0.999) or "sgd" (``momentum``).
    decay_all: weight decay on every parameter (IDC) instead of only on ≥2-D weights (RDED leaves biases and norm
        parameters undecayed).
    schedule: per-epoch LR factor. "rded-cosine" is the released RDED code's ``0.5·(1 + cos(π·e / (2·epochs)))``, a
        quarter period that ends at half the LR; "cosine" the full half period to 0; "step" multiplies by ``gamma``
        at each fraction in ``milestones``; "constant".
    temperature: softmax temperature of the soft-label KL. t2_scale: multiply that KL by T² (Hinton's scaling).
        RDED does not, so the default is False; with T = 20 the scaled loss is 400× larger, which with AdamW
        changes only the balance against weight decay.
    image_size: the student's input side; crops are resized to it, real images are read at it.
    crop_scale / crop_ratio: RandomResizedCrop's area fraction and aspect-ratio ranges. flip: random mirroring.
    patch_factor: RDED patch shuffling with factor×factor patches (2 for soft); below 2 turns it off (hard).
    cutmix_beta / cutmix_prob: CutMix's Beta(β, β) and the chance a batch is mixed.
    eval_every / eval_from: test every n epochs once this fraction of the run has passed (plus the last epoch).
    eval_batch_size: real images per forward when testing.
    val_crop_ratio: how real images are read from a folder: shorter side to ``image_size / val_crop_ratio``, then
        the centre crop (0.875 = resize 256, crop 224); 1.0 keeps the whole image.
    mean / std: the student's input normalisation (images in [0, 1]).
    seed: model initialisation and every augmentation draw.
    """

    protocol: str = "soft"
    student: str = "resnet18"
    norm: str = "batch"
    output_stride: int | None = None
    epochs: int = 300
    batch_size: int = 50
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    decay_all: bool = False
    schedule: str = "rded-cosine"
    milestones: tuple[float, ...] = (2 / 3, 5 / 6)
    gamma: float = 0.2
    temperature: float = 20.0
    t2_scale: bool = False
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    patch_factor: int = 2
    cutmix_beta: float = 1.0
    cutmix_prob: float = 1.0
    eval_every: int = 10
    eval_from: float = 0.8
    eval_batch_size: int = 256
    val_crop_ratio: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    seed: int = 0

    def validate(self) -> TrainConfig:
        def bad(msg: str):
            raise UserError(msg)

        if self.protocol not in {p.value for p in Protocol}:
            bad(f"protocol {self.protocol!r}: expected one of {', '.join(p.value for p in Protocol)}")
        if self.norm not in NORMS:
            bad(f"norm {self.norm!r}: expected one of {', '.join(NORMS)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.output_stride not in (None, 8, 16, 32):
            bad(f"output-stride must be 8, 16 or 32 (got {self.output_stride})")
        for name in ("epochs", "batch_size", "image_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("lr", "temperature", "cutmix_beta", "val_crop_ratio"):
            if not getattr(self, name) > 0:
                bad(f"{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.weight_decay < 0:
            bad(f"weight-decay must be ≥ 0 (got {self.weight_decay})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            bad(f"crop scale ({lo}, {hi}): need 0 < min ≤ max ≤ 1")
        if not 0 <= self.cutmix_prob <= 1:
            bad(f"cutmix-prob must be in [0, 1] (got {self.cutmix_prob})")
        if not 0 <= self.eval_from <= 1:
            bad(f"eval-from must be in [0, 1] (got {self.eval_from})")
        if self.val_crop_ratio > 1:
            bad(f"val-crop-ratio must be ≤ 1 (got {self.val_crop_ratio})")
        return self

    def hyperparameters(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def default_config(protocol: str, ipc: int, num_classes: int, **overrides) -> TrainConfig:
    """The published defaults (docs/evaluation.md) for ``protocol`` at ``ipc`` images per class and ``num_classes``
    classes, then ``overrides`` (any ``TrainConfig`` field; None values are ignored)."""
    if protocol == Protocol.soft.value:
        batch = 50 if ipc <= 10 else 100
        cfg = TrainConfig(protocol="soft", batch_size=batch * (2 if num_classes >= 100 else 1))
    elif protocol == Protocol.hard.value:
        cfg = TrainConfig(protocol="hard", norm="instance", epochs=2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000,
                          batch_size=64, optimizer="sgd", lr=0.1 if num_classes > 100 else 0.01, weight_decay=5e-4,
                          momentum=0.9, decay_all=True, schedule="step", patch_factor=1)
    else:
        raise UserError(f"protocol {protocol!r}: expected one of {', '.join(p.value for p in Protocol)}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"unknown training setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    return replace(cfg, **overrides).validate()


# ---------------------------------------------------------------------------------------------------------------
# student


class InstanceNorm(nn.GroupNorm):
    """Instance norm with a per-channel affine, as IDC builds it: ``GroupNorm(C, C)``. Unlike ``nn.InstanceNorm2d``
    it has no running statistics, so train and eval behave the same, and it accepts the ``norm_layer(C)`` call that
    timm ResNets make."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__(num_channels, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)


def build_student(cfg: TrainConfig, num_classes: int) -> Classifier:
    """A fresh timm ``cfg.student`` with ``num_classes`` outputs, inside the same input wrapper as the teacher:
    it takes images in [−1, 1], resizes to ``cfg.image_size`` if needed, and normalises with ``cfg.mean/std``."""
    import timm

    from ..models.classifier import check_student

    name = check_student(cfg.student)  # a checkpoint or an unreachable hf-hub config is one line, before building
    kwargs = {"norm_layer": InstanceNorm} if cfg.norm == "instance" else {}
    if cfg.output_stride is not None:
        kwargs["output_stride"] = cfg.output_stride
    try:
        model = timm.create_model(name.removeprefix("random:"), pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        raise UserError(f"student {cfg.student!r}: {str(e).splitlines()[0]}") from None
    except TypeError:
        raise UserError(f"student {cfg.student!r}: timm cannot build it with "
                        f"{' and '.join(f'{k}={v.__name__ if isinstance(v, type) else v}' for k, v in kwargs.items())}"
                        f"; use a timm ResNet (e.g. resnet18)") from None
    if cfg.norm == "instance" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError(f"student {cfg.student!r} keeps BatchNorm layers with norm_layer=instance; use a timm ResNet "
                        f"(e.g. resnet18) or --norm batch")
    if cfg.norm == "instance" and hasattr(model, "forward_features"):
        try:
            with torch.no_grad():
                side = model.eval().forward_features(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[-1]
        except ValueError:  # GroupNorm refuses a single value per group
            side = 1
        model.train()
        if side <= 1:
            raise UserError(f"student {cfg.student!r} at {cfg.image_size} px ends on 1×1 feature maps, where instance "
                            f"norm erases every feature: raise --image-size, set --output-stride 8, or use --norm batch")
    return Classifier(model, cfg.image_size, normalize=True, mean=cfg.mean, std=cfg.std)


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """LR multiplier for ``epoch`` (0-based), constant within an epoch."""
    e, n = epoch, cfg.epochs
    if cfg.schedule == "rded-cosine":
        return 0.5 * (1 + math.cos(math.pi * e / n / 2))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * e / n))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(e >= math.floor(m * n + 1e-9) for m in cfg.milestones)  # IDC: 2·n // 3, 5·n // 6
    return 1.0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            t2_scale: bool = False) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) summed over classes, averaged over the batch (PyTorch's
    ``KLDivLoss(reduction="batchmean")``, as in RDED), times T² when ``t2_scale``."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    loss = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return loss * temperature**2 if t2_scale else loss


# ---------------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    """One student's run: ``best_top1`` over the evaluations (the reported number), ``final_top1`` at the last
    epoch, in percent; ``evals`` is [(epoch, top1)], epochs 1-based."""

    best_top1: float
    final_top1: float
    best_epoch: int
    evals: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    seed: int = 0


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu",
             batch_size: int = 256) -> float:
    """Top-1 in percent of ``model`` on images (uint8, or float in [−1, 1]) and labels."""
    was_training = model.training
    model.eval()
    correct = 0
    cl = torch.channels_last if device.startswith("cuda") else torch.contiguous_format
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size].to(device, non_blocking=True)).contiguous(memory_format=cl)
        with _autocast(device):
            pred = model(x).argmax(1)
        correct += (pred.cpu() == labels[i:i + batch_size].cpu()).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(images), 1)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat(chunks[-2:])
        chunks.pop()
    return chunks


def _eval_due(cfg: TrainConfig, epoch: int) -> bool:
    last = epoch == cfg.epochs - 1
    return last or ((epoch + 1) % cfg.eval_every == 0 and epoch >= cfg.eval_from * cfg.epochs)


def fit_student(images: torch.Tensor, labels: torch.Tensor | None, teacher: nn.Module | None,
                val_images: torch.Tensor, val_labels: torch.Tensor, cfg: TrainConfig, device: str = "cpu",
                num_classes: int | None = None, progress: bool = False, desc: str | None = None) -> TrainResult:
    """Train a fresh student on ``images`` (uint8, or float in [−1, 1]; (N, 3, H, W)) and test it on the real
    ``val_images`` / ``val_labels``.

    Soft protocol: ``teacher`` (a module mapping [−1, 1] images to logits, e.g. a ``Classifier``) labels every
    augmented batch; ``labels`` may be None. Hard protocol: ``labels`` are required, ``teacher`` is unused.
    ``num_classes`` defaults to the teacher's, else to the largest label + 1.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    soft = cfg.protocol == Protocol.soft.value
    if soft and teacher is None:
        raise UserError("the soft-label protocol needs a teacher")
    if not soft and labels is None:
        raise UserError("the hard-label protocol needs labels for the distilled images")
    if len(images) == 0:
        raise UserError("the distilled set is empty")
    if num_classes is None:
        if teacher is not None and soft:
            num_classes = int(teacher.num_classes)
        else:
            num_classes = int(max(labels.max(), val_labels.max())) + 1
    if val_labels.numel() and int(val_labels.max()) >= num_classes:
        raise UserError(f"val labels go up to {int(val_labels.max())}, but the student has {num_classes} classes")

    cuda = device.startswith("cuda")
    cl = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    student = build_student(cfg, num_classes).to(device).to(memory_format=cl).train()
    if soft:
        teacher = teacher.to(device).to(memory_format=cl).eval()
    opt_groups = param_groups(student, cfg.weight_decay, cfg.decay_all)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(opt_groups, lr=cfg.lr, betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(opt_groups, lr=cfg.lr, momentum=cfg.momentum)
    base_lrs = [g["lr"] for g in opt.param_groups]

    on_device = cuda and images.numel() * images.element_size() < (2 << 30)
    data = images.to(device) if on_device else images
    targets = labels.to(device) if labels is not None else None

    t0 = time.perf_counter()
    best, best_epoch, final, evals = -1.0, 0, 0.0, []
    bar = tqdm(range(cfg.epochs), desc=desc or cfg.protocol, disable=not progress, leave=False, file=sys.stderr,
               dynamic_ncols=True, unit="ep")
    for epoch in bar:
        f = lr_factor(cfg, epoch)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * f
        total, count = 0.0, 0
        for idx in _batches(len(images), cfg.batch_size, gen):
            x = to_float(data[idx.to(data.device)].to(device, non_blocking=True))
            x = patch_shuffle(x, cfg.patch_factor, gen)
            x = random_resized_crop(x, cfg.image_size, cfg.crop_scale, cfg.crop_ratio, cfg.flip, gen)
            mix = cfg.cutmix_prob > 0 and float(torch.rand(1, generator=gen)) < cfg.cutmix_prob
            if mix:
                x, partner, lam = cutmix(x, cfg.cutmix_beta, gen)
            x = x.contiguous(memory_format=cl)
            with _autocast(device):
                out = student(x)
                if soft:
                    with torch.no_grad():
                        t_out = teacher(x)
            if soft:
                loss = kd_loss(out, t_out, cfg.temperature, cfg.t2_scale)
            else:
                y = targets[idx.to(targets.device)].to(device)
                target = mixed_targets(y, partner, lam, num_classes) if mix else F.one_hot(y, num_classes).float()
                loss = torch.sum(-target * F.log_softmax(out.float(), dim=1), dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        if _eval_due(cfg, epoch):
            final = accuracy(student, val_images, val_labels, device, cfg.eval_batch_size)
            evals.append((epoch + 1, final))
            if final > best:
                best, best_epoch = final, epoch + 1
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{base_lrs[0] * f:.2e}",
                        top1=f"{best:.1f}" if best >= 0 else "-")
    bar.close()
    return TrainResult(best_top1=best, final_top1=final, best_epoch=best_epoch, evals=evals,
                       seconds=time.perf_counter() - t0, seed=cfg.seed)


def train_student(images: torch.Tensor, labels: torch.Tensor | None, teacher: nn.Module | None,
                  val_images: torch.Tensor, val_labels: torch.Tensor, cfg: TrainConfig, **kwargs) -> float:
    """``fit_student`` reduced to the reported number: the best top-1 (percent) on the real images."""
    return fit_student(images, labels, teacher, val_images, val_labels, cfg, **kwargs).best_top1
