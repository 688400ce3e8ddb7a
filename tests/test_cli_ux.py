"""The command line as a new user meets it: start-up, help, progress output, defaults that protect the install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_cli

HELP_PROBE = """
import sys
from cao2_fast.cli.main import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "numpy", "diffusers", "timm", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code))
"""


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["distill", "--help"], ["eval", "-h"],
                                  ["bench", "--help"], ["info", "--help"], ["export", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "HEAVY= CODE=0", (last, proc.stderr[-2000:])


def test_version_and_short_help(capsys):
    from cao2_fast import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"cao2-fast {__version__}"
    code, out, _ = run_cli(["distill", "-h"], capsys)
    assert code == 0 and "--ipc" in out and "Examples" in out


def test_flags_show_no_bool_type(capsys):
    for cmd in ([], ["distill"], ["eval"], ["bench"], ["info"], ["export"], ["train-preset"]):
        code, out, _ = run_cli([*cmd, "--help"], capsys)
        assert code == 0 and "<bool>" not in out and "--help" in out, cmd


def test_the_package_imports_its_api_on_first_use():
    code = ("import sys, cao2_fast; assert 'torch' not in sys.modules; d = cao2_fast.Distiller; "
            "assert 'torch' in sys.modules and d.__name__ == 'Distiller'; "
            "from cao2_fast import UserError, load_dit; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import cao2_fast; cao2_fast.nope"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "has no attribute 'nope'" in proc.stderr


# -- train-preset never overwrites the shipped weights by accident ---------------------------------------------------


@pytest.fixture
def fake_trainer(monkeypatch):
    """Record where train-preset would write instead of training (minutes)."""
    from cao2_fast.presets import train_digits

    calls = []
    monkeypatch.setattr(train_digits, "train_digits", lambda out, **kw: calls.append((out, kw)) or {"out": str(out)})
    return calls


def _shipped_state():
    from cao2_fast.pipeline import preset_dir

    return {p.name: p.stat().st_mtime_ns for p in preset_dir("digits").rglob("*") if p.is_file()}


def test_train_preset_needs_out_or_an_explicit_replace(fake_trainer, capsys, tmp_path):
    before = _shipped_state()
    code, _, err = run_cli(["train-preset"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--out DIR" in lines[0] and "--replace-shipped" in lines[0], err
    code, _, err = run_cli(["train-preset", "--out", str(tmp_path), "--replace-shipped"], capsys)
    assert code == 2 and "exclude each other" in err
    from cao2_fast.pipeline import preset_dir

    code, _, err = run_cli(["train-preset", "--out", str(preset_dir("digits"))], capsys)
    assert code == 2 and "--replace-shipped" in err
    assert fake_trainer == [] and _shipped_state() == before

    code, out, _ = run_cli(["train-preset", "digits", "--out", str(tmp_path / "p"), "--quick"], capsys)
    assert code == 0 and fake_trainer[-1][0] == tmp_path / "p" and fake_trainer[-1][1]["quick"] is True
    code, _, _ = run_cli(["train-preset", "--replace-shipped"], capsys)
    assert code == 0 and fake_trainer[-1][0] == preset_dir("digits")


def test_unknown_presets_are_refused_without_suggesting_a_refused_command(capsys):
    from cao2_fast import UserError
    from cao2_fast.pipeline import read_preset

    with pytest.raises(UserError, match="unknown preset 'foo' \\(available: digits\\)"):
        read_preset("foo")
    for args in (["export", "--preset", "foo"], ["train-preset", "foo"], ["bench", "--preset", "foo"]):
        code, _, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "foo" in lines[0] and "train-preset foo" not in lines[0], (args, err)


# -- info -------------------------------------------------------------------------------------------------------------


def test_info_lists_python_once_and_full_engine_paths(capsys, tmp_path, monkeypatch):
    import json as _json

    root = tmp_path / ("a-long-folder-name-" * 4) / "engines"
    entry = root / "dit-onnx-0123456789abcdef0123"
    entry.mkdir(parents=True)
    (entry / "model.onnx").write_bytes(b"x" * 10)
    meta = {"format": 1, "kind": "onnx", "model": "dit", "key": "k", "created": "2025-01-01T00:00:00",
            "files": {"model.onnx": {"bytes": 10}}, "precision": "float32",
            "fields": {"weights": "abcdef0123456789ff", "signature": {"class": "DiT", "config": {
                "depth": 4, "hidden_size": 96, "num_classes": 10, "input_size": 8}}}}
    (entry / "meta.json").write_text(_json.dumps(meta))
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(["info", "--engine-dir", str(root)], capsys)
    assert code == 0
    import platform

    assert out.count(f"python {platform.python_version()}") == 1
    assert str(entry) in out.splitlines()[-1]  # the whole path, on a line of its own
    desc = [line for line in out.splitlines() if "onnx dit" in line]
    assert len(desc) == 1 and "DiT" in desc[0] and "classes 10" in desc[0] and "weights sha256 abcdef012345" in desc[0]
    code, out, _ = run_cli(["info", "--json", "--engine-dir", str(root)], capsys)
    data = _json.loads(out)
    assert "python" not in data and "python" in data["versions"]
    assert "weights sha256 abcdef012345" in data["engines"][entry.name]


# -- help pages -------------------------------------------------------------------------------------------------------


def _help(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli([*cmd, "--help"], capsys)
    assert code == 0
    return out


def test_distill_help_is_grouped_with_computed_defaults(capsys, monkeypatch):
    out = _help(["distill"], capsys, monkeypatch)
    for panel in ("Models", "Recipe", "Stage 1", "Stage 2", "Output", "Engines & runtime"):
        assert f"─ {panel}" in out, panel
    assert "cao2-out/DATASET-ipcIPC" in out and "compile on CUDA" in out
    row = next(line for line in out.splitlines() if "--stage2-engine" in line)
    assert "<eager|compile>" in row and "onnx" not in row and "trt" not in row
    assert "--no-overwrite" not in out and "--no-dry-run" not in out


@pytest.mark.parametrize("cmd", [["distill"], ["export"], ["bench"], ["eval"], ["info"], ["train-preset"]])
def test_examples_fit_80_columns(cmd, capsys, monkeypatch):
    out = _help(cmd, capsys, monkeypatch)
    assert max(map(len, out.splitlines())) <= 80
    examples = out.split("Examples:", 1)[1].splitlines()
    body = [line for line in examples if line.strip()]
    assert body, "no examples"
    for line in body:  # a command, its continuation, or a remark; never the tail of a command cut at the edge
        assert line.startswith(("   cao2-fast ", "   torchrun ", "       --", "   (")), line


# -- bench ------------------------------------------------------------------------------------------------------------


def test_bench_reports_progress_and_writes_outside_the_working_folder(tmp_path, monkeypatch, capsys):
    import json as _json

    import torch

    work, cache = tmp_path / "repo", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("CAO2_FAST_CACHE", str(cache))
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli(["bench", "--model", "tiny", "--random-weights", "--device", "cpu", "--threads", "1",
                                  "--steps1", "1", "--steps2", "1", "--ref-images", "1", "--repeats", "1"], capsys)
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    assert list(work.iterdir()) == []  # nothing in the folder it ran from (a checkout's bench/results stays as is)
    rows = _json.loads((cache / "bench" / "bench_tiny_cpu-1t.json").read_text())
    assert {r["unit"] for r in rows if r["stage"] == "1"} == {"candidates/s"}
    assert f"wrote {cache / 'bench'}" in out
    steps = [line for line in err.splitlines() if line.startswith("[")]
    assert any("stage 1: warm-up" in s for s in steps) and any("stage 2: reference" in s for s in steps), err
