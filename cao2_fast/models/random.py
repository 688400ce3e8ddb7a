"""Models with random weights at real or tiny sizes: for timing (a forward's cost does not depend on weight values)
and for tests. Nothing here is downloaded."""

from __future__ import annotations

import torch

from .classifier import Classifier
from .dit import DiTConfig, random_dit
from .vae import VAE

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def random_vae(tiny: bool = True, seed: int = 0, scaling_factor: float = 0.18215) -> VAE:
    """An ``AutoencoderKL``: the sd-vae-ft-mse architecture (x8) or a tiny one (x2)."""
    from diffusers import AutoencoderKL

    spec = TINY_VAE if tiny else SD_VAE
    n = len(spec["block_out_channels"])
    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        torch.manual_seed(seed)
        ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                           up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4, **spec)
    ae.requires_grad_(False)
    return VAE(ae.eval(), scaling_factor).eval()


def random_classifier(name: str = "test_resnet", num_classes: int = 1000, input_size: int = 224,
                      normalize: bool = False, seed: int = 0) -> Classifier:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    model.requires_grad_(False)
    return Classifier(model.eval(), input_size, normalize).eval()


def random_models(dit_cfg: DiTConfig, tiny_vae: bool = True, classifier: str = "test_resnet",
                  classifier_input_size: int = 32, seed: int = 0):
    """(dit, vae, classifier) with random weights; the classifier has the DiT's class count."""
    dit = random_dit(dit_cfg, seed=seed)
    vae = random_vae(tiny=tiny_vae, seed=seed)
    clf = random_classifier(classifier, dit_cfg.num_classes, classifier_input_size, seed=seed)
    return dit, vae, clf
