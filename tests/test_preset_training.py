"""The digits preset trainer: a quick run writes a complete, loadable preset, and training is seeded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from cao2_fast.models.classifier import load_classifier
from cao2_fast.models.dit import load_dit
from cao2_fast.models.vae import load_vae
from cao2_fast.presets import train_digits as td
from cao2_fast.presets.digits_data import digits_split


@pytest.fixture(scope="module")
def quick_preset(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-preset")
    before = torch.get_num_threads()
    meta = td.train_digits(out, seed=0, quick=True, progress=False)
    assert torch.get_num_threads() == before  # the trainer restores the caller's thread count
    return out, meta


def test_quick_run_writes_every_file_and_no_temporaries(quick_preset):
    out, meta = quick_preset
    names = sorted(p.name for p in out.iterdir())
    assert names == [".cao2-preset", "classifier.safetensors", "dit.safetensors", "preset.json", "vae"]
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    on_disk = json.loads((out / "preset.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["class_names"] == [str(i) for i in range(10)]
    assert (on_disk["image_size"], on_disk["latent_size"]) == (16, 8)
    assert on_disk["classifier"]["input_size"] == 32
    assert on_disk["guidance_scale"] in td.CHECK_SCALES
    acc = on_disk["training"]["generation_check"]["accuracy"]
    assert sorted(float(s) for s in acc) == sorted(td.CHECK_SCALES)
    assert all(0.0 <= v[m] <= 1.0 for v in acc.values() for m in ("normalize", "raw"))
    assert on_disk["training"]["quick"] is True


def test_quick_preset_models_load_and_fit_together(quick_preset):
    out, meta = quick_preset
    vae = load_vae(out / "vae")
    x, _ = digits_split("val")
    with torch.no_grad():
        z = vae.encode(x[:3])
        assert z.shape == (3, 4, 8, 8)
        assert vae.decode(z).shape == (3, 3, 16, 16)
    with torch.no_grad():
        train_latents = vae.encode(digits_split("train")[0])
    assert train_latents.std().item() == pytest.approx(1.0, rel=1e-3)  # scaling_factor = 1 / std of these latents

    dit = load_dit(out / "dit.safetensors")
    assert dit.cfg == td.DIT_CONFIG
    with torch.no_grad():
        eps = dit(z, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert eps.shape == (3, 8, 8, 8) and torch.isfinite(eps).all()

    sd = load_file(str(out / "classifier.safetensors"))
    model = timm.create_model(meta["classifier"]["model"], pretrained=False, num_classes=10)
    model.load_state_dict(sd, strict=True)
    clf = load_classifier(f"{meta['classifier']['model']}:{out / 'classifier.safetensors'}",
                          input_size=meta["classifier"]["input_size"], normalize=True, num_classes=10)
    with torch.no_grad():
        assert torch.equal(clf(x[:4]), clf.model(clf.transform(x[:4])))
        assert torch.allclose(clf(x[:4]), model.eval()(clf.transform(x[:4])))


def test_dit_training_is_seeded():
    sched = dataclasses.replace(td.Schedule.quick(), dit_steps=6)
    g = torch.Generator().manual_seed(5)
    latents, labels = torch.randn(40, 4, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, _ = td.train_dit(latents, labels, sched, seed=3, progress=False)
        b, _ = td.train_dit(latents, labels, sched, seed=3, progress=False)
        c, _ = td.train_dit(latents, labels, sched, seed=4, progress=False)
    finally:
        torch.set_num_threads(before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert sa["final_layer.linear.weight"].abs().sum() > 0  # the zero-initialised output layer was trained


def test_batches_cover_each_epoch_once():
    g = torch.Generator().manual_seed(0)
    batches = list(td.batch_indices(10, 4, 5, g))
    assert [len(b) for b in batches] == [4] * 5
    assert sorted(torch.cat(batches[:2]).tolist()) == sorted(set(torch.cat(batches[:2]).tolist()))
    assert sorted(torch.cat(batches[2:4]).tolist()) == sorted(set(torch.cat(batches[2:4]).tolist()))


def test_recommended_scale_is_the_least_guidance_that_reaches_the_target():
    check = {"1.0": {"normalize": 0.5}, "2.0": {"normalize": 0.9}, "2.7": {"normalize": 0.96},
             "4.0": {"normalize": 1.0}}
    assert td.recommended_scale(check, target=0.95) == 2.7
    assert td.recommended_scale(check, target=0.85) == 2.0
    check["4.0"]["normalize"] = 0.93
    check["2.7"]["normalize"] = 0.93
    assert td.recommended_scale(check, target=0.95) == 2.7  # none reaches it: the most accurate, least guided
