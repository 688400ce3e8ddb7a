"""The whole job: models + config -> a distilled ImageFolder, resumable and shardable by class.

``Distiller`` is also the Python API for data pipelines: ``stage1``/``stage2``/``distill`` work on tensors in memory,
``run`` writes the output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import numerics, output, stage1, stage2
from .config import NOISE_BANK_SIZE, DistillConfig, build_config, check_class_ids
from .diffusion import Diffusion, guided_steps
from .errors import UserError
from .fileio import overlaps
from .identity import weights_id
from .models.classifier import Classifier, load_classifier, parse_spec
from .models.dit import DiT, fast_kernels, load_dit
from .models.vae import VAE, load_vae
from .progress import Plan, Progress, as_progress, clock_text

LOCK_POLL_S = 0.5  # how often a run waiting for another run's classes looks again

_log = logging.getLogger("cao2_fast")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def class_generator(seed: int, class_id: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, class id, stream): the order or sharding of classes never
    changes a class's randomness."""
    digest = hashlib.sha256(f"cao2-fast/{seed}/{class_id}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


PRESETS = ("digits",)  # the embedded presets (SPEC §6)


def preset_dir(name: str = "digits") -> Path:
    return Path(str(resources.files("cao2_fast").joinpath("presets", name)))


def read_preset(name: str = "digits") -> dict:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    d = preset_dir(name)
    f = d / "preset.json"
    if not f.is_file():
        raise UserError(f"{f}: the {name} preset is not installed (rebuild it with "
                        f"`cao2-fast train-preset {name} --replace-shipped`)")
    return json.loads(f.read_text())


@dataclass
class ClassResult:
    """One class's outcome in memory."""

    class_id: int
    class_name: str
    stage1_images: torch.Tensor  # kept candidates, decoded (ipc, 3, H, W) in [−1, 1]
    images: torch.Tensor  # after stage 2
    records: list[dict]
    candidate_accuracy: float
    failure: str | None = None  # why the class cannot be written (e.g. too few finite candidates); None if fine


@dataclass
class ClassOutput:
    """One class as :meth:`Distiller.stream` yields it.

    images_uint8: (IPC, H, W, 3) uint8, the pixels the CLI writes as PNG (torchvision ``save_image`` arithmetic).
    images: (IPC, 3, H, W) float32 in [−1, 1], after stage 2, clamped to [−1, 1] (the VAE can overshoot).
    stage1_images: the stage-1 picks before stage 2, likewise clamped.
    records: per image, the fields of ``manifest.json`` (candidate index, p(class) before/after, losses, status…)
        except the file name and checksum, which only exist on disk.
    failure: None, or why the class could not be distilled (then the image fields are None).

    :meth:`as_item` gives the same as a dict that a ``DataLoader`` can collate.
    """

    class_id: int
    class_name: str
    images_uint8: torch.Tensor | None
    images: torch.Tensor | None
    stage1_images: torch.Tensor | None
    records: list[dict]
    failure: str | None = None

    # Record fields by type: a column keeps its dtype whichever values one class happens to have.
    _INT_FIELDS = ("class_id", "candidate_index", "stage2_steps", "stage1_nonfinite_candidates", "noise_bank_index")
    _FLOAT_FIELDS = ("prob_before", "prob_after", "loss_first", "loss_last", "stage1_candidate_accuracy")

    def as_item(self) -> dict:
        """This class as one training item: tensors, ints and strings only, no ``None`` anywhere, so torch's
        ``default_collate`` (a ``DataLoader`` at any ``batch_size``, ``accelerate``) takes it::

            {"images": float32 (IPC, 3, H, W) in [-1, 1], "labels": int64 (IPC,) (the class id of each image),
             "images_uint8": uint8 (IPC, H, W, 3), "stage1_images": float32 (IPC, 3, H, W),
             "class_id": int, "class_name": str, "records": {field: column of IPC values}}

        The images come first: tools that read the batch size off the first tensor (``accelerate``) then see IPC.

        A record column is an int64 tensor for whole numbers (-1 where there is none: ``noise_bank_index`` when
        the recipe draws no noise bank), a float64 tensor for measurements (NaN where unknown: a loss that was
        not finite) and a list of str for text (``stage2_status``). A failed class has no images, so it is no
        item: one ``UserError`` naming the class and why."""
        if self.failure is not None or self.images is None:
            why = (self.failure or "no images").splitlines()[0]
            raise UserError(f"class {self.class_id} ({self.class_name}) cannot be a training item, it failed: {why}")
        columns: dict = {}
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        for k in keys:
            values = [r.get(k) for r in self.records]
            known = [v for v in values if v is not None]
            if k in self._INT_FIELDS or known and all(isinstance(v, int) and not isinstance(v, bool) for v in known):
                columns[k] = torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.int64)
            elif k in self._FLOAT_FIELDS or known and all(isinstance(v, (int, float)) for v in known):
                columns[k] = torch.tensor([float("nan") if v is None else float(v) for v in values],
                                          dtype=torch.float64)
            else:
                columns[k] = ["" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
        labels = torch.full((len(self.images),), int(self.class_id), dtype=torch.int64)
        return {"images": self.images, "labels": labels,
                "images_uint8": self.images_uint8, "stage1_images": self.stage1_images,
                "class_id": int(self.class_id), "class_name": str(self.class_name), "records": columns}


class Distiller:
    """Runs CaO2 on given models.

    ``dit(x, t, y, drop=None)`` must return all 2C channels; ``vae.decode`` maps latents to [−1, 1] images;
    ``classifier`` maps such images to logits. Stage-1 callables can be swapped for compiled engines with
    :meth:`use_engines`. The DiT is switched to :func:`~cao2_fast.models.dit.fast_kernels` for the device (on CPU:
    the sigmoid-form GELU and written-out attention; the same maths to float rounding).
    """

    def __init__(self, dit: DiT, vae: VAE, classifier: Classifier, config: DistillConfig, device: str = "auto",
                 progress: bool | Progress = False):
        self.dit, self.vae, self.classifier, self.config = dit, vae, classifier, config
        self.device = _check_device(device)
        self.dtype = DTYPES[config.dtype]
        self.progress = progress
        self.log: Callable[[str], None] = _log.info  # notes (a halved stage-2 batch, a waiting run); run(log=) sets it
        self.stage1_out: Path | None = None  # where ``run`` also writes the stage-1 picks, if asked
        self.engine_dir: Path | None = None  # the engine cache stage 1 uses, if its engines have files (use_engines)
        self.last_run: dict = {}  # what the last ``run`` did in this process (see ``run``)
        self.diffusion = Diffusion.create(respacing=config.sample_steps)
        self.latent_shape = (dit.cfg.in_channels, dit.cfg.input_size, dit.cfg.input_size)
        self.classifier.normalize = config.recipe.classifier_normalize
        self.classifier.input_size = config.classifier_input_size
        self.dit.set_kernels(fast_kernels(self.device))
        self.stage1_dit: Callable = self._dit_call
        self.stage1_decode: Callable = vae.decode
        self.stage1_classify: Callable = classifier
        self._target_index = self._classifier_targets()
        self._check_fits()
        self.to(device)  # ready on the device it names, in the config's dtype

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "digits", ipc: int = 10, recipe: str = "official", device: str = "auto",
                    progress: bool = False, class_ids: list[int] | None = None, **overrides) -> "Distiller":
        """The embedded digits preset (SPEC §6)."""
        meta = read_preset(name)
        names = meta["class_names"]
        _check_ipc(ipc)
        ids = list(range(len(names))) if class_ids is None else check_class_ids(class_ids)
        bad = [c for c in ids if not 0 <= c < len(names)]
        if bad:
            raise UserError(f"class id {bad[0]} is not in the {name} preset (valid: 0..{len(names) - 1})")
        d = preset_dir(name)
        dit = load_dit(d / "dit.safetensors")
        vae = load_vae(d / "vae")
        clf_meta = meta["classifier"]
        clf = load_classifier(f"{clf_meta['model']}:{d / 'classifier.safetensors'}", input_size=clf_meta["input_size"],
                              num_classes=len(meta["class_names"]), mean=clf_meta["mean"], std=clf_meta["std"])
        overrides.setdefault("classifier_input_size", clf_meta["input_size"])
        overrides.setdefault("stage1_batch", 2 * 2 * ipc)  # two classes per group: several groups to shard
        overrides.setdefault("stage2_batch", 64)
        models = {"preset": name, "dit": weights_id(d / "dit.safetensors"), "vae": weights_id(d / "vae"),
                  "classifier": weights_id(d / "classifier.safetensors")}
        for m in models.values():
            if isinstance(m, dict):
                m["path"] = f"<preset {name}>/{Path(m['path']).name}"  # installed location must not change the fingerprint
        cfg = build_config(name, ipc, recipe, class_ids=ids, class_names=[names[i] for i in ids],
                           num_model_classes=dit.num_classes, models=models, **overrides)
        return cls(dit, vae, clf, cfg, device=device, progress=progress)

    @classmethod
    def from_paths(cls, dit: str | Path, vae: str | Path, classifier: str, dataset: str = "imagenet-1k", ipc: int = 10,
                   recipe: str = "official", class_ids: list[int] | None = None, device: str = "auto",
                   progress: bool = False, classifier_input_size: int = 224, **overrides) -> "Distiller":
        """Real checkpoints on disk: an original/diffusers DiT, a diffusers VAE dir, a timm ``name[:ckpt]``."""
        _check_ipc(ipc)
        class_ids = None if class_ids is None else check_class_ids(class_ids)
        dit_m = load_dit(dit)
        vae_m = load_vae(vae)
        name, ckpt = parse_spec(classifier)
        clf = load_classifier(classifier, input_size=classifier_input_size)
        if class_ids is not None:
            dataset = "custom" if dataset in ("imagenet-1k", "custom") else dataset
        names = None
        if class_ids is not None and dit_m.num_classes == 1000:
            from .config import read_class_file

            wnids = read_class_file("imagenet1k_wnids.txt")
            names = [wnids[c] if 0 <= c < 1000 else f"{c:04d}" for c in class_ids]
        models = {"dit": weights_id(Path(dit)), "vae": weights_id(Path(vae)),
                  "classifier": {"name": name, **(weights_id(Path(ckpt)) if ckpt else {})}}
        cfg = build_config(dataset, ipc, recipe, class_ids=class_ids, class_names=names,
                           num_model_classes=dit_m.num_classes, models=models,
                           classifier_input_size=classifier_input_size, **overrides)
        return cls(dit_m, vae_m, clf, cfg, device=device, progress=progress)

    def to(self, device) -> "Distiller":
        """Move the models to ``device`` in the config's dtype (a device that is not there is one ``UserError``)."""
        self.device = _check_device(device)
        self.dit.set_kernels(fast_kernels(self.device))
        self.dit.to(self.device, self.dtype)
        self.vae.to(self.device, self.dtype)
        self.classifier.to(self.device, self.dtype)
        return self

    def stage1_group_bytes(self) -> int:
        """Host memory one stage-1 group holds at once: every candidate's pre-drawn noise (initial and per step) and
        its decoded image, in float32."""
        cfg = self.config
        n = cfg.classes_per_group * cfg.num_candidates
        latent = math.prod(self.latent_shape)
        image = 3 * latent // self.latent_shape[0] * self.vae.downsample ** 2
        return 4 * n * ((cfg.sample_steps + 1) * latent + image)

    def _check_fits(self) -> None:
        """Refuse, before any work, a config whose stage-1 group cannot fit this machine's memory (an IPC or K
        typed with too many digits), in one line instead of an allocation error minutes later."""
        need, have = self.stage1_group_bytes(), _host_memory()
        if have and need > have:
            cfg = self.config
            raise UserError(f"--ipc {cfg.ipc} with --k {cfg.k}: one class's {cfg.num_candidates} stage-1 candidates "
                            f"need about {need / 1e9:.3g} GB of host memory (their pre-drawn noise and decoded "
                            f"images), more than this machine's {have / 1e9:.3g} GB; lower --ipc or --k")

    def _classifier_targets(self) -> dict[int, int]:
        n = self.classifier.num_classes
        ids = self.config.class_ids
        if n == self.dit.num_classes:
            return {c: c for c in ids}
        if n == len(ids):  # a subset classifier: its outputs follow the class list's order
            return {c: i for i, c in enumerate(ids)}
        raise UserError(f"the classifier has {n} classes, but the DiT has {self.dit.num_classes} and the class list "
                        f"{len(ids)}: its head must match one of them")

    @property
    def engines(self) -> dict:
        """The engines of the two stages, as the config records them (see :meth:`use_engines`)."""
        return {"stage1": self.config.engine, "stage2": self.config.stage2_engine}

    def _dit_call(self, x, t, y, drop=None):
        return self.dit(x, t, y, drop)

    def use_engines(self, engine: str = "eager", stage2: str | None = None, cache_dir: str | Path | None = None,
                    settings=None, build: bool = True) -> dict:
        """Run the stage-1 models on ``engine`` (eager, compile, onnx, trt; built or loaded from the engine cache in
        ``cache_dir``) and the stage-2 DiT on ``stage2`` (eager or compile: it needs gradients; default compile on
        CUDA, eager on CPU). Call after :meth:`to`. Returns the engines by model name, plus ``"stage2"``.

        ``build=False`` never exports or builds an engine: one missing from the cache is a ``UserError`` (for
        machines that must only load what ``cao2-fast export`` made). The engines enter the config (``engine``,
        ``stage2_engine``) and so its fingerprint, unless both are eager: another engine can round a pixel
        differently, and one set is made by one engine's bytes."""
        from .config import with_overrides
        from .engines import EngineCache, check_engines, stage1_engines, stage2_engine

        cfg = self.config
        check_engines(engine, stage2, self.device, cfg.dtype)
        built = stage1_engines(engine, self.dit, self.vae, self.classifier, self.device, cfg.dtype,
                               dit_batch=cfg.stage1_batch * (1 if cfg.guidance_scale == 1.0 else 2),
                               decode_batch=cfg.decode_batch, cache_dir=cache_dir, settings=settings, build=build)
        built["stage2"] = stage2_engine(stage2, self.dit, self.device, cfg.dtype, settings)
        self.stage1_dit, self.stage1_decode, self.stage1_classify = built["dit"], built["vae_decode"], built["classifier"]
        self.engine_dir = EngineCache(cache_dir).root if any(e.artefact for e in built.values()) else None
        self._dit_call = built["stage2"]
        self.config = with_overrides(cfg, engine=engine, stage2_engine=built["stage2"].backend.name)
        _log.info("engines: stage 1 %s, stage 2 %s (%s)", engine, self.engines["stage2"],
                  ", ".join(f"{k} {'cache hit' if e.cache_hit else 'built'}" for k, e in built.items()
                            if e.cache_hit is not None) or "nothing to build")
        return built

    # -- the stages on tensors -------------------------------------------------------------------------------------

    def stage1_forwards(self) -> int:
        """DiT image-forwards of one class's stage 1 under the config (a guided step counts 2; early rejection and
        the guidance interval counted), the SPEC §5 cost model's unit."""
        cfg = self.config
        gi = cfg.guidance_interval
        return stage1.dit_forwards(cfg.num_candidates, cfg.sample_steps, _checks(cfg), cfg.guidance_scale,
                                   None if gi is None else guided_steps(self.diffusion, gi))

    def _numerics(self):
        """The recipe's process-wide numerics (TF32 on CUDA under ``official``), set for one call and restored."""
        return numerics.tf32(self.config.recipe.tf32, self.device)

    def stage1(self, class_ids: list[int], bar=None) -> dict[int, dict]:
        """Sample K·IPC candidates per class, score and select. Returns per class: kept latents, kept candidate
        indices, their stage-1 images and probabilities, and the candidates' accuracy. With early rejection
        (``early_reject_step``) only the candidates that survive the check finish sampling, and the accuracy and
        the selection are over those survivors."""
        self._check_classes(class_ids)
        with self._numerics():
            return self._stage1(list(class_ids), bar)

    def _stage1(self, class_ids: list[int], bar=None) -> dict[int, dict]:
        cfg = self.config
        n = cfg.num_candidates
        noises = [stage1.Stage1Noise.draw(n, self.latent_shape, cfg.sample_steps, class_generator(cfg.seed, c, "stage1"))
                  for c in class_ids]
        labels = torch.tensor([c for c in class_ids for _ in range(n)])
        if cfg.early_reject_step is not None or cfg.guidance_interval is not None:
            return self._stage1_early(class_ids, stage1.Stage1Noise.cat(noises), labels, bar)
        with torch.no_grad():
            latents = stage1.generate(self.stage1_dit, self.diffusion, stage1.Stage1Noise.cat(noises), labels,
                                      self.dit.null_class, cfg.guidance_scale, cfg.recipe.guided_channels, self.device,
                                      self.dtype, cfg.stage1_batch, progress=bar)
        images, probs = stage1.decode_and_score(self.stage1_decode, self.stage1_classify, latents, self.device,
                                                self.dtype, cfg.decode_batch)
        # a candidate whose latent, image or probabilities are not finite (NaN/Inf in a model) is never kept
        finite = (latents.flatten(1).isfinite().all(1) & images.flatten(1).isfinite().all(1)
                  & probs.isfinite().all(1))
        out = {}
        for j, c in enumerate(class_ids):
            sl = slice(j * n, (j + 1) * n)
            target = self._target_index[c]
            gen = class_generator(cfg.seed, c, "select")
            p, ok = probs[sl], finite[sl]
            n_ok = int(ok.sum())
            keep = (stage1.select(p, target, cfg.ipc, cfg.selection, cfg.order, gen, valid=ok) if n_ok >= cfg.ipc
                    else torch.zeros(0, dtype=torch.long))
            out[c] = {
                "latents": latents[sl][keep],
                "candidate_index": keep,
                "images": images[sl][keep],
                "prob": p[keep, target],
                "candidate_accuracy": float(((p.argmax(1) == target) & ok).float().mean()),
                "nonfinite_candidates": n - n_ok,
                "failure": None if n_ok >= cfg.ipc else
                f"only {n_ok} of {n} stage-1 candidates are finite (NaN/Inf in the DiT, VAE or classifier output), "
                f"{cfg.ipc} are needed",
            }
        return out

    def _stage1_early(self, class_ids: list[int], noise: stage1.Stage1Noise, labels: torch.Tensor,
                      bar=None) -> dict[int, dict]:
        """Stage 1 with early rejection and/or a guidance interval (:func:`stage1.generate_early`); a class's
        randomness and ranking depend on (seed, class) only, as in the full run."""
        cfg = self.config
        n = cfg.num_candidates

        def score(x0):
            images, probs = stage1.decode_and_score(self.stage1_decode, self.stage1_classify, x0, self.device,
                                                    self.dtype, cfg.decode_batch)
            return probs, (x0.flatten(1).isfinite().all(1) & images.flatten(1).isfinite().all(1)
                           & probs.isfinite().all(1))

        def rank(j, idx, probs, finite):
            c = class_ids[j]
            if cfg.selection == "random":  # the class's one permutation, restricted to idx (see early_rank)
                perm = stage1.early_rank(torch.zeros(n, 1), 0, "random", generator=class_generator(cfg.seed, c, "select"))
                place = torch.empty(n, dtype=torch.long)
                place[perm] = torch.arange(n)
                order = torch.sort(place[idx], stable=True).indices
                return torch.cat([order[finite[order]], order[~finite[order]]])
            return stage1.early_rank(probs, self._target_index[c], cfg.selection, cfg.order, valid=finite)

        with torch.no_grad():
            latents, alive, early_nonfinite = stage1.generate_early(
                self.stage1_dit, self.diffusion, noise, labels, n, self.dit.null_class, cfg.guidance_scale,
                cfg.recipe.guided_channels, self.device, self.dtype, cfg.stage1_batch,
                stage1.early_checks(cfg.early_reject_step, cfg.early_reject_keep), score, rank, progress=bar,
                guidance_interval=cfg.guidance_interval)
        images, probs = stage1.decode_and_score(self.stage1_decode, self.stage1_classify, latents, self.device,
                                                self.dtype, cfg.decode_batch)
        finite = (latents.flatten(1).isfinite().all(1) & images.flatten(1).isfinite().all(1)
                  & probs.isfinite().all(1))
        bad = early_nonfinite.clone()
        bad[alive[~finite]] = True  # non-finite at the check or at the end
        out = {}
        for j, c in enumerate(class_ids):
            pos = torch.nonzero(alive // n == j).flatten()
            idx, target = alive[pos] - j * n, self._target_index[c]
            p, ok = probs[pos], finite[pos]
            n_ok = int(ok.sum())
            if n_ok < cfg.ipc:
                keep = torch.zeros(0, dtype=torch.long)
            elif cfg.selection == "random":
                keep = rank(j, idx, p, ok)[:cfg.ipc]
            else:
                keep = stage1.select(p, target, cfg.ipc, cfg.selection, cfg.order, valid=ok)
            out[c] = {
                "latents": latents[pos][keep],
                "candidate_index": idx[keep],
                "images": images[pos][keep],
                "prob": p[keep, target],
                "candidate_accuracy": float(((p.argmax(1) == target) & ok).float().mean()),
                "nonfinite_candidates": int(bad[j * n:(j + 1) * n].sum()),
                "failure": None if n_ok >= cfg.ipc else
                f"only {n_ok} of {len(pos)} surviving stage-1 candidates are finite (NaN/Inf in the DiT, VAE or "
                f"classifier output), {cfg.ipc} are needed",
            }
        return out

    def bank_index(self, class_id: int, n: int) -> torch.Tensor | None:
        """Each of the class's ``n`` kept images' entry of the stage-2 noise bank: uniform over the bank, with
        replacement, from the class's own stream (so it depends on (seed, class) only, never on sharding); None
        without the bank."""
        if not self.config.recipe.noise_bank:
            return None
        gen = class_generator(self.config.seed, class_id, "noise-bank")
        return torch.randint(0, NOISE_BANK_SIZE, (n,), generator=gen)

    def stage2_noise(self, class_id: int, candidate_index: torch.Tensor) -> stage2.Stage2Noise:
        cfg = self.config
        index = self.bank_index(class_id, len(candidate_index))
        bank_eps = None if index is None else stage2.noise_bank(self.latent_shape)[index]
        return stage2.Stage2Noise.draw(len(candidate_index), self.latent_shape, cfg.stage2_steps, cfg.t_max,
                                       class_generator(cfg.seed, class_id, "stage2"),
                                       self.dit.cfg.class_dropout_prob, eps=bank_eps)

    def stage2(self, latents: torch.Tensor, class_ids: torch.Tensor, noise: stage2.Stage2Noise,
               bar=None) -> stage2.Stage2Result:
        """Optimise ``latents`` (B, C, H, W) of classes ``class_ids`` (B,) in chunks of ``stage2_batch``. On CUDA each
        chunk's step loop runs as one CUDA graph; a chunk that runs out of device memory is retried at half the size,
        and the chunks after it keep that size (batching is exact, so the latents do not depend on it)."""
        with self._numerics():
            return self._stage2(latents, class_ids, noise, bar)

    def _stage2(self, latents: torch.Tensor, class_ids: torch.Tensor, noise: stage2.Stage2Noise,
                bar=None) -> stage2.Stage2Result:
        cfg = self.config
        y = class_ids.clone() if cfg.stage2_label == "true" else torch.full_like(class_ids, self.dit.null_class)
        parts, s, batch = [], 0, cfg.stage2_batch
        while s < len(latents):
            ticks = _Ticks(bar)

            def chunk(b: int, s: int = s, ticks: _Ticks = ticks) -> stage2.Stage2Result:
                ticks.start(b)
                return stage2.optimize(self._dit_call, self.diffusion, latents[s:s + b], y[s:s + b],
                                       noise.slice(s, s + b), cfg.stage2_steps, cfg.lr, cfg.lam,
                                       cfg.recipe.timestep_mode, cfg.recipe.label_dropout, self.device, self.dtype,
                                       progress=ticks, cuda_graph=self.device.type == "cuda")

            batch, part = stage2.halve_on_oom(chunk, min(batch, len(latents) - s), self.log)
            parts.append(part)
            s += batch
        return stage2.Stage2Result(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                     ("latents", "loss_first", "loss_last", "steps_done", "finite")))

    def distill(self, class_ids: list[int] | None = None, bars=None) -> list[ClassResult]:
        """Both stages for ``class_ids`` (default: the config's), in memory. Progress goes to the Distiller's
        ``progress`` (``bars`` are a caller's own callbacks, as ``run`` and ``stream`` pass them)."""
        cfg = self.config
        self._check_classes(class_ids)
        class_ids = list(cfg.class_ids if class_ids is None else class_ids)
        if bars is None:
            wanted = set(class_ids)
            bars = self._bars(self._plan([[c for c in g if c in wanted] for g in self.groups()]))
            try:
                results = self.distill(class_ids, bars)
                if "classes" in bars:
                    bars["classes"].update(len(class_ids))
                return results
            finally:
                for b in bars.values():
                    b.close()
        class_order = list(class_ids)
        s1 = {}
        for g in self.groups():  # stage-1 batches never straddle a group, however many groups are asked for
            part = [c for c in g if c in set(class_ids)]
            if part:
                s1.update(self.stage1(part, bars.get("stage1")))
        names = dict(zip(cfg.class_ids, cfg.class_names))
        results = [ClassResult(c, names.get(c, str(c)), s1[c]["images"], s1[c]["images"], [],
                               s1[c]["candidate_accuracy"], failure=s1[c]["failure"])
                   for c in class_ids if s1[c]["failure"] is not None]  # the other classes go on without them
        class_ids = [c for c in class_ids if s1[c]["failure"] is None]
        if not class_ids:
            return results
        lat = torch.cat([s1[c]["latents"] for c in class_ids])
        ids = torch.tensor([c for c in class_ids for _ in range(cfg.ipc)])
        noise = stage2.Stage2Noise.cat([self.stage2_noise(c, s1[c]["candidate_index"]) for c in class_ids])
        r2 = self.stage2(lat, ids, noise, bars.get("stage2"))
        bank = {c: self.bank_index(c, cfg.ipc) for c in class_ids}
        with self._numerics():
            images, probs = stage1.decode_and_score(self.stage1_decode, self.stage1_classify, r2.latents, self.device,
                                                    self.dtype, cfg.decode_batch)
        for j, c in enumerate(class_ids):
            sl = slice(j * cfg.ipc, (j + 1) * cfg.ipc)
            target = self._target_index[c]
            records = []
            for i, b in enumerate(range(sl.start, sl.stop)):
                records.append({
                    "class_id": c,
                    "candidate_index": int(s1[c]["candidate_index"][i]),
                    "prob_before": _num(s1[c]["prob"][i]),
                    "prob_after": _num(probs[b, target]),
                    "loss_first": _num(r2.loss_first[b]),
                    "loss_last": _num(r2.loss_last[b]),
                    "stage2_steps": int(r2.steps_done[b]),
                    "stage2_status": "ok" if bool(r2.finite[b]) else "stopped: non-finite loss or latent",
                    "stage1_nonfinite_candidates": s1[c]["nonfinite_candidates"],
                    "noise_bank_index": None if bank[c] is None else int(bank[c][i]),
                })
            bad = not bool(images[sl].isfinite().all())
            results.append(ClassResult(c, names.get(c, str(c)), s1[c]["images"], images[sl], records,
                                       s1[c]["candidate_accuracy"],
                                       failure="a decoded stage-2 image is not finite (NaN/Inf in the VAE output)"
                                       if bad else None))
        results.sort(key=lambda r: class_order.index(r.class_id))
        return results

    def stream(self, class_ids: list[int] | None = None) -> Iterator[ClassOutput]:
        """Distill ``class_ids`` (default: the config's) and yield each class's :class:`ClassOutput` as soon as its
        block is done, in the config's class order — a consumer sees the first classes after one block, not after
        the job. Classes are computed in the config's blocks (:meth:`blocks`), exactly as ``run`` and the CLI
        compute them, so the images are the bytes the CLI writes; asking for one class of a block computes its whole
        block. A class that fails (see ``run``) is yielded with ``failure`` set and no images,
        and logged; the others go on. Nothing is written to disk."""
        wanted = self._check_classes(class_ids)
        blocks = [b for b in self.blocks() if wanted.intersection(b)]
        plan = self._plan([g for g in self.groups() if any(set(g) <= set(b) for b in blocks)])
        bars, clock = self._bars(plan), _BlockClock(plan.todo)
        try:
            for block in blocks:
                yield from self._stream_block(block, wanted, bars)
                clock.done(block, self.config)
                if "classes" in bars:
                    bars["classes"].update(len(block))
        finally:
            for b in bars.values():
                b.close()

    def _stream_block(self, block: list[int], wanted: set[int], bars: dict) -> Iterator[ClassOutput]:
        for r in self.distill(block, bars):
            if r.class_id not in wanted:
                continue
            if r.failure is not None:
                _log.warning("class %s (%s) failed: %s", r.class_id, r.class_name, r.failure)
                yield ClassOutput(r.class_id, r.class_name, None, None, None, r.records, r.failure)
                continue
            for rec in r.records:
                rec["stage1_candidate_accuracy"] = round(r.candidate_accuracy, 6)
            yield ClassOutput(r.class_id, r.class_name, torch.from_numpy(output.to_uint8(r.images)),
                              r.images.clamp(-1, 1), r.stage1_images.clamp(-1, 1), r.records)

    def _check_classes(self, class_ids) -> set[int]:
        cfg = self.config
        if class_ids is None:
            return set(cfg.class_ids)
        class_ids = check_class_ids(class_ids)
        unknown = [c for c in class_ids if c not in set(cfg.class_ids)]
        if unknown:
            shown = ", ".join(map(str, cfg.class_ids[:10])) + (", …" if len(cfg.class_ids) > 10 else "")
            raise UserError(f"class {unknown[0]} is not in the config (its classes: {shown})")
        return set(class_ids)

    # -- the job on disk ---------------------------------------------------------------------------------------------

    def groups(self) -> list[list[int]]:
        """Classes whose candidates share stage-1 batches (``DistillConfig.classes_per_group`` each)."""
        ids = list(self.config.class_ids)
        g = self.config.classes_per_group
        return [ids[i:i + g] for i in range(0, len(ids), g)]

    def blocks(self) -> list[list[int]]:
        """The unit of work: consecutive whole groups whose latents (up to ``stage2_batch`` of them) go through
        stage 2 together. Stage 1 still runs group by group; pooling groups only fills stage 2's batches (a digits
        group has 20 latents against a batch of 64). Blocks depend on the config alone, so ``run``, ``stream`` and
        every rank of a sharded job compute each class in the same batches."""
        per_class = self.config.ipc
        blocks: list[list[int]] = []
        for g in self.groups():
            if blocks and (len(blocks[-1]) + len(g)) * per_class <= self.config.stage2_batch:
                blocks[-1] += g
            else:
                blocks.append(list(g))
        return blocks

    def run(self, out: str | Path, overwrite: bool = False, rank: int = 0, world_size: int = 1,
            barrier: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
            stage1_out: str | Path | None = None) -> dict | None:
        """Distill into ``out``: skip complete classes, redo incomplete ones, merge the manifest on rank 0.

        Classes are scheduled in blocks (:meth:`blocks`: whole stage-1 groups pooled for stage 2) and block b runs on
        rank b mod world_size, so every class sees the same batches however many ranks share the job. A block is worked
        on under advisory locks of its classes: a second run on the same folder does the groups nobody holds and
        waits for the rest. A class whose stage 1 cannot fill IPC with finite candidates fails alone: the other
        classes are written, then the run raises one ``UserError`` naming it. ``self.last_run`` counts what this
        process did (``distilled``, ``already_complete``).

        ``stage1_out``: also write each class's stage-1 picks (before stage 2) as an ImageFolder tree of its own
        there, with the same staging, checksums and resume; it must lie outside ``out`` (and ``out`` outside it),
        and a class counts as complete only when both trees hold it.
        """
        out, self.stage1_out = self._check_paths(out, stage1_out)
        try:
            return self._run(out, overwrite, rank, world_size, barrier, log)
        except BaseException as e:
            if hasattr(barrier, "fail"):  # tell the other ranks at once instead of letting them wait it out
                barrier.fail(f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e))
            raise

    def _check_paths(self, out, stage1_out) -> tuple[Path, Path | None]:
        out = output.check_out_path(out, "--out")
        stage1_out = None if stage1_out is None else output.check_out_path(stage1_out, "--stage1-out")
        if stage1_out is not None and overlaps(out, stage1_out):
            raise UserError(f"{stage1_out}: the stage-1 folder must lie beside --out {out}, not inside it (or around "
                            "it, or be it under another name): the main root holds only the distilled class folders")
        if self.engine_dir is not None:
            for root in [out, stage1_out]:
                if root is not None and overlaps(self.engine_dir, root):
                    raise UserError(f"{self.engine_dir}: the engine cache must lie outside the output folder {root} "
                                    "(engine files are not part of a distilled set); pass another --engine-dir")
        return out, stage1_out

    def check_folders(self, out: str | Path, overwrite: bool = False, stage1_out: str | Path | None = None,
                      engine: str | None = None, stage2_engine: str | None = None) -> None:
        """Raise the refusal :meth:`run` would raise for these folders, writing nothing, for a config that runs on
        ``engine``/``stage2_engine`` (default: the current ones): a caller checks before it spends minutes building
        engines for a folder that is then refused."""
        from .config import with_overrides

        out, stage1_out = self._check_paths(out, stage1_out)
        cfg = with_overrides(self.config, engine=engine or self.config.engine,
                             stage2_engine=stage2_engine or self.config.stage2_engine)
        for root in [out] if stage1_out is None else [out, stage1_out]:
            output.check_output_dir(root, cfg.fingerprint(), cfg.class_names, cfg.ipc, overwrite, act=False,
                                    engines={"stage1": cfg.engine, "stage2": cfg.stage2_engine})

    def _run(self, out: Path, overwrite: bool, rank: int, world_size: int, barrier, log) -> dict | None:
        cfg = self.config
        fp = cfg.fingerprint()
        if log is not None:
            self.log = log
        roots = self._roots(out)

        def prepare(lock: output.FolderLock, alone: bool) -> None:
            # under the folders' claim: refusals again (the folder may have changed since the first check), and
            # --overwrite's deletions only while no other run is alive there
            output.check_output_dir(lock.root, fp, cfg.class_names, cfg.ipc, overwrite, act=alone,
                                    engines=self.engines)

        with contextlib.ExitStack() as stack:
            if rank == 0:
                for root in roots:  # every refusal before anything is written or deleted, in either tree
                    output.check_output_dir(root, fp, cfg.class_names, cfg.ipc, overwrite, act=False,
                                            engines=self.engines)
                for root in roots:
                    root.mkdir(parents=True, exist_ok=True)
                locks = [stack.enter_context(output.FolderLock(root, cfg.class_names)) for root in roots]
                output.claim(locks, fp, prepare)
            if barrier is not None:
                barrier()
            if rank != 0:  # rank 0 holds the claim: the other ranks join it
                locks = [stack.enter_context(output.FolderLock(root, cfg.class_names)) for root in roots]
                output.claim(locks, fp)
            return self._work(out, locks, rank, world_size, barrier)

    def _work(self, out: Path, locks: list, rank: int, world_size: int, barrier) -> dict | None:
        """This rank's share of the blocks, each under its classes' locks, then (rank 0) the merge."""
        cfg = self.config
        fp = cfg.fingerprint()
        names = dict(zip(cfg.class_ids, cfg.class_names))
        complete = {c for c in cfg.class_ids if self._complete(out, [c])}  # read once: checksums every image
        mine = [b for i, b in enumerate(self.blocks()) if i % world_size == rank]
        todo = [b for b in mine if not complete.issuperset(b)]
        self.last_run = {"distilled": 0, "already_complete": sum(map(len, mine)) - sum(map(len, todo))}
        failed: dict[int, str] = {}
        t0 = time.perf_counter()
        plan = self._plan([g for g in self.groups() if any(set(g) <= set(b) for b in todo)], len(complete), rank,
                          world_size, job_todo=len(cfg.class_ids) - len(complete))
        bars = self._bars(plan, out)
        try:
            self._take_blocks(out, locks[0], todo, fp, bars, failed)
        finally:
            for b in bars.values():
                b.close()
        if self.log:
            self.log(f"rank {rank}: {self.last_run['distilled']} classes distilled in "
                     f"{time.perf_counter() - t0:.1f} s")
        if barrier is not None:
            barrier()
        if failed:
            first = next(iter(failed))
            raise UserError(f"class {first} ({names[first]}): {failed[first]}"
                            + (f" (and {len(failed) - 1} more classes)" if len(failed) > 1 else "")
                            + "; the other classes are written, re-run the same command after fixing it")
        if rank != 0:
            return None
        manifest = self.merge(out)
        for lock in locks:
            lock.retire()  # the set is complete: nothing left to share
        return manifest

    def _take_blocks(self, out: Path, lock, todo: list[list[int]], fp: str, bars: dict, failed: dict) -> None:
        """Distill and write each block of ``todo`` under its classes' locks: a block another run on this folder
        holds is left for later (and skipped if that run completes it), so two runs of one config share the work."""
        names = dict(zip(self.config.class_ids, self.config.class_names))
        pending, said, clock = list(todo), False, _BlockClock(sum(map(len, todo)))
        while pending:
            progressed = False
            for block in list(pending):
                block_names = [names[c] for c in block]
                if not lock.try_acquire(block_names):
                    continue
                try:
                    pending.remove(block)
                    progressed = True
                    if self._complete(out, block):  # finished meanwhile by another run on this folder
                        self.last_run["already_complete"] += len(block)
                        continue
                    self._write_group(out, block, fp, bars, failed)
                    clock.done(block, self.config)
                finally:
                    lock.release(block_names)
            if pending and not progressed:
                if not said and self.log:
                    busy = ", ".join(names[c] for b in pending for c in b)
                    self.log(f"another cao2-fast run is working on classes {busy} in {out}; waiting for it")
                    said = True
                time.sleep(LOCK_POLL_S)

    def _roots(self, out: Path) -> list[Path]:
        """The folders a run writes: ``out``, and the stage-1 tree when asked for."""
        return [out] if self.stage1_out is None else [out, self.stage1_out]

    def _complete(self, out: Path, group: list[int]) -> bool:
        cfg = self.config
        names = dict(zip(cfg.class_ids, cfg.class_names))
        return all(output.read_complete(root, names[c], cfg.fingerprint(), cfg.ipc, self._fields(root, out))
                   is not None for root in self._roots(out) for c in group)

    def _fields(self, root: Path, out: Path) -> dict:
        """The per-image record fields a class marker in ``root`` must hold (a stage-1 tree records the picks only)."""
        return output.IMAGE_FIELDS if root == out else output.PICK_FIELDS

    def _write_group(self, out: Path, group: list[int], fp: str, bars: dict, failed: dict[int, str]) -> None:
        for r in self.distill(group, bars):
            if r.failure is not None:
                failed[r.class_id] = r.failure
                if self.log:
                    self.log(f"class {r.class_id} ({r.class_name}) failed: {r.failure}")
                continue
            for rec in r.records:
                rec["stage1_candidate_accuracy"] = round(r.candidate_accuracy, 6)
            stage1_images = output.to_uint8(r.stage1_images)
            writes = [(out, output.to_uint8(r.images), r.records)]
            if self.stage1_out is not None:
                picks = [{k: rec[k] for k in ("class_id", "candidate_index", "prob_before",
                                              "stage1_candidate_accuracy")} for rec in r.records]
                writes.insert(0, (self.stage1_out, stage1_images, picks))
            wrote = False
            for root, images, records in writes:
                if output.read_complete(root, r.class_name, fp, self.config.ipc, self._fields(root, out)) is not None:
                    continue  # complete already; it shared its group's batches with a class that was not
                wrote = True
                try:
                    output.write_class(root, r.class_name, images, stage1_images, records, fp,
                                       extra={"engines": dict(self.engines)})
                except OSError as e:
                    raise UserError(f"{root / r.class_name}: cannot write ({e.strerror or e}); classes already "
                                    f"complete are kept, re-run the same command to resume") from None
            if not wrote:
                continue
            self.last_run["distilled"] += 1
            if "classes" in bars:
                bars["classes"].update(1)

    def merge(self, out: Path) -> dict:
        """Write ``manifest.json`` and the contact sheet from the class markers (a damaged manifest is rebuilt)."""
        cfg = self.config
        fp = cfg.fingerprint()
        stage1_out = self.stage1_out
        parts, stage1_parts = [], []
        for c, name in zip(cfg.class_ids, cfg.class_names):
            for root, into in ((out, parts), (stage1_out, stage1_parts)):
                if root is None:
                    continue
                part = output.read_complete(root, name, fp, cfg.ipc, self._fields(root, out))
                if part is None:
                    raise UserError(f"{root / name}: class {c} is not complete; re-run the same command to finish it")
                into.append(part)
        acc = [rec["stage1_candidate_accuracy"] for p in parts for rec in p["images"][:1]]
        header = {
            "config": cfg.to_json(),
            "versions": versions(),
            "seed": cfg.seed,
            "engines": sorted({json.dumps(p.get("engines"), sort_keys=True) for p in parts}),
            "summary": {
                "classes": len(parts),
                "images": sum(len(p["images"]) for p in parts),
                "stage1_candidate_accuracy": _mean(acc),
                "mean_prob_before": _mean(r["prob_before"] for p in parts for r in p["images"]),
                "mean_prob_after": _mean(r["prob_after"] for p in parts for r in p["images"]),
                "stage2_stopped": sum(r["stage2_status"] != "ok" for p in parts for r in p["images"]),
            },
        }
        header["engines"] = [json.loads(e) for e in header["engines"]]
        if stage1_out is not None:
            header["stage1_folder"] = os.path.relpath(stage1_out.absolute(), out.absolute())
        try:
            if stage1_out is not None:
                output.write_manifest(stage1_out, {**header, "stage1_folder": None, "main_folder": os.path.relpath(
                    out.absolute(), stage1_out.absolute()), "contents": "stage-1 picks, before stage 2"},
                    stage1_parts)
            manifest = output.write_manifest(out, header, parts)
            output.contact_sheet(parts, out)
        except OSError as e:
            raise UserError(f"{out}: cannot write the manifest ({e.strerror or e}); all classes are complete, "
                            "re-run the same command to merge") from None
        return manifest

    def _plan(self, todo: list[list[int]], done: int = 0, rank: int = 0, world: int = 1,
              job_todo: int | None = None) -> Plan:
        """What a call is about to do: ``todo`` lists the classes it samples, as stage 1 batches them (per group);
        ``done`` classes of the job are complete already; a rank of a sharded run also names the job's share."""
        cfg = self.config
        todo = [g for g in todo if g]
        n_todo = sum(map(len, todo))
        flop = self.dit.cfg.flops_per_forward() * (n_todo * self.stage1_forwards()
                                                   + n_todo * cfg.ipc * cfg.stage2_steps * 2)
        return Plan(classes=len(cfg.class_ids), already_complete=done, todo=n_todo,
                    candidates=n_todo * cfg.num_candidates, sample_steps=cfg.sample_steps,
                    batch_steps=_batch_steps(todo, cfg), latents=n_todo * cfg.ipc,
                    latent_steps=cfg.stage2_steps * cfg.ipc * n_todo, engines=dict(self.engines),
                    dit_tflop=flop / 1e12, rank=rank, world=world, job_todo=n_todo if job_todo is None else job_todo)

    def _bars(self, plan: Plan, out: Path | None = None) -> dict:
        """The progress callbacks of one call, reporting to ``self.progress`` (see :mod:`cao2_fast.progress`), which
        is told ``plan`` first; empty when progress is off. The plan is also logged (INFO, logger ``cao2_fast``).
        With ``out``, the class count is read from the classes complete there (all ranks' work)."""
        _log.info("%s", plan.describe())
        reporter = as_progress(self.progress)
        if reporter is None:
            return {}
        reporter.start(plan)
        return {"classes": _ClassBar(reporter, "classes", out, plan.already_complete),
                "stage1": _Bar(reporter, "stage1"), "stage2": _Bar(reporter, "stage2")}


