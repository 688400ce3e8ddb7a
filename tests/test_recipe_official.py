"""`official` is the released scripts' behaviour: fill order, noise-bank draws, TF32 and PNG quantisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import make_distiller

from cao2_fast import numerics
from cao2_fast.config import RECIPES, build_config
from cao2_fast.output import png_bytes, to_uint8
from cao2_fast.selection import select


def table(rows):
    """Probabilities over 3 classes from (predicted class, confidence) rows; the rest spread evenly."""
    p = torch.zeros(len(rows), 3)
    for i, (cls, conf) in enumerate(rows):
        p[i] = (1 - conf) / 2
        p[i, cls] = conf
    return p


# target class 0; candidates: (argmax, max prob)
ROWS = [(1, 0.9), (0, 0.6), (2, 0.5), (0, 0.95), (1, 0.7), (2, 0.99)]


@pytest.mark.parametrize("order,ipc,expect", [
    ("desc", 2, [3, 1]),               # enough correct: most confident first
    ("asc", 2, [1, 3]),                # ImageNet-100: least confident correct first
    ("desc", 4, [3, 1, 5, 0]),         # fill: most confident wrong first (1K, Woof, Nette)
    ("asc", 4, [1, 3, 2, 4]),          # fill: least confident wrong first (ImageNet-100 reuses its ascending sort)
    ("asc", 6, [1, 3, 2, 4, 0, 5]),
])
def test_fill_follows_the_selection_order(order, ipc, expect):
    assert select(table(ROWS), 0, ipc, "confident", order).tolist() == expect


@pytest.mark.parametrize("order,expect", [("desc", [5, 0, 4]), ("asc", [2, 3, 1])])
def test_fill_with_no_correct_candidate(order, expect):
    rows = [(1, 0.9), (1, 0.6), (2, 0.5), (2, 0.55), (1, 0.7), (2, 0.99)]
    assert select(table(rows), 0, 3, "confident", order).tolist() == expect


@pytest.mark.parametrize("order,expect", [("desc", [1, 5, 0]), ("asc", [1, 2, 3])])
def test_fill_with_one_correct_candidate(order, expect):
    rows = [(1, 0.9), (0, 0.6), (2, 0.5), (2, 0.55), (1, 0.7), (2, 0.99)]
    assert select(table(rows), 0, 3, "confident", order).tolist() == expect


def test_imagenet100_official_uses_the_ascending_order():
    cfg = build_config("imagenet-100", 10, "official", num_model_classes=1000)
    assert cfg.order == "asc" and cfg.t_max == 5


# target 0: one correct candidate (1); wrong ones 0 (max prob 0.9), 2 (0.5), 3 (0.7)
FILL_ROWS = [(1, 0.9), (0, 0.6), (2, 0.5), (1, 0.7)]


@pytest.mark.parametrize("recipe", ["official", "consistent"])
@pytest.mark.parametrize("dataset,expect", [
    ("imagenet-1k", [1, 0, 3, 2]),   # most confident wrong first
    ("imagewoof", [1, 0, 3, 2]),
    ("imagenette", [1, 0, 3, 2]),
    ("imagenet-100", [1, 2, 3, 0]),  # least confident wrong first
    ("digits", [1, 0, 3, 2]),
])
def test_each_datasets_fill_order_under_both_recipes(dataset, expect, recipe):
    ids = dict(class_ids=list(range(10)), num_model_classes=10) if dataset == "digits" else dict(num_model_classes=1000)
    cfg = build_config(dataset, 4, recipe, **ids)
    assert select(table(FILL_ROWS), 0, cfg.ipc, cfg.selection, cfg.order).tolist() == expect


def test_bank_indices_are_uniform_reproducible_and_depend_on_seed_and_class_only():
    d = make_distiller(class_ids=(0, 1, 2, 3, 4), ipc=2)
    a = d.generator.bank_index(d.config, 3, 4000)
    assert torch.equal(a, d.generator.bank_index(d.config, 3, 4000))  # reproducible
    assert not torch.equal(a, d.generator.bank_index(d.config, 2, 4000))  # per class
    other = make_distiller(class_ids=(3,), ipc=2)  # another shard holding only class 3
    assert torch.equal(other.generator.bank_index(other.config, 3, 4000), a)
    assert not torch.equal(make_distiller(seed=1).generator.bank_index(make_distiller(seed=1).config, 3, 4000), a)
    assert a.min() >= 0 and a.max() <= 1023
    counts = torch.bincount(a, minlength=1024).double()  # 4000 draws over 1024 entries: with replacement
    assert (counts > 1).any() and len(a.unique()) > 900
    hist = torch.bincount(a // 128, minlength=8).double()  # chi-square over 8 bins, 7 dof: p=1e-4 bound 27.9
    assert ((hist - 500) ** 2 / 500).sum() < 27.9


def test_the_bank_entry_is_the_images_noise_and_is_recorded(tmp_path):
    d = make_distiller(k=2, ipc=2)
    manifest = d.run(tmp_path / "o")
    from cao2_fast.stage2 import noise_bank

    for c in manifest["classes"]:
        recs = c["images"]
        idx = [r["noise_bank_index"] for r in recs]
        assert idx == d.generator.bank_index(d.config, recs[0]["class_id"], 2).tolist()
        noise = d.generator.stage2_noise(d.config, recs[0]["class_id"], len(recs))
        assert torch.equal(noise.eps, noise_bank(d.generator.latent_shape)[idx])
    consistent = make_distiller(recipe="consistent").run(tmp_path / "c")
    assert all(r["noise_bank_index"] is None for c in consistent["classes"] for r in c["images"])


def test_recorded_bank_entries_do_not_depend_on_which_classes_run_together():
    d = make_distiller(class_ids=(0, 2, 4), ipc=2)
    together = {r.class_id: [x["noise_bank_index"] for x in r.records] for r in d.distill()}
    alone = d.distill([4])[0]
    assert [x["noise_bank_index"] for x in alone.records] == together[4]
    # candidate slot i no longer shares its noise across classes
    assert len({tuple(v) for v in together.values()}) == 3


def test_more_candidates_than_bank_entries_are_allowed():
    cfg = build_config("custom", 300, "official", class_ids=[1], num_model_classes=5, k=4)
    assert cfg.num_candidates == 1200


def test_tf32_is_a_recipe_field_in_the_manifest_and_the_fingerprint(tmp_path):
    from dataclasses import replace

    assert RECIPES["official"].tf32 is True and RECIPES["consistent"].tf32 is False
    d = make_distiller(class_ids=(0,))
    cfg = d.config
    strict = replace(cfg, recipe=replace(cfg.recipe, tf32=False))
    assert strict.fingerprint() != cfg.fingerprint()
    manifest = d.run(tmp_path / "o")
    assert manifest["config"]["recipe"]["tf32"] is True
    assert manifest["config"]["fingerprint"] == cfg.fingerprint()


def flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("raises_in", [None, "stage1", "stage2", "final decode"])
def test_tf32_is_on_during_a_cuda_run_and_restored_after(monkeypatch, tf32_flags, raises_in):
    monkeypatch.setattr(numerics, "_on_cuda", lambda device: True)  # no GPU here: pretend the device is CUDA
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    d = make_distiller()
    seen = []

    def spy(stage, fn):
        def call(*a, **k):
            now = "final decode" if stage == "decode" and any(s == "stage2" for s, _ in seen) else stage
            seen.append((now, flags()))
            if now == raises_in:
                raise RuntimeError("boom")
            return fn(*a, **k)
        return call

    d.generator.sampler = spy("stage1", d.generator.sampler)
    d.generator.stage2_call = spy("stage2", d.generator.stage2_call)  # the stage-2 DiT
    d.generator.decoder = spy("decode", d.generator.decoder)
    if raises_in:
        with pytest.raises(RuntimeError, match="boom"):
            d.distill([0])
    else:
        d.distill([0])
        assert {s for s, _ in seen} == {"stage1", "decode", "stage2", "final decode"}
    assert seen and {f for _, f in seen} == {(True, True)}
    assert flags() == (False, False)


@pytest.mark.parametrize("before", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("enabled", [False, True])
def test_the_tf32_switch_puts_back_whatever_the_caller_had(monkeypatch, tf32_flags, before, enabled):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    with numerics.tf32(enabled, "cpu"):  # flags only act on CUDA: a CPU run leaves them alone
        assert flags() == before
    monkeypatch.setattr(numerics, "_on_cuda", lambda device: True)
    with pytest.raises(KeyError):
        with numerics.tf32(enabled, "cuda"):
            assert flags() == (enabled, enabled)
            raise KeyError("inside")
    assert flags() == before


def test_tf32_stays_off_under_consistent(monkeypatch, tf32_flags):
    monkeypatch.setattr(numerics, "_on_cuda", lambda device: True)
    torch.backends.cuda.matmul.allow_tf32 = True
    d = make_distiller(recipe="consistent")
    seen = []
    real = d.generator.sampler
    d.generator.sampler = lambda *a, **k: seen.append(torch.backends.cuda.matmul.allow_tf32) or real(*a, **k)
    d.stage1([0])
    assert set(seen) == {False} and torch.backends.cuda.matmul.allow_tf32 is True


def test_png_bytes_equal_torchvisions_save_image_on_exact_halves(tmp_path):
    from torchvision.utils import save_image

    # values whose (x + 1) / 2 * 255 lands exactly on n + 0.5 in float32: round-half-even would go one level down
    n = torch.arange(0, 255, dtype=torch.float32)
    x = ((n + 0.5) / 255) * 2 - 1
    x = x[(((x.clamp(-1, 1) + 1) / 2) * 255 == n + 0.5)]
    assert len(x) > 50  # plenty of exact halves among them
    extra = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5, 0.999, -0.999])
    vals = torch.cat([x, extra])
    side = int(np.ceil(np.sqrt(len(vals))))
    img = torch.zeros(side * side)
    img[: len(vals)] = vals
    img = img.view(1, side, side).expand(3, side, side).clone()
    img[1] = img[1].flip(0)
    save_image(img, tmp_path / "tv.png", normalize=True, value_range=(-1, 1))
    ours = to_uint8(img[None])[0]
    theirs = np.asarray(Image.open(tmp_path / "tv.png").convert("RGB"))
    assert (ours == theirs).all()
    assert np.asarray(Image.open(io.BytesIO(png_bytes(ours)))).tolist() == theirs.tolist()
    old = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (old != theirs).any()  # the halves this test is about


def test_an_in_memory_set_is_evaluated_on_the_bytes_of_its_pngs(tmp_path):
    """eval takes distilled images from memory as well as from a folder: both must be the same uint8 images, exact
    halves included (they used to be rounded half to even in memory)."""
    from cao2_fast.eval.data import ImageSet, load_image_folder

    n = torch.arange(0, 255, dtype=torch.float32)
    x = ((n + 0.5) / 255) * 2 - 1
    x = x[(((x.clamp(-1, 1) + 1) / 2) * 255 == n + 0.5)]
    side = int(np.ceil(np.sqrt(len(x))))
    img = torch.full((side * side,), -1.0)
    img[: len(x)] = x
    images = torch.stack([img.view(1, side, side).expand(3, side, side), -img.view(1, side, side).expand(3, side,
    side)])
    for i, arr in enumerate(to_uint8(images)):
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / "0.png").write_bytes(png_bytes(arr))
    from_folder = load_image_folder(tmp_path, what="distilled")
    in_memory = ImageSet(images, torch.tensor([0, 1]), ["c0", "c1"])
    assert from_folder.images.shape == in_memory.images.shape
    assert torch.equal(from_folder.images, in_memory.images)


def test_a_folder_made_before_these_fixes_is_refused(tmp_path):
    """The same settings hashed b01ebcdcd2bde16d before the recipe gained tf32 and the bank draw changed; a folder
    holding that set must not be resumed into."""
    import json

    from cao2_fast.errors import UserError

    d = make_distiller()
    assert d.config.fingerprint() != "b01ebcdcd2bde16d"
    out = tmp_path / "old"
    d.run(out)
    marker = out / "0000" / ".complete.json"
    part = json.loads(marker.read_text())
    part["fingerprint"] = "b01ebcdcd2bde16d"
    marker.write_text(json.dumps(part))
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="different config \\(fingerprint b01ebcdcd2bde16d") as err:
        make_distiller().run(out)
    assert "\n" not in str(err.value)  # the CLI prints it as its one error line
