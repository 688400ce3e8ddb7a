"""The MAR family: a masked autoregressive model with a per-token diffusion head (MAR + DiffLoss) and its VAE, as a
:class:`~cao2_fast.generator.Generator`.

Stage 1 (:func:`sample_tokens`): every candidate starts with all L tokens hidden; over ``sample_steps`` iterations
the MAE encoder/decoder conditions each hidden token and the DiffLoss head samples the tokens the cosine schedule
reveals this iteration (those at the end of the candidate's random order), guided against the learned null
embedding with a scale that ramps linearly from 1 towards the guidance scale as tokens are revealed. The decodes
after the last two iterations are scored; a candidate's stability is the cosine similarity of the two softmaxes.
All candidates of a group run as one batch (the released loop runs one class at a time).

Stage 2 (:func:`optimise_tokens`): each kept latent, as tokens, is optimised with Adam to lower MAR's own masked
diffusion loss plus λ·L∞ of the ε error, under the recipe's condition, mask rule, target and loss terms
(``Recipe.mar_*``). All images of a batch step together; each image's randomness (orders, mask rates, timesteps,
noises) is pre-drawn from its class's stream, so its result does not depend on the batch.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engines.specs import ModelSpec, TensorSpec, plain, vae_decode_spec
from ..errors import UserError
from ..generator import Candidates, Generator, Optimised, Ranker, Scorer, class_generator
from ..models.mar import (MAR, MARConfig, MARDiffusion, linear_cfg, load_mar, mask_by_order, next_mask_len,
                          p_sample, patchify, random_mar, unpatchify)
from ..models.vae import VAE
from ..progress import RetryTicks

# the family's architecture and schedule, for its checks and benchmarks
__all__ = ["MAR", "MARConfig", "MARDiffusion", "patchify", "random_mar", "MARGenerator", "MARStage1Noise", "MARStage2Noise", "sample_tokens", "optimise_tokens", "mask_rates",
           "stage2_mask_counts", "revealed_counts", "stability", "MASK_FLOOR"]

_log = logging.getLogger("cao2_fast")
MASK_RATE_MIN, MASK_RATE_STD = 0.7, 0.25  # MAR's training mask rate: N(1, 0.25²) truncated to [0.7, 1]
MASK_FLOOR = 0.25  # the released stage 2's ``max_ratio``


def mask_rates(u: torch.Tensor) -> torch.Tensor:
    """MAR's mask rates from uniforms ``u`` in [0, 1): the inverse CDF of N(1, 0.25²) truncated to [0.7, 1]
    (scipy's ``truncnorm.rvs`` draws one uniform and maps it so). float64."""
    u = u.double()
    a = torch.special.ndtr(torch.tensor((MASK_RATE_MIN - 1.0) / MASK_RATE_STD, dtype=torch.float64))
    return 1.0 + MASK_RATE_STD * torch.special.ndtri(a + u * (0.5 - a))


def stage2_mask_counts(rates: torch.Tensor, seq_len: int, rule: str) -> torch.Tensor:
    """Tokens hidden per stage-2 step: ⌈L·rate⌉, then at least (``max``, released) or at most (``min``) ⌊L/4⌋."""
    count = torch.ceil(seq_len * rates).long()
    floor = int(seq_len * MASK_FLOOR)
    return count.clamp(min=floor) if rule == "max" else count.clamp(max=floor)


# ----------------------------------------------------------------------------------------------------------------
# Randomness


@dataclass
class MARStage1Noise:
    """A batch of candidates' stage-1 randomness: orders (n, L) (a permutation each), ``init`` (n, L, C) each
    token's initial DiffLoss noise and ``steps`` (n, L, S, C) its noise at each of the S DiffLoss steps (index i =
    respaced step i). Every token is sampled exactly once, so this is all the randomness a candidate uses."""

    orders: torch.Tensor
    init: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def draw(cls, n: int, seq_len: int, channels: int, token_steps: int, generator: torch.Generator):
        orders = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(n)]) if n else \
            torch.zeros(0, seq_len, dtype=torch.long)
        init = torch.randn(n, seq_len, channels, generator=generator)
        steps = torch.randn(n, seq_len, token_steps, channels, generator=generator)
        return cls(orders, init, steps)

    @staticmethod
    def cat(parts: list["MARStage1Noise"]) -> "MARStage1Noise":
        return MARStage1Noise(*(torch.cat([getattr(p, f) for p in parts]) for f in ("orders", "init", "steps")))

    def slice(self, start: int, stop: int) -> "MARStage1Noise":
        return MARStage1Noise(self.orders[start:stop], self.init[start:stop], self.steps[start:stop])