class _BlockClock:
    """Logs (INFO) each block as it is done, with the rate so far and the time left for ``total`` classes."""

    def __init__(self, total: int):
        self.total, self.done_classes, self.blocks, self.t0 = total, 0, 0, time.perf_counter()

    def done(self, block: list[int], cfg: DistillConfig) -> None:
        self.blocks += 1
        self.done_classes += len(block)
        elapsed = time.perf_counter() - self.t0
        rate = self.done_classes * cfg.ipc / max(elapsed, 1e-9)
        left = (self.total - self.done_classes) * cfg.ipc / rate if rate > 0 else None
        _log.info("block %d done (classes %s): %d/%d classes in %s, %.3g images/s, ETA %s", self.blocks,
                  ", ".join(map(str, block)), self.done_classes, self.total, clock_text(elapsed), rate,
                  clock_text(max(left, 0.0)) if left is not None else "?")


class _Bar:
    """One stage's progress as the stages call it: a zero-argument tick (stage 1, one sampling step of a batch) or
    ``update(n)`` (stage 2, latent-steps), passed on to the run's :class:`~cao2_fast.progress.Progress`."""

    def __init__(self, reporter: Progress, stage: str):
        self.reporter, self.stage = reporter, stage

    def __call__(self):
        self.reporter.advance(self.stage, 1)

    def update(self, n):
        self.reporter.advance(self.stage, n)

    def close(self):
        pass


