"""The scoring classifier: a timm model by name plus an optional local state dict, and its input transform.

Checkpoint layouts accepted: plain state dicts, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers, ``module.``
prefixes (DDP), and torchvision ResNet keys (which timm ResNets share).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, require_file
from .weights import load_checked, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``name[:ckpt]`` -> (timm name, checkpoint path or None)."""
    name, sep, ckpt = spec.partition(":")
    if not name:
        raise UserError(f"classifier {spec!r}: expected NAME[:CHECKPOINT], e.g. resnet18:/models/resnet18.pth")
    return name, (ckpt or None) if sep else None


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
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32, device="cpu") -> Classifier:
    """Build timm model ``name`` and load ``ckpt`` if given. ``num_classes`` defaults to the checkpoint's head size
    (or 1000). A head that does not match ``num_classes`` is a one-line error."""
    import timm

    name, ckpt = parse_spec(spec)
    sd = None
    if ckpt is not None:
        sd = read_weights(require_file(ckpt, f"a state dict for timm model {name}"))
        head = next((sd[k] for k in ("fc.weight", "head.fc.weight", "classifier.weight", "head.weight") if k in sd), None)
        if head is not None and num_classes is not None and head.shape[0] != num_classes:
            raise UserError(f"{ckpt}: classifier head has {head.shape[0]} classes, but {num_classes} are needed")
        if head is not None and num_classes is None:
            num_classes = head.shape[0]
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes or 1000)
    except RuntimeError as e:
        raise UserError(f"classifier {name!r}: {str(e).splitlines()[0]}") from None
    if sd is not None:
        load_checked(model, sd, ckpt, f"timm {name}")
    model.requires_grad_(False)
    clf = Classifier(model, input_size, normalize, mean, std)
    return clf.eval().to(device=device, dtype=dtype)