@dataclass
class MARStage2Noise:
    """A batch of images' stage-2 randomness, per step k: ``orders`` (n, K, L), mask-rate uniforms ``u`` (n, K)
    float64, DiffLoss timesteps ``t`` (n, K, L) in 0..999 and noises ``eps`` (n, K, L, C)."""

    orders: torch.Tensor
    u: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor

    @classmethod
    def draw(cls, n: int, steps: int, seq_len: int, channels: int, generator: torch.Generator):
        orders = torch.argsort(torch.rand(n, steps, seq_len, generator=generator), dim=-1)
        u = torch.rand(n, steps, generator=generator, dtype=torch.float64)
        t = torch.randint(0, 1000, (n, steps, seq_len), generator=generator)
        eps = torch.randn(n, steps, seq_len, channels, generator=generator)
        return cls(orders, u, t, eps)

    @staticmethod
    def cat(parts: list["MARStage2Noise"]) -> "MARStage2Noise":
        return MARStage2Noise(*(torch.cat([getattr(p, f) for p in parts]) for f in ("orders", "u", "t", "eps")))

    def slice(self, start: int, stop: int) -> "MARStage2Noise":
        return MARStage2Noise(self.orders[start:stop], self.u[start:stop], self.t[start:stop], self.eps[start:stop])


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the sampler


@torch.no_grad()
def sample_tokens(model: MAR, diffusion: MARDiffusion, cond: torch.Tensor, noise: MARStage1Noise, num_iter: int,
                  guidance: float, schedule: str = "linear", temperature: float = 1.0, keep_after=(),
                  progress=None, mae=None, head=None) -> dict[int, torch.Tensor]:
    """MAR's sampling loop for a batch of candidates with class embeddings ``cond`` (B, width): tokens (B, L, C)
    after each iteration listed in ``keep_after`` (0-based; the tokens not yet sampled are zero), and under the key
    ``num_iter - 1`` the finished tokens. Guidance ``guidance`` (1 = none) pairs every candidate with the
    unconditional row (``fake_latent``); ``schedule`` ``linear`` scales it as 1 + (s − 1)·(L − hidden next)/L,
    ``constant`` keeps s. The DiffLoss sampler runs the respaced ``diffusion`` with each token's own noises.

    ``mae`` ``(tokens, mask, cond) -> z`` and ``head`` ``(x, t float32, z) -> out`` replace the model's encoder/decoder
    and DiffLoss MLP (engines of :meth:`MARGenerator.engine_specs`); ``head`` may also be a :class:`HeadLoop`, which
    runs a whole token's steps per call."""
    b, seq_len, c = noise.init.shape
    device = cond.device
    param = next(model.parameters())
    guided = guidance != 1.0
    null = model.null_embedding(b).to(device, cond.dtype)
    tokens = torch.zeros(b, seq_len, c, device=device, dtype=torch.float32)
    mask = torch.ones(b, seq_len, dtype=torch.bool, device=device)
    orders = noise.orders.to(device)
    kept: dict[int, torch.Tensor] = {}
    for step in range(num_iter):
        x, m, emb = tokens.to(param.dtype), mask, cond
        if guided:
            x, m, emb = torch.cat([x, x]), torch.cat([m, m]), torch.cat([cond, null])
        z = model(x, m.float(), emb) if mae is None else mae(x, m.to(x.dtype), emb)
        mask_len = next_mask_len(step, num_iter, int(mask[0].sum()), seq_len)
        mask_next = mask_by_order(mask_len, orders)
        pred = mask if step >= num_iter - 1 else mask & ~mask_next
        rows = pred.nonzero(as_tuple=True)  # (candidate, position) order, as released
        zc = z[:b][rows]
        zu = z[b:][rows] if guided else None
        scale = (linear_cfg(guidance, mask_len, seq_len) if schedule == "linear"
                 else torch.tensor(float(guidance))).item() if guided else None
        x_rows = noise.init[pred.cpu()].to(device, zc.dtype)  # each sampled token's own noises
        step_noise = noise.steps[pred.cpu()]  # (rows, S, C)
        if isinstance(head, HeadLoop):
            x_rows = head(x_rows, zc, zu, step_noise.to(device, zc.dtype), temperature, scale)
        else:
            net = model.diffloss.net if head is None else _float_timesteps(head)
            for i in reversed(range(diffusion.num_steps)):
                x_rows = p_sample(net, diffusion, x_rows, i, zc, step_noise[:, i].to(device, zc.dtype),
                                  temperature, scale, zu)
        tokens[rows] = x_rows.float()  # in place: this step's forward is done, and kept snapshots are copies
        mask = mask_next if step < num_iter - 1 else torch.zeros_like(mask)
        if step in keep_after or step == num_iter - 1:
            kept[step] = tokens.clone()
        if progress is not None:
            progress()
    return kept


