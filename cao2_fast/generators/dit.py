"""The DiT family: a class-conditional latent DiT and its VAE as a :class:`~cao2_fast.generator.Generator`.

Stage 1 is the DiT's own DDPM ancestral sampler respaced to ``sample_steps`` steps, with learned variance and
classifier-free guidance on the first ``guided_channels`` eps channels (:mod:`cao2_fast.stage1`), or a few-step
diffusers scheduler (:mod:`cao2_fast.schedulers`), optionally with early rejection and a guidance interval. Stage 2
optimises each latent's denoising error under the condition (:mod:`cao2_fast.stage2`), each image with its own
noise: a fresh draw from its class's stream, or under the released recipe an entry of the fixed 1024-noise bank
(:func:`cao2_fast.stage2.noise_bank`) picked from that stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .. import selection, stage1, stage2
from ..config import NOISE_BANK_SIZE
from ..diffusion import Diffusion, guided_steps
from ..engines.specs import ModelSpec, TensorSpec, plain, vae_decode_spec
from ..generator import Candidates, Generator, Optimised, Ranker, Scorer, class_generator
from ..models.dit import RELEASED_KERNELS, DiT, DiTConfig, fast_kernels, load_dit, random_dit
from ..models.vae import VAE, load_vae
from ..progress import RetryTicks
from ..schedulers import SchedulerSampler

# the family's architectures and execution forms, for the DiT benchmarks and checks
__all__ = ["RELEASED_KERNELS", "DiTConfig", "DiTForward", "DiTGenerator", "dit_spec", "fast_kernels"]


class DiTForward(torch.nn.Module):
    """``dit(x, t, y)`` without label dropout: the stage-1 call, as engines export it."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit
        self.train(dit.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)


def _released_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (a :class:`DiTForward`) as an exported file holds it: float32 on the CPU, in eval mode, the DiT in
    its released forms (a CPU's quicker forms would make the file depend on the machine that exported it, while its
    cache key does not). The caller's module is copied, never changed."""
    import copy

    p = next(iter(module.parameters()), None)
    dits = [m for m in module.modules() if isinstance(m, DiT)]
    if p is not None and p.device.type == "cpu" and p.dtype == torch.float32 and not any(
            m.training for m in module.modules()) and all(d.kernels == RELEASED_KERNELS for d in dits):
        return module
    module = copy.deepcopy(module).to("cpu", torch.float32).eval()
    for d in module.modules():
        if isinstance(d, DiT):
            d.set_kernels(RELEASED_KERNELS)
    return module


def dit_spec(dit: DiT) -> ModelSpec:
    """The DiT's stage-1 forward. Exported files hold its released forms whatever the DiT runs eagerly; the
    signature says so, so that a file exported before that rule (with a CPU's forms) is another entry."""
    cfg = dit.cfg
    latent = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return ModelSpec(
        "dit", DiTForward(dit),
        (TensorSpec("x", latent), TensorSpec("t", (), "float32"), TensorSpec("y", (), "int64")),
        "out", signature={"class": type(dit).__name__, "config": plain(cfg), "forms": plain(RELEASED_KERNELS)},
        export_form=_released_copy,
    )


