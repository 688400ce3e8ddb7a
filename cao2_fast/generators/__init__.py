"""The generator families and the loader branch that picks one: the only place that knows which families exist.

A family is one module here holding a :class:`~cao2_fast.generator.Generator` (``dit``: a class-conditional latent
DiT and its VAE). :func:`from_paths` and :func:`from_preset` load a family's models from the files a user names and
say, for the config's fingerprint, which weights they are (``weights_id`` of each file).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..generator import Generator
from ..identity import weights_id


def from_paths(dit: str | Path | None = None, vae: str | Path | None = None) -> tuple[Generator, dict]:
    """(the generator, the identity of its weight files) for the checkpoints given: a DiT (original ``.pt`` /
    ``.safetensors`` or a diffusers folder) and its diffusers VAE folder."""
    if dit is not None:
        if vae is None:
            raise UserError("a DiT needs its VAE (--vae, a diffusers AutoencoderKL folder)")
        from .dit import DiTGenerator

        return DiTGenerator.from_paths(dit, vae), {"dit": weights_id(Path(dit)), "vae": weights_id(Path(vae))}
    raise UserError("no generator given: pass a DiT checkpoint (--dit) and its VAE (--vae)")


def from_preset(folder: Path, meta: dict) -> tuple[Generator, dict]:
    """The generator of an embedded preset (``meta`` is its ``preset.json``), with its weights' identity; the
    installed location is left out of it, so moving the package does not change a config's fingerprint."""
    if "dit" in meta:
        gen, models = from_paths(folder / meta["dit"], folder / meta["vae"])
    else:
        raise UserError(f"{folder / 'preset.json'}: names no generator (expected a 'dit' entry)")
    for m in models.values():
        m["path"] = f"<preset {meta['name']}>/{Path(m['path']).name}"
    return gen, models
