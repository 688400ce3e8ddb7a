"""Train the embedded ``digits-mar`` preset: a tiny class-conditional MAR (docs SPEC-MAR §1) on the latents of the
shipped ``digits`` preset's VAE, with fixed seeds.

The MAR models exactly the latent space :meth:`cao2_fast.models.vae.VAE.decode` takes: ``VAE.encode`` of the
digits images (encoder mean × the VAE's ``scaling_factor``, about unit variance), patchified to 64 tokens of 4
values (``patchify`` of [N, 4, 8, 8]). Training follows the released recipe at a tiny size: one random order per
image, a mask rate from a truncated normal on [0.7, 1] (loc 1, scale 0.25), the first ⌈64·rate⌉ tokens of the order
masked, labels dropped to ``fake_latent`` with p = 0.1, the DiffLoss loss (ε MSE + the variational term of the
learned variance, t ~ U{0..999}, ε ~ N(0, I)) averaged over the masked tokens with ``diffusion_batch_mul`` draws per
token, AdamW with warm-up and cosine decay, an EMA of the weights (what is shipped). One departure, in the weights
and not the architecture or the loss: a few DiffLoss values are pinned (:class:`TopStepAnchor`) so that ε̂ at
t = 999 is exactly the noisy input. The released sampler's first DiffLoss step magnifies an ε error there about
316-fold; a model trained for minutes, not hundreds of epochs, is ~2e-2 off, and its samples diverge without the
pin. Every random number comes from
seeded generators (torch for masks' rates, labels, t and ε, numpy for the orders; dropout from torch's seeded
global generator), and the thread count is fixed for the run, so a re-run on the same machine and library versions
writes the same bytes.

    python -m cao2_fast.presets.train_digits_mar --out cao2_fast/presets/digits-mar
    cao2-fast train-preset digits-mar --replace-shipped

Output folder: ``mar.safetensors`` (:func:`cao2_fast.models.mar.save_mar` of the EMA model; its config is the
released one: ``diffusion_batch_mul`` 1, label drop 0.1, dropouts 0.1) and ``preset.json``. The preset reuses the
digits preset's VAE and classifier: written into the shipped folder (``cao2_fast/presets/digits-mar``), preset.json
names them by the relative paths ``../digits/vae`` and ``../digits/classifier.safetensors``; written anywhere else
(``--out``), those would not resolve, so the trainer copies the digits VAE folder and classifier file in beside the
MAR as ``vae/`` and ``classifier.safetensors`` and names those. The digest of the VAE weights the MAR was trained on
is recorded (``training.digits_vae_sha256``): retraining the digits preset changes the latent space, and then this
preset must be retrained too.

``preset.json`` also holds ``generation_check``: samples drawn with the released MAR sampler (written out here, for
this check only: ``num_iter`` steps of the cosine schedule, tokens revealed from the end of each random order, the
linear guidance schedule with ``fake_latent`` as the unconditional embedding, the DiffLoss's 100-step ancestral
sampling at temperature 1), decoded by the digits VAE and recognised by the digits classifier, per guidance scale.
``guidance_scale`` is the least checked scale whose samples are recognised at 95 % (else the most accurate one).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engines.cache import file_sha256
from ..fileio import atomic_write, json_bytes
from ..models.classifier import Classifier
from ..models.mar import (MAR, MARConfig, linear_cfg, mask_by_order, next_mask_len, patchify, random_masking,
                          random_orders, save_mar, unpatchify)
from ..models.vae import VAE
from .digits_data import CLASS_NAMES, IMAGE_SIZE, digits_split
from .train_digits import (VAE_FILES, _atomic_save_dir, _atomic_save_file, _progress, _versions, after_step,
                           augment, batch_indices, decode_all, encode_all, predict, recommended_scale, set_lr,
                           warmup_cosine)
from .train_digits import prepare_out_dir as _prepare_out_dir
from .train_digits import claim_out_dir, torch_threads, trainer_args

NAME = "digits-mar"
BASE_PRESET = "digits"
CHECK_SCALES = (1.0, 2.0, 2.9, 4.0)
# The head's diffusion steps per token that a distill on this preset uses by default: at guidance 2.9 its samples are
# recognised as often with 25 steps as with the trained 100 (93.0 / 90.7 / 91.0 % at 25 / 50 / 100 steps, 300
# samples each), and stage 1 costs a quarter of the head's work.
TOKEN_STEPS = 25
MASK_RATE_MIN, MASK_RATE_LOC, MASK_RATE_SCALE = 0.7, 1.0, 0.25  # the released truncated normal on [0.7, 1]

MAR_CONFIG = MARConfig(img_size=IMAGE_SIZE, vae_stride=2, patch_size=1, vae_embed_dim=4, buffer_size=8,
                       encoder_embed_dim=128, encoder_depth=2, encoder_num_heads=4,
                       decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                       class_num=len(CLASS_NAMES), diffloss_d=3, diffloss_w=128, num_sampling_steps="100")


@dataclass(frozen=True)
class MARSchedule:
    """Steps, batch and optimiser of the MAR training and the size of the generation check. ``full()`` makes the
    shipped weights; ``quick()`` is a smoke test of the same code paths.

    ``augment_copies`` fixed, seeded affine warps of each training image (:func:`train_digits.augment`) are encoded
    once, beside the originals, and drawn from like them. ``dropout`` is the attention/projection dropout used in
    training (the shipped config keeps the released 0.1; it does nothing at sampling time)."""

    steps: int
    batch: int
    lr: float
    beta2: float
    weight_decay: float
    warmup: int
    ema: float
    grad_clip: float
    diffusion_batch_mul: int
    dropout: float
    augment_copies: int
    check_per_class: int
    num_iter: int
    check_steps: str = "100"  # the DiffLoss steps of the check's sampler (the shipped config's "100" in full runs)
    anchor: bool = True

    @classmethod
    def full(cls) -> MARSchedule:
        return cls(steps=500, batch=64, lr=2e-3, beta2=0.99, weight_decay=0.02, warmup=30, ema=0.995,
                   grad_clip=3.0, diffusion_batch_mul=1, dropout=0.0, augment_copies=0, check_per_class=10,
                   num_iter=16)

    @classmethod
    def quick(cls) -> MARSchedule:
        return cls(steps=6, batch=8, lr=1e-3, beta2=0.99, weight_decay=0.02, warmup=2, ema=0.9, grad_clip=3.0,
                   diffusion_batch_mul=2, dropout=0.1, augment_copies=1, check_per_class=1, num_iter=2,
                   check_steps="4")


# ---------------------------------------------------------------------------------------------------------------------
# training


def init_mar_for_training(model: MAR, generator: torch.Generator) -> MAR:
    """The released initialisation: N(0, 0.02) class embeddings, ``fake_latent``, ``mask_token`` and position
    tables; Xavier-uniform linears with zero biases in the encoder and decoder; LayerNorms at 1 and 0. The DiffLoss
    MLP as its own release initialises it: Xavier-uniform linears, N(0, 0.02) timestep-MLP weights, zero adaLN
    modulations and a zero output layer (:class:`TopStepAnchor` then rewrites parts of it)."""

    def xavier(lin: nn.Linear) -> None:
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        lin.weight.copy_((torch.rand(lin.weight.shape, generator=generator) * 2 - 1) * bound)
        lin.bias.zero_()

    def normal(p: torch.Tensor) -> None:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.02)

    with torch.no_grad():
        for p in (model.class_emb.weight, model.fake_latent, model.mask_token, model.encoder_pos_embed_learned,
                  model.decoder_pos_embed_learned, model.diffusion_pos_embed_learned):
            normal(p)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                xavier(m)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        net = model.diffloss.net
        for i in (0, 2):
            normal(net.time_embed.mlp[i].weight)
        for block in net.res_blocks:
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
        for lin in (net.final_layer.adaLN_modulation[-1], net.final_layer.linear):
            lin.weight.zero_()
            lin.bias.zero_()
    return model


class TopStepAnchor:
    """Weights of the DiffLoss MLP under which its ε at t = 999 is the noisy input itself (ε̂ = x to ~1e-4, for
    every condition z), held through training. Why: the released sampler's first DiffLoss step (t = 999, where the
    cosine schedule's capped β leaves ᾱ ≈ 2.4e-9) predicts x0 = (x − √(1−ᾱ)·ε̂)/√ᾱ, so an ε error δ moves the next
    token state by ≈ 316·δ ("100" steps), and guidance multiplies the conditional/unconditional difference. A
    released-size model learns ε̂ ≈ x there to ~1e-3 over hundreds of epochs; a minutes-long training reaches ~2e-2,
    and sampling then diverges. The architecture and the loss are unchanged; these values are pinned:

    * a timestep detector: one hidden unit of ``time_embed`` fires only at t = 999 (its input weights are the
      sinusoidal embedding of 999, its threshold halfway to the next-most-similar timestep) and its output column
      drives every component of the condition y far negative there, so SiLU(y) = 0 and every adaLN modulation is
      its bias, pinned at 0 (shift, scale, gate), whatever the MAR's z;
    * ``input_proj`` = a·Q x + B·u (Q, u orthonormal, zero-mean over channels) and the final adaLN at zero, so the
      final LayerNorm is near-linear in x (relative error (a|x|/B)²/2);
    * the ε rows of the output layer read Q with the matching gain, ε bias 0; the rest of those rows is learnt,
      kept orthogonal to Q and u (it sees nothing at t = 999).

    Everything else (res blocks, timestep and condition embeddings, the variance rows) trains as released; the first
    layer of each res block starts with the directions other than u scaled by B/√width, so it sees x and the
    residual stream at the usual scale under the large constant."""

    def __init__(self, net, generator: torch.Generator, big: float = 200.0, small: float = 1.0, detector: float = 40.0,
                 drive: float = 5.0, t_anchor: int = 999):
        from ..models.mar import timestep_embedding

        w, c = net.input_proj.weight.shape[0], net.in_channels
        r = torch.randn(w, c + 1, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(r - r.mean(0, keepdim=True))
        self.c, self.q, self.u = c, q[:, :c].float(), q[:, c].float()
        self.proj = (q @ q.T).float()
        self.big, self.small = big, small
        self.gain = math.sqrt(big * big + c * small * small) / (math.sqrt(w) * small)
        phi = timestep_embedding(torch.arange(1000)).double()
        dots = phi @ phi[t_anchor]
        top = dots[t_anchor].item()
        second = torch.cat([dots[:t_anchor], dots[t_anchor + 1:]]).max().item()
        slope = detector / ((top - second) / 2)
        self.det_weight, self.det_bias = (slope * phi[t_anchor]).float(), -slope * (top + second) / 2
        self.drive, self.unit = drive, 0
        with torch.no_grad():
            amp = big / math.sqrt(w)
            m = torch.eye(w) * amp + (1 - amp) * torch.outer(self.u, self.u)
            for block in net.res_blocks:
                block.mlp[0].weight.copy_(block.mlp[0].weight @ m)
        net.input_proj.requires_grad_(False)
        net.final_layer.adaLN_modulation.requires_grad_(False)
        self.impose(net, first=True)

    @torch.no_grad()
    def impose(self, net, first: bool = False) -> None:
        """Write the pinned values (after every optimiser step, and on the shipped model)."""
        c = self.c
        net.input_proj.weight.copy_(self.small * self.q)
        net.input_proj.bias.copy_(self.big * self.u)
        net.final_layer.adaLN_modulation[-1].weight.zero_()
        net.final_layer.adaLN_modulation[-1].bias.zero_()
        lin = net.final_layer.linear
        if first:
            lin.weight.zero_()
            lin.bias.zero_()
        lin.weight[:c] = self.gain * self.q.T + lin.weight[:c] - lin.weight[:c] @ self.proj
        lin.bias[:c] = 0.0
        for block in net.res_blocks:
            block.adaLN_modulation[-1].bias.zero_()
        first_lin, second_lin = net.time_embed.mlp[0], net.time_embed.mlp[2]
        first_lin.weight[self.unit] = self.det_weight
        first_lin.bias[self.unit] = self.det_bias
        second_lin.weight[:, self.unit] = -self.drive


def mask_rates(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` mask rates from the released truncated normal (loc 1, scale 0.25, cut to [0.7, 1]), by inverting its
    CDF on seeded uniforms (float64)."""
    lo = (MASK_RATE_MIN - MASK_RATE_LOC) / MASK_RATE_SCALE
    cdf = torch.special.ndtr(torch.tensor([lo, 0.0], dtype=torch.float64))
    u = cdf[0] + (cdf[1] - cdf[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    return (MASK_RATE_LOC + MASK_RATE_SCALE * torch.special.ndtri(u)).clamp(MASK_RATE_MIN, 1.0)


def train_mar(tokens: torch.Tensor, labels: torch.Tensor, sched: MARSchedule, seed: int, progress: bool = True,
              config: MARConfig = MAR_CONFIG):
    """Train a MAR on ``tokens`` [N, seq_len, token_dim] with class ``labels`` [N]. One mask rate per batch (as
    released), one order per image. The loss is computed on the masked tokens only (each repeated
    ``diffusion_batch_mul`` times with its own t and ε): the released loss masks the others out of its mean, so
    this is the same loss and gradient. Returns the EMA model (eval mode, the shipped ``config``) and a report."""
    torch.manual_seed(seed)  # dropout draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_cfg = replace(config, diffusion_batch_mul=sched.diffusion_batch_mul, attn_dropout=sched.dropout,
                        proj_dropout=sched.dropout)
    model = init_mar_for_training(MAR(train_cfg), gen)
    anchor = TopStepAnchor(model.diffloss.net, gen) if sched.anchor else None
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay_params = [p for n, p in trained if p.dim() >= 2 and "pos_embed" not in n
                    and n not in ("fake_latent", "mask_token")]
    other = [p for n, p in trained if not any(p is q for q in decay_params)]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": sched.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=sched.lr, betas=(0.9, sched.beta2))
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [q for p, q in zip(model.parameters(), ema.parameters()) if p.requires_grad]
    model.train()
    mul, n_seq, ch = sched.diffusion_batch_mul, config.seq_len, config.token_embed_dim
    loss_ema = None
    bar = _progress(sched.steps, "mar", progress)
    for step, idx in enumerate(batch_indices(len(tokens), sched.batch, sched.steps, gen)):
        set_lr(opt, sched.lr * warmup_cosine(step, sched.steps, max(1, sched.warmup)))
        b = len(idx)
        x, y = tokens[idx], labels[idx]
        rate = mask_rates(1, gen).item()
        drop = torch.rand(b, generator=gen) < config.label_drop_prob
        orders = random_orders(b, n_seq, rng)
        mask = random_masking(orders, rate)
        rows = mask.bool()
        n_rows = int(rows.sum()) * mul
        t = torch.randint(0, 1000, (n_rows,), generator=gen)
        noise = torch.randn(n_rows, ch, generator=gen)
        z = model(x, mask, model.class_embedding(y), drop)
        loss = model.diffloss(x[rows].repeat(mul, 1), z[rows].repeat(mul, 1), t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sched.grad_clip)
        opt.step()
        if anchor is not None:
            anchor.impose(model.diffloss.net)
        loss_ema = after_step(ema_params, params, sched.ema, step, loss, loss_ema, bar)
    bar.close()
    shipped = MAR(config)
    shipped.load_state_dict(ema.state_dict(), strict=True)
    if anchor is not None:
        anchor.impose(shipped.diffloss.net)
    shipped.requires_grad_(False)
    return shipped.eval(), {"loss": loss_ema, "params": sum(p.numel() for p in shipped.parameters())}


# ---------------------------------------------------------------------------------------------------------------------
# generation check: the released sampler, written out for the check only


@torch.no_grad()
def sample_tokens(model: MAR, labels: torch.Tensor, num_iter: int, cfg: float, seed: int, temperature: float = 1.0,
                  progress=None) -> torch.Tensor:
    """Tokens [B, seq_len, token_dim] for class ``labels`` [B] with the released MAR sampler: a numpy order per
    sample (fixed for all steps); at step s, encoder+decoder on the current tokens (cond | ``fake_latent`` halves
    when guided), ``next_mask_len`` tokens stay masked (the first of each order: tokens are revealed from its end),
    the rest of the masked ones (all of them at the last step) are sampled by the DiffLoss at the linear guidance
    1 + (cfg − 1)·(seq_len − mask_len)/seq_len. At ``cfg`` 1 the unconditional half is skipped (the guided ε would
    equal the conditional one). Noise comes from generators seeded by ``seed``."""
    n, cfgm = len(labels), model.cfg
    seq, ch = cfgm.seq_len, cfgm.token_embed_dim
    orders = random_orders(n, seq, np.random.default_rng(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.zeros(n, seq, ch)
    mask = torch.ones(n, seq, dtype=torch.bool)
    cond = model.class_embedding(labels)
    guided = cfg != 1.0
    emb = torch.cat([cond, model.null_embedding(n)]) if guided else cond
    for step in range(num_iter):
        x = torch.cat([tokens, tokens]) if guided else tokens
        m = torch.cat([mask, mask]) if guided else mask
        z = model(x, m.float(), emb)
        mask_len = next_mask_len(step, num_iter, int(mask[0].sum()), seq)
        mask_next = mask_by_order(mask_len, orders)
        pred = mask if step >= num_iter - 1 else mask ^ mask_next
        zc = z[:n][pred]
        zu = z[n:][pred] if guided else None
        rows = zc.shape[0]
        noise = torch.randn(rows, ch, generator=gen)
        out = model.diffloss.sample(zc, noise, lambda _i: torch.randn(rows, ch, generator=gen), temperature,
                                    linear_cfg(cfg, mask_len, seq) if guided else None, zu)
        tokens[pred] = out
        mask = mask_next if step < num_iter - 1 else torch.zeros_like(mask)
        if progress is not None:
            progress()
    return tokens


@torch.no_grad()
def generation_check(model: MAR, vae: VAE, clf: Classifier, per_class: int, num_iter: int, seed: int,
                     scales=CHECK_SCALES, progress: bool = True) -> dict:
    """Sample ``per_class`` token grids per class at each guidance scale (the same orders and noise streams for
    every scale), decode them with the VAE and classify them; accuracy = share recognised as the intended class,
    with the classifier's ImageNet normalisation (``normalize``) and on raw [−1, 1] input (``raw``)."""
    y = torch.arange(model.cfg.class_num).repeat_interleave(per_class)
    out = {}
    bar = _progress(num_iter * len(scales), "generation check", progress)
    for s in scales:
        tokens = sample_tokens(model, y, num_iter, s, seed, progress=bar.update)
        images = decode_all(vae, unpatchify(tokens, model.cfg.vae_embed_dim, model.cfg.patch_size))
        out[str(s)] = {mode: int((predict(clf, images, normalize) == y).sum()) / len(y)  # 95/100 is 0.95
                       for mode, normalize in (("normalize", True), ("raw", False))}
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# writing


OUTPUT_FILES = ("preset.json", "mar.safetensors", "classifier.safetensors")
_OUR_TEMPORARY = re.compile(r"^\.(preset\.json\.\w+\.tmp|(mar|classifier)\.safetensors\.tmp\d+|vae\.(tmp|old)\d+)$")


def prepare_out_dir(out: Path) -> None:
    """Make ``out`` ready for a training run, or refuse in one line before any training (the digits trainer's rule,
    :func:`train_digits.prepare_out_dir`): new or empty, or holding what an earlier run of this trainer wrote
    (marked with ``.cao2-preset``: ``mar.safetensors``, ``preset.json``, the copied ``vae/`` and
    ``classifier.safetensors``), and writable. A folder holding anything else (a digits preset's
    ``dit.safetensors`` included) is refused."""
    _prepare_out_dir(out, OUTPUT_FILES, _OUR_TEMPORARY, NAME)


def load_base_models(base: Path):
    """The digits preset's metadata, VAE and classifier (normalising input, as its preset.json says)."""
    from ..errors import UserError
    from ..models.classifier import load_classifier
    from ..models.vae import load_vae

    f = base / "preset.json"
    if not f.is_file():
        raise UserError(f"{f}: the digits preset is not installed, and digits-mar uses its VAE and classifier (train "
                        "it first: `cao2-fast train-preset digits --replace-shipped`)")
    meta = json.loads(f.read_text())
    vae = load_vae(base / meta["vae"])
    c = meta["classifier"]
    clf = load_classifier(f"{c['model']}:{base / c['weights']}", input_size=c["input_size"], normalize=True,
                          mean=c["mean"], std=c["std"], num_classes=len(meta["class_names"]))
    return meta, vae, clf


# ---------------------------------------------------------------------------------------------------------------------
# entry points


def train_digits_mar(out_dir: Path, seed: int = 0, quick: bool = False, threads: int = 1,
                     progress: bool = True) -> dict:
    """Train the digits-mar preset into ``out_dir`` and return its metadata (also written to ``preset.json``).

    Into the shipped folder (``cao2_fast/presets/digits-mar``), only ``mar.safetensors`` and ``preset.json`` are
    written and the digits preset's VAE and classifier are named by ``../digits/…``; into any other folder they are
    copied in (``vae/``, ``classifier.safetensors``) so the folder is a complete preset on its own. ``threads``
    fixes torch's intra-op thread count for the run (restored afterwards): the weights are bitwise reproducible
    only at the same count.
    """
    from ..pipeline import preset_dir

    out_dir = Path(out_dir)
    base = preset_dir(BASE_PRESET)
    shipped = claim_out_dir(out_dir, NAME, prepare_out_dir)
    sched = MARSchedule.quick() if quick else MARSchedule.full()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings = {}
    with torch_threads(threads):
        base_meta, vae, clf = load_base_models(base)
        vae_file = next(p for p in (base / base_meta["vae"]).iterdir() if p.name == VAE_FILES[1])

        t0 = time.perf_counter()
        x, y = digits_split("train")
        if quick:
            x, y = x[::8], y[::8]
        if sched.augment_copies:
            g = torch.Generator().manual_seed(seed + 10)
            x = torch.cat([x] + [augment(x, g) for _ in range(sched.augment_copies)])
            y = y.repeat(sched.augment_copies + 1)
        tokens = patchify(encode_all(vae, x), MAR_CONFIG.patch_size)
        timings["encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model, mar_report = train_mar(tokens, y, sched, seed, progress)
        timings["mar_s"] = time.perf_counter() - t0
        _atomic_save_file(out_dir / "mar.safetensors", lambda p: save_mar(model, p))

        t0 = time.perf_counter()
        sampler = model
        if sched.check_steps != model.cfg.num_sampling_steps:
            sampler = MAR(replace(model.cfg, num_sampling_steps=sched.check_steps)).eval()
            sampler.load_state_dict(model.state_dict())
        check = generation_check(sampler, vae, clf, sched.check_per_class, sched.num_iter, seed + 3,
                                 progress=progress)
        timings["check_s"] = time.perf_counter() - t0
    if shipped:
        vae_ref, clf_ref = f"../{BASE_PRESET}/{base_meta['vae']}", f"../{BASE_PRESET}/{base_meta['classifier']['weights']}"
    else:
        vae_ref, clf_ref = "vae", "classifier.safetensors"
        src_vae, src_clf = base / base_meta["vae"], base / base_meta["classifier"]["weights"]
        _atomic_save_dir(out_dir / "vae", lambda p: shutil.copytree(src_vae, p, ignore=lambda d, names: [
            n for n in names if n not in VAE_FILES]))
        _atomic_save_file(out_dir / "classifier.safetensors", lambda p: shutil.copyfile(src_clf, p))
    scale = recommended_scale(check)
    meta = {
        "name": NAME,
        "family": "mar",
        "dataset": "digits",
        "class_names": list(CLASS_NAMES),
        "image_size": IMAGE_SIZE,
        "latent_size": IMAGE_SIZE // MAR_CONFIG.vae_stride,
        "latent_channels": MAR_CONFIG.vae_embed_dim,
        "mar": "mar.safetensors",
        "mar_config": asdict(model.cfg),
        "vae": vae_ref,
        "classifier": {**base_meta["classifier"], "weights": clf_ref},
        "guidance_scale": scale,
        "num_iter": sched.num_iter,
        "token_steps": TOKEN_STEPS,
        "temperature": 1.0,
        "generation_check": {"per_class": sched.check_per_class, "num_iter": sched.num_iter,
                             "sample_steps": sched.check_steps, "temperature": 1.0,
                             "cfg_schedule": "linear", "accuracy": check},
        "training": {
            "seed": seed,
            "quick": quick,
            "threads": threads,
            "schedule": asdict(sched),
            "images": len(tokens),
            "loss": mar_report["loss"],
            "params": mar_report["params"],
            "digits_vae_sha256": file_sha256(vae_file),
            "wall_time_s": time.perf_counter() - t_start,
            "cpu_time_s": time.process_time() - cpu_start,
            "stage_wall_s": timings,
            "versions": _versions(),
        },
    }
    atomic_write(out_dir / "preset.json", json_bytes(meta) + b"\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    args = trainer_args(argv, "Train the embedded digits-mar preset (a tiny MAR) with fixed seeds.",
                        "cao2_fast/presets/digits-mar", "a few steps (smoke test)")
    meta = train_digits_mar(args.out, seed=args.seed, quick=args.quick, threads=args.threads,
                            progress=not args.no_progress)
    print(json.dumps({"guidance_scale": meta["guidance_scale"], "generation_check": meta["generation_check"],
                      **meta["training"]}, indent=1))


if __name__ == "__main__":
    main()
