"""Class-sharded runs under torchrun (gloo on CPU) and resume after SIGKILL: both must give byte-identical folders."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cao2_fast.models.dit import DiTConfig
from cao2_fast.models.random import random_models


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-ckpt")
    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=6))
    torch.save(dict(dit.state_dict(), pos_embed=dit.pos_embed), root / "dit.pt")
    vae.autoencoder.save_pretrained(root / "vae")
    torch.save(clf.model.state_dict(), root / "clf.pth")
    return root


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", CAO2_FAST_NO_PROGRESS="1")
    e.pop("WORLD_SIZE", None)
    return e


def args(ckpts, out, steps="3"):
    return ["distill", "--dit", str(ckpts / "dit.pt"), "--vae", str(ckpts / "vae"), "--classifier",
            f"test_resnet:{ckpts / 'clf.pth'}", "--classes", "0-5", "--ipc", "2", "--k", "2", "--stage1-batch", "8",
            "--sample-steps", "5", "--stage2-steps", steps, "--t-max", "2", "--device", "cpu", "--out", str(out)]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "o"
    subprocess.run([sys.executable, "-m", "cao2_fast", *args(ckpts, out)], check=True, env=env(), timeout=300)
    return out


def test_torchrun_two_processes_equal_one_process(ckpts, single, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "cao2_fast", *args(ckpts, out)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0:" in proc.stderr  # rank 0 logs; both ranks took work (3 groups over 2 ranks)
    assert snapshot(out) == snapshot(single)


def test_sigkill_mid_run_then_resume_is_byte_identical(ckpts, single, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cao2_fast", *args(ckpts, out)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("*/.complete.json")):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = list(out.glob("*/.complete.json"))
    assert complete and not (out / "manifest.json").exists(), "the kill must land mid-run"
    subprocess.run([sys.executable, "-m", "cao2_fast", *args(ckpts, out)], check=True, env=env(), timeout=300)
    assert snapshot(out) == snapshot(single)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    shutil.rmtree(out)
