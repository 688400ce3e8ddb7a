"""The three stage-1 models as engines see them: a module with positional tensor inputs and one output.

* ``dit``: ``(x (N, C, H, W) float, t (N,) float32, y (N,) int64) -> (N, 2C, H, W)``, the DiT forward that guided
  sampling calls on the doubled batch. ``t`` may be given as int64: integer timesteps are exact in float32.
* ``vae_decode``: ``latents (N, C, H, W) -> images (N, 3, H·f, W·f)`` in [−1, 1].
* ``classifier``: ``images (N, 3, H, W) -> logits (N, classes)``, the whole ``Classifier`` wrapper, so the resize and
  the optional normalisation travel with the exported graph.

A :class:`ModelSpec` also carries what the engine cache needs to tell two models apart: a digest of every weight
and buffer, and the architecture facts that change the computation without being a tensor (config fields, the
classifier's input size and normalisation switch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass

import torch
from torch import nn

FLOAT = "float"  # the engine's compute precision


@dataclass(frozen=True)
class TensorSpec:
    """One input: its name in exported graphs, its shape without the batch axis, and its dtype (``FLOAT`` means the
    engine precision; ``float32`` and ``int64`` are fixed)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = FLOAT

    def example(self, batch: int, precision: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        """A deterministic input for tracing: zeros for integers (always a valid class id), N(0, 1) otherwise."""
        shape = (batch, *self.shape)
        if self.dtype == "int64":
            return torch.zeros(shape, dtype=torch.int64, device=device)
        g = torch.Generator().manual_seed(0)
        dtype = precision if self.dtype == FLOAT else torch.float32
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@dataclass
class ModelSpec:
    """A model to run on an engine. ``module(*inputs)`` returns ``output_name``'s tensor."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    output_name: str
    signature: dict = field(default_factory=dict)
    prepare: Callable[..., torch.Tensor] | None = None  # torch work before the graph (same on every backend)
    _digest: str | None = field(default=None, repr=False)

    def weights_digest(self) -> str:
        """sha256 over every parameter and buffer (name, dtype, shape, bytes); computed once per spec."""
        if self._digest is None:
            self._digest = weights_digest(self.module)
        return self._digest

    def shape_profile(self) -> dict:
        """Per-sample input shapes and dtypes (the batch axis is dynamic)."""
        return {t.name: {"shape": list(t.shape), "dtype": t.dtype} for t in self.inputs}

    def identity(self) -> dict:
        """What identifies this model for the engine cache: weights, architecture, input profile."""
        return {"model": self.name, "weights": self.weights_digest(), "signature": self.signature,
                "inputs": self.shape_profile(), "output": self.output_name}


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    tensors = [("p:" + n, t) for n, t in module.named_parameters()] + [("b:" + n, t) for n, t in module.named_buffers()]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _plain(obj):
    """JSON-friendly copy of config-like objects (dataclasses, diffusers FrozenDicts, tuples)."""
    if is_dataclass(obj):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


class DiTForward(nn.Module):
    """``dit(x, t, y)`` without label dropout: the stage-1 call."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit
        self.train(dit.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)


class ClassifierAtSize(nn.Module):
    """The classifier on images already at its input size (input mapping + network): what engines export. The
    resize runs in torch before it (``ModelSpec.prepare``)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.train(classifier.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.model(self.classifier.normalize_input(images))


class VAEDecode(nn.Module):
    """``vae.decode(latents)`` as a module's forward."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.train(vae.training)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


def dit_spec(dit: nn.Module) -> ModelSpec:
    """The DiT's stage-1 forward. Exported files hold its released forms whatever the DiT runs eagerly
    (:func:`cao2_fast.engines.onnx_ort.export_onnx`); the signature says so, so that a file exported before that rule
    (with a CPU's forms) is a different entry and never served."""
    from cao2_fast.models.dit import RELEASED_KERNELS

    cfg = dit.cfg
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return ModelSpec(
        "dit", DiTForward(dit),
        (TensorSpec("x", latent), TensorSpec("t", (), "float32"), TensorSpec("y", (), "int64")),
        "out", signature={"class": type(dit).__name__, "config": _plain(cfg), "forms": _plain(RELEASED_KERNELS)},
    )


def vae_decode_spec(vae: nn.Module, latent_shape: tuple[int, ...]) -> ModelSpec:
    ae = vae.autoencoder
    return ModelSpec(
        "vae_decode", VAEDecode(vae), (TensorSpec("latents", tuple(latent_shape)),), "images",
        signature={"class": type(ae).__name__, "config": _plain(dict(ae.config)),
                   "scaling_factor": vae.scaling_factor},
    )


def decoded_image_shape(vae: nn.Module, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, H, W) of ``vae.decode`` on one latent of ``latent_shape``."""
    f = vae.downsample
    return (vae.autoencoder.config.out_channels, latent_shape[1] * f, latent_shape[2] * f)


def classifier_spec(classifier: nn.Module, image_shape: tuple[int, ...]) -> ModelSpec:
    """The classifier at its own input size; decoded images of ``image_shape`` are resized in torch first."""
    size = classifier.input_size
    return ModelSpec(
        "classifier", ClassifierAtSize(classifier), (TensorSpec("images", (image_shape[0], size, size)),), "logits",
        signature={"class": type(classifier.model).__name__, "input_size": size,
                   "normalize": bool(classifier.normalize), "resize": "torch, before the engine",
                   "structure": hashlib.sha256(repr(classifier.model).encode()).hexdigest()[:16]},
        prepare=classifier.resize,
    )


def stage1_specs(dit: nn.Module, vae: nn.Module, classifier: nn.Module) -> dict[str, ModelSpec]:
    """Specs of the three stage-1 models, chained: the DiT's latent shape feeds the VAE, its images the classifier."""
    d = dit_spec(dit)
    latent = d.inputs[0].shape
    return {"dit": d, "vae_decode": vae_decode_spec(vae, latent),
            "classifier": classifier_spec(classifier, decoded_image_shape(vae, latent))}