def _float_timesteps(head):
    """``head`` called with its timesteps as float32, as its engine's contract takes them."""
    return lambda x, t, z: head(x, t.float(), z)


class HeadLoop:
    """Every respaced DiffLoss step of one iteration's tokens as one call, replayed from a CUDA graph.

    ``__call__(x, z, z_uncond, step_noise (rows, S, C), temperature, scale)`` returns the sampled rows, the same
    arithmetic as stepping :func:`~cao2_fast.models.mar.p_sample` S times. On first sight of a row count (every
    candidate of a batch reveals as many tokens per iteration, so a run has at most ``num_iter`` of them) the loop is
    captured into a graph over static buffers; later calls copy their inputs into the buffers and replay it, which
    removes S·(layers) kernel launches and the Python between them. ``capture`` makes the graph: by default a
    ``torch.cuda.CUDAGraph`` on ``device``; a test passes a stand-in to check the buffer handling on CPU. Should a
    capture fail (a driver or library that cannot capture), the loop logs why once and steps uncaptured: the same
    arithmetic, only slower."""

    def __init__(self, net, diffusion: MARDiffusion, guided: bool, capture=None):
        self.net, self.diffusion, self.guided = net, diffusion, guided
        self.capture = capture or _cuda_graph
        self.graphs: dict[tuple, tuple] = {}
        self.failed: str | None = None

    def _loop(self, buf: dict) -> torch.Tensor:
        x = buf["x"]
        for i in reversed(range(self.diffusion.num_steps)):
            x = p_sample(self.net, self.diffusion, x, i, buf["z"], buf["noise"][:, i], buf["temperature"],
                         buf["scale"] if self.guided else None, buf["zu"] if self.guided else None)
        return x

    def __call__(self, x, z, zu, step_noise, temperature, scale) -> torch.Tensor:
        key = (tuple(x.shape), tuple(z.shape), x.dtype, str(x.device), torch.is_autocast_enabled(x.device.type))
        inputs = {"x": x, "z": z, "zu": z if zu is None else zu, "noise": step_noise,
                  "temperature": torch.full((x.shape[0],), float(temperature), device=x.device),
                  "scale": torch.full((x.shape[0],), 1.0 if scale is None else float(scale), device=x.device)}
        if self.failed is not None:
            return self._loop(inputs)
        if key not in self.graphs:
            buf = {k: v.clone() for k, v in inputs.items()}
            try:
                self.graphs[key] = (buf, *self.capture(lambda: self._loop(buf), x.device))
            except Exception as e:  # noqa: BLE001 (whatever failed, stepping uncaptured computes the same)
                self.failed = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _log.warning("MAR head steps: CUDA graph capture failed (%s); stepping them uncaptured", self.failed)
                return self._loop(inputs)
        buf, replay, out = self.graphs[key]
        for k, v in inputs.items():
            buf[k].copy_(v)
        replay()
        return out.clone()


def _cuda_graph(fn, device):
    """(replay, output) of ``fn`` captured in a CUDA graph on ``device`` after a warm-up on a side stream. Under
    autocast (the official recipe's fp16 stage 1) the weight casts are not cached while capturing: a cached cast
    lives outside the graph and is freed when the autocast region ends, so the graph must make its own."""
    autocast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                if torch.is_autocast_enabled("cuda") else nullcontext())
    with autocast:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # warm-up: lazy initialisation must not happen inside the capture
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph.replay, out


def revealed_counts(num_iter: int, seq_len: int) -> list[int]:
    """Tokens sampled at each iteration of :func:`sample_tokens` (the same for every candidate)."""
    hidden, out = seq_len, []
    for step in range(num_iter):
        nxt = next_mask_len(step, num_iter, hidden, seq_len) if step < num_iter - 1 else 0
        out.append(hidden - nxt)
        hidden = nxt
    return out


