"""The ``cao2-fast`` command: a real-checkpoint run on tiny files, and every expected error as one line + exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import run_cli
from cao2_fast.models.dit import DiTConfig
from cao2_fast.models.random import random_models

FAST = ["--sample-steps", "4", "--stage2-steps", "2", "--t-max", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny DiT in the original checkpoint layout, a diffusers VAE dir and a timm classifier state dict."""
    root = tmp_path_factory.mktemp("ckpt")
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5))
    sd = dict(dit.state_dict())
    sd["pos_embed"] = dit.pos_embed.clone()
    torch.save({"ema": sd}, root / "dit.pt")
    vae.autoencoder.save_pretrained(root / "vae")
    torch.save({"state_dict": {f"module.{k}": v for k, v in clf.model.state_dict().items()}}, root / "clf.pth")
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    return root


def real_args(ckpts, out, *extra):
    return ["distill", "--dit", str(ckpts / "dit.pt"), "--vae", str(ckpts / "vae"), "--classifier",
            f"test_resnet:{ckpts / 'clf.pth'}", "--out", str(out), *FAST, *extra]


def test_distill_with_real_checkpoints(ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, _ = run_cli(real_args(ckpts, out, "--classes", "1,3", "--ipc", "2", "--k", "2"), capsys)
    assert code == 0
    assert "wrote 4 images of 2 classes" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["class_ids"] == [1, 3] and manifest["config"]["dataset"] == "custom"
    assert sorted(p.name for p in out.iterdir()) == ["0001", "0003", "contact_sheet.png", "manifest.json"]


def test_dry_run_writes_nothing(ckpts, tmp_path, capsys):
    out = tmp_path / "dry"
    code, stdout, _ = run_cli(real_args(ckpts, out, "--classes", "0-4", "--ipc", "3", "--dry-run"), capsys)
    assert code == 0 and not out.exists()
    plan = json.loads(stdout)
    assert plan["classes"] == 5 and plan["candidates"] == 5 * 4 * 3 and plan["latents"] == 15


@pytest.mark.parametrize("case,extra,message", [
    ("ipc0", ["--classes", "1", "--ipc", "0"], "--ipc must be at least 1"),
    ("ipc-neg", ["--classes", "1", "--ipc", "-3"], "--ipc must be at least 1"),
    ("class-range", ["--classes", "1,7"], "class id 7 is out of range for a DiT with 5 classes"),
    ("bad-classes", ["--classes", "one"], "expected comma-separated class ids"),
    ("unknown-recipe", ["--classes", "1", "--recipe", "fancy"], "fancy"),
    ("unknown-dataset", ["--dataset", "cifar"], "cifar"),
    ("dataset-classes", ["--dataset", "imagenette"], "class id"),
])
def test_expected_errors_are_one_line_exit_2_and_write_nothing(ckpts, tmp_path, capsys, case, extra, message):
    out = tmp_path / case
    code, _, err = run_cli(real_args(ckpts, out, *extra), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case,mutate,message", [
    ("missing-dit", lambda r, a: a.__setitem__(a.index("--dit") + 1, str(r / "nope.pt")), "nope.pt: no such file"),
    ("vae-as-dit", lambda r, a: a.__setitem__(a.index("--dit") + 1, str(r / "vae" / "diffusion_pytorch_model.safetensors")),
     "not a DiT checkpoint"),
    ("missing-vae", lambda r, a: a.__setitem__(a.index("--vae") + 1, str(r / "novae")), "novae: no such directory"),
    ("dit-as-vae", lambda r, a: a.__setitem__(a.index("--vae") + 1, str(r / "transformer")), "not an AutoencoderKL"),
    ("missing-clf", lambda r, a: a.__setitem__(a.index("--classifier") + 1, f"test_resnet:{r / 'x.pth'}"),
     "x.pth: no such file"),
])
def test_bad_checkpoints_are_one_line_exit_2(ckpts, tmp_path, capsys, case, mutate, message):
    out = tmp_path / case
    args = real_args(ckpts, out, "--classes", "1")
    mutate(ckpts, args)
    code, _, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_truncated_dit_checkpoint(ckpts, tmp_path, capsys):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes((ckpts / "dit.pt").read_bytes()[:5000])
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--dit") + 1] = str(bad)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "trunc.pt: cannot read weights" in err and len(err.strip().splitlines()) == 1


def test_classifier_head_mismatch(ckpts, tmp_path, capsys):
    from cao2_fast.models.random import random_classifier

    torch.save(random_classifier(num_classes=7).model.state_dict(), tmp_path / "c7.pth")
    args = real_args(ckpts, tmp_path / "o", "--classes", "1")
    args[args.index("--classifier") + 1] = f"test_resnet:{tmp_path / 'c7.pth'}"
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "classifier has 7 classes" in err and len(err.strip().splitlines()) == 1


def test_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "cao2_fast", "distill", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "Examples" in proc.stdout and "--recipe" in proc.stdout


def test_rerun_into_a_complete_folder_says_nothing_was_done_and_another_engine_is_another_set(ckpts, tmp_path,
                                                                                             capsys):
    out = tmp_path / "o"
    code, stdout, _ = run_cli(real_args(ckpts, out, "--classes", "1,3", "--ipc", "1"), capsys)
    assert code == 0 and "wrote 2 images of 2 classes" in stdout
    before = (out / "manifest.json").read_bytes()
    code, stdout, _ = run_cli(real_args(ckpts, out, "--classes", "1,3", "--ipc", "1"), capsys)
    assert code == 0 and "2 classes already complete" in stdout and "nothing to do" in stdout
    assert "wrote" not in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engines"] == [{"stage1": "eager", "stage2": "eager"}]
    # an engine rounds its own way: a folder made by another one is another config's, not one to add classes to
    code, stdout, err = run_cli(real_args(ckpts, out, "--classes", "1,3", "--ipc", "1", "--engine", "compile"), capsys)
    assert code == 2 and "made with engines stage 1 eager, stage 2 eager, this run uses compile, eager" in err
    assert (out / "manifest.json").read_bytes() == before