class DiTGenerator(Generator):
    """A DiT (``dit(x, t, y, drop=None)`` returns all 2C output channels) and its VAE (``vae.decode`` maps latents
    to images in [-1, 1]). Stage 1 calls ``sampler``/``decoder`` (the eager models, or engines after
    :meth:`use_engines`); stage 2 differentiates through ``stage2_call``."""

    family = "dit"
    record_fields = {"noise_bank_index": (int, type(None))}

    def __init__(self, dit: DiT, vae: VAE):
        self.dit, self.vae = dit, vae
        self.sampler: Callable = self._eager_dit
        self.decoder: Callable = vae.decode
        self.stage2_call: Callable = self._eager_dit
        self._diffusion: dict[int, Diffusion] = {}
        self._schedulers: dict[tuple[str, int], SchedulerSampler] = {}

    # -- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_paths(cls, dit: str | Path, vae: str | Path) -> "DiTGenerator":
        """An original/diffusers DiT checkpoint and a diffusers AutoencoderKL folder."""
        return cls(load_dit(dit), load_vae(vae))

    @staticmethod
    def hub_parts(names: set[str], read_index: Callable[[], dict], with_vae: bool) -> dict:
        """The files of a Hub repository the loaders read (see :func:`cao2_fast.hub.resolve`): its DiT, and its
        VAE too when ``with_vae`` and it is a diffusers pipeline that holds one."""
        from ..models import dit as dit_model
        from ..models import vae as vae_model

        parts = {"dit": dit_model.checkpoint_files(names, read_index)}
        if with_vae:
            found = vae_model.checkpoint_files(names, read_index) if dit_model.PIPELINE_INDEX in names else None
            if found is not None:
                parts["vae"] = found
        return parts

    @staticmethod
    def vae_parts(names: set[str], read_index: Callable[[], dict]) -> dict:
        """The files of a Hub repository the VAE loader reads (an AutoencoderKL, or a pipeline's VAE)."""
        from ..models import vae as vae_model

        found = vae_model.checkpoint_files(names, read_index)
        if found is None:
            raise LookupError("no AutoencoderKL (expected config.json with diffusion_pytorch_model.safetensors or "
                              ".bin, or a diffusers pipeline with vae/)")
        return {"vae": found}

    @staticmethod
    def hub_uses(folder: Path, names: set[str]) -> list[str]:
        """The options that can take a cached Hub snapshot (``folder``, holding ``names``): ``--dit`` when the DiT
        loader finds a checkpoint in it, ``--vae`` when the VAE loader finds one (a pipeline holds both)."""
        from ..errors import UserError
        from ..models.dit import DIFFUSERS_CLASSES
        from ..models.weights import PIPELINE_INDEX, read_json_object

        def read_index() -> dict:
            return read_json_object(folder / PIPELINE_INDEX, "a diffusers pipeline model_index.json")

        uses = []
        for option, role, classes, parts in (
                ("--dit", "dit", DIFFUSERS_CLASSES, lambda: DiTGenerator.hub_parts(names, read_index, False)),
                ("--vae", "vae", ("AutoencoderKL",), lambda: DiTGenerator.vae_parts(names, read_index))):
            try:
                configs = [f for f in parts()[role][1] if f.endswith("config.json")]
                if all(read_json_object(folder / f, "a diffusers config.json").get("_class_name") in classes
                       for f in configs):  # a diffusers model of the right class, or an original checkpoint
                    uses.append(option)
            except (LookupError, UserError):
                pass
        return uses

    @staticmethod
    def pipeline_vae(path: Path) -> Path | None:
        """``path`` when it is a local diffusers pipeline folder holding its VAE, else None."""
        from ..models.vae import pipeline_holds_vae

        return path if pipeline_holds_vae(path) else None

    @classmethod
    def random(cls, cfg: DiTConfig, tiny_vae: bool = True, seed: int = 0) -> "DiTGenerator":
        """Random weights of the DiT ``cfg`` and of a VAE (a tiny x2 one, or sd-vae-ft-mse's x8 architecture): what
        benchmarks time and tests run (the cost of a forward does not depend on the weights)."""
        from ..models.random import random_vae

        return cls(random_dit(cfg, seed=seed), random_vae(tiny=tiny_vae, seed=seed))

    # -- what the method needs ---------------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = self.dit.cfg
        return (c.in_channels, c.input_size, c.input_size)

    @property
    def num_classes(self) -> int:
        return self.dit.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of a decoded latent."""
        f = self.vae.downsample
        _, h, w = self.latent_shape
        return (self.vae.autoencoder.config.out_channels, h * f, w * f)

    def _eager_dit(self, x, t, y, drop=None):
        return self.dit(x, t, y, drop)

    def diffusion(self, cfg, steps: int | None = None) -> Diffusion:
        """The DDPM schedule respaced to ``steps`` (default: stage 2's, ``cfg.stage2_schedule_steps``; one per step
        count)."""
        steps = cfg.stage2_schedule_steps if steps is None else steps
        if steps not in self._diffusion:
            self._diffusion[steps] = Diffusion.create(respacing=steps)
        return self._diffusion[steps]

    def stage1_sampler(self, cfg) -> Diffusion | SchedulerSampler:
        """Stage 1's sampler: the DDPM schedule respaced to ``cfg.sample_steps``, or a diffusers scheduler."""
        if cfg.sampler == "ddpm":
            return self.diffusion(cfg, cfg.sample_steps)
        key = (cfg.sampler, cfg.sample_steps)
        if key not in self._schedulers:  # one per sampler and step count, like the DDPM schedules
            self._schedulers[key] = SchedulerSampler(*key)
        return self._schedulers[key]

    def to(self, device: torch.device, dtype: torch.dtype) -> "DiTGenerator":
        self.dit.set_kernels(fast_kernels(device))
        self.dit.to(device, dtype)
        self.vae.to(device, dtype)
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    # -- stage 1 ---------------------------------------------------------------------------------------------------

    def stage1_noise(self, cfg, class_ids: list[int]) -> stage1.Stage1Noise:
        """Every candidate's pre-drawn noise (initial and per step), class by class from its own stream. The initial
        noise is each stream's first draw, so a candidate starts from the same noise under every sampler."""
        n = cfg.num_candidates
        steps = cfg.sample_steps if cfg.sampler == "ddpm" else 0  # the schedulers draw no noise after the first
        return stage1.Stage1Noise.cat([stage1.Stage1Noise.draw(n, self.latent_shape, steps,
                                                                class_generator(cfg.seed, c, "stage1"))
                                       for c in class_ids])

    def sample(self, class_ids: list[int], cfg, score: Scorer, rank: Ranker, device, dtype,
               progress=None) -> dict[int, Candidates]:
        n = cfg.num_candidates
        noise = self.stage1_noise(cfg, class_ids)
        labels = torch.tensor([c for c in class_ids for _ in range(n)])
        args = (self.sampler, self.stage1_sampler(cfg), noise, labels)
        with torch.no_grad():
            if cfg.early_reject_step is None and cfg.guidance_interval is None:
                latents = stage1.generate(*args, self.dit.null_class, cfg.guidance_scale, cfg.recipe.guided_channels,
                                          device, dtype, cfg.stage1_batch, progress=progress)
                alive, early_bad = torch.arange(len(labels)), torch.zeros(len(labels), dtype=torch.bool)
            else:
                latents, alive, early_bad = stage1.generate_early(
                    *args, n, self.dit.null_class, cfg.guidance_scale, cfg.recipe.guided_channels, device, dtype,
                    cfg.stage1_batch, selection.early_checks(cfg.early_reject_step, cfg.early_reject_keep),
                    lambda x0: score(x0)[1:], rank, progress=progress, guidance_interval=cfg.guidance_interval)
        images, probs, finite = score(latents)
        bad = early_bad.clone()
        bad[alive[~finite]] = True  # not finite at a check or at the end
        out = {}
        for j, c in enumerate(class_ids):
            pos = torch.nonzero(alive // n == j).flatten()
            out[c] = Candidates(alive[pos] - j * n, latents[pos], images[pos], probs[pos], finite[pos],
                                int(bad[j * n:(j + 1) * n].sum()))
        return out

    def stage1_forwards(self, cfg) -> int:
        """DiT image-forwards of one class's stage 1 (a guided step counts 2; early rejection and the guidance
        interval counted)."""
        gi = cfg.guidance_interval
        return stage1.dit_forwards(cfg.num_candidates, cfg.sample_steps,
                                   selection.early_checks(cfg.early_reject_step, cfg.early_reject_keep),
                                   cfg.guidance_scale,
                                   None if gi is None else guided_steps(self.stage1_sampler(cfg), gi))

    def stage1_ticks(self, groups: list[list[int]], cfg) -> int:
        """Sampling steps × DiT batches, with fewer batches after an early-rejection check."""
        total, done, alive = 0, 0, cfg.num_candidates
        for step, keep in [*selection.early_checks(cfg.early_reject_step, cfg.early_reject_keep),
                           (cfg.sample_steps, None)]:
            total += (step - done) * sum(-(-len(g) * alive // cfg.stage1_batch) for g in groups)
            done, alive = step, keep
        return total

    def stage1_flops(self, cfg) -> float:
        return self.dit.cfg.flops_per_forward() * self.stage1_forwards(cfg)

    def stage1_bytes(self, cfg) -> int:
        n = cfg.classes_per_group * cfg.num_candidates
        latent = math.prod(self.latent_shape)
        noises = cfg.sample_steps + 1 if cfg.sampler == "ddpm" else 2  # DPM-Solver++ holds one x̂0 instead
        return 4 * n * (noises * latent + math.prod(self.image_shape))

    # -- stage 2 ---------------------------------------------------------------------------------------------------

    def bank_index(self, cfg, class_id: int, n: int) -> torch.Tensor | None:
        """Each of the class's ``n`` kept images' entry of the stage-2 noise bank: uniform over the bank, with
        replacement, from the class's own stream (so it depends on (seed, class) only, never on sharding); None
        without the bank."""
        if not cfg.recipe.noise_bank:
            return None
        return torch.randint(0, NOISE_BANK_SIZE, (n,), generator=class_generator(cfg.seed, class_id, "noise-bank"))

    def stage2_noise(self, cfg, class_id: int, n: int) -> stage2.Stage2Noise:
        """The stage-2 randomness of the class's ``n`` kept images (noise, timesteps, label dropout)."""
        index = self.bank_index(cfg, class_id, n)
        bank_eps = None if index is None else stage2.noise_bank(self.latent_shape)[index]
        return stage2.Stage2Noise.draw(n, self.latent_shape, cfg.stage2_steps, cfg.t_max,
                                       class_generator(cfg.seed, class_id, "stage2"),
                                       self.dit.cfg.class_dropout_prob, eps=bank_eps)

    def image_records(self, class_id: int, n: int, cfg) -> list[dict]:
        bank = self.bank_index(cfg, class_id, n)
        return [{"noise_bank_index": None if bank is None else int(bank[i])} for i in range(n)]

    def optimise(self, latents: torch.Tensor, class_ids: torch.Tensor, cfg, device, dtype, progress=None,
                 log=None, noise: stage2.Stage2Noise | None = None) -> Optimised:
        """In chunks of ``stage2_batch``; on CUDA each chunk's step loop runs as one CUDA graph; a chunk that runs
        out of device memory is retried at half the size, and the chunks after it keep that size (batching is
        exact, so the latents do not depend on it)."""
        if noise is None:
            runs = torch.unique_consecutive(class_ids, return_counts=True)
            noise = stage2.Stage2Noise.cat([self.stage2_noise(cfg, int(c), int(k)) for c, k in zip(*runs)])
        y = class_ids.clone() if cfg.stage2_label == "true" else torch.full_like(class_ids, self.dit.null_class)
        diffusion, device = self.diffusion(cfg), torch.device(device)
        parts, s, batch = [], 0, cfg.stage2_batch
        while s < len(latents):
            ticks = RetryTicks(progress)

            def chunk(b: int, s: int = s, ticks: RetryTicks = ticks) -> stage2.Stage2Result:
                ticks.start(b)
                return stage2.optimize(self.stage2_call, diffusion, latents[s:s + b], y[s:s + b],
                                       noise.slice(s, s + b), cfg.stage2_steps, cfg.lr, cfg.lam,
                                       cfg.recipe.timestep_mode, cfg.recipe.label_dropout, device, dtype,
                                       progress=ticks, cuda_graph=device.type == "cuda")

            batch, part = stage2.halve_on_oom(chunk, min(batch, len(latents) - s), log)
            parts.append(part)
            s += batch
        return Optimised(*(torch.cat([getattr(p, f) for p in parts]) for f in
                           ("latents", "loss_first", "loss_last", "steps_done", "finite")))

    def stage2_flops(self, cfg) -> float:
        return self.dit.cfg.flops_per_forward() * cfg.stage2_steps * 2

    # -- engines ---------------------------------------------------------------------------------------------------

    def engine_specs(self) -> dict[str, ModelSpec]:
        return {"dit": dit_spec(self.dit), "vae_decode": vae_decode_spec(self.vae, self.latent_shape)}

    def engine_batches(self, cfg) -> dict[str, int]:
        """The largest call of each stage-1 model: the DiT sees twice the candidates under guidance."""
        return {"dit": cfg.stage1_batch * (1 if cfg.guidance_scale == 1.0 else 2), "vae_decode": cfg.decode_batch}

    def use_engines(self, built: dict, stage2) -> None:
        self.sampler, self.decoder, self.stage2_call = built["dit"], built["vae_decode"], stage2

    def stage2_module(self) -> torch.nn.Module:
        return self.dit
