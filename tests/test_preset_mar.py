"""The digits MAR preset: its trainer (a quick run through the CLI, seeded), and the shipped preset end to end through
the Python API and a DataLoader."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math

import pytest
import torch
from helpers import run_cli

from cao2_fast.errors import UserError
from cao2_fast.models.mar import MARConfig, load_mar
from cao2_fast.pipeline import Distiller, preset_dir, read_preset
from cao2_fast.presets import train_digits_mar as tm

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """``train-preset digits-mar --quick`` twice into new folders, through the CLI."""
    from cao2_fast.cli.main import main

    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"q{i}") / "preset"
        with pytest.raises(SystemExit) as exc:
            main(["train-preset", "digits-mar", "--out", str(out), "--quick"])
            raise SystemExit(0)
        assert exc.value.code == 0
        outs.append(out)
    return outs


def test_a_quick_training_writes_a_loadable_preset_and_is_seeded(quick_runs):
    out = quick_runs[0]
    meta = json.loads((out / "preset.json").read_text())
    assert meta["name"] == "digits-mar" and meta["mar"] == "mar.safetensors" and meta["training"]["quick"] is True
    assert {"vae", "classifier.safetensors", "mar.safetensors", "preset.json"} <= {p.name for p in out.iterdir()}
    model = load_mar(out / "mar.safetensors")
    assert model.cfg.class_num == 10 and model.cfg.seq_len == 64 and model.cfg.token_embed_dim == 4
    assert (out / "mar.safetensors").read_bytes() == (quick_runs[1] / "mar.safetensors").read_bytes()


def test_train_preset_refuses_a_folder_holding_other_files(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    code, _, err = run_cli(["train-preset", "digits-mar", "--out", str(tmp_path), "--quick"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not (tmp_path / "preset.json").exists()


def test_the_shipped_preset_distills_and_feeds_a_dataloader():
    """The embedded MAR preset through the API, its classes as DataLoader items (what a pipeline consumes)."""
    from torch.utils.data import DataLoader

    from cao2_fast.data import DistilledClasses

    meta = read_preset("digits-mar")
    assert (preset_dir("digits-mar") / meta["mar"]).is_file()
    d = Distiller.from_preset("digits-mar", ipc=1, class_ids=[3, 7], device="cpu", stage2_steps=2, token_steps=5,
                              sample_steps=4)
    assert d.config.family == "mar" and d.config.dataset == "digits"
    default = Distiller.from_preset("digits-mar", device="cpu").config  # the preset's own sampling settings
    assert (default.guidance_scale, default.sample_steps, default.token_steps) == (
        meta["guidance_scale"], meta["num_iter"], meta["token_steps"]) == (2.9, 16, tm.TOKEN_STEPS)
    outs = d.distill()
    assert [o.class_id for o in outs] == [3, 7] and all(o.images.shape == (1, 3, 16, 16) for o in outs)
    assert all(o.records[0]["stage2_steps"] == 2 and "stage1_score" in o.records[0] for o in outs)
    ds = DistilledClasses(functools.partial(Distiller.from_preset, "digits-mar", ipc=1, class_ids=[3, 7], device="cpu",
                                            stage2_steps=2, token_steps=5, sample_steps=4))
    items = list(DataLoader(ds, batch_size=None))
    assert [int(i["class_id"]) for i in items] == [3, 7]
    assert all(torch.equal(i["images"], o.images) for i, o in zip(items, outs))  # the same bytes either way


# -- the trainer through the Python API ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """``train_digits_mar(..., quick=True)`` into a new folder."""
    out = tmp_path_factory.mktemp("api") / "preset"
    before = torch.get_num_threads()
    meta = tm.train_digits_mar(out, quick=True, progress=False)
    assert torch.get_num_threads() == before  # the trainer restores the caller's thread count
    return out, meta


def test_the_trainer_writes_a_complete_preset_beside_copies_of_the_digits_vae_and_classifier(api_run):
    out, meta = api_run
    assert sorted(p.name for p in out.iterdir()) == [".cao2-preset", "classifier.safetensors", "mar.safetensors",
                                                     "preset.json", "vae"]
    digits = preset_dir("digits")
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "classifier.safetensors"):
        assert (out / name).read_bytes() == (digits / name).read_bytes(), name
    on_disk = json.loads((out / "preset.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    base = json.loads((digits / "preset.json").read_text())
    assert {k: on_disk[k] for k in ("name", "family", "dataset", "mar", "vae")} == {
        "name": "digits-mar", "family": "mar", "dataset": "digits", "mar": "mar.safetensors", "vae": "vae"}
    assert on_disk["class_names"] == base["class_names"]
    assert (on_disk["image_size"], on_disk["latent_size"], on_disk["latent_channels"]) == (16, 8, 4)
    assert on_disk["classifier"] == {**base["classifier"], "weights": "classifier.safetensors"}
    assert on_disk["guidance_scale"] in tm.CHECK_SCALES and on_disk["num_iter"] == tm.MARSchedule.quick().num_iter
    assert on_disk["token_steps"] == tm.TOKEN_STEPS
    acc = on_disk["generation_check"]["accuracy"]
    assert sorted(float(s) for s in acc) == sorted(tm.CHECK_SCALES)
    assert all(0.0 <= v[m] <= 1.0 for v in acc.values() for m in ("normalize", "raw"))
    train = on_disk["training"]
    assert train["quick"] is True and train["seed"] == 0 and train["threads"] == 1
    assert train["schedule"] == dataclasses.asdict(tm.MARSchedule.quick())
    assert math.isfinite(train["loss"]) and train["params"] > 0 and train["wall_time_s"] > 0
    assert train["digits_vae_sha256"] == hashlib.sha256(
        (digits / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def test_the_saved_mar_has_the_config_of_preset_json_and_the_released_training_fields(api_run):
    out, meta = api_run
    model = load_mar(out / "mar.safetensors")
    assert model.cfg == MARConfig(**meta["mar_config"]) == tm.MAR_CONFIG
    assert model.cfg.diffusion_batch_mul == 1 and model.cfg.label_drop_prob == 0.1
    assert model.cfg.attn_dropout == model.cfg.proj_dropout == 0.1 and model.cfg.num_sampling_steps == "100"
    assert sum(p.numel() for p in model.parameters()) == meta["training"]["params"]


def test_the_api_and_the_cli_write_the_same_bytes(api_run, quick_runs):
    out, _ = api_run
    assert (out / "mar.safetensors").read_bytes() == (quick_runs[0] / "mar.safetensors").read_bytes()


def test_the_first_diffloss_step_returns_its_input_for_any_condition(api_run):
    """At t = 999 the released sampler multiplies an ε error by ~316 (ᾱ ≈ 2.4e-9 after the capped β): the trainer
    pins ε̂(x, 999, z) = x, the same for every z (so guidance cannot magnify a difference either)."""
    out, _ = api_run
    net = load_mar(out / "mar.safetensors").diffloss.net
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 4, generator=g).clamp(-3.5, 3.5)
    t = torch.full((512,), 999)
    with torch.no_grad():
        outs = [net(x, t, torch.randn(512, tm.MAR_CONFIG.decoder_embed_dim, generator=g) * s) for s in (1.0, 3.0)]
    assert (outs[0][:, :4] - x).abs().max() < 2e-3
    assert torch.allclose(outs[0], outs[1], atol=1e-6)  # no trace of z


def test_digits_mar_refuses_the_digits_folder_and_a_digits_run_as_its_out(tmp_path, capsys):
    digits = preset_dir("digits")
    before = {p: p.stat().st_mtime_ns for p in digits.rglob("*") if p.is_file()}
    for out in (digits, digits / "sub"):
        code, _, err = run_cli(["train-preset", "digits-mar", "--out", str(out), "--quick"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "digits" in err, err
    assert {p: p.stat().st_mtime_ns for p in digits.rglob("*") if p.is_file()} == before
    (tmp_path / ".cao2-preset").write_text("a digits preset written by cao2-fast train-preset\n")
    (tmp_path / "dit.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="dit.safetensors"):
        tm.prepare_out_dir(tmp_path)


def test_a_rerun_into_its_own_folder_is_accepted(api_run):
    out, _ = api_run
    tm.prepare_out_dir(out)  # everything there is what the trainer wrote

