"""Class-sharded runs under torchrun (gloo on CPU) and resume after SIGKILL: both must give byte-identical folders."""

from __future__ import annotations

import os
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


def distill_here(argv):
    """``cao2-fast ARGV`` in this process, on one thread as the launched ranks run (``OMP_NUM_THREADS=1``): the
    same bytes as a subprocess, without its start-up."""
    from cao2_fast.cli.main import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--no-progress"])
            raise SystemExit(0)
    finally:
        torch.set_num_threads(before)
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def single(ckpts, tmp_path_factory):
    """One uninterrupted run, with the stage-1 tree beside it (``o-stage1``): the set every other run must equal."""
    out = tmp_path_factory.mktemp("single") / "o"
    distill_here([*args(ckpts, out), "--save-stage1"])
    return out


def test_torchrun_two_processes_equal_one_process(ckpts, single, tmp_path):
    out = tmp_path / "two" / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "cao2_fast", *args(ckpts, out), "--save-stage1"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0:" in proc.stderr  # rank 0 logs; both ranks took work (3 groups over 2 ranks)
    for name in ("o", "o-stage1"):
        assert snapshot(out.parent / name) == snapshot(single.parent / name), name


def test_a_rank_that_dies_stops_the_others_with_one_line_then_a_rerun_completes(ckpts, single, tmp_path):
    """Two ranks started by hand (no launcher to tear the job down): rank 1 is killed once rank 0 has prepared the
    output folder, before it can reach the last barrier. Rank 0 must not wait forever: it stops at a bounded barrier
    with one line naming rank 1."""
    out = tmp_path / "dead" / "o"
    base = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "cao2_fast", *args(ckpts, out), "--rank-timeout", "8"]
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
    assert len(lines) == 1 and "rank 0: rank 1 did not reach the barrier within 8 s" in lines[0], err[-3000:]
    assert "Traceback" not in err and waited < 90
    assert not (out / "manifest.json").exists()
    distill_here([*args(ckpts, out), "--save-stage1"])  # the re-run finishes the job
    assert snapshot(out) == snapshot(single)


def test_sigkill_mid_run_then_resume_is_byte_identical_in_both_trees(ckpts, single, tmp_path):
    """After a kill -9 mid-run (once a stage-1 class is complete, before the merge) and a re-run, the set and its
    stage-1 tree equal an uninterrupted run's, with no temporary left behind."""
    killed = tmp_path / "killed" / "o"
    proc = subprocess.Popen([sys.executable, "-m", "cao2_fast", *args(ckpts, killed), "--save-stage1"], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s1 = killed.parent / "o-stage1"
    deadline = time.time() + 240
    while time.time() < deadline and not list(s1.glob("*/.complete.json")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the kill must land mid-run"
    distill_here([*args(ckpts, killed), "--save-stage1"])
    for name in ("o", "o-stage1"):
        assert snapshot(killed.parent / name) == snapshot(single.parent / name), name
    assert not [p for p in killed.parent.rglob("*") if p.name.endswith(".tmp")]
    from torchvision.datasets import ImageFolder

    assert len(ImageFolder(str(s1))) == 12 and len(ImageFolder(str(killed))) == 12
