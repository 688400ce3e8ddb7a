"""The generator families and the loader branch that picks one: the only place that knows which families exist.

A family is one module here holding a :class:`~cao2_fast.generator.Generator` (``dit``: a class-conditional latent
DiT and its VAE; ``mar``: a masked autoregressive model with its diffusion head, and its VAE). :func:`from_paths` and :func:`from_preset` load a family's models from the files a user names
(local paths, or Hugging Face Hub ids resolved by :mod:`cao2_fast.hub`) and say, for the config's fingerprint, which
weights they are (``weights_id`` of each local file; a Hub model's id, commit and file digests).
"""

from __future__ import annotations

from pathlib import Path

from .. import hub
from ..errors import UserError
from ..generator import Generator
from ..identity import weights_id


BACKBONES = ("dit", "mar")


def backbone_of(dit=None, mar=None, backbone: str | None = None) -> str:
    """The family the model options name: ``--backbone`` when given (it must agree with them), else the family of
    the one checkpoint given."""
    given = [name for name, path in (("dit", dit), ("mar", mar)) if path is not None]
    if len(given) > 1:
        raise UserError("--dit and --mar exclude each other: a run distills with one generator")
    if backbone is not None and backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if backbone is not None and given and given[0] != backbone:
        raise UserError(f"--backbone {backbone} with a --{given[0]} checkpoint: give --{backbone}, or drop --backbone")
    return backbone or (given[0] if given else "dit")


def from_paths(dit: str | Path | None = None, vae: str | Path | None = None,
               mar: str | Path | None = None) -> tuple[Generator, dict]:
    """(the generator, the identity of its weights) for the checkpoints given: a DiT (original ``.pt`` /
    ``.safetensors``, a diffusers folder, or a Hugging Face Hub id ``org/name[@revision]``) and its VAE (a diffusers
    AutoencoderKL folder or Hub id). Without ``vae`` the DiT must be a diffusers pipeline (a Hub id or a local
    folder) that holds its own VAE. A local path that exists always wins over a Hub id."""
    if mar is not None:
        return _mar_from_paths(mar, vae, dit)
    if dit is None:
        raise UserError("no generator given: pass a DiT checkpoint (--dit) and its VAE (--vae), or a MAR checkpoint "
                        "(--mar) and its VAE")
    from .dit import DiTGenerator

    dit_ref, vae_ref = hub.parse(dit), hub.parse(vae)
    snaps: dict[str, hub.Snapshot] = {}  # role -> the Hub snapshot it loads from
    if dit_ref is not None:
        snap = hub.resolve(dit_ref, "DiT", lambda names, index: DiTGenerator.hub_parts(names, index, vae is None))
        snaps["dit"] = snap
        if vae is None:
            if "vae" not in snap.parts:
                raise UserError(f"{dit_ref}: holds no VAE beside its DiT (a diffusers pipeline with "
                                "model_index.json and vae/ does); pass --vae, a diffusers AutoencoderKL folder or "
                                "Hub id")
            snaps["vae"] = snap
    elif vae is None and DiTGenerator.pipeline_vae(Path(dit).expanduser()) is None:
        raise UserError(f"{dit}: a DiT needs its VAE (--vae, a diffusers AutoencoderKL folder or Hub id); only a "
                        "diffusers pipeline folder with model_index.json and vae/ holds its own")
    if vae_ref is not None:
        snaps["vae"] = hub.resolve(vae_ref, "VAE", DiTGenerator.vae_parts)
    paths = {"dit": Path(dit), "vae": Path(dit if vae is None else vae)}  # a local pipeline folder holds its VAE
    paths.update({role: snap.path(role) for role, snap in snaps.items()})
    gen = DiTGenerator.from_paths(paths["dit"], paths["vae"])
    return gen, {role: snaps[role].identity(role) if role in snaps else weights_id(paths[role])
                 for role in ("dit", "vae")}


def _mar_from_paths(mar, vae, dit) -> tuple[Generator, dict]:
    """A MAR checkpoint and its VAE, both local (a MAR training checkpoint is a pickle: it is never fetched)."""
    if dit is not None:
        raise UserError("--dit and --mar exclude each other: a run distills with one generator")
    if vae is None:
        raise UserError(f"{mar}: a MAR needs its VAE (--vae: kl16.ckpt, or a diffusers AutoencoderKL folder)")
    for option, path in (("--mar", mar), ("--vae", vae)):
        if not Path(path).expanduser().exists() and hub.parse(path) is not None:
            raise UserError(f"{option} {path}: MAR models load from local files only (not the Hub); download "
                            "the checkpoint and pass its path")
    from .mar import MARGenerator

    gen = MARGenerator.from_paths(mar, vae)
    return gen, {"mar": weights_id(Path(mar)), "vae": weights_id(Path(vae))}


def hub_uses(folder: Path, names: set[str]) -> list[str]:
    """The model options (``--dit``, ``--vae``) that can take a cached Hub snapshot holding ``names``."""
    from .dit import DiTGenerator

    return DiTGenerator.hub_uses(folder, names)


def from_preset(folder: Path, meta: dict) -> tuple[Generator, dict]:
    """The generator of an embedded preset (``meta`` is its ``preset.json``), with its weights' identity; the
    installed location is left out of it, so moving the package does not change a config's fingerprint."""
    if "dit" in meta:
        gen, models = from_paths(folder / meta["dit"], folder / meta["vae"])
    elif "mar" in meta:
        gen, models = from_paths(mar=folder / meta["mar"], vae=folder / meta["vae"])
    else:
        raise UserError(f"{folder / 'preset.json'}: names no generator (expected a 'dit' or 'mar' entry)")
    for m in models.values():
        m["path"] = f"<preset {meta['name']}>/{Path(m['path']).name}"
    return gen, models