def stability(p_start: torch.Tensor, p_end: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two softmaxes per candidate (float32), as ``F.cosine_similarity`` computes it."""
    return torch.nn.functional.cosine_similarity(p_start.float(), p_end.float(), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the latent optimisation


@dataclass
class TokenResult:
    tokens: torch.Tensor
    loss_first: torch.Tensor
    loss_last: torch.Tensor
    steps_done: torch.Tensor
    finite: torch.Tensor


def stage2_loss(model: MAR, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                eps: torch.Tensor, lam: float, attached: bool, include_vb: bool,
                rows: tuple | None = None) -> torch.Tensor:
    """Each image's stage-2 loss (B,): the masked mean of MAR's per-token diffusion loss plus λ·max|ε − ε̂| over all
    its tokens. x (B, L, C) tokens, mask (B, L) float (1 = hidden), t (B, L), eps (B, L, C); ``rows`` the
    mask's :meth:`~cao2_fast.models.mar.MAR.kept_rows` (computed from it when not given)."""
    b, seq_len, c = x.shape
    param = next(model.parameters())
    z = model(x.to(param.dtype), mask, cond.to(param.dtype), rows=rows)
    target = x if attached else x.detach()
    terms = model.forward_loss(z, target.to(param.dtype), t.reshape(-1), eps.reshape(-1, c).to(param.dtype),
                               include_vb)
    per_token = terms["loss"].float().view(b, seq_len)
    masked = (per_token * mask).sum(1) / mask.sum(1)
    linf = (terms["target"].float() - terms["model_output"].float()).view(b, -1).abs().amax(1)
    return masked + lam * linf


class Stage2Objective(torch.nn.Module):
    """:func:`stage2_loss` of ``mar`` as a module's forward: what a stage-2 engine compiles."""

    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar

    def forward(self, x, cond, mask, t, eps, lam: float, attached: bool, include_vb: bool,
                rows: tuple | None = None) -> torch.Tensor:
        return stage2_loss(self.mar, x, cond, mask, t, eps, lam, attached, include_vb, rows)


def optimise_tokens(model: MAR, tokens: torch.Tensor, cond: torch.Tensor, noise: MARStage2Noise, steps: int,
                    lr: float, lam: float, rule: str = "max", attached: bool = False, include_vb: bool = True,
                    device="cpu", progress=None, objective=None) -> TokenResult:
    """Adam (torch's defaults: β (0.9, 0.999), ε 1e-8) on each image's tokens (B, L, C) for ``steps`` steps; the
    gradient of an image is its own loss's (the batch's losses are summed, and Adam is elementwise), so a batch
    equals its images optimised one by one. An image whose loss, gradient or update is not finite stops there and
    keeps its last finite tokens. ``objective`` (a :class:`Stage2Objective` or its compiled engine) computes the
    losses instead of :func:`stage2_loss` on ``model``; an engine gets the encoder's rows padded to
    :meth:`~cao2_fast.models.mar.MAR.row_bucket`, so it compiles once per bucket, not once per count of visible
    tokens."""
    device = torch.device(device)
    bucketed = objective is not None
    objective = objective if objective is not None else Stage2Objective(model)
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    x = tokens.detach().to(device, torch.float32, copy=True)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    n, seq_len, _ = x.shape
    cond = cond.to(device)
    first = torch.full((n,), float("nan"))
    last = torch.full((n,), float("nan"))
    alive = torch.ones(n, dtype=torch.bool)
    done = torch.zeros(n, dtype=torch.long)
    counts = stage2_mask_counts(mask_rates(noise.u), seq_len, rule)  # (n, steps)
    for k in range(steps):
        mask = mask_by_order(counts[:, k].to(device), noise.orders[:, k].to(device)).float()
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = objective(xg, cond, mask, noise.t[:, k].to(device), noise.eps[:, k].to(device), lam, attached,
                             include_vb, model.kept_rows(mask, bucketed))
            (g,) = torch.autograd.grad(loss.sum(), xg, allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        loss = loss.detach().cpu()
        if k == 0:
            first.copy_(loss)
        ok = alive & torch.isfinite(loss) & torch.isfinite(g).flatten(1).all(1).cpu()
        okd = ok.to(device).view(-1, 1, 1)
        g = torch.where(okd, g, torch.zeros_like(g))
        m_new = m.mul(b1).add_(g, alpha=1 - b1)
        v_new = v.mul(b2).addcmul_(g, g, value=1 - b2)
        step = k + 1
        denom = (v_new.sqrt() / math.sqrt(1 - b2 ** step)).add_(adam_eps)
        x_new = x.addcdiv(m_new, denom, value=-lr / (1 - b1 ** step))
        ok &= torch.isfinite(x_new).flatten(1).all(1).cpu()
        okd = ok.to(device).view(-1, 1, 1)
        x, m, v = (torch.where(okd, new, old) for new, old in ((x_new, x), (m_new, m), (v_new, v)))
        last = torch.where(ok, loss, last)
        alive = ok
        done += ok.long()
        if progress is not None:
            progress()
    return TokenResult(x.detach().cpu(), first, last, done, alive)


# ----------------------------------------------------------------------------------------------------------------
# The generator


class MARGenerator(Generator):
    """A MAR (:class:`~cao2_fast.models.mar.MAR`) and its VAE (``vae.decode`` maps latents, in the scaled space
    MAR's tokens live in, to images in [−1, 1]). A latent is the token grid unpatchified: (C, h·p, h·p)."""

    family = "mar"
    record_fields = {"stage1_score": (int, float, type(None))}  # the kept candidate's stability

    def __init__(self, mar: MAR, vae: VAE):
        self.mar, self.vae = mar, vae
        self.decoder = vae.decode
        self.mae_call = self.head_call = self.stage2_call = None  # None: the model itself (see use_engines)
        self.head_backend, self.head_graphs = "eager", False
        self.graph_head_steps = True  # on CUDA, replay each iteration's head steps from a graph (see _head)
        self._loops: dict[tuple, HeadLoop] = {}  # those loops, by (head steps, guided)
        self._diffusion: dict[int, MARDiffusion] = {}
        c = mar.cfg
        if vae.latent_channels != c.vae_embed_dim:
            raise UserError(f"the VAE has {vae.latent_channels} latent channels but the MAR's tokens hold "
                            f"{c.vae_embed_dim}: they are not a pair")

    @classmethod
    def from_paths(cls, mar: str | Path, vae: str | Path) -> "MARGenerator":
        """A MAR checkpoint (``checkpoint-last.pth``, a folder holding it, or ``.safetensors``) and its VAE (the
        KL-16 ``kl16.ckpt``, or a diffusers AutoencoderKL folder)."""
        from ..models.mar_vae import load_kl16
        from ..models.vae import load_vae

        p = Path(vae).expanduser()
        model = load_mar(mar)
        decoder = load_vae(p) if p.is_dir() and (p / "config.json").is_file() else load_kl16(p)
        return cls(model, decoder)

    @classmethod
    def random(cls, cfg: MARConfig, vae: VAE, seed: int = 0) -> "MARGenerator":
        return cls(random_mar(cfg, seed), vae)

    # -- shapes and settings ----------------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = self.mar.cfg
        side = c.seq_h * c.patch_size
        return (c.vae_embed_dim, side, side)

    @property
    def num_classes(self) -> int:
        return self.mar.cfg.class_num

    @property
    def image_shape(self) -> tuple[int, int, int]:
        f = self.vae.downsample
        _, h, w = self.latent_shape
        return (self.vae.autoencoder.config.out_channels, h * f, w * f)

    def config_defaults(self, recipe) -> dict:
        """The released MAR run: 2·IPC candidates, 32 sampling iterations, guidance 2.9 on the linear ramp,
        temperature 1, 100 DiffLoss steps, the recipe's stability rule; stage 2 100 Adam steps."""
        return {"family": "mar", "k": 2, "sample_steps": 32, "guidance_scale": 2.9, "guidance_schedule": "linear",
                "temperature": 1.0, "token_steps": int(self.mar.cfg.num_sampling_steps), "selection":
                    recipe.mar_select, "stage2_steps": 100}

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        seq_len = self.mar.cfg.seq_len
        if cfg.sample_steps > seq_len:
            raise UserError(f"--sample-steps {cfg.sample_steps}: MAR reveals at least one of its {seq_len} tokens "
                            f"per iteration, so it takes at most {seq_len} iterations")
        if cfg.sample_steps < 2:
            raise UserError("--sample-steps must be at least 2 for MAR: stability compares the last two iterations")

    def diffusion(self, cfg) -> MARDiffusion:
        if cfg.token_steps not in self._diffusion:
            self._diffusion[cfg.token_steps] = MARDiffusion.create(str(cfg.token_steps))
        return self._diffusion[cfg.token_steps]

    def to(self, device: torch.device, dtype: torch.dtype) -> "MARGenerator":
        self.mar.set_attention("sdpa" if torch.device(device).type == "cuda" else "math")
        self.mar.to(device, dtype)
        self.vae.to(device, dtype)
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def _tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents, self.mar.cfg.patch_size)

    def _latents(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.mar.cfg.vae_embed_dim, self.mar.cfg.patch_size)

    # -- stage 1 ---------------------------------------------------------------------------------------------------

    def stage1_noise(self, cfg, class_ids: list[int]) -> MARStage1Noise:
        c = self.mar.cfg
        return MARStage1Noise.cat([MARStage1Noise.draw(cfg.num_candidates, c.seq_len, c.token_embed_dim,
                                                       cfg.token_steps, class_generator(cfg.seed, k, "mar-stage1"))
                                   for k in class_ids])

    def _chunks(self, total: int, cfg) -> list[tuple[int, int]]:
        return [(s, min(s + cfg.stage1_batch, total)) for s in range(0, total, cfg.stage1_batch)]

    def sample(self, class_ids: list[int], cfg, score: Scorer, rank: Ranker, device, dtype,
               progress=None) -> dict[int, Candidates]:
        n = cfg.num_candidates
        noise = self.stage1_noise(cfg, class_ids)
        labels = torch.tensor([c for c in class_ids for _ in range(n)], device=device)
        io = cfg.recipe.mar_teacher_io
        device = torch.device(device)
        fp16 = cfg.recipe.mar_autocast and device.type == "cuda"
        start, end = cfg.sample_steps - 2, cfg.sample_steps - 1
        latents, p_start, p_end, images, fin = [], [], [], [], []
        for a, b in self._chunks(len(labels), cfg):
            with torch.autocast("cuda", dtype=torch.float16) if fp16 else nullcontext():
                kept = sample_tokens(self.mar, self.diffusion(cfg), self.mar.class_embedding(labels[a:b]),
                                     noise.slice(a, b), cfg.sample_steps, cfg.guidance_scale,
                                     cfg.guidance_schedule, cfg.temperature, keep_after=(start,), progress=progress,
                                     mae=self.mae_call, head=self._head(cfg, device))
                lat_start, lat_end = self._latents(kept[start].cpu()), self._latents(kept[end].cpu())
                _, ps, fs = score(lat_start, io=io)
                img, pe, fe = score(lat_end, io=io)
            latents.append(lat_end)
            p_start.append(ps)
            p_end.append(pe)
            images.append(img)
            fin.append(fs & fe)
        latents, images, finite = torch.cat(latents), torch.cat(images), torch.cat(fin)
        p_start, p_end = torch.cat(p_start), torch.cat(p_end)
        scores = stability(p_start, p_end)
        finite &= scores.isfinite()
        return {c: Candidates(torch.arange(n), latents[j * n:(j + 1) * n], images[j * n:(j + 1) * n],
                              p_end[j * n:(j + 1) * n], finite[j * n:(j + 1) * n],
                              int((~finite[j * n:(j + 1) * n]).sum()), scores[j * n:(j + 1) * n])
                for j, c in enumerate(class_ids)}

    def stage1_flops(self, cfg) -> float:
        """Per class: every iteration's encoder (buffer + visible tokens) and decoder, doubled under guidance, and
        the DiffLoss steps of the tokens it samples (also doubled under guidance)."""
        c, guided = self.mar.cfg, 2 if cfg.guidance_scale != 1.0 else 1
        visible, flops = 0, 0.0
        for revealed in revealed_counts(cfg.sample_steps, c.seq_len):
            flops += guided * (c.encoder_flops(c.buffer_size + visible) + c.decoder_flops())
            flops += guided * revealed * cfg.token_steps * c.diffloss_flops_per_row_step()
            visible += revealed
        return cfg.num_candidates * flops

    def stage1_ticks(self, groups: list[list[int]], cfg) -> int:
        return cfg.sample_steps * sum(len(self._chunks(len(g) * cfg.num_candidates, cfg)) for g in groups)

    def stage1_bytes(self, cfg) -> int:
        c = self.mar.cfg
        n = cfg.classes_per_group * cfg.num_candidates
        per = c.seq_len * c.token_embed_dim * (cfg.token_steps + 1 + 3) + c.seq_len * 2
        return 4 * n * (per + math.prod(self.image_shape) * 2)

    # -- stage 2 ---------------------------------------------------------------------------------------------------

    def stage2_noise(self, cfg, class_id: int, n: int) -> MARStage2Noise:
        c = self.mar.cfg
        return MARStage2Noise.draw(n, cfg.stage2_steps, c.seq_len, c.token_embed_dim,
                                   class_generator(cfg.seed, class_id, "mar-stage2"))

    def stage2_condition(self, cfg, class_ids: torch.Tensor) -> torch.Tensor:
        """Stage 2's buffer rows: the zero vector (released) or each image's class embedding."""
        if cfg.recipe.mar_stage2_cond == "zero":
            return self.mar.class_embedding(torch.zeros(len(class_ids), self.mar.cfg.class_num,
                                                        device=self.mar.class_emb.weight.device,
                                                        dtype=self.mar.class_emb.weight.dtype))
        return self.mar.class_embedding(class_ids.to(self.mar.class_emb.weight.device))

    def optimise(self, latents: torch.Tensor, class_ids: torch.Tensor, cfg, device, dtype, progress=None,
                 log=None, noise: MARStage2Noise | None = None) -> Optimised:
        from ..stage2 import halve_on_oom

        if noise is None:
            runs = torch.unique_consecutive(class_ids, return_counts=True)
            noise = MARStage2Noise.cat([self.stage2_noise(cfg, int(c), int(k)) for c, k in zip(*runs)])
        tokens = self._tokens(latents.float())
        rec = cfg.recipe
        parts, s, batch = [], 0, cfg.stage2_batch
        while s < len(tokens):
            ticks = RetryTicks(progress)

            def chunk(b: int, s: int = s, ticks: RetryTicks = ticks) -> TokenResult:
                ticks.start(b)
                return optimise_tokens(self.mar, tokens[s:s + b], self.stage2_condition(cfg, class_ids[s:s + b]),
                                       noise.slice(s, s + b), cfg.stage2_steps, cfg.lr, cfg.lam, rec.mar_mask_rule,
                                       rec.mar_target_grad == "attached", rec.mar_stage2_vb, device, progress=ticks,
                                       objective=self.stage2_call)

            batch, part = halve_on_oom(chunk, min(batch, len(tokens) - s), log)
            parts.append(part)
            s += batch
        out = TokenResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("tokens", "loss_first", "loss_last", "steps_done", "finite")))
        return Optimised(self._latents(out.tokens), out.loss_first, out.loss_last, out.steps_done, out.finite)

    def stage2_flops(self, cfg) -> float:
        """Forward and input gradient (about twice the forward) of each step, at the mean visible count."""
        c = self.mar.cfg
        hidden = float(stage2_mask_counts(mask_rates(torch.linspace(0.0005, 0.9995, 1000)), c.seq_len,
                                          cfg.recipe.mar_mask_rule).double().mean())
        fwd = (c.encoder_flops(round(c.buffer_size + c.seq_len - hidden)) + c.decoder_flops()
               + c.seq_len * c.diffloss_flops_per_row_step())
        return 2 * fwd * cfg.stage2_steps

    # -- engines ---------------------------------------------------------------------------------------------------

    def engine_specs(self) -> dict:
        """Stage 1's three models: ``mar_mae`` (the encoder and decoder in :meth:`MAR.forward_static`'s fixed-shape
        form), ``mar_head`` (the DiffLoss MLP, called once per respaced step) and ``vae_decode``. Exported files hold
        the released attention arithmetic whatever the model runs eagerly."""
        return {"mar_mae": mae_spec(self.mar), "mar_head": head_spec(self.mar),
                "vae_decode": vae_decode_spec(self.vae, self.latent_shape)}

    def engine_batches(self, cfg) -> dict[str, int]:
        """The largest call of each: the MAE sees a batch's candidates, the head the tokens they reveal in one
        iteration (the most of any), both doubled under guidance."""
        guided = 1 if cfg.guidance_scale == 1.0 else 2
        rows = max(revealed_counts(cfg.sample_steps, self.mar.cfg.seq_len))
        return {"mar_mae": guided * cfg.stage1_batch, "mar_head": guided * cfg.stage1_batch * rows,
                "vae_decode": cfg.decode_batch}

    def use_engines(self, built: dict, stage2) -> None:
        """Stage 1 on ``built``'s engines (on ``eager`` the model's own calls stay: the MAE then drops the hidden
        tokens instead of masking them, the cheaper form), stage 2's objective on ``stage2``."""
        eager = built["mar_mae"].backend.name == "eager"
        self.mae_call = None if eager else built["mar_mae"]
        self.head_call = None if eager else built["mar_head"]
        self.head_backend = built["mar_head"].backend.name
        self.head_graphs = bool(getattr(built["mar_head"], "details", {}).get("cuda_graphs"))
        self.decoder = built["vae_decode"]
        self.stage2_call = None if stage2.backend.name == "eager" else stage2
        self._loops = {}  # a loop holds the head it was made with

    def _head(self, cfg, device):
        """What stage 1 calls for the head's steps: a :class:`HeadLoop` on CUDA (eager or compiled head: the graph
        replays their kernels), else the head engine (None: the model's own MLP). A head compiled with CUDA graphs
        of its own (``reduce-overhead``) replays those per step instead: graphs do not nest. With
        ``graph_head_steps`` off, the steps are always called one by one (as released)."""
        device = torch.device(device)
        if (not self.graph_head_steps or device.type != "cuda" or self.head_backend not in ("eager", "compile")
                or self.head_graphs):
            return self.head_call
        key = (cfg.token_steps, cfg.guidance_scale != 1.0)
        if key not in self._loops:
            net = self.mar.diffloss.net if self.head_call is None else _float_timesteps(self.head_call)
            self._loops[key] = HeadLoop(net, self.diffusion(cfg), key[1])
        return self._loops[key]

    def stage2_module(self) -> torch.nn.Module:
        return Stage2Objective(self.mar)


