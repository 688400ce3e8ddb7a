"""Train the embedded digits preset (docs/method.md, the embedded digits preset): a tiny VAE, a small classifier and a
tiny class-conditional latent DiT.

Everything is trained on the ``train`` split of :mod:`cao2_fast.presets.digits_data` with fixed seeds and a fixed data
order, on the CPU with a fixed thread count, so a re-run on the same machine and library versions gives the same
weights. The ``val`` split is only used for the report written into ``preset.json``.

    python -m cao2_fast.presets.train_digits --out cao2_fast/presets/digits

Output folder: ``vae/`` (diffusers ``AutoencoderKL``), ``classifier.safetensors`` (timm state dict),
``dit.safetensors`` (:func:`cao2_fast.models.dit.save_dit`), ``preset.json`` (metadata and the training report).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..diffusion import Diffusion, sample
from ..models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from ..models.dit import DiT, DiTConfig, save_dit
from ..fileio import atomic_write, json_bytes
from ..models.vae import VAE
from .digits_data import CLASS_NAMES, IMAGE_SIZE, digits_split

CLASSIFIER_NAME = "test_resnet"
CLASSIFIER_INPUT = 32
CHECK_SCALES = (1.0, 2.0, 2.7, 4.0)
RECOMMEND_ACCURACY = 0.95


@dataclass(frozen=True)
class Schedule:
    """Steps, batch sizes and learning rates of the three trainings. ``full()`` makes the shipped weights;
    ``quick()`` is a smoke test of the same code paths.

    The DiT's rate and second-moment window decide how fast the class conditioning is learnt, which is what the
    generation check measures. NOTE: at 1500 steps of batch 64 (cosine decay, EMA 0.995), samples at guidance 4 were
    recognised at 17 % with lr 1e-3 / beta2 0.999, 85 % with 2e-3 / 0.99 and 100 % with 4e-3 / 0.99 (4000 steps of
    1e-3 / 0.999 reached 76 %). The generation check (``check_per_class`` per class, 4 scales, ``check_steps`` steps)
    costs about a sixth of the run.
    """

    vae_steps: int
    vae_batch: int
    vae_lr: float
    vae_kl_weight: float
    clf_steps: int
    clf_batch: int
    clf_lr: float
    dit_steps: int
    dit_batch: int
    dit_lr: float
    dit_beta2: float
    dit_ema: float
    check_per_class: int
    check_steps: int

    @classmethod
    def full(cls) -> Schedule:
        return cls(vae_steps=300, vae_batch=64, vae_lr=2e-3, vae_kl_weight=1e-3,
                   clf_steps=300, clf_batch=64, clf_lr=3e-3,
                   dit_steps=1500, dit_batch=64, dit_lr=4e-3, dit_beta2=0.99, dit_ema=0.995, check_per_class=20,
                   check_steps=50)

    @classmethod
    def quick(cls) -> Schedule:
        return cls(vae_steps=12, vae_batch=16, vae_lr=2e-3, vae_kl_weight=1e-3,
                   clf_steps=12, clf_batch=16, clf_lr=3e-3,
                   dit_steps=24, dit_batch=16, dit_lr=1e-3, dit_beta2=0.99, dit_ema=0.9,
                   check_per_class=1, check_steps=5)


VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": IMAGE_SIZE,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8, "mid_block_add_attention": False,
}

DIT_CONFIG = DiTConfig(input_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
                       num_classes=len(CLASS_NAMES), learn_sigma=True, class_dropout_prob=0.1, freq_shift=0)


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def batch_indices(n: int, batch: int, steps: int, generator: torch.Generator):
    """``steps`` index batches: consecutive slices of fresh random permutations of ``range(n)`` (epochs)."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + batch]
        pos += batch


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 5 %."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------------
# 1. VAE


