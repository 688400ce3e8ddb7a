"""The stage-1 models as engines see them: a module with positional tensor inputs and one output.

A generator supplies its own models' specs (:meth:`cao2_fast.generator.Generator.engine_specs`: the DiT family's
sampler ``dit``, ``(x (N, C, H, W), t (N,) float32, y (N,) int64) -> (N, 2C, H, W)``, and the decoder); the two that
every family shares are here:

* ``vae_decode``: ``latents (N, C, H, W) -> images (N, 3, H·f, W·f)`` in [−1, 1].
* ``classifier``: ``images (N, 3, H, W) -> logits (N, classes)``, the input mapping and the network; the resize to
  its input size runs in torch before it (``ModelSpec.prepare``).

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
    export_form: Callable[[nn.Module], nn.Module] | None = None  # ``module`` as an exported file holds it (below)
    _digest: str | None = field(default=None, repr=False)

    def exported_module(self) -> nn.Module:
        """The module as an exported file holds it, whatever machine exports it: float32 on the CPU, in eval mode,
        in the forms ``export_form`` names (a generator's model may run quicker forms eagerly). The spec's own
        module is never changed: a converted copy is made when needed."""
        if self.export_form is not None:
            return self.export_form(self.module)
        p = next(iter(self.module.parameters()), None)
        if p is not None and p.device.type == "cpu" and p.dtype == torch.float32 and not any(
                m.training for m in self.module.modules()):
            return self.module
        import copy

        return copy.deepcopy(self.module).to("cpu", torch.float32).eval()

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


def plain(obj):
    """JSON-friendly copy of config-like objects (dataclasses, diffusers FrozenDicts, tuples)."""
    if is_dataclass(obj):
        return plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


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


def vae_decode_spec(vae: nn.Module, latent_shape: tuple[int, ...]) -> ModelSpec:
    ae = vae.autoencoder
    return ModelSpec(
        "vae_decode", VAEDecode(vae), (TensorSpec("latents", tuple(latent_shape)),), "images",
        signature={"class": type(ae).__name__, "config": plain(dict(ae.config)),
                   "scaling_factor": vae.scaling_factor},
    )


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


def stage1_specs(generator, classifier: nn.Module) -> dict[str, ModelSpec]:
    """Specs of the stage-1 models: the generator's (its sampler and ``vae_decode``) and the classifier on the
    generator's decoded images."""
    return {**generator.engine_specs(), "classifier": classifier_spec(classifier, generator.image_shape)}
