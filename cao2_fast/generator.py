"""What the method asks of a generative model: one small interface, whatever the model family.

CaO2 needs three things from its generator. Stage 1: sample K·IPC candidates for each class of a batch of classes,
with what selection needs (their latents, decoded images and the classifier's scores; :class:`Candidates`).
Stage 2: optimise kept latents under the model's conditional objective (:class:`Optimised`). And to decode latents
into images. Everything else — which candidates to keep, how classes are grouped and blocked, streaming, writing a
folder, sharding, resume — is the method's and lives in :mod:`cao2_fast.pipeline` and :mod:`cao2_fast.output`, which
use only this interface. A generator family is one module under :mod:`cao2_fast.generators` plus a loader branch.

Randomness: a generator draws each class's noise from :func:`class_generator` streams, so a class's result depends on
(seed, class id, config) only, never on which other classes share its batches or how a job is sharded.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

# latents (n, *latent_shape) -> (images (n, 3, H, W) in [-1, 1], classifier softmax (n, classes), finite (n,) bool);
# ``score(latents, io="jpeg")`` shows the classifier the decodes as 8-bit JPEG files (quality 75) resized by PIL
Scorer = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (class position j in the batch, candidate indices, their early softmax, finite) -> positions, best first
Ranker = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def class_generator(seed: int, class_id: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, class id, stream): the order or sharding of classes never
    changes a class's randomness."""
    digest = hashlib.sha256(f"cao2-fast/{seed}/{class_id}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Candidates:
    """One class's stage-1 candidates, as selection needs them (float32, on the CPU).

    index: (m,) each candidate's index among the class's K·IPC (all of them, or those that survived early rejection).
    latents: (m, *latent_shape). images: (m, 3, H, W) decoded, in [-1, 1]. probs: (m, classes) classifier softmax.
    finite: (m,) whether latent, image and probabilities are all finite (a candidate that is not is never kept).
    nonfinite: how many of the class's K·IPC candidates were found not finite (at an early check or at the end).
    scores: (m,) the family's own per-candidate score where its selection rule needs one (MAR: stability), else
        None; recorded per kept image as ``stage1_score``.
    """

    index: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor
    probs: torch.Tensor
    finite: torch.Tensor
    nonfinite: int
    scores: torch.Tensor | None = None


@dataclass
class Optimised:
    """Stage 2's result for a batch of latents."""

    latents: torch.Tensor  # optimised (B, *latent_shape), float32 on the CPU
    loss_first: torch.Tensor  # (B,) loss at the first step
    loss_last: torch.Tensor  # (B,) loss at the last step taken
    steps_done: torch.Tensor  # (B,) steps applied before a stop (== steps when all went well)
    finite: torch.Tensor  # (B,) False where the image stopped on a non-finite loss or latent


class Generator(abc.ABC):
    """A class-conditional generative model as the method drives it. ``cfg`` is the run's
    :class:`~cao2_fast.config.DistillConfig`; ``device``/``dtype`` where and how the models compute."""

    family: str = ""  # recorded in the config (``DistillConfig.family``)
    record_fields: dict = {}  # per-image manifest fields the family adds: {name: accepted Python types}
    engines: tuple[str, ...] = ("eager", "compile", "onnx", "trt")  # what its stage 1 can run on (stage 2: the
    # first two, where listed)

    def config_defaults(self, recipe) -> dict:
        """The family's own settings of a config under ``recipe`` (a :class:`~cao2_fast.config.Recipe`), applied
        over the dataset preset's and under the user's."""
        return {"family": self.family}

    def check_config(self, cfg) -> None:
        """Refuse (one ``UserError`` line) a config these models cannot run, beyond what the config checks."""
        if cfg.family != self.family:
            from .errors import UserError

            raise UserError(f"a {cfg.family} config cannot drive a {self.family} generator")

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """One latent's shape (what stage 2 optimises)."""

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Classes the model is conditioned on (class ids are 0..num_classes-1)."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of a decoded latent (what the classifier scores)."""

    @abc.abstractmethod
    def to(self, device: torch.device, dtype: torch.dtype) -> "Generator":
        """Move every model to ``device`` in ``dtype``, in the fastest forms that keep the method's arithmetic."""

    @abc.abstractmethod
    def sample(self, class_ids: list[int], cfg, score: Scorer, rank: Ranker, device, dtype,
               progress: Callable[[], None] | None = None) -> dict[int, Candidates]:
        """Stage 1: sample K·IPC candidates of each class of ``class_ids`` (in shared batches), decode them and
        score them with ``score``. Where the config asks for early rejection, ``rank`` orders a class's candidates
        at each check (the best first) and only the best go on."""

    @abc.abstractmethod
    def optimise(self, latents: torch.Tensor, class_ids: torch.Tensor, cfg, device, dtype,
                 progress=None, log: Callable[[str], None] | None = None, noise=None) -> Optimised:
        """Stage 2: optimise ``latents`` (B, ...) of ``class_ids`` (B,), each class's latents consecutive in the
        order its candidates were kept. ``noise``: the family's own pre-drawn randomness (default: drawn from
        the class streams)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (on the stage-1 engine when one is in use)."""

    def image_records(self, class_id: int, n: int, cfg) -> list[dict]:
        """Per-image fields of the manifest beyond the method's own (e.g. which noise an image was optimised
        with), for the class's ``n`` kept images."""
        return [{} for _ in range(n)]

    @abc.abstractmethod
    def stage1_flops(self, cfg) -> float:
        """The generator's FLOPs of one class's stage 1 under ``cfg`` (decodes and classifier excluded)."""

    @abc.abstractmethod
    def stage2_flops(self, cfg) -> float:
        """The generator's FLOPs of stage 2 for one latent under ``cfg``."""

    @abc.abstractmethod
    def stage1_ticks(self, groups: list[list[int]], cfg) -> int:
        """How often :meth:`sample` calls ``progress`` to sample these groups of classes (one call per group)."""

    @abc.abstractmethod
    def stage1_bytes(self, cfg) -> int:
        """Host memory one stage-1 group of ``cfg`` holds at once (pre-drawn noise, latents, decoded images)."""

    @abc.abstractmethod
    def engine_specs(self) -> dict:
        """The stage-1 models as engines see them: ``{name: engines.ModelSpec}``, the decoder under
        ``"vae_decode"``; they take what :meth:`sample` feeds them."""

    @abc.abstractmethod
    def engine_batches(self, cfg) -> dict[str, int]:
        """The largest call of each of :meth:`engine_specs`' models under ``cfg`` (TensorRT builds for it)."""

    @abc.abstractmethod
    def use_engines(self, built: dict, stage2) -> None:
        """Run stage 1 on the engines ``built`` for :meth:`engine_specs` and stage 2 on ``stage2``."""

    @abc.abstractmethod
    def stage2_module(self) -> torch.nn.Module:
        """The module stage 2 differentiates through (a stage-2 engine wraps it)."""
