"""The scoring classifier: a timm model by name with its weights, and its input transform.

``NAME:CHECKPOINT`` loads local weights; a bare ``NAME`` loads timm's pretrained weights for it (through the
Hugging Face cache; no silent fallback to random weights when they cannot be had); ``random:NAME`` builds random
weights, for tests and timing, only when asked for by name.

Checkpoint layouts accepted: plain state dicts, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers, ``module.``
prefixes (DDP), and torchvision ResNet keys (which timm ResNets share).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, require_dir, require_file
from .weights import first_line, load_checked, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


RANDOM_PREFIX = "random:"
_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm's own name prefixes: the colon after them is part of NAME


@dataclass(frozen=True)
class ClassifierSpec:
    """A parsed ``[random:]NAME[:CHECKPOINT]``: ``name`` is the timm model name (with any ``hf-hub:`` prefix),
    ``checkpoint`` the local weights or None, ``random`` whether random weights were asked for by name."""

    name: str
    checkpoint: str | None
    random: bool

    @property
    def source(self) -> str:
        """Where the weights come from: ``checkpoint``, ``random`` or ``pretrained`` (timm's, by name)."""
        return "checkpoint" if self.checkpoint is not None else "random" if self.random else "pretrained"


def split_spec(spec: str, what: str = "classifier") -> ClassifierSpec:
    """``NAME:CHECKPOINT`` (local weights), ``NAME`` (timm's pretrained weights, e.g. ``resnet18.tv_in1k`` or
    ``hf-hub:timm/resnet18.a1_in1k``) or ``random:NAME`` (random weights, only when asked for by name)."""
    text = spec
    random = text.startswith(RANDOM_PREFIX)
    if random:
        text = text[len(RANDOM_PREFIX):]
    prefix = next((p for p in _SOURCES if text.lower().startswith(p)), "")
    name, sep, ckpt = text[len(prefix):].partition(":")
    if not name:
        raise UserError(f"{what} {spec!r}: expected NAME:CHECKPOINT (e.g. resnet18:/models/resnet18.pth), a timm "
                        "NAME with pretrained weights (e.g. resnet18.tv_in1k), or random:NAME")
    ckpt = (ckpt or None) if sep else None
    if random and ckpt is not None:
        raise UserError(f"{what} {spec!r}: random:NAME takes no checkpoint (give NAME:CHECKPOINT for local weights)")
    return ClassifierSpec(prefix + name, ckpt, random)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``[random:]name[:ckpt]`` -> (model name, checkpoint path or None). A ``random:`` prefix stays on the name, so
    that records tell random weights from timm's pretrained ones."""
    s = split_spec(spec)
    return (RANDOM_PREFIX + s.name if s.random else s.name), s.checkpoint


class Classifier(nn.Module):
    """Wraps a timm model with the input transform of the recipe.

    ``forward(images)`` takes decoded images in [−1, 1] at any size, resizes them to ``input_size`` (bilinear,
    antialiased when shrinking), and feeds them either as they are (``normalize=False``, the released code's quirk) or
    mapped to [0, 1] and normalised with ``mean``/``std``.
    """

    def __init__(self, model: nn.Module, input_size: int, normalize: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        self.input_size = input_size
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Bring images to ``input_size`` (bilinear, antialiased when shrinking, as torchvision's ``Resize``). Engines
        run it in torch before the exported graph: TensorRT's ONNX parser has no antialiased ``Resize``."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.input_size)
        return images

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        """The recipe's input mapping of images already at ``input_size``."""
        if self.normalize:
            images = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return images

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize_input(self.resize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(images))


def load_classifier(spec: str, input_size: int = 224, normalize: bool = False, num_classes: int | None = None,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32, device="cpu",
                    what: str = "classifier") -> Classifier:
    """Build the timm model of ``spec`` (see ``split_spec``) with its weights: a local checkpoint, timm's pretrained
    weights (from the Hugging Face cache, downloaded there once), or random ones for ``random:NAME``.

    ``num_classes`` defaults to the checkpoint's head size (or the pretrained head, or 1000 for random weights). A
    head that does not match ``num_classes``, and pretrained weights that cannot be had, are one-line errors."""
    s = split_spec(spec, what)
    name, ckpt = s.name, s.checkpoint
    sd = None
    if ckpt is not None:
        sd = read_weights(require_file(ckpt, f"a state dict for timm model {name}"))
        head = next((sd[k] for k in ("fc.weight", "head.fc.weight", "classifier.weight", "head.weight") if k in sd), None)
        if head is not None and num_classes is not None and head.shape[0] != num_classes:
            raise UserError(f"{ckpt}: {what} head has {head.shape[0]} classes, but {num_classes} are needed")
        if head is not None and num_classes is None:
            num_classes = head.shape[0]
    if s.source == "pretrained":
        if name.lower().startswith("local-dir:"):
            check_local_dir(name.partition(":")[2])
        model = create_timm_model(name, what, pretrained=True)
        if num_classes is not None and model.num_classes != num_classes:
            raise UserError(f"{what} {name!r}: timm's pretrained head has {model.num_classes} classes, but "
                            f"{num_classes} are needed; give NAME:CHECKPOINT with weights trained on these classes")
    else:
        model = create_timm_model(name, what, pretrained=False, num_classes=num_classes or 1000)
    if sd is not None:
        load_checked(model, sd, ckpt, f"timm {name}")
    model.requires_grad_(False)
    clf = Classifier(model, input_size, normalize, mean, std)
    return clf.eval().to(device=device, dtype=dtype)


def create_timm_model(name: str, what: str = "classifier", pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` where every failure is one line naming the model: an unknown name, no pretrained
    weights for it, or pretrained weights (or an ``hf-hub:`` config) that are neither in the Hugging Face cache nor
    downloadable. timm loads pretrained weights itself, as tensors only."""
    import timm

    try:
        with _quiet_hub():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        raise UserError(_timm_failure(name, what, e)) from None


def check_student(spec: str) -> str:
    """The timm name an eval student is built from: ``NAME`` or ``random:NAME`` (students always start from random
    weights, so a checkpoint is refused). An ``hf-hub:`` name has its config fetched here, so that no network and
    no cached copy is one line rather than a failure deep in training setup."""
    s = split_spec(spec, "student")
    if s.checkpoint is not None:
        raise UserError(f"student {spec!r}: students train from scratch; give a timm model name without a "
                        "checkpoint (e.g. resnet18)")
    source, _, ident = s.name.partition(":") if s.name.lower().startswith(_SOURCES) else ("", "", s.name)
    if source.lower() in ("hf-hub", "hf_hub"):
        import timm.models

        try:
            with _quiet_hub():
                timm.models.load_model_config_from_hf(ident)
        except Exception as e:
            raise UserError(_timm_failure(s.name, "student", e)) from None
    elif source.lower() == "local-dir":
        check_local_dir(ident)
    return s.name


def check_local_dir(folder: str) -> None:
    """A timm ``local-dir:`` model folder: its config.json and every weights file in it must be regular files, so
    nothing timm opens there can block (a FIFO) or be a directory."""
    d = require_dir(folder, "a timm model folder with config.json")
    require_file(d / "config.json", "a timm model folder's config.json")
    for f in d.iterdir():
        if f.suffix in (".safetensors", ".bin", ".pth", ".pt", ".json"):
            require_file(f, "a timm model folder's file")


def _timm_failure(name: str, what: str, e: Exception) -> str:
    text = first_line(str(e), 160)
    if isinstance(e, RuntimeError) and text.startswith("Unknown model"):
        return f"{what} {name!r}: timm has no model of that name"
    if isinstance(e, RuntimeError) and ("pretrained tag" in text or "No pretrained weights" in text):
        return (f"{what} {name!r}: timm has no pretrained weights of that name ({text.rstrip('.')}); give "
                f"NAME:CHECKPOINT with local weights, or random:{name} for random weights")
    if name.lower().startswith("local-dir:") or (isinstance(e, (RuntimeError, ValueError, TypeError, KeyError))
                                                  and not _is_hub_error(e)):
        return f"{what} {name!r}: timm cannot build it ({type(e).__name__}: {text})"
    from huggingface_hub import constants

    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set" if offline else f"the download failed ({type(e).__name__})"
    files, fix = (("config", "give a timm registry name (e.g. resnet18)") if what == "student" else
                  ("pretrained files", "give NAME:CHECKPOINT with local weights"))
    return (f"{what} {name!r}: timm's {files} for it are not cached (Hugging Face cache {constants.HF_HUB_CACHE}) "
            f"and {why}; {fix}, or download them once with network access (later runs can set HF_HUB_OFFLINE=1 "
            "to use the cache)")


def _is_hub_error(e: Exception) -> bool:
    return type(e).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests", "urllib3", "urllib") \
        or isinstance(e, OSError)


@contextlib.contextmanager
def _quiet_hub():
    """No third-party warning or log line from timm or huggingface_hub reaches the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
