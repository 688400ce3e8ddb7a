"""The shipped digits preset: its models load and do their jobs on the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cao2_fast.presets
from cao2_fast.diffusion import Diffusion, sample
from cao2_fast.models.classifier import load_classifier
from cao2_fast.models.dit import load_dit
from cao2_fast.models.vae import load_vae
from cao2_fast.presets.digits_data import digits_split

PRESET = Path(cao2_fast.presets.__file__).parent / "digits"


@pytest.fixture(scope="module")
def preset():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and steadiest on a shared machine
    meta = json.loads((PRESET / "preset.json").read_text())
    c = meta["classifier"]
    clf = load_classifier(f"{c['model']}:{PRESET / 'classifier.safetensors'}", input_size=c["input_size"],
                          normalize=True, num_classes=len(meta["class_names"]), mean=c["mean"], std=c["std"])
    yield meta, load_vae(PRESET / "vae"), load_dit(PRESET / "dit.safetensors"), clf
    torch.set_num_threads(before)


def _accuracy(clf, images, labels, normalize: bool) -> float:
    clf.normalize = normalize
    with torch.no_grad():
        return (clf(images).argmax(1) == labels).float().mean().item()


def test_shipped_preset_is_small_and_consistent(preset):
    meta, vae, dit, clf = preset
    total = sum(p.stat().st_size for p in PRESET.rglob("*") if p.is_file())
    assert total < 8 * 2**20
    assert dit.num_classes == len(meta["class_names"]) == clf.num_classes
    assert dit.cfg.input_size == meta["latent_size"] == meta["image_size"] // vae.downsample
    assert dit.cfg.in_channels == vae.latent_channels and dit.cfg.learn_sigma


def test_classifier_is_accurate_on_held_out_digits(preset):
    _, _, _, clf = preset
    x, y = digits_split("val")
    assert _accuracy(clf, x, y, normalize=True) >= 0.9
    assert _accuracy(clf, x, y, normalize=False) >= 0.8  # the released code's raw [-1, 1] input


def test_vae_reconstructs_held_out_digits(preset):
    _, vae, _, _ = preset
    x, _ = digits_split("val")
    with torch.no_grad():
        rec = vae.decode(vae.encode(x))
    assert ((rec - x) ** 2).mean().item() < 0.01


def test_guided_samples_are_recognised_as_their_class(preset):
    meta, vae, dit, clf = preset
    per_class = 10
    y = torch.arange(dit.num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(2024)
    noise = torch.randn(len(y), dit.cfg.in_channels, dit.cfg.input_size, dit.cfg.input_size, generator=g)
    z = sample(dit, Diffusion.create(respacing=50), noise, y, null_class=dit.null_class,
               guidance_scale=meta["guidance_scale"], guided_channels=3, generator=g)
    with torch.no_grad():
        images = vae.decode(z)
    assert images.shape == (len(y), 3, 16, 16)
    assert _accuracy(clf, images, y, normalize=True) >= 0.8