def train_vae(x: torch.Tensor, sched: Schedule, seed: int, progress: bool = True):
    """Train ``AutoencoderKL`` on images ``x`` in [−1, 1]; L1 + L2 reconstruction of a posterior sample plus a small
    KL term. Returns the autoencoder (eval mode, ``scaling_factor`` set to 1/std of the training latents) and the
    final loss values."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(**VAE_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=sched.vae_lr, weight_decay=0.0)
    ae.train()
    rec_ema = kl_ema = None
    bar = _progress(sched.vae_steps, "vae", progress)
    for step, idx in enumerate(batch_indices(len(x), sched.vae_batch, sched.vae_steps, gen)):
        set_lr(opt, sched.vae_lr * warmup_cosine(step, sched.vae_steps, max(1, sched.vae_steps // 20)))
        xb = x[idx]
        post = ae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = ae.decode(z).sample
        l_rec = (rec - xb).abs().mean() + ((rec - xb) ** 2).mean()
        kl = post.kl().mean() / xb[0].numel()
        loss = l_rec + sched.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec_ema = l_rec.item() if rec_ema is None else 0.95 * rec_ema + 0.05 * l_rec.item()
        kl_ema = kl.item() if kl_ema is None else 0.95 * kl_ema + 0.05 * kl.item()
        bar.update()
        bar.set_postfix(rec=f"{rec_ema:.4f}", kl=f"{kl_ema:.3f}")
    bar.close()
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat([ae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)]).std().item()
    ae.register_to_config(scaling_factor=1.0 / std)
    return ae, {"recon_loss": rec_ema, "kl_per_dim": kl_ema, "latent_std": std}


@torch.no_grad()
def encode_all(vae: VAE, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def decode_all(vae: VAE, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.decode(z[i:i + batch]) for i in range(0, len(z), batch)])


# ---------------------------------------------------------------------------------------------------------------------
# 2. classifier


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine warps (rotation ±8°, scale ±8 %, shift ±1 px at 16 px); the border (white page) fills
    what comes into view."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(8)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.08
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2.0 / x.shape[-1])
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter(inputs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast/brightness jitter of the network input. The contrast range reaches ~0.45, the factor between raw
    [−1, 1] images and ImageNet-normalised ones, so the classifier also works on raw inputs (the released quirk)."""
    n = inputs.shape[0]
    contrast = 0.35 + 0.85 * torch.rand(n, 1, 1, 1, generator=gen)
    brightness = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.3
    return inputs * contrast + brightness


def build_classifier(num_classes: int = len(CLASS_NAMES)) -> nn.Module:
    import timm

    return timm.create_model(CLASSIFIER_NAME, pretrained=False, num_classes=num_classes)


