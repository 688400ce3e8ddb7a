"""cao2-fast: CaO2 dataset distillation (objective-guided sampling + condition-aware latent optimisation)."""

__version__ = "0.1.0"

from .config import DATASETS, RECIPES, DistillConfig, Recipe, build_config  # noqa: E402
from .diffusion import Diffusion  # noqa: E402
from .errors import UserError  # noqa: E402
from .models.classifier import load_classifier  # noqa: E402
from .models.dit import DiT, DiTConfig, load_dit  # noqa: E402
from .models.vae import load_vae  # noqa: E402
from .pipeline import Distiller  # noqa: E402

__all__ = ["Distiller", "DistillConfig", "Recipe", "RECIPES", "DATASETS", "build_config", "Diffusion", "DiT",
           "DiTConfig", "load_dit", "load_vae", "load_classifier", "UserError", "__version__"]