# ----------------------------------------------------------------------------------------------------------------
# Engine specs


class MAEForward(torch.nn.Module):
    """``(tokens (N, L, C), mask (N, L) 1 = hidden, cond (N, width)) -> z (N, L, decoder width)``: the MAE in its
    fixed-shape form (:meth:`MAR.forward_static`)."""

    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar
        self.train(mar.training)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.mar.forward_static(tokens, mask, cond)


class HeadForward(torch.nn.Module):
    """``(x (N, C), t (N,) float32 timesteps on the 1000-step schedule, z (N, Dz)) -> (N, 2C)``: the DiffLoss MLP."""

    def __init__(self, mar: MAR):
        super().__init__()
        self.net = mar.diffloss.net
        self.train(mar.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, z)


def _released_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU eval copy with the released attention arithmetic (what an exported file holds)."""
    import copy

    out = copy.deepcopy(module).to("cpu", torch.float32).eval()
    for m in out.modules():
        if isinstance(m, MAR):
            m.set_attention("math")
    return out


def mae_spec(mar: MAR) -> ModelSpec:
    c = mar.cfg
    return ModelSpec(
        "mar_mae", MAEForward(mar),
        (TensorSpec("tokens", (c.seq_len, c.token_embed_dim)), TensorSpec("mask", (c.seq_len,)),
         TensorSpec("cond", (c.encoder_embed_dim,))),
        "z", signature={"class": "MAR", "config": plain(c), "form": "static (hidden tokens masked out of attention)",
                        "attention": "math"},
        export_form=_released_copy)


def head_spec(mar: MAR) -> ModelSpec:
    c = mar.cfg
    return ModelSpec(
        "mar_head", HeadForward(mar),
        (TensorSpec("x", (c.token_embed_dim,)), TensorSpec("t", (), "float32"),
         TensorSpec("z", (c.decoder_embed_dim,))),
        "out", signature={"class": "SimpleMLPAdaLN", "config": plain(c)}, export_form=_released_copy)


# ----------------------------------------------------------------------------------------------------------------
# The released execution (the baseline a benchmark measures against): the same arithmetic, executed as released


def released_stage2_image(model: MAR, tokens: torch.Tensor, cond: torch.Tensor, noise: MARStage2Noise, steps: int,
                          lr: float, lam: float, rule: str = "max", attached: bool = False,
                          include_vb: bool = True) -> torch.Tensor:
    """One image's tokens (L, C) optimised as the release does: batch 1, a fresh ``torch.optim.Adam``, the model's
    weights left trainable (every backward also computes weight gradients nobody uses). ``noise`` holds this
    image's draws step-major (orders (K, L), u (K,), t (K, L), eps (K, L, C)). Returns the tokens."""
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        latent = torch.nn.Parameter(tokens.detach().clone()[None])
        opt = torch.optim.Adam([latent], lr=lr)
        counts = stage2_mask_counts(mask_rates(noise.u), tokens.shape[0], rule)
        for k in range(steps):
            opt.zero_grad()
            model.zero_grad(set_to_none=True)
            mask = mask_by_order(counts[k:k + 1], noise.orders[k:k + 1]).float()
            loss = stage2_loss(model, latent, cond, mask, noise.t[k][None], noise.eps[k][None], lam, attached,
                               include_vb)
            loss.sum().backward()
            opt.step()
        return latent.detach()[0]
    finally:
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
