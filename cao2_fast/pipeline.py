"""The method on tensors: a generator, a classifier and a config -> each class's distilled images, in memory.

``Distiller`` computes: stage 1 (sample K·IPC candidates per class with the generator, score them with the
classifier, keep IPC), stage 2 (optimise the kept latents), ``distill`` (both, for some classes) and ``stream``
(class by class as each block is done). It drives a :class:`~cao2_fast.generator.Generator` and knows no model
family. Writing a folder (staging, markers, locks, resume, merge, the contact sheet) is :mod:`cao2_fast.output`'s:
``cao2_fast.output.write_set(distiller, out)``, or :meth:`Distiller.run` for short.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import numerics, selection
from .config import DistillConfig, build_config, check_class_ids
from .errors import UserError
from .generator import Candidates, Generator, Optimised, class_generator
from .identity import weights_id
from .models.classifier import Classifier, load_classifier, parse_spec
from .progress import BlockClock, Plan, Progress, as_progress, stage_bars

__all__ = ["ClassOutput", "Distiller", "class_generator", "preset_dir", "read_preset"]

_log = logging.getLogger("cao2_fast")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PRESETS = ("digits", "digits-mar")  # the embedded presets


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
    _FLOAT_FIELDS = ("prob_before", "prob_after", "loss_first", "loss_last", "stage1_candidate_accuracy",
                     "stage1_score")

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
    """CaO2 on a generator (:class:`~cao2_fast.generator.Generator`), a classifier and a config.

    ``classifier`` maps images in [−1, 1] to logits. The stage-1 models can be swapped for compiled engines with
    :meth:`use_engines`. ``device`` ``auto`` is CUDA when there is one (as on the command line).
    """

    def __init__(self, generator: Generator, classifier: Classifier, config: DistillConfig, device: str = "auto",
                 progress: bool | Progress = False):
        self.generator, self.classifier, self.config = generator, classifier, config
        self.device = _check_device(device)
        self.dtype = DTYPES[config.dtype]
        self.progress = progress
        self.log: Callable[[str], None] = _log.info  # notes (a halved stage-2 batch, a waiting run); run(log=) sets it
        self.engine_dir: Path | None = None  # the engine cache stage 1 uses, if its engines have files (use_engines)
        self.last_run: dict = {}  # what the last ``run`` did in this process (see cao2_fast.output.write_set)
        self.classifier.normalize = config.recipe.classifier_normalize
        self.classifier.input_size = config.classifier_input_size
        self.classify: Callable = classifier  # the stage-1 classifier call (an engine after use_engines)
        self._target_index = self._classifier_targets()
        generator.check_config(config)
        self._check_fits()
        self.to(device)  # ready on the device it names, in the config's dtype

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "digits", ipc: int = 10, recipe: str = "official", device: str = "auto",
                    progress: bool = False, class_ids: list[int] | None = None, **overrides) -> "Distiller":
        """An embedded preset: ``digits``, a tiny latent DiT, its VAE and a classifier trained on scikit-learn's
        handwritten digits (shipped with the package)."""
        from . import generators

        meta = read_preset(name)
        names = meta["class_names"]
        _check_ipc(ipc)
        ids = list(range(len(names))) if class_ids is None else check_class_ids(class_ids)
        bad = [c for c in ids if not 0 <= c < len(names)]
        if bad:
            raise UserError(f"class id {bad[0]} is not in the {name} preset (valid: 0..{len(names) - 1})")
        d = preset_dir(name)
        gen, models = generators.from_preset(d, meta)
        clf_meta = meta["classifier"]
        clf_file = clf_meta.get("weights", "classifier.safetensors")
        clf = load_classifier(f"{clf_meta['model']}:{d / clf_file}", input_size=clf_meta["input_size"],
                              num_classes=len(meta["class_names"]), mean=clf_meta["mean"], std=clf_meta["std"])
        overrides.setdefault("classifier_input_size", clf_meta["input_size"])
        overrides.setdefault("stage1_batch", 2 * 2 * ipc)  # two classes per group: several groups to shard
        overrides.setdefault("stage2_batch", 64)
        clf_id = weights_id(d / clf_file)
        clf_id["path"] = f"<preset {name}>/{Path(clf_file).name}"
        models = {"preset": name, **models, "classifier": clf_id}
        for key, setting in (("guidance_scale", "guidance_scale"), ("num_iter", "sample_steps"),
                             ("token_steps", "token_steps")):
            if key in meta:  # the preset's own sampling settings (what its training check found best)
                overrides.setdefault(setting, meta[key])
        cfg = build_config(meta.get("dataset", name), ipc, recipe, class_ids=ids, class_names=[names[i] for i in ids],
                           num_model_classes=gen.num_classes, models=models,
                           family_defaults=gen.config_defaults, **overrides)
        return cls(gen, clf, cfg, device=device, progress=progress)

    @classmethod
    def from_paths(cls, dit: str | Path | None = None, vae: str | Path | None = None, classifier: str | None = None,
                   dataset: str = "imagenet-1k", ipc: int = 10, recipe: str = "official",
                   class_ids: list[int] | None = None, device: str = "auto", progress: bool = False,
                   classifier_input_size: int = 224, mar: str | Path | None = None, **overrides) -> "Distiller":
        """Real checkpoints: an original/diffusers DiT (a file, a folder, or a Hugging Face Hub id
        ``org/name[@revision]`` such as ``facebook/DiT-XL-2-256``), a diffusers VAE (a folder or Hub id; None when
        the DiT is a diffusers pipeline holding its own), and a classifier (``NAME:CHECKPOINT``, a pretrained timm
        ``NAME``, or ``random:NAME``). A local path that exists always wins over a Hub id.

        Or, instead of ``dit``, a MAR (``mar``: a folder holding ``checkpoint-last.pth``, the file, or
        ``.safetensors``; local only) with its VAE (``kl16.ckpt`` or a diffusers AutoencoderKL folder)."""
        from . import generators

        _check_ipc(ipc)
        if classifier is None:
            raise UserError("no classifier given: pass NAME:CHECKPOINT, a pretrained timm NAME, or random:NAME")
        class_ids = None if class_ids is None else check_class_ids(class_ids)
        gen, models = generators.from_paths(dit=dit, vae=vae, mar=mar)
        name, ckpt = parse_spec(classifier)
        clf = load_classifier(classifier, input_size=classifier_input_size)
        if class_ids is not None:
            dataset = "custom" if dataset in ("imagenet-1k", "custom") else dataset
        names = None
        if class_ids is not None and gen.num_classes == 1000:
            from .config import read_class_file

            wnids = read_class_file("imagenet1k_wnids.txt")
            names = [wnids[c] if 0 <= c < 1000 else f"{c:04d}" for c in class_ids]
        if ckpt:
            clf_id = weights_id(Path(ckpt))
        elif not name.startswith("random:"):  # timm's pretrained weights: their Hub id and commit
            from .hub import timm_identity

            clf_id = timm_identity(clf.model)
        else:
            clf_id = {}
        models["classifier"] = {"name": name, **clf_id}
        cfg = build_config(dataset, ipc, recipe, class_ids=class_ids, class_names=names,
                           num_model_classes=gen.num_classes, models=models, family_defaults=gen.config_defaults,
                           classifier_input_size=classifier_input_size, **overrides)
        return cls(gen, clf, cfg, device=device, progress=progress)

    def to(self, device) -> "Distiller":
        """Move the models to ``device`` in the config's dtype (a device that is not there is one ``UserError``)."""
        self.device = _check_device(device)
        self.generator.to(self.device, self.dtype)
        self.classifier.to(self.device, self.dtype)
        return self

    def _check_fits(self) -> None:
        """Refuse, before any work, a config whose stage-1 group cannot fit this machine's memory (an IPC or K
        typed with too many digits), in one line instead of an allocation error minutes later."""
        need, have = self.generator.stage1_bytes(self.config), _host_memory()
        if have and need > have:
            cfg = self.config
            raise UserError(f"--ipc {cfg.ipc} with --k {cfg.k}: one class's {cfg.num_candidates} stage-1 candidates "
                            f"need about {need / 1e9:.3g} GB of host memory (their pre-drawn noise and decoded "
                            f"images), more than this machine's {have / 1e9:.3g} GB; lower --ipc or --k")

    def _classifier_targets(self) -> dict[int, int]:
        n = self.classifier.num_classes
        ids = self.config.class_ids
        if n == self.generator.num_classes:
            return {c: c for c in ids}
        if n == len(ids):  # a subset classifier: its outputs follow the class list's order
            return {c: i for i, c in enumerate(ids)}
        raise UserError(f"the classifier has {n} classes, but the generator has {self.generator.num_classes} and the "
                        f"class list {len(ids)}: its head must match one of them")

    @property
    def engines(self) -> dict:
        """The engines of the two stages, as the config records them (see :meth:`use_engines`)."""
        return {"stage1": self.config.engine, "stage2": self.config.stage2_engine}

    def use_engines(self, engine: str = "eager", stage2: str | None = None, cache_dir: str | Path | None = None,
                    settings=None, build: bool = True) -> dict:
        """Run the stage-1 models on ``engine`` (eager, compile, onnx, trt; built or loaded from the engine cache in
        ``cache_dir``) and stage 2 on ``stage2`` (eager or compile: it needs gradients; default compile on CUDA,
        eager on CPU). Call after :meth:`to`. Returns the engines by model name, plus ``"stage2"``.

        ``build=False`` never exports or builds an engine: one missing from the cache is a ``UserError`` (for
        machines that must only load what ``cao2-fast export`` made). The engines enter the config (``engine``,
        ``stage2_engine``) and so its fingerprint, unless both are eager: another engine can round a pixel
        differently, and one set is made by one engine's bytes."""
        from .config import with_overrides
        from .engines import EngineCache, check_engines, stage1_engines, stage1_specs, stage2_engine

        cfg, gen = self.config, self.generator
        if stage2 is None and "compile" not in gen.engines:
            stage2 = "eager"
        for which, name in (("stage-1", engine), ("stage-2", stage2)):
            if name is not None and name not in gen.engines:
                raise UserError(f"the {gen.family} generator runs {which} on {', '.join(gen.engines)} only, not "
                                f"{name}")
        check_engines(engine, stage2, self.device, cfg.dtype)
        batches = {**gen.engine_batches(cfg), "classifier": cfg.decode_batch}
        built = stage1_engines(engine, stage1_specs(gen, self.classifier), batches, self.device, cfg.dtype,
                               cache_dir=cache_dir, settings=settings, build=build)
        built["stage2"] = stage2_engine(stage2, gen.stage2_module(), self.device, cfg.dtype, settings,
                                        model=f"{gen.family}_stage2")
        gen.use_engines(built, built["stage2"])
        self.classify = built["classifier"]
        self.engine_dir = EngineCache(cache_dir).root if any(e.artefact for e in built.values()) else None
        self.config = with_overrides(cfg, engine=engine, stage2_engine=built["stage2"].backend.name)
        _log.info("engines: stage 1 %s, stage 2 %s (%s)", engine, self.engines["stage2"],
                  ", ".join(f"{k} {'cache hit' if e.cache_hit else 'built'}" for k, e in built.items()
                            if e.cache_hit is not None) or "nothing to build")
        return built

    # -- the stages on tensors -------------------------------------------------------------------------------------

    def _numerics(self):
        """The recipe's process-wide numerics (TF32 on CUDA under ``official``), set for one call and restored."""
        return numerics.tf32(self.config.recipe.tf32, self.device)

    def _score(self, latents: torch.Tensor, io: str = "tensor"):
        """Decode and classify: (images, softmax, finite), where a candidate whose latent, image or probabilities
        are not finite (NaN/Inf in a model) is marked so and never kept. ``io="jpeg"`` shows the classifier each
        decode as an 8-bit JPEG (quality 75) resized by PIL and normalised (see :func:`selection.jpeg_view`)."""
        classify = self._classify_jpeg if io == "jpeg" else self.classify
        images, probs = selection.decode_and_score(self.generator.decode, classify, latents, self.device,
                                                   self.dtype, self.config.decode_batch)
        finite = (latents.flatten(1).isfinite().all(1) & images.flatten(1).isfinite().all(1)
                  & probs.isfinite().all(1))
        return images, probs, finite

    def _classify_jpeg(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's logits of images seen through JPEG files (always mean/std normalised, as released)."""
        clf = self.classifier
        view = selection.jpeg_view(images, clf.input_size).to(images.device, images.dtype)
        return clf.model((view - clf.mean.to(view.dtype)) / clf.std.to(view.dtype))

    def _early(self) -> bool:
        return self.config.early_reject_step is not None or self.config.guidance_interval is not None

    def _rank(self, class_ids: list[int]):
        """The ranking of a class's candidates at an early check (see :func:`cao2_fast.selection.early_rank`)."""
        cfg, n = self.config, self.config.num_candidates

        def rank(j, idx, probs, finite):
            c = class_ids[j]
            if cfg.selection == "random":  # the class's one permutation, restricted to idx (see early_rank)
                perm = selection.early_rank(torch.zeros(n, 1), 0, "random",
                                         generator=class_generator(cfg.seed, c, "select"))
                place = torch.empty(n, dtype=torch.long)
                place[perm] = torch.arange(n)
                order = torch.sort(place[idx], stable=True).indices
                return torch.cat([order[finite[order]], order[~finite[order]]])
            return selection.early_rank(probs, self._target_index[c], cfg.selection, cfg.order, valid=finite)

        return rank

    def stage1(self, class_ids: list[int], bar=None) -> dict[int, dict]:
        """Sample K·IPC candidates per class, score and select. Returns per class: kept latents, kept candidate
        indices, their stage-1 images and probabilities, and the candidates' accuracy. With early rejection
        (``early_reject_step``) only the candidates that survive the check finish sampling, and the accuracy and
        the selection are over those survivors."""
        self._check_classes(class_ids)
        class_ids = list(class_ids)
        with self._numerics():
            cands = self.generator.sample(class_ids, self.config, self._score, self._rank(class_ids), self.device,
                                          self.dtype, progress=bar)
        return {c: self._select(c, cands[c], j, class_ids) for j, c in enumerate(class_ids)}

    def _select(self, c: int, cand: Candidates, j: int, class_ids: list[int]) -> dict:
        cfg = self.config
        target, p, ok = self._target_index[c], cand.probs, cand.finite
        n_ok = int(ok.sum())
        if n_ok < cfg.ipc:
            keep = torch.zeros(0, dtype=torch.long)
        elif not self._early():
            keep = selection.select(p, target, cfg.ipc, cfg.selection, cfg.order,
                                    class_generator(cfg.seed, c, "select"), valid=ok, scores=cand.scores)
        elif cfg.selection == "random":
            keep = self._rank(class_ids)(j, cand.index, p, ok)[:cfg.ipc]
        else:
            keep = selection.select(p, target, cfg.ipc, cfg.selection, cfg.order, valid=ok)
        surviving = "surviving " if self._early() else ""
        return {
            "latents": cand.latents[keep],
            "candidate_index": cand.index[keep],
            "images": cand.images[keep],
            "prob": p[keep, target],
            "candidate_accuracy": float(((p.argmax(1) == target) & ok).float().mean()),
            "nonfinite_candidates": cand.nonfinite,
            "score": None if cand.scores is None else cand.scores[keep],
            "failure": None if n_ok >= cfg.ipc else
            f"only {n_ok} of {len(cand.index)} {surviving}stage-1 candidates are finite (NaN/Inf in the generator, "
            f"decoder or classifier output), {cfg.ipc} are needed",
        }

    def stage2(self, latents: torch.Tensor, class_ids: torch.Tensor, noise=None, bar=None) -> Optimised:
        """Optimise ``latents`` (B, ...) of classes ``class_ids`` (B,), each class's latents consecutive, with the
        generator's stage-2 objective (``noise``: its own pre-drawn randomness, default: from the class streams).
        Batching is exact: a latent's result does not depend on the others."""
        with self._numerics():
            return self.generator.optimise(latents, class_ids, self.config, self.device, self.dtype, progress=bar,
                                           log=self.log, noise=noise)

    def distill(self, class_ids: list[int] | None = None) -> list[ClassOutput]:
        """Both stages for ``class_ids`` (default: the config's), in memory: one :class:`ClassOutput` per class,
        in the order asked. Like :meth:`stream`, which it collects, it computes the config's whole blocks, so the
        images are the bytes the CLI writes (and ``cao2_fast.output.write_set(d, out, results=...)`` can write them
        to a resumable folder without computing them again)."""
        order = list(self.config.class_ids if class_ids is None else class_ids)
        found = {o.class_id: o for o in self.stream(class_ids)}
        return [found[c] for c in order]

    def compute(self, class_ids: list[int], bars: dict | None = None) -> list[ClassOutput]:
        """Both stages for ``class_ids`` as one unit of work: stage 1 group by group, stage 2 pooled over all their
        kept latents. :meth:`stream` does this for each block; a class's float rounding depends on the unit it is
        computed in, so sets are made block by block. ``bars``: progress callbacks."""
        self._check_classes(class_ids)
        class_ids, bars = list(class_ids), bars or {}
        s1 = {}
        for g in self.groups():  # stage-1 batches never straddle a group, however many groups are asked for
            part = [c for c in g if c in set(class_ids)]
            if part:
                s1.update(self.stage1(part, bars.get("stage1")))
        outputs = {c: self._failed(c, s1[c]) for c in class_ids if s1[c]["failure"] is not None}
        good = [c for c in class_ids if s1[c]["failure"] is None]  # the other classes go on without the failed
        if good:
            outputs.update(self._both_stages(good, s1, bars))
        return [outputs[c] for c in class_ids]

    def _failed(self, c: int, s1c: dict) -> ClassOutput:
        _log.warning("class %s (%s) failed: %s", c, self._name(c), s1c["failure"])
        return ClassOutput(c, self._name(c), None, None, None, [], s1c["failure"])

    def _name(self, c: int) -> str:
        return dict(zip(self.config.class_ids, self.config.class_names)).get(c, str(c))

    def _both_stages(self, class_ids: list[int], s1: dict, bars: dict) -> dict[int, ClassOutput]:
        """Stage 2 for the kept latents of ``class_ids`` (pooled in one batch), then decode and score them."""
        from .output import to_uint8

        cfg = self.config
        lat = torch.cat([s1[c]["latents"] for c in class_ids])
        ids = torch.tensor([c for c in class_ids for _ in range(cfg.ipc)])
        r2 = self.stage2(lat, ids, bar=bars.get("stage2"))
        with self._numerics():
            images, probs = selection.decode_and_score(self.generator.decode, self.classify, r2.latents, self.device,
                                                    self.dtype, cfg.decode_batch)
        out = {}
        for j, c in enumerate(class_ids):
            sl = slice(j * cfg.ipc, (j + 1) * cfg.ipc)
            records = self._records(c, s1[c], r2, probs, sl)
            if not bool(images[sl].isfinite().all()):
                failure = "a decoded stage-2 image is not finite (NaN/Inf in the decoder output)"
                _log.warning("class %s (%s) failed: %s", c, self._name(c), failure)
                out[c] = ClassOutput(c, self._name(c), None, None, None, records, failure)
                continue
            out[c] = ClassOutput(c, self._name(c), torch.from_numpy(to_uint8(images[sl])), images[sl].clamp(-1, 1),
                                 s1[c]["images"].clamp(-1, 1), records)
        return out

    def _records(self, c: int, s1c: dict, r2: Optimised, probs: torch.Tensor, sl: slice) -> list[dict]:
        """The manifest's per-image fields of class ``c`` (its images are rows ``sl`` of the stage-2 batch)."""
        target = self._target_index[c]
        extra = self.generator.image_records(c, sl.stop - sl.start, self.config)
        records = []
        for i, b in enumerate(range(sl.start, sl.stop)):
            records.append({
                "class_id": c,
                "candidate_index": int(s1c["candidate_index"][i]),
                "prob_before": _num(s1c["prob"][i]),
                "prob_after": _num(probs[b, target]),
                "loss_first": _num(r2.loss_first[b]),
                "loss_last": _num(r2.loss_last[b]),
                "stage2_steps": int(r2.steps_done[b]),
                "stage2_status": "ok" if bool(r2.finite[b]) else "stopped: non-finite loss or latent",
                "stage1_nonfinite_candidates": s1c["nonfinite_candidates"],
                "stage1_candidate_accuracy": round(s1c["candidate_accuracy"], 6),
                **({} if s1c["score"] is None else {"stage1_score": _num(s1c["score"][i])}),
                **extra[i],
            })
        return records

    def stream(self, class_ids: list[int] | None = None, bars: dict | None = None) -> Iterator[ClassOutput]:
        """Distill ``class_ids`` (default: the config's) and yield each class's :class:`ClassOutput` as soon as its
        block is done, in the config's class order — a consumer sees the first classes after one block, not after
        the job. Classes are computed in the config's blocks (:meth:`blocks`), exactly as the CLI computes them, so
        the images are the bytes the CLI writes; asking for one class of a block computes its whole block. A class
        that fails (see :func:`cao2_fast.output.write_set`) is yielded with ``failure`` set and no images, and
        logged; the others go on. Nothing is written to disk. ``bars``: a caller's own progress callbacks (the
        folder runner's), used instead of the Distiller's ``progress``."""
        wanted = self._check_classes(class_ids)
        blocks = [b for b in self.blocks() if wanted.intersection(b)]
        own = bars is None
        if own:
            plan = self._plan([g for g in self.groups() if any(set(g) <= set(b) for b in blocks)])
            bars, clock = self._bars(plan), BlockClock(plan.todo, self.config.ipc, _log.info)
        try:
            for block in blocks:
                yield from (o for o in self.compute(block, bars) if o.class_id in wanted)
                if own:
                    clock.done(block)
                    if "classes" in bars:
                        bars["classes"].update(len(block))
        finally:
            if own:
                for b in bars.values():
                    b.close()

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

    # -- how classes share work ------------------------------------------------------------------------------------

    def groups(self) -> list[list[int]]:
        """Classes whose candidates share stage-1 batches (``DistillConfig.classes_per_group`` each)."""
        ids = list(self.config.class_ids)
        g = self.config.classes_per_group
        return [ids[i:i + g] for i in range(0, len(ids), g)]

    def blocks(self) -> list[list[int]]:
        """The unit of work: consecutive whole groups whose latents (up to ``stage2_batch`` of them) go through
        stage 2 together. Stage 1 still runs group by group; pooling groups only fills stage 2's batches (a digits
        group has 20 latents against a batch of 64). Blocks depend on the config alone, so the folder runner,
        ``stream`` and every rank of a sharded job compute each class in the same batches."""
        per_class = self.config.ipc
        blocks: list[list[int]] = []
        for g in self.groups():
            if blocks and (len(blocks[-1]) + len(g)) * per_class <= self.config.stage2_batch:
                blocks[-1] += g
            else:
                blocks.append(list(g))
        return blocks

    # -- progress --------------------------------------------------------------------------------------------------

    def _plan(self, todo: list[list[int]], done: int = 0, rank: int = 0, world: int = 1,
              job_todo: int | None = None) -> Plan:
        """What a call is about to do: ``todo`` lists the classes it samples, as stage 1 batches them (per group);
        ``done`` classes of the job are complete already; a rank of a sharded run also names the job's share."""
        cfg, gen = self.config, self.generator
        todo = [g for g in todo if g]
        n_todo = sum(map(len, todo))
        flop1 = n_todo * gen.stage1_flops(cfg)
        flop = flop1 + n_todo * cfg.ipc * gen.stage2_flops(cfg)
        return Plan(classes=len(cfg.class_ids), already_complete=done, todo=n_todo,
                    candidates=n_todo * cfg.num_candidates, sample_steps=cfg.sample_steps,
                    batch_steps=gen.stage1_ticks(todo, cfg), latents=n_todo * cfg.ipc,
                    latent_steps=cfg.stage2_steps * cfg.ipc * n_todo, engines=dict(self.engines),
                    tflop=flop / 1e12, stage1_tflop=flop1 / 1e12, rank=rank, world=world,
                    job_todo=n_todo if job_todo is None else job_todo)

    def _bars(self, plan: Plan, on_disk: Callable[[], int] | None = None) -> dict:
        """The progress callbacks of one call, reporting to ``self.progress`` (see :mod:`cao2_fast.progress`); the
        plan is also logged (INFO, logger ``cao2_fast``). ``on_disk`` counts the classes complete in a folder."""
        _log.info("%s", plan.describe())
        return stage_bars(as_progress(self.progress), plan, on_disk)

    # -- the job on disk (cao2_fast.output) ----------------------------------------------------------------------------

    def run(self, out: str | Path, overwrite: bool = False, rank: int = 0, world_size: int = 1,
            barrier: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
            stage1_out: str | Path | None = None) -> dict | None:
        """Distill into the folder ``out`` (see :func:`cao2_fast.output.write_set`, which this calls)."""
        from .output import write_set

        return write_set(self, out, overwrite=overwrite, rank=rank, world_size=world_size, barrier=barrier, log=log,
                         stage1_out=stage1_out)

    def check_folders(self, out: str | Path, overwrite: bool = False, stage1_out: str | Path | None = None,
                      engine: str | None = None, stage2_engine: str | None = None) -> None:
        """Raise the refusal :meth:`run` would raise for these folders, writing nothing (see
        :func:`cao2_fast.output.check_folders`)."""
        from .output import check_folders

        check_folders(self, out, overwrite, stage1_out, engine, stage2_engine)


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


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return round(v, 6) if np.isfinite(v) else None
