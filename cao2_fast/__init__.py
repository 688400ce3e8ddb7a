"""cao2-fast: CaO2 dataset distillation (objective-guided sampling + condition-aware latent optimisation).

The public names below are imported on first use, not with the package: ``cao2-fast --help`` and other light
commands start without loading torch.
"""

import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {
    "DATASETS": ".config", "RECIPES": ".config", "DistillConfig": ".config", "Recipe": ".config",
    "build_config": ".config", "Diffusion": ".diffusion", "UserError": ".errors",
    "load_classifier": ".models.classifier", "DiT": ".models.dit", "DiTConfig": ".models.dit",
    "load_dit": ".models.dit", "load_vae": ".models.vae", "Distiller": ".pipeline", "ClassOutput": ".pipeline",
    "Generator": ".generator", "DiTGenerator": ".generators.dit", "write_set": ".output",
}

__all__ = ["Distiller", "ClassOutput", "write_set", "Generator", "DiTGenerator", "DistillConfig", "Recipe", "RECIPES",
           "DATASETS", "build_config", "Diffusion", "DiT", "DiTConfig", "load_dit", "load_vae", "load_classifier",
           "UserError", "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cao2_fast' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_LAZY})
