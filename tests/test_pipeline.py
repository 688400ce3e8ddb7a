"""The job on disk: layout, manifest, determinism, resume and refusal to mix configs (tiny random models)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cao2_fast.config import build_config
from cao2_fast.errors import UserError
from cao2_fast.models.dit import DiTConfig
from cao2_fast.models.random import random_models
from cao2_fast.generators.dit import DiTGenerator
from cao2_fast.pipeline import Distiller, class_generator
from cao2_fast.stage2 import Stage2Noise


def make_distiller(class_ids=(0, 2, 4), ipc=2, recipe="official", **kw):
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    opts = dict(k=2, stage1_batch=8, stage2_batch=3, stage2_steps=3, sample_steps=6, t_max=2,
                classifier_input_size=32)
    opts.update(kw)
    cfg = build_config("custom", ipc, recipe, class_ids=list(class_ids), num_model_classes=5, **opts)
    return Distiller(DiTGenerator(dit, vae), clf, cfg)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    d = make_distiller()
    manifest = d.run(out)
    return d, out, manifest


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_is_an_imagefolder_with_manifest_and_contact_sheet(finished):
    d, out, manifest = finished
    assert sorted(os.listdir(out)) == ["0000", "0002", "0004", "contact_sheet.png", "manifest.json"]
    for name in ("0000", "0002", "0004"):
        assert sorted(p.name for p in (out / name).glob("*.png")) == ["0.png", "1.png"]
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(out))
    assert ds.classes == ["0000", "0002", "0004"] and len(ds) == 6
    img, label = ds[5]
    assert img.size == (16, 16) and label == 2
    assert not list(out.rglob("*.tmp"))


def test_manifest_records_config_versions_and_per_image_fields(finished):
    d, out, manifest = finished
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["config"]["fingerprint"] == d.config.fingerprint()
    assert on_disk["config"]["recipe"]["timestep_mode"] == "official"
    assert {"torch", "diffusers", "timm", "cao2_fast"} <= set(on_disk["versions"])
    rec = on_disk["classes"][1]["images"][0]
    for field in ("class_id", "candidate_index", "prob_before", "prob_after", "loss_first", "loss_last", "sha256",
                  "file", "stage2_status"):
        assert field in rec, field
    assert rec["class_id"] == 2 and 0 <= rec["candidate_index"] < 4
    assert rec["loss_last"] != rec["loss_first"]


def test_same_seed_gives_byte_identical_files(finished, tmp_path):
    _, out, _ = finished
    make_distiller().run(tmp_path / "again")
    assert snapshot(out) == snapshot(tmp_path / "again")


def test_other_seed_changes_images(finished, tmp_path):
    _, out, _ = finished
    make_distiller(seed=1).run(tmp_path / "s1")
    assert (out / "0002" / "0.png").read_bytes() != (tmp_path / "s1" / "0002" / "0.png").read_bytes()


def test_class_randomness_depends_on_seed_and_class_only():
    a = torch.randn(3, generator=class_generator(0, 7, "stage1"))
    b = torch.randn(3, generator=class_generator(0, 7, "stage1"))
    c = torch.randn(3, generator=class_generator(0, 8, "stage1"))
    d = torch.randn(3, generator=class_generator(1, 7, "stage1"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    # a class distilled alone equals the same class distilled among others (up to batch rounding)
    alone = make_distiller(class_ids=(2,)).distill()[0]
    among = [r for r in make_distiller().distill() if r.class_id == 2][0]
    assert [r["candidate_index"] for r in alone.records] == [r["candidate_index"] for r in among.records]
    torch.testing.assert_close(alone.images, among.images, atol=1e-4, rtol=1e-4)


def test_rerun_skips_complete_classes_and_redoes_damaged_ones(finished, tmp_path):
    _, out, _ = finished
    target = tmp_path / "resume"
    d = make_distiller()
    d.run(target)
    before = snapshot(target)
    untouched = target / "0000" / "0.png"
    mtime = untouched.stat().st_mtime_ns
    (target / "0002" / "1.png").write_bytes(b"garbage")  # damaged image: checksum mismatch
    (target / "0004").rename(target / ".cao2-partial-0004")  # killed before the staged class was renamed into place
    (target / ".cao2-partial-0004" / ".complete.json").unlink()
    (target / "manifest.json").unlink()
    d.run(target)
    assert snapshot(target) == before
    assert untouched.stat().st_mtime_ns == mtime  # the complete class was not rewritten


def test_refuses_to_mix_configs_unless_overwrite(finished, tmp_path):
    target = tmp_path / "mix"
    make_distiller().run(target)
    other = make_distiller(seed=3)
    with pytest.raises(UserError, match="different config"):
        other.run(target)
    assert (target / "manifest.json").is_file()  # nothing was lost
    other.run(target, overwrite=True)
    fp = json.loads((target / "manifest.json").read_text())["config"]["fingerprint"]
    assert fp == other.config.fingerprint()


def test_batch_sizes_do_not_enter_the_fingerprint_but_grouping_does():
    a = make_distiller(stage2_batch=3).config
    b = make_distiller(stage2_batch=5).config
    c = make_distiller(stage1_batch=4).config  # 1 class per group instead of 2
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_groups_tile_the_class_list():
    d = make_distiller(class_ids=(0, 1, 2, 3, 4), stage1_batch=8)  # 4 candidates per class -> 2 per group
    assert d.groups() == [[0, 1], [2, 3], [4]]


def test_blocks_pool_whole_groups_up_to_the_stage2_batch_with_the_same_results():
    d = make_distiller(class_ids=(0, 1, 2, 3, 4), stage1_batch=8, stage2_batch=9)  # 4 latents per group
    assert d.blocks() == [[0, 1, 2, 3], [4]]
    assert make_distiller(class_ids=(0, 1, 2, 3, 4), stage2_batch=3).blocks() == [[0, 1], [2, 3], [4]]
    calls = []
    real = d.stage1
    d.stage1 = lambda ids, bar=None: calls.append(list(ids)) or real(ids, bar)
    pooled = d.distill([0, 1, 2, 3])
    assert calls == [[0, 1], [2, 3]]  # stage 1 stays per group
    alone = make_distiller(class_ids=(0, 1, 2, 3, 4), stage1_batch=8, stage2_batch=4).distill([2, 3])
    for a, b in zip(pooled[2:], alone):
        assert a.class_id == b.class_id and a.records[0]["candidate_index"] == b.records[0]["candidate_index"]
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)


def test_subset_classifier_targets_follow_the_class_list():
    d = make_distiller(class_ids=(1, 3))
    assert d._target_index == {1: 1, 3: 3}  # classifier with the DiT's 5 classes: index = class id
    from cao2_fast.models.random import random_classifier

    d.classifier = random_classifier(num_classes=2, input_size=32)
    assert d._classifier_targets() == {1: 0, 3: 1}
    d.classifier = random_classifier(num_classes=7, input_size=32)
    with pytest.raises(UserError, match="classifier has 7 classes"):
        d._classifier_targets()


def test_disk_full_keeps_finished_classes(tmp_path, monkeypatch):
    from cao2_fast import output

    target = tmp_path / "full"
    d = make_distiller(stage1_batch=4)  # one class per group
    real = output.folder.atomic_write
    calls = {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if "0004" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(output.folder, "atomic_write", failing)
    with pytest.raises(UserError, match="No space left"):
        d.run(target)
    monkeypatch.setattr(output.folder, "atomic_write", real)
    fp = d.config.fingerprint()
    assert output.read_complete(target, "0000", fp, 2) is not None
    assert output.read_complete(target, "0002", fp, 2) is not None
    assert not (target / "0004").exists()  # no partial class where an ImageFolder reader would see it
    assert sorted(p.name for p in target.iterdir()) == [".cao2-lock", "0000", "0002"]  # nor a staging folder
    assert not (target / "manifest.json").exists()
    d.run(target)  # resumes
    assert output.read_complete(target, "0004", fp, 2) is not None and (target / "manifest.json").is_file()


@pytest.mark.parametrize("where", ["file-in-path", "read-only-fs"])
def test_unwritable_output_is_refused_before_any_work(tmp_path, where):
    d = make_distiller()
    if where == "file-in-path":
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "out"
    else:
        target = __import__("pathlib").Path("/proc/cao2-fast-test/out")
    with pytest.raises(UserError, match="not writable|not a directory"):
        d.run(target)
    assert not target.exists()


def test_nonfinite_stage2_is_recorded_in_the_manifest_and_the_run_continues(tmp_path):
    d = make_distiller()
    real = d.generator.stage2_call
    calls = {"n": 0}

    def poisoned(x, t, y, drop=None):
        out = real(x, t, y, drop)
        if torch.is_grad_enabled() and x.requires_grad:
            calls["n"] += 1
            if calls["n"] == 2:
                out = out.clone()
                out[0, 0, 0, 0] = float("inf")
        return out

    d.generator.stage2_call = poisoned
    manifest = d.run(tmp_path / "nan")
    statuses = [r["stage2_status"] for c in manifest["classes"] for r in c["images"]]
    assert statuses.count("ok") == len(statuses) - 1 and manifest["summary"]["stage2_stopped"] == 1
    stopped = [r for c in manifest["classes"] for r in c["images"] if r["stage2_status"] != "ok"][0]
    assert stopped["stage2_steps"] == 1 and stopped["loss_last"] is not None
    assert len(list((tmp_path / "nan").rglob("*.png"))) == 6 + 1  # all images + contact sheet


def test_halve_on_oom_retries_at_half_the_batch_down_to_one():
    from cao2_fast.stage2 import halve_on_oom

    tried, notes = [], []

    def fn(b):
        tried.append(b)
        if b > 5:
            raise torch.OutOfMemoryError("fake: out of memory")
        return b * 10

    assert halve_on_oom(fn, 64, notes.append) == (4, 40)
    assert tried == [64, 32, 16, 8, 4] and len(notes) == 4 and "batch of 64" in notes[0]
    with pytest.raises(torch.OutOfMemoryError):
        halve_on_oom(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("always")), 4)


class _CountingBar:
    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


def test_stage2_chunk_that_runs_out_of_memory_is_retried_smaller_with_the_same_latents():
    d = make_distiller(stage2_batch=4)
    s1 = d.stage1([0, 2, 4])
    lat = torch.cat([s1[c]["latents"] for c in (0, 2, 4)])
    ids = torch.tensor([c for c in (0, 2, 4) for _ in range(2)])
    noise = Stage2Noise.cat([d.generator.stage2_noise(d.config, c, len(s1[c]["candidate_index"])) for c in (0, 2, 4)])
    whole = d.stage2(lat, ids, noise)

    calls, notes = [], []
    real = d.generator.stage2_call

    def tight(x, *a):  # a device that fits one latent; the failure comes after some steps of the first chunk
        calls.append(x.shape[0])
        if x.shape[0] > 1 and len(calls) > 2:
            raise torch.OutOfMemoryError("fake: out of memory")
        return real(x, *a)

    d.generator.stage2_call, d.log = tight, notes.append
    bar = _CountingBar()
    halved = d.stage2(lat, ids, noise, bar)
    assert calls[:4] == [4, 4, 4, 2] and set(calls[4:]) == {1}  # 4 fails on its 3rd step, 2 on its 1st, then 1s
    assert len(notes) == 2 and "batch of 4" in notes[0] and "retrying with 2" in notes[0]
    assert (halved.latents - whole.latents).abs().max() <= 1e-6
    torch.testing.assert_close(halved.loss_last, whole.loss_last, rtol=1e-6, atol=1e-6)
    assert min(bar.updates) < 0  # the failed attempt's progress was taken back
    assert sum(bar.updates) == d.config.stage2_steps * len(lat)


def test_results_in_hand_are_written_to_a_resumable_folder_without_computing_them_again(finished, tmp_path):
    from cao2_fast.output import write_set

    _, out, _ = finished
    d = make_distiller()
    outputs = d.distill()  # the whole config, block by block: the bytes a run writes
    calls = []
    real = d.compute
    d.compute = lambda ids, bars=None: calls.append(list(ids)) or real(ids, bars)
    manifest = write_set(d, tmp_path / "in-hand", results=outputs)
    assert calls == [] and d.last_run["distilled"] == 3
    assert snapshot(tmp_path / "in-hand") == snapshot(out) and manifest["summary"]["images"] == 6
    write_set(d, tmp_path / "partial", results=outputs[:1])  # only class 0 in hand: its block [0, 2] is computed
    assert calls == [[0, 2], [4]] and snapshot(tmp_path / "partial") == snapshot(out)
