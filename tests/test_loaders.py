"""VAE and classifier loaders on tiny locally built models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cao2_fast.errors import UserError
from cao2_fast.models.classifier import Classifier, load_classifier, parse_spec
from cao2_fast.models.vae import load_vae

from helpers import randomize_, tiny_autoencoder, tiny_diffusers_dit

SF = 0.37


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    ae = tiny_autoencoder(seed=0, scaling_factor=SF)
    randomize_(ae, seed=1, std=0.1)
    ae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    return ae, root


@pytest.mark.parametrize("sub", ["vae", ""])
def test_load_vae_round_trip_uses_scaling_factor(ae_dir, sub):
    ae, root = ae_dir
    vae = load_vae(root / sub if sub else root)
    assert vae.scaling_factor == pytest.approx(SF)
    assert vae.latent_channels == 4 and vae.downsample == 2
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        mean = ae.encode(x).latent_dist.mean
        img = vae.decode(z)
        ref_img = ae.decode(mean).sample
        alt = ae.decode(z).sample
    assert z.shape == (2, 4, 8, 8)
    assert torch.allclose(z, mean * SF, atol=1e-6)
    assert img.shape == (2, 3, 16, 16)
    assert torch.allclose(img, ref_img, atol=1e-5)
    assert (img - alt).abs().max() > 1e-3  # the scale really is divided back out
    with torch.no_grad():
        assert torch.allclose(vae(z), img, atol=1e-6)


def test_load_vae_default_scaling_factor(tmp_path):
    ae = tiny_autoencoder(seed=2, scaling_factor=0.5)
    ae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("scaling_factor")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_vae(tmp_path).scaling_factor == pytest.approx(0.18215)


def test_load_vae_missing_dir(tmp_path):
    p = tmp_path / "sd-vae-ft-mse"
    with pytest.raises(UserError, match="sd-vae-ft-mse"):
        load_vae(p)


def test_load_vae_file_instead_of_dir(tmp_path):
    p = tmp_path / "vae.pt"
    p.write_bytes(b"x")
    with pytest.raises(UserError, match="vae.pt"):
        load_vae(p)


def test_load_vae_rejects_dit_config(tmp_path):
    dm = tiny_diffusers_dit(seed=0)
    dm.save_pretrained(tmp_path / "transformer")
    with pytest.raises(UserError, match="DiTTransformer2DModel"):
        load_vae(tmp_path / "transformer")


def test_load_vae_dir_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_vae(tmp_path / "empty")
    ae = tiny_autoencoder(seed=0)
    ae.save_pretrained(tmp_path / "noweights")
    for f in (tmp_path / "noweights").iterdir():
        if f.name != "config.json":
            f.unlink()
    with pytest.raises(UserError, match="noweights"):
        load_vae(tmp_path / "noweights")


# ---------------------------------------------------------------------------------------------------------------
# Classifier


@pytest.fixture(scope="module")
def resnet():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model.eval()


def _ddp_keys(sd):
    return {"module." + k: v for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["state_dict", "model", "plain", "plain_module"])
def test_load_classifier_layouts(resnet, tmp_path, layout):
    sd = resnet.state_dict()
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "fc.weight"} <= set(sd)
    obj = {
        "state_dict": {"state_dict": _ddp_keys(sd), "epoch": 3},
        "model": {"model": _ddp_keys(sd)},
        "plain": dict(sd),
        "plain_module": _ddp_keys(sd),
    }[layout]
    p = tmp_path / "r18.pth"
    torch.save(obj, p)
    clf = load_classifier(f"resnet18:{p}", input_size=32)
    assert clf.num_classes == 10
    assert not clf.training
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = clf(x)
        ref = resnet(x)
    assert out.shape == (3, 10)
    assert torch.allclose(out, ref, atol=1e-5)
    fresh = load_classifier("random:resnet18", input_size=32, num_classes=10)
    with torch.no_grad():
        assert (fresh(x) - ref).abs().max() > 1e-3


def test_load_classifier_timm_training_checkpoint(resnet, tmp_path):
    import argparse

    p = tmp_path / "model_best.pth.tar"
    torch.save({"arch": "resnet18", "epoch": 7, "state_dict": _ddp_keys(resnet.state_dict()),
                "args": argparse.Namespace(model="resnet18", lr=0.1), "metric": 71.2}, p)
    clf = load_classifier(f"resnet18:{p}", input_size=32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(clf(x), resnet(x), atol=1e-5)


def test_load_classifier_explicit_num_classes(resnet, tmp_path):
    p = tmp_path / "r18.pth"
    torch.save({"state_dict": _ddp_keys(resnet.state_dict())}, p)
    assert load_classifier(f"resnet18:{p}", num_classes=10).num_classes == 10
    with pytest.raises(UserError) as e:
        load_classifier(f"resnet18:{p}", num_classes=5)
    assert "10" in str(e.value) and "5" in str(e.value) and str(p) in str(e.value)


def test_load_classifier_missing_file(tmp_path):
    p = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(UserError, match="resnet18.pth"):
        load_classifier(f"resnet18:{p}")


def test_load_classifier_wrong_architecture(resnet, tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), p)
    with pytest.raises(UserError, match="r18.pth"):
        load_classifier(f"resnet34:{p}")


def test_load_classifier_truncated(resnet, tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), p)
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(UserError, match="r18.pth"):
        load_classifier(f"resnet18:{p}")


def test_parse_spec():
    assert parse_spec("resnet18") == ("resnet18", None)
    assert parse_spec("resnet18:/m/r.pth") == ("resnet18", "/m/r.pth")
    assert parse_spec("random:resnet18") == ("random:resnet18", None)
    assert parse_spec("hf-hub:timm/resnet18.a1_in1k") == ("hf-hub:timm/resnet18.a1_in1k", None)
    assert parse_spec("hf-hub:timm/resnet18.a1_in1k:/m/r.pth") == ("hf-hub:timm/resnet18.a1_in1k", "/m/r.pth")
    for bad in (":/m/r.pth", "random:", "random:resnet18:/m/r.pth", "hf-hub:"):
        with pytest.raises(UserError):
            parse_spec(bad)


def _recorder(num_classes=10):
    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_classes = num_classes
            self.seen = None

        def forward(self, x):
            self.seen = x.clone()
            return x.mean(dim=(2, 3))

    return Rec()


def test_transform_unnormalized_is_identity_at_input_size():
    rec = _recorder()
    clf = Classifier(rec, input_size=24, normalize=False)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clf(x)
    assert torch.equal(rec.seen, x)


def test_transform_normalized():
    rec = _recorder()
    clf = Classifier(rec, input_size=16, normalize=True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clf(x)
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    ref = ((x.double().numpy() + 1) / 2 - mean) / std
    assert np.allclose(rec.seen.double().numpy(), ref, atol=1e-5)


def test_transform_custom_mean_std():
    rec = _recorder()
    clf = Classifier(rec, input_size=8, normalize=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    clf(x)
    assert torch.allclose(rec.seen, x, atol=1e-6)


@pytest.mark.parametrize("src", [64, 48, 16])
def test_transform_resizes_to_input_size(src):
    from PIL import Image

    rec = _recorder()
    clf = Classifier(rec, input_size=32, normalize=False)
    g = torch.Generator().manual_seed(src)
    x = torch.rand(1, 3, src, src, generator=g) * 2 - 1
    const = torch.full((1, 3, src, src), 0.3)
    clf(const)
    assert rec.seen.shape == (1, 3, 32, 32) and torch.allclose(rec.seen, const[:, :, :1, :1].expand(1, 3, 32, 32))
    clf(x)
    assert rec.seen.shape == (1, 3, 32, 32)
    ref = np.stack([
        np.asarray(Image.fromarray(x[0, c].numpy().astype(np.float32), mode="F").resize((32, 32), Image.BILINEAR))
        for c in range(3)
    ])
    got = rec.seen[0].numpy()
    inner = (slice(None), slice(2, -2), slice(2, -2))
    assert np.abs(got[inner] - ref[inner]).max() < 1e-4


def test_load_classifier_normalize_flag(resnet, tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), p)
    raw = load_classifier(f"resnet18:{p}", input_size=32, normalize=False)
    norm = load_classifier(f"resnet18:{p}", input_size=32, normalize=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(norm(x), resnet(((x + 1) / 2 - m) / s), atol=1e-5)
        assert torch.allclose(raw(x), resnet(x), atol=1e-5)
