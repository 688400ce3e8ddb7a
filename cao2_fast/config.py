"""Configuration: recipes (the released code's behaviour vs a consistent one), dataset presets, and the resolved
``DistillConfig`` that a run records in its manifest.

Every quirk of the released code is one named field of :class:`Recipe`; nothing branches on a recipe's name.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Literal

from .errors import UserError

Order = Literal["desc", "asc"]
Selection = Literal["confident", "el2n", "random", "stability", "stable-correct"]
Label = Literal["null", "true"]
TimestepMode = Literal["official", "consistent"]


@dataclass(frozen=True)
class Recipe:
    """How stage 1 and stage 2 treat the released code's quirks (docs/method.md, recipes).

    timestep_mode: ``official`` noises with ᾱ of the *respaced* schedule at t∈{1..t_max} but tells the DiT the raw t
        (quirk a: noise level and timestep embedding disagree ~20×); ``consistent`` tells it the matching original
        timestep. The consistent mode is what the model was trained for; official reproduces the published numbers.
    classifier_normalize: False feeds decoded images in [−1, 1] to the classifier (the released quirk); True maps
        them to [0, 1] and applies the classifier's mean/std.
    stage2_label: ``null`` optimises under the null class (released ImageNet-1K/Woof/100 scripts), ``true`` under
        the image's own class (the paper's wording, the first release).
    label_dropout: the DiT's train-mode label dropout during stage 2 (quirk b: 10 % of steps see the null class);
        only matters with stage2_label = true.
    guided_channels: how many eps channels classifier-free guidance acts on; 3 reproduces the DiT codebase.
    noise_bank: each image's stage-2 noise ε is a uniformly random entry (with replacement) of a fixed bank of 1024
        noises drawn with seed 42, shared by all classes, as released; the entry is drawn from the class's own seeded
        stream (the released numpy draw is unseeded) and recorded as ``noise_bank_index``. Otherwise ε is drawn from
        the class's own stream.
    MAR fields (``mar_``; they apply to the MAR family only and enter only a MAR config's fingerprint):

    mar_stage2_cond: the condition stage 2 optimises under: ``zero`` (the released call passes an all-zero label
        vector through the class embedding: a zero condition, neither the class nor the learned null) or ``class``
        (the image's own class embedding).
    mar_target_grad: ``detached`` noises a detached copy of the latent (the released stage 2: the latent's gradient
        comes only through the visible tokens the encoder sees) or ``attached`` (the noised tokens carry gradient
        too, as in the DiT path).
    mar_mask_rule: how many tokens stage 2 hides per step, with the rate r drawn from MAR's truncated normal on
        [0.7, 1]: ``max`` hides max(⌈L·r⌉, ⌊L/4⌋) (released: 70–100 % hidden, the ¼ never binds) or ``min`` hides
        min(⌈L·r⌉, ⌊L/4⌋) (¼ hidden, what the released ``max_ratio=0.25`` reads as).
    mar_select: ``stability`` keeps the IPC candidates whose teacher softmax moves least between the last two
        sampling iterations (cosine similarity), never checking the class (released); ``stable-correct`` ranks the
        teacher-correct candidates first, each part by stability.
    mar_teacher_io: ``jpeg`` scores the decodes the way the release does (8-bit, JPEG quality 75, PIL bilinear
        resize, then mean/std); ``tensor`` scores them in memory (resized and normalised as tensors).
    mar_stage2_vb: add the variational-bound term of the learned variance to the stage-2 loss (released) or not.
    mar_autocast: run stage 1 under fp16 autocast on CUDA (released) or in the run's dtype.

    tf32: run fp32 matmuls and convolutions in TF32 on CUDA during the job (every released script sets
        ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` before anything runs);
        both flags are restored when the call returns. ``consistent`` keeps strict fp32 (off), so an fp32 run equals
        the fp32 reference to float rounding; bf16 runs are unaffected either way.
    """

    name: str
    timestep_mode: TimestepMode
    classifier_normalize: bool
    stage2_label: Label
    label_dropout: bool
    guided_channels: int = 3
    noise_bank: bool = False
    tf32: bool = False
    mar_stage2_cond: Literal["zero", "class"] = "zero"
    mar_target_grad: Literal["detached", "attached"] = "detached"
    mar_mask_rule: Literal["max", "min"] = "max"
    mar_select: Literal["stability", "stable-correct"] = "stability"
    mar_teacher_io: Literal["jpeg", "tensor"] = "jpeg"
    mar_stage2_vb: bool = True
    mar_autocast: bool = True


FAMILIES = ("dit", "mar")  # generator families; a recipe field named "<family>_..." is that family's
NOISE_BANK_SIZE = 1024
RELEASED_SAMPLE_STEPS = 50  # the released scripts' DDPM respacing (stage 1 and stage 2's schedule)
SAMPLERS = ("ddpm", "ddim", "dpmpp")  # stage 1's DiT samplers; ddpm is the released one (cao2_fast.schedulers)
NOISE_BANK_SEED = 42

RECIPES = {
    "official": Recipe("official", timestep_mode="official", classifier_normalize=False, stage2_label="null",
                       label_dropout=True, noise_bank=True, tf32=True),
    "consistent": Recipe("consistent", timestep_mode="consistent", classifier_normalize=True, stage2_label="true",
                         label_dropout=False, mar_stage2_cond="class", mar_target_grad="attached", mar_mask_rule="min",
                         mar_select="stable-correct", mar_teacher_io="tensor", mar_stage2_vb=False,
                         mar_autocast=False),
}


@dataclass(frozen=True)
class DatasetPreset:
    """Per-dataset settings of the released scripts: oversampling K, selection order, stage-2 window and label."""

    name: str
    class_file: str | None  # WNID list shipped in cao2_fast/data/imagenet, None for digits / custom
    k: int
    order: Order
    t_max: int  # stage-2 timesteps are uniform over {1..t_max}
    stage2_label: Label | None = None  # overrides the recipe's label under `official` (released per-dataset scripts)
    stage2_steps: int = 100


DATASETS = {
    "imagenet-1k": DatasetPreset("imagenet-1k", "imagenet1k_wnids.txt", k=4, order="desc", t_max=11),
    "imagewoof": DatasetPreset("imagewoof", "imagewoof_wnids.txt", k=4, order="desc", t_max=11),
    "imagenette": DatasetPreset("imagenette", "imagenette_wnids.txt", k=2, order="desc", t_max=11, stage2_steps=0),
    "imagenet-100": DatasetPreset("imagenet-100", "imagenet100_wnids.txt", k=2, order="asc", t_max=5),
    "digits": DatasetPreset("digits", None, k=2, order="desc", t_max=11),
}


def read_class_file(name: str) -> list[str]:
    text = resources.files("cao2_fast").joinpath("data", "imagenet", name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def imagenet_class_ids(wnids: list[str]) -> list[int]:
    """DiT/ImageNet class index of each WNID = its position in the sorted ImageNet-1K list."""
    index = {w: i for i, w in enumerate(read_class_file("imagenet1k_wnids.txt"))}
    missing = [w for w in wnids if w not in index]
    if missing:
        raise UserError(f"unknown WNIDs {missing[:3]} (not in the ImageNet-1K class list)")
    return [index[w] for w in wnids]


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distilled set. Two runs with equal ``fingerprint()`` write identical files.

    Fields that trade speed for nothing else (batch sizes, engines on the same numerics) are recorded but only the
    numerics-relevant ones enter the fingerprint.

    Stage-1 savings beyond the released method (all off by default and in both recipes; a setting that is off stays
    out of the fingerprint, so runs made before these fields existed keep theirs):

    early_reject_step / early_reject_keep: early candidate rejection. After ``early_reject_step`` of the
        ``sample_steps`` sampling steps (1 ≤ STEP < sample_steps) every candidate's x̂0 prediction is decoded and
        scored, the candidates are ranked by :func:`cao2_fast.selection.early_rank` (the selection rule and order applied
        to the early scores), and only the best ``early_reject_keep`` = M (IPC ≤ M ≤ K·IPC) of each class finish
        sampling. Survivors keep their own pre-drawn noise, so each survivor's latent is the full run's up to float
        rounding; where the early ranking keeps all of the full run's picks, the picks are the same. Trades stage-1
        DiT work (about (1 − STEP/steps)·(1 − M/(K·IPC)) of it is saved) against the chance of dropping a
        candidate the full run would have kept; M closer to K·IPC and a later STEP make that chance smaller.
        Tuples of equal length make the rejection progressive: one check per entry, steps increasing, keeps not
        increasing.
    guidance_interval: (lo, hi): classifier-free guidance only at the sampling steps whose noise level
        σ = sqrt((1 − ᾱ)/ᾱ) lies in (lo, hi]; the other steps run the conditional model alone, at half the DiT work.
        None guides every step (the released behaviour).
    sampler: stage 1's sampler over ``sample_steps`` steps: ``ddpm`` (the DiT codebase's ancestral sampler on the
        schedule respaced to ``sample_steps``: released), ``ddim`` (diffusers' DDIMScheduler, η = 0) or ``dpmpp``
        (diffusers' DPMSolverMultistepScheduler, DPM-Solver++ 2M), see :mod:`cao2_fast.schedulers`. Early
        rejection and the guidance interval apply to every sampler (checks count its steps).
    stage2_respacing: the respaced schedule stage 2 counts its timesteps {1..t_max} in. None: the one the release
        uses, stage 1's respacing (``sample_steps``) under ``ddpm`` and 50 steps under ``ddim``/``dpmpp`` (whose
        steps are not a respacing), so a few-step sampler changes stage 1 only.
    """

    dataset: str
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    ipc: int
    recipe: Recipe
    k: int
    order: Order
    selection: Selection = "confident"
    seed: int = 0
    # stage 1
    sample_steps: int = RELEASED_SAMPLE_STEPS
    guidance_scale: float = 2.7
    classifier_input_size: int = 224
    early_reject_step: int | tuple[int, ...] | None = None
    early_reject_keep: int | tuple[int, ...] | None = None
    guidance_interval: tuple[float, float] | None = None
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddpm"
    guidance_schedule: Literal["constant", "linear"] = "constant"  # linear: MAR's ramp 1 → scale over the tokens
    temperature: float = 1.0  # MAR: the DiffLoss sampler's noise scale
    token_steps: int | None = None  # MAR: DiffLoss sampling steps per token (None for a DiT)
    # stage 2
    stage2_steps: int = 100
    lr: float = 6e-4
    lam: float = 10.0
    t_max: int = 11
    stage2_label: Label = "null"
    stage2_respacing: int | None = None
    # execution
    stage1_batch: int = 256  # candidates per DiT call (the guided call runs 2× this)
    stage2_batch: int = 64  # latents optimised together
    dtype: str = "float32"
    engine: str = "eager"  # the stage-1 engine (Distiller.use_engines sets it): engines round differently
    stage2_engine: str = "eager"  # the stage-2 DiT's engine, likewise
    models: dict = field(default_factory=dict)  # paths and fingerprints of the weights
    family: str = "dit"  # the generator family (dit, mar); MAR reads sample_steps as its sampling iterations

    @property
    def num_candidates(self) -> int:
        return self.k * self.ipc

    @property
    def stage2_schedule_steps(self) -> int:
        """The respaced schedule stage 2 works in (see ``stage2_respacing``)."""
        if self.stage2_respacing is not None:
            return self.stage2_respacing
        return self.sample_steps if self.sampler == "ddpm" else RELEASED_SAMPLE_STEPS

    def fingerprint(self) -> str:
        d = asdict(self)
        for speed_only in ("stage1_batch", "stage2_batch"):
            d.pop(speed_only)
        for off_by_default in ("early_reject_step", "early_reject_keep", "guidance_interval"):
            if d[off_by_default] is None:  # off: the fingerprint of a config from before the field existed
                d.pop(off_by_default)
        if d["sampler"] == "ddpm":  # the released sampler: the fingerprint of a config from before samplers existed
            d.pop("sampler")
        d.pop("stage2_respacing")  # entered as the schedule it resolves to, when that is not stage 1's respacing
        if self.stage2_schedule_steps != self.sample_steps:
            d["stage2_schedule_steps"] = self.stage2_schedule_steps
        for name in ("engine", "stage2_engine"):  # another engine can move a pixel by a grey level: another set
            if d[name] == "eager":
                d.pop(name)
        for name, default in (("family", "dit"), ("guidance_schedule", "constant"), ("temperature", 1.0),
                              ("token_steps", None)):  # a DiT config's fingerprint from before MAR existed
            if d[name] == default:
                d.pop(name)
        for name in list(d["recipe"]):  # a family's recipe fields enter only its own configs' fingerprints
            if name.split("_")[0] in FAMILIES and name.split("_")[0] != self.family:
                d["recipe"].pop(name)
        d["stage1_group"] = self.classes_per_group  # the grouping of classes into batches does change rounding
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def decode_batch(self) -> int:
        """Latents per VAE-decode and classifier call (decoding is far heavier in memory than a DiT step)."""
        return max(1, min(self.stage1_batch, 64))

    @property
    def classes_per_group(self) -> int:
        """Classes whose candidates share one stage-1 batch. Work is scheduled and sharded in these groups so the
        float rounding of every class is the same however the run is split."""
        return max(1, self.stage1_batch // self.num_candidates)

    def to_json(self) -> dict:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint()
        return d


_NOT_OVERRIDES = ("dataset", "class_ids", "class_names", "ipc", "recipe")  # given as build_config's own arguments


def build_config(dataset: str, ipc: int, recipe: str, class_ids: list[int] | None = None,
                 class_names: list[str] | None = None, num_model_classes: int | None = None,
                 family_defaults=None, **overrides) -> DistillConfig:
    """Resolve dataset preset + recipe + user overrides into a validated config (errors name the fix).
    ``family_defaults(recipe)``: the generator family's own settings (its ``Generator.config_defaults``), between
    the dataset preset's and the user's."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if not isinstance(dataset, str) or (dataset not in DATASETS and dataset != "custom"):
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)} or pass --classes")
    if not _is_int(ipc):
        raise UserError(f"--ipc must be a whole number (got {ipc!r})")
    if ipc < 1:
        raise UserError(f"--ipc must be at least 1 (got {ipc})")
    class_ids = None if class_ids is None else check_class_ids(class_ids)
    rec = RECIPES[recipe]
    preset = DATASETS.get(dataset, DatasetPreset("custom", None, k=4, order="desc", t_max=11))
    if class_ids is None:
        if preset.class_file is None:
            raise UserError(f"dataset {dataset!r} needs its class ids (--classes)")
        wnids = read_class_file(preset.class_file)
        class_ids, class_names = imagenet_class_ids(wnids), wnids
    if class_names is None:
        class_names = [f"{c:04d}" for c in class_ids]
    if len(set(class_ids)) != len(class_ids):
        raise UserError("class ids repeat: each class may be listed once")
    if num_model_classes is not None:
        bad = [c for c in class_ids if not 0 <= c < num_model_classes]
        if bad:
            raise UserError(f"class id {bad[0]} is out of range for a DiT with {num_model_classes} classes "
                            f"(valid: 0..{num_model_classes - 1})")
    label = preset.stage2_label if (preset.stage2_label and rec.name == "official") else rec.stage2_label
    stage2_steps = preset.stage2_steps if rec.name == "official" else 100
    base = dict(k=preset.k, order=preset.order, t_max=preset.t_max, stage2_label=label, stage2_steps=stage2_steps)
    if family_defaults is not None:
        base.update(family_defaults(rec))
    valid = sorted(f.name for f in fields(DistillConfig) if f.name not in _NOT_OVERRIDES)
    unknown = sorted(set(overrides) - set(valid))
    engines = sorted(set(overrides) & {"engine", "stage2_engine"})
    if engines:
        raise UserError(f"{engines[0]} is set by Distiller.use_engines(), which also builds the engines, not as a "
                        "config override")
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}: valid overrides are {', '.join(valid)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    cfg = DistillConfig(dataset=dataset, class_ids=tuple(class_ids), class_names=tuple(class_names), ipc=ipc,
                        recipe=rec, **base)
    validate(cfg)
    return cfg


def check_class_ids(class_ids, what: str = "class ids") -> list[int]:
    """``class_ids`` as a list of ints: a non-empty sequence of whole numbers (numpy's too; bools are not class
    ids). ``what`` names the argument in the one-line error."""
    if isinstance(class_ids, (str, bytes)) or not hasattr(class_ids, "__iter__"):
        raise UserError(f"{what} must be a list of whole numbers (got {class_ids!r})")
    ids = list(class_ids)
    bad = next((c for c in ids if not (isinstance(c, numbers.Integral) and not isinstance(c, bool))), None)
    if bad is not None:
        raise UserError(f"{what} must be whole numbers (got {bad!r})")
    if not ids:
        raise UserError("the class list is empty: give at least one class")
    return [int(c) for c in ids]


_INT_FIELDS = ("ipc", "k", "seed", "sample_steps", "stage2_steps", "t_max", "stage1_batch", "stage2_batch",
               "classifier_input_size")
_FLOAT_FIELDS = {  # name: (option, lowest allowed, whether the lowest itself is allowed)
    "guidance_scale": ("--guidance", 0.0, True), "lr": ("--lr", 0.0, False), "lam": ("--lam", 0.0, True),
    "temperature": ("--temperature", 0.0, False)}
_CHOICES = {"selection": ("confident", "el2n", "random", "stability", "stable-correct"), "order": ("desc", "asc"), "stage2_label": ("null", "true"),
            "dtype": ("float32", "bfloat16", "float16"), "engine": ("eager", "compile", "onnx", "trt"),
            "stage2_engine": ("eager", "compile"), "family": FAMILIES, "guidance_schedule": ("constant", "linear"),
            "sampler": SAMPLERS}
SCHEDULE_STEPS = 1000  # the DiT's training schedule: stage 1 respaces it, so it can take at most this many steps


def max_sample_steps(sampler: str) -> int:
    """The most stage-1 steps ``sampler`` can take on the DiT's schedule with distinct timesteps (DPM-Solver++
    spaces N + 1 points over 0..999 and rounds them, so 1000 steps would repeat a timestep)."""
    return SCHEDULE_STEPS - 1 if sampler == "dpmpp" else SCHEDULE_STEPS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(cfg: DistillConfig) -> None:
    """Every field has the type and the finite range it must have, whatever built the config (CLI or API): a float
    that is NaN or infinite would write every class and then fail on the strict-JSON manifest."""
    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        if not _is_int(v):
            raise UserError(f"{name} must be a whole number (got {v!r})")
    for name, (option, low, inclusive) in _FLOAT_FIELDS.items():
        v = getattr(cfg, name)
        if not _is_number(v) or not math.isfinite(v):
            raise UserError(f"{option} must be a finite number (got {v!r})")
        if v < low or (v == low and not inclusive):
            raise UserError(f"{option} must be {'at least' if inclusive else 'above'} {low:g} (got {v:g})")
    for name, allowed in _CHOICES.items():
        v = getattr(cfg, name)
        if v not in allowed:
            raise UserError(f"{name} {v!r}: choose one of {', '.join(allowed)}")
    if not cfg.class_ids:
        raise UserError("the class list is empty: give at least one class")
    bad = next((c for c in cfg.class_ids if not _is_int(c)), None)
    if bad is not None:
        raise UserError(f"class ids must be whole numbers (got {bad!r})")
    if len(cfg.class_names) != len(cfg.class_ids) or not all(isinstance(n, str) for n in cfg.class_names):
        raise UserError("class names must be one string per class id")


def validate(cfg: DistillConfig) -> None:
    _check_types(cfg)
    if cfg.ipc < 1:
        raise UserError(f"--ipc must be at least 1 (got {cfg.ipc})")
    if cfg.sample_steps < 1:
        raise UserError(f"--sample-steps must be at least 1 (got {cfg.sample_steps})")
    if cfg.stage2_steps < 0:
        raise UserError(f"--stage2-steps must be 0 or more (got {cfg.stage2_steps})")
    for name in ("stage1_batch", "stage2_batch", "classifier_input_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.k < 1:
        raise UserError(f"--k must be at least 1 (got {cfg.k})")
    _FAMILY_RULES[cfg.family](cfg)


def _dit_rules(cfg: DistillConfig) -> None:
    """What a DiT config must satisfy (its stage-1 schedule, stage-2 window and stage-1 savings)."""
    most = max_sample_steps(cfg.sampler)
    if cfg.sample_steps > most:
        raise UserError(f"--sample-steps {cfg.sample_steps}: the {cfg.sampler} sampler steps through the DiT's "
                        f"{SCHEDULE_STEPS}-step schedule, so it takes at most {most} steps")
    if cfg.stage2_respacing is not None and (not _is_int(cfg.stage2_respacing)
                                             or not 1 <= cfg.stage2_respacing <= SCHEDULE_STEPS):
        raise UserError(f"--stage2-respacing must be a whole number from 1 to {SCHEDULE_STEPS} "
                        f"(got {cfg.stage2_respacing!r})")
    if cfg.t_max < 1:
        raise UserError(f"stage-2 timestep window {{1..{cfg.t_max}}} is empty")
    if cfg.t_max >= cfg.stage2_schedule_steps:
        raise UserError(f"stage-2 t_max {cfg.t_max} must be below the {cfg.stage2_schedule_steps} respaced steps "
                        "stage 2 works in")
    for name, mar_only, option in _MAR_ONLY:
        if mar_only(getattr(cfg, name)):
            raise UserError(f"{option} applies to the MAR generator only, not to a DiT")
    early_check_list(cfg.early_reject_step, cfg.early_reject_keep, cfg.sample_steps, cfg.ipc, cfg.num_candidates)
    if cfg.guidance_interval is not None:
        gi = cfg.guidance_interval
        if not isinstance(gi, (tuple, list)) or len(gi) != 2 or not all(_is_number(v) for v in gi):
            raise UserError(f"guidance interval {gi!r}: give two noise levels (lo, hi)")
        lo, hi = gi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UserError(f"--guidance-interval {lo:g},{hi:g}: both noise levels must be finite")
        if not 0 <= lo < hi:
            raise UserError(f"guidance interval ({lo:g}, {hi:g}]: need 0 <= lo < hi (noise levels σ)")


_MAR_ONLY = (  # (field, whether its value is one only MAR takes, the option that sets it)
    ("guidance_schedule", lambda v: v != "constant", "--guidance-schedule linear"),
    ("temperature", lambda v: v != 1.0, "--temperature"),
    ("token_steps", lambda v: v is not None, "--token-steps"),
    ("selection", lambda v: v in ("stability", "stable-correct"), "--selection stability"),
)


def _mar_rules(cfg: DistillConfig) -> None:
    """What a MAR config must satisfy: a DiffLoss step count, a positive temperature, none of the DiT's stage-1
    savings (MAR's sampler has no x̂0 to check early and guides by its own schedule)."""
    if cfg.token_steps is None or not _is_int(cfg.token_steps) or not 1 <= cfg.token_steps <= SCHEDULE_STEPS:
        raise UserError(f"--token-steps must be a whole number from 1 to {SCHEDULE_STEPS} (got {cfg.token_steps!r})")
    if not cfg.temperature > 0:
        raise UserError(f"--temperature must be above 0 (got {cfg.temperature:g})")
    if cfg.early_reject_step is not None or cfg.early_reject_keep is not None:
        raise UserError("--early-reject/--early-keep apply to the DiT sampler only, not to MAR")
    if cfg.guidance_interval is not None:
        raise UserError("--guidance-interval applies to the DiT sampler only; MAR guides by --guidance-schedule")
    if cfg.sampler != "ddpm" or cfg.stage2_respacing is not None:
        raise UserError("--sampler/--stage2-respacing apply to the DiT only; MAR samples by its own iterations")


_FAMILY_RULES = {"dit": _dit_rules, "mar": _mar_rules}


def early_check_list(steps, keeps, sample_steps: int, ipc: int, num_candidates: int) -> list[tuple[int, int]]:
    """Early-rejection settings (``--early-reject``/``--early-keep``: None, an int or equally long tuples) checked
    against a run of ``sample_steps`` steps keeping IPC..K·IPC candidates, as ``(step, keep)`` pairs (none when
    off). Bad settings raise :class:`UserError`."""
    if (steps is None) != (keeps is None):
        raise UserError("early rejection needs both --early-reject STEP and --early-keep M (or neither)")
    if steps is None:
        return []
    steps, keeps = _ints(steps), _ints(keeps)
    if steps is None or keeps is None or len(steps) != len(keeps) or not steps:
        raise UserError("--early-reject and --early-keep take one integer each, or equally many (one per check)")
    for i, (step, keep) in enumerate(zip(steps, keeps)):
        if not 1 <= step < sample_steps:
            raise UserError(f"--early-reject {step}: a check must come after 1 to {sample_steps - 1} of the "
                            f"{sample_steps} sampling steps")
        if not ipc <= keep <= num_candidates:
            raise UserError(f"--early-keep {keep}: keep between IPC ({ipc}) and K·IPC ({num_candidates}) "
                            "candidates per class")
        if i and (step <= steps[i - 1] or keep > keeps[i - 1]):
            raise UserError("progressive early rejection: each check must come later and keep no more than the "
                            "one before")
    return list(zip(steps, keeps))

def _ints(v) -> tuple[int, ...] | None:
    """An int or a sequence of ints as a tuple; None for anything else (bools are not counts)."""
    items = (v,) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else None
    if items is None or any(isinstance(x, bool) or not isinstance(x, int) for x in items):
        return None
    return items


def with_overrides(cfg: DistillConfig, **kw) -> DistillConfig:
    new = replace(cfg, **kw)
    validate(new)
    return new