def train_classifier(x: torch.Tensor, y: torch.Tensor, sched: Schedule, seed: int, progress: bool = True):
    """Train the timm classifier through :class:`Classifier` (resize 16->32, ImageNet normalisation) with
    augmentation. Returns the wrapped model (eval mode, ``normalize=True``) and the final loss."""
    torch.manual_seed(seed)
    clf = Classifier(build_classifier(), CLASSIFIER_INPUT, normalize=True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clf.model.parameters(), lr=sched.clf_lr, weight_decay=0.05)
    clf.train()
    loss_ema = None
    bar = _progress(sched.clf_steps, "classifier", progress)
    for step, idx in enumerate(batch_indices(len(x), sched.clf_batch, sched.clf_steps, gen)):
        set_lr(opt, sched.clf_lr * warmup_cosine(step, sched.clf_steps, max(1, sched.clf_steps // 20)))
        inputs = jitter(clf.transform(augment(x[idx], gen)), gen)
        loss = F.cross_entropy(clf.model(inputs), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    bar.close()
    clf.eval().requires_grad_(False)
    return clf, {"loss": loss_ema}


@torch.no_grad()
def predict(clf: Classifier, images: torch.Tensor, normalize: bool, batch: int = 512) -> torch.Tensor:
    saved = clf.normalize
    clf.normalize = normalize
    try:
        return torch.cat([clf(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    finally:
        clf.normalize = saved


def accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, normalize: bool) -> float:
    return (predict(clf, images, normalize) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# 3. DiT


def init_dit_for_training(model: DiT, generator: torch.Generator) -> DiT:
    """The DiT paper's initialisation: Xavier-uniform linears and patch embedding, N(0, 0.02) label and timestep
    embeddings, zero adaLN modulation and a zero output layer (each block starts as the identity)."""

    def xavier(w: torch.Tensor) -> None:
        fan_out, fan_in = w.shape[0], w[0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w.copy_((torch.rand(w.shape, generator=generator) * 2 - 1) * bound)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                xavier(m.weight)
                m.bias.zero_()
        xavier(model.x_embedder.proj.weight)
        model.x_embedder.proj.bias.zero_()
        model.y_embedder.embedding_table.weight.copy_(
            torch.randn(model.y_embedder.embedding_table.weight.shape, generator=generator) * 0.02)
        for i in (0, 2):
            lin = model.t_embedder.mlp[i]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * 0.02)
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
        model.final_layer.adaLN_modulation[-1].weight.zero_()
        model.final_layer.adaLN_modulation[-1].bias.zero_()
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    return model


def train_dit(latents: torch.Tensor, y: torch.Tensor, sched: Schedule, seed: int, progress: bool = True):
    """Train the DiT with the hybrid DDPM loss (eps MSE + VLB for the learned variance) over 1000 steps, uniform t.
    Returns the EMA model (eval mode) and the final loss."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = init_dit_for_training(DiT(DIT_CONFIG), gen)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = Diffusion.create()
    opt = torch.optim.AdamW(model.parameters(), lr=sched.dit_lr, betas=(0.9, sched.dit_beta2), weight_decay=0.0)
    model.train()
    loss_ema = None
    bar = _progress(sched.dit_steps, "dit", progress)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    for step, idx in enumerate(batch_indices(len(latents), sched.dit_batch, sched.dit_steps, gen)):
        set_lr(opt, sched.dit_lr * warmup_cosine(step, sched.dit_steps, max(1, sched.dit_steps // 25)))
        x0 = latents[idx]
        t = torch.randint(0, diffusion.num_steps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = diffusion.training_losses(model, x0, t, y[idx], noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_ema = after_step(ema_params, params, sched.dit_ema, step, loss, loss_ema, bar)
    bar.close()
    return ema.eval(), {"loss": loss_ema}


def after_step(ema_params: list, params: list, rate: float, step: int, loss: torch.Tensor, loss_ema: float | None,
               bar) -> float:
    """What follows an optimiser step: the EMA weights move towards the weights (decay min(rate, (1+step)/(10+step)),
    the usual warm-up), the loss's running mean (0.98) is updated and shown on ``bar``. Returns that mean."""
    decay = min(rate, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
    bar.update()
    bar.set_postfix(loss=f"{loss_ema:.4f}")
    return loss_ema


# ---------------------------------------------------------------------------------------------------------------------
# 4. generation check


@torch.no_grad()
def generation_check(dit: DiT, vae: VAE, clf: Classifier, per_class: int, seed: int, scales=CHECK_SCALES,
                     steps: int = 50, progress: bool = True) -> dict:
    """Sample ``per_class`` latents per class (``steps`` respaced steps, guidance on 3 eps channels as released),
    decode and classify; accuracy = share of samples whose argmax is the intended class, for each scale and input
    mode. The same initial noises and step-noise stream are used for every scale."""
    n_cls = dit.num_classes
    y = torch.arange(n_cls).repeat_interleave(per_class)
    shape = (len(y), dit.cfg.in_channels, dit.cfg.input_size, dit.cfg.input_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    diffusion = Diffusion.create(respacing=steps)
    out = {}
    bar = _progress(steps * len(scales), "generation check", progress)
    for s in scales:
        g = torch.Generator().manual_seed(seed + 1)
        z = sample(dit, diffusion, noise, y, null_class=dit.null_class, guidance_scale=s, guided_channels=3,
                   generator=g, progress=bar.update)
        images = decode_all(vae, z)
        out[str(s)] = {mode: (predict(clf, images, normalize) == y).float().mean().item()
                       for mode, normalize in (("normalize", True), ("raw", False))}
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _readable(path: Path) -> None:
    """Give files the mode ``open`` would (safetensors writes them owner-only), so an installed preset is readable."""
    mask = os.umask(0)
    os.umask(mask)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, 0o666 & ~mask)


def _atomic_save_file(path: Path, save) -> None:
    """``save(tmp_path)`` then rename onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save(tmp)
        _readable(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_save_dir(path: Path, save) -> None:
    """``save(tmp_dir)`` then swap it in for ``path`` (a directory cannot be renamed over a non-empty one, so the old
    one is moved aside first and removed after)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        _readable(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


OWN_MARKER = ".cao2-preset"  # written first into a folder this trainer fills: what is in it by our names is ours
OUTPUT_FILES = ("preset.json", "dit.safetensors", "classifier.safetensors")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
_OUR_TEMPORARY = re.compile(r"^\.(preset\.json\.\w+\.tmp|(dit|classifier)\.safetensors\.tmp\d+|vae\.(tmp|old)\d+)$")


def prepare_out_dir(out: Path, output_files: tuple[str, ...] = OUTPUT_FILES, temporary: re.Pattern = _OUR_TEMPORARY,
                    preset: str = "digits") -> None:
    """Make ``out`` ready for a training run, or refuse in one line before any training: the folder must be new or
    empty, or hold what an earlier run of this trainer wrote (it marks its folders with ``.cao2-preset`` first),
    and be writable. The trainer replaces only its own files, so a folder holding anything else is refused.
    ``output_files``, ``temporary`` and ``preset``: what the trainer of ``preset`` writes (its files by name, the
    temporaries of its atomic saves), for the presets whose trainers share this folder rule."""
    from ..errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (train-preset --out takes a folder)")
    ours = (out / OWN_MARKER).is_file()
    foreign = []
    for e in sorted(out.iterdir()) if out.is_dir() else []:
        if e.name == OWN_MARKER or ours and (e.name in output_files and e.is_file() and not e.is_symlink()
                                             or temporary.match(e.name)):
            continue
        if ours and e.name == "vae" and e.is_dir() and not e.is_symlink():
            foreign += [f for f in sorted(e.rglob("*")) if f.parent != e or f.name not in VAE_FILES or not f.is_file()]
            continue
        foreign.append(e)
    if foreign:
        shown = ", ".join(str(f.relative_to(out)) for f in foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{out}: holds files train-preset did not write ({shown}); it replaces only its own files, so "
                        "move them away or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / OWN_MARKER, f"a {preset} preset written by cao2-fast train-preset\n".encode())
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror or e}); choose a writable --out") from None


def recommended_scale(check: dict, target: float = RECOMMEND_ACCURACY) -> float:
    """The smallest checked scale whose samples are recognised (normalised input) at ``target`` or better, else the
    most accurate one. Less guidance keeps more variety, and leaves stage-1 selection something to select."""
    good = [float(s) for s, v in check.items() if v["normalize"] >= target]
    if good:
        return min(good)
    return float(max(check, key=lambda s: (check[s]["normalize"], -float(s))))


# ---------------------------------------------------------------------------------------------------------------------
# entry points


def claim_out_dir(out_dir: Path, preset: str, prepare) -> bool:
    """Make ``out_dir`` ready for a preset trainer. The installed preset ``preset``'s own folder is replaced on
    purpose (``--replace-shipped``) and only created if missing; any other folder must pass ``prepare`` (this
    trainer's or another's :func:`prepare_out_dir` rule). Returns whether it is the installed preset's folder."""
    from ..pipeline import preset_dir

    shipped = out_dir.resolve() == preset_dir(preset).resolve()
    if shipped:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        prepare(out_dir)
    return shipped


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count fixed to ``threads`` for the block and restored after it (a trainer's weights
    are bitwise reproducible only at the same count)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_digits(out_dir: Path, seed: int = 0, quick: bool = False, threads: int = 1, progress: bool = True) -> dict:
    """Train the three preset models into ``out_dir`` and return the report (also stored in ``preset.json``).

    ``threads`` fixes torch's intra-op thread count for the run (restored afterwards): results are bitwise
    reproducible only at the same count, and one thread is also the fastest on a busy two-core machine.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    claim_out_dir(out_dir, "digits", prepare_out_dir)
    sched = Schedule.quick() if quick else Schedule.full()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings = {}
    with torch_threads(threads):
        x_train, y_train = digits_split("train")
        x_val, y_val = digits_split("val")

        t0 = time.perf_counter()
        ae, vae_report = train_vae(x_train, sched, seed, progress)
        vae = VAE(ae, ae.config.scaling_factor).eval()
        with torch.no_grad():
            rec_val = decode_all(vae, encode_all(vae, x_val))
        vae_report["val_recon_mse"] = ((rec_val - x_val) ** 2).mean().item()
        _atomic_save_dir(out_dir / "vae", lambda p: ae.save_pretrained(str(p), safe_serialization=True))
        timings["vae_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        clf, clf_report = train_classifier(x_train, y_train, sched, seed + 1, progress)
        for mode, normalize in (("normalize", True), ("raw", False)):
            clf_report[f"val_accuracy_{mode}"] = accuracy(clf, x_val, y_val, normalize)
            clf_report[f"val_recon_accuracy_{mode}"] = accuracy(clf, rec_val, y_val, normalize)
        state = {k: v.detach().contiguous() for k, v in clf.model.state_dict().items()}
        _atomic_save_file(out_dir / "classifier.safetensors", lambda p: save_file(state, str(p)))
        timings["classifier_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = encode_all(vae, x_train)
        dit, dit_report = train_dit(latents, y_train, sched, seed + 2, progress)
        _atomic_save_file(out_dir / "dit.safetensors", lambda p: save_dit(dit, p))
        timings["dit_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        check = generation_check(dit, vae, clf, sched.check_per_class, seed + 3, steps=sched.check_steps,
                                 progress=progress)
        timings["check_s"] = time.perf_counter() - t0
    scale = recommended_scale(check)
    report = {
        "seed": seed,
        "quick": quick,
        "threads": threads,
        "schedule": asdict(sched),
        "vae": vae_report,
        "classifier": clf_report,
        "dit": {**dit_report, "params": sum(p.numel() for p in dit.parameters())},
        "generation_check": {"per_class": sched.check_per_class, "sample_steps": sched.check_steps,
                             "guided_channels": 3, "accuracy": check},
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - cpu_start,
        "stage_wall_s": timings,
        "versions": _versions(),
    }
    meta = {
        "name": "digits",
        "class_names": list(CLASS_NAMES),
        "image_size": IMAGE_SIZE,
        "latent_size": DIT_CONFIG.input_size,
        "latent_channels": DIT_CONFIG.in_channels,
        "dit": "dit.safetensors",
        "vae": "vae",
        "classifier": {"model": CLASSIFIER_NAME, "weights": "classifier.safetensors", "input_size": CLASSIFIER_INPUT,
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "guidance_scale": scale,
        "training": report,
    }
    atomic_write(out_dir / "preset.json", json_bytes(meta) + b"\n")
    return meta


def _versions() -> dict:
    import diffusers
    import timm

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "timm": timm.__version__}


def trainer_args(argv: list[str] | None, description: str, out_example: str, quick_help: str) -> argparse.Namespace:
    """The options every preset trainer's ``python -m`` entry takes: --out, --seed, --quick, --threads,
    --no-progress."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True, help=f"output folder (e.g. {out_example})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = trainer_args(argv, "Train the embedded digits preset (VAE, classifier, DiT) with fixed seeds.",
                        "cao2_fast/presets/digits", "a few dozen steps per model (smoke test)")
    meta = train_digits(args.out, seed=args.seed, quick=args.quick, threads=args.threads,
                        progress=not args.no_progress)
    print(json.dumps({"guidance_scale": meta["guidance_scale"], **meta["training"]}, indent=1))


if __name__ == "__main__":
    main()
