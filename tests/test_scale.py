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
            "--sample-steps", "5", "--stage2-steps", steps, "--t-max", "2", "--device", "cpu", "--out", str(out),
            "--stage2-batch", "4"]  # one group (2 classes, 4 latents) per block: 3 blocks to shard


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


def test_a_rank_that_dies_stops_the_others_with_one_line_then_a_rerun_completes(ckpts, single, tmp_path):
    """Two ranks started by hand (no launcher to tear the job down): rank 1 is killed once rank 0 has prepared the
    output folder, before it can reach the last barrier. Rank 0 must not wait forever: it stops at a bounded barrier
    with one line naming rank 1."""
    out = tmp_path / "dead"
    base = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "cao2_fast", *args(ckpts, out), "--rank-timeout", "20"]
    procs = [subprocess.Popen(cmd, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not out.is_dir() and procs[1].poll() is None:
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert procs[0].returncode == 2, err[-3000:]
    assert len(lines) == 1 and "rank 0: rank 1 did not reach the barrier within 20 s" in lines[0], err[-3000:]
    assert "Traceback" not in err and waited < 90
    assert not (out / "manifest.json").exists()
    subprocess.run([sys.executable, "-m", "cao2_fast", *args(ckpts, out)], check=True, env=env(), timeout=300)
    assert snapshot(out) == snapshot(single)


def test_save_stage1_survives_sigkill_and_resume_byte_identically(ckpts, tmp_path):
    """Both trees after a kill -9 mid-run and a re-run equal an uninterrupted run's (same folder names)."""
    whole, killed = tmp_path / "whole" / "o", tmp_path / "killed" / "o"
    subprocess.run([sys.executable, "-m", "cao2_fast", *args(ckpts, whole), "--save-stage1"], check=True, env=env(),
                   timeout=300)
    proc = subprocess.Popen([sys.executable, "-m", "cao2_fast", *args(ckpts, killed), "--save-stage1"], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s1 = killed.parent / "o-stage1"
    deadline = time.time() + 240
    while time.time() < deadline and not list(s1.glob("*/.complete.json")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the kill must land mid-run"
    subprocess.run([sys.executable, "-m", "cao2_fast", *args(ckpts, killed), "--save-stage1"], check=True, env=env(),
                   timeout=300)
    for name in ("o", "o-stage1"):
        assert snapshot(killed.parent / name) == snapshot(whole.parent / name), name
    from torchvision.datasets import ImageFolder

    assert len(ImageFolder(str(s1))) == 12 and len(ImageFolder(str(killed))) == 12