class _Ticks:
    """Stage-2 progress of one chunk in latent-steps: :meth:`start` (re)begins it for ``b`` latents, taking back
    what an attempt that ran out of memory had counted; each call is one step of all of them."""

    def __init__(self, bar):
        self.bar, self.b, self.n = bar, 0, 0

    def start(self, b: int) -> None:
        if self.bar is not None and self.n:
            self.bar.update(-self.n)
        self.b, self.n = b, 0

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update(self.b)
            self.n += self.b


class _ClassBar(_Bar):
    """Counts complete classes on disk, so rank 0 reports the progress of all ranks; closing it ends the report."""

    def __init__(self, reporter: Progress, stage: str, out: Path | None, done: int):
        super().__init__(reporter, stage)
        self.out, self.n = out, done

    def update(self, n):
        on_disk = len(list(self.out.glob(f"*/{output.MARKER}"))) if self.out is not None else 0
        self.n = max(self.n + n, on_disk)
        self.reporter.classes_done(self.n)

    def close(self):
        self.reporter.close()


def _host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_ipc(ipc) -> None:
    if isinstance(ipc, bool) or not isinstance(ipc, int):
        raise UserError(f"--ipc must be a whole number (got {ipc!r})")
    if ipc < 1:
        raise UserError(f"--ipc must be at least 1 (got {ipc})")


def _check_device(device) -> torch.device:
    """``device`` as a torch device that is there; ``auto`` picks CUDA when present (as the CLI's default does)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: no CUDA device is available (use device='cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise UserError(f"device {device}: cao2-fast runs on cpu or cuda")
    return dev


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _checks(cfg: DistillConfig) -> list[tuple[int, int]]:
    return stage1.early_checks(cfg.early_reject_step, cfg.early_reject_keep)


def _batch_steps(groups: list[list[int]], cfg: DistillConfig) -> int:
    """Stage-1 progress ticks: sampling steps × DiT batches, with fewer batches after an early-rejection check."""
    total, done, alive = 0, 0, cfg.num_candidates
    for step, keep in [*_checks(cfg), (cfg.sample_steps, None)]:
        total += (step - done) * sum(_ceil(len(g) * alive, cfg.stage1_batch) for g in groups)
        done, alive = step, keep
    return total


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return round(v, 6) if np.isfinite(v) else None


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 6) if v else None


def versions() -> dict:
    import diffusers
    import timm

    from . import __version__

    return {"cao2_fast": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": sys.platform}
