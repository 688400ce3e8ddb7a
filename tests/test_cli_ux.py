"""The command line as a new user meets it: start-up, help, progress output, defaults that protect the install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_cli
from test_cli import ckpts  # noqa: F401  (the tiny real-checkpoint fixture)

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


def test_flags_show_no_bool_type_and_nothing_is_cut_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for cmd in ([], ["distill"], ["eval"], ["bench"], ["info"], ["export"], ["train-preset"], ["convert"],
                ["selftest"]):
        code, out, _ = run_cli([*cmd, "--help"], capsys)
        assert code == 0 and "<bool>" not in out and "--help" in out, cmd
        assert "…" not in out and max(map(len, out.splitlines())) <= 80, (cmd, [ln for ln in out.splitlines()
                                                                                if "…" in ln])


def test_the_package_imports_its_api_on_first_use():
    code = ("import sys, cao2_fast; assert 'torch' not in sys.modules; d = cao2_fast.Distiller; "
            "assert 'torch' in sys.modules and d.__name__ == 'Distiller'; "
            "from cao2_fast import UserError, load_dit; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import cao2_fast; cao2_fast.nope"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "has no attribute 'nope'" in proc.stderr
    import cao2_fast

    assert not {"annotations", "importlib"} & set(dir(cao2_fast)) and set(cao2_fast.__all__) <= set(dir(cao2_fast))


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

    with pytest.raises(UserError, match="unknown preset 'foo' \\(available: digits, digits-mar\\)"):
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
    (listed,) = [e for e in data["engines"]["entries"] if e["name"] == entry.name]
    assert "weights sha256 abcdef012345" in listed["description"]
    assert listed["contract"] is None and "lacks its inputs/output" in listed["problem"]  # a made-up entry


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


# -- progress ---------------------------------------------------------------------------------------------------------


def _tiny_distill(ckpts, out, *extra):
    return ["distill", "--dit", str(ckpts / "dit.pt"), "--vae", str(ckpts / "vae"), "--classifier",
            f"test_resnet:{ckpts / 'clf.pth'}", "--out", str(out), "--classes", "0-4", "--ipc", "2", "--k", "2",
            "--sample-steps", "4", "--stage2-steps", "3", "--t-max", "2", "--stage1-batch", "4", "--device", "cpu",
            *extra]


def test_distill_logs_a_few_plain_lines_when_stderr_is_not_a_terminal(ckpts, tmp_path, capsys):  # noqa: F811
    code, out, err = run_cli(_tiny_distill(ckpts, tmp_path / "o"), capsys)
    assert code == 0, err
    assert "\r" not in err and "\x1b" not in err  # no redraws, no escape codes
    lines = err.strip().splitlines()
    assert len(lines) <= 8, lines
    plan = lines[0]
    assert plan.startswith("plan: 5 of 5 classes to distill")
    assert "20 candidates × 4 sampling steps" in plan and "10 latents, 30 latent-steps" in plan
    assert "stage1 eager" in plan and "stage2 eager" in plan and "TFLOP" in plan
    assert any(line.startswith("estimate: ") for line in lines)
    assert any("finished: classes 5/5" in line for line in lines)
    assert "wrote 10 images of 5 classes" in out

    code, _, err = run_cli(_tiny_distill(ckpts, tmp_path / "q", "--no-progress"), capsys)
    assert code == 0 and "plan:" not in err and "estimate" not in err


class Recorder:
    """A Progress that keeps every call."""

    def __init__(self):
        from cao2_fast.progress import Progress

        self.calls = []
        rec = self

        class _P(Progress):
            def start(self, plan):
                rec.calls.append(("start", plan))

            def advance(self, stage, n=1):
                rec.calls.append((stage, n))

            def classes_done(self, total):
                rec.calls.append(("classes", total))

            def close(self):
                rec.calls.append(("close",))

        self.progress = _P()


# noqa: F811
def test_the_library_reports_through_its_progress_object_and_draws_nothing_by_default(ckpts, tmp_path, capsys):
    from cao2_fast import Distiller

    kw = dict(dataset="custom", class_ids=[0, 1, 2], ipc=2, k=2, sample_steps=4, stage2_steps=3, t_max=2,
              stage1_batch=4)
    args = (ckpts / "dit.pt", ckpts / "vae", f"test_resnet:{ckpts / 'clf.pth'}")
    Distiller.from_paths(*args, **kw).run(tmp_path / "quiet")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""

    rec = Recorder()
    Distiller.from_paths(*args, progress=rec.progress, **kw).run(tmp_path / "o")
    calls = rec.calls
    assert calls[0][0] == "start" and calls[-1] == ("close",)
    plan = calls[0][1]
    assert (plan.classes, plan.todo, plan.candidates, plan.latents, plan.latent_steps) == (3, 3, 12, 6, 18)
    # per group, stage 1 before stage 2; every unit of planned work is reported once
    assert sum(n for c, n, *_ in [c for c in calls if c[0] == "stage1"]) == plan.batch_steps
    assert sum(n for c, n, *_ in [c for c in calls if c[0] == "stage2"]) == plan.latent_steps
    first2 = next(i for i, c in enumerate(calls) if c[0] == "stage2")
    assert all(c[0] != "stage2" for c in calls[:first2]) and any(c[0] == "stage1" for c in calls[:first2])
    assert [c for c in calls if c[0] == "classes"][-1] == ("classes", 3)


def test_log_lines_are_throttled_and_bars_appear_per_stage():
    import io

    from cao2_fast.progress import Bars, LogLines, Plan

    plan = Plan(classes=10, already_complete=2, todo=8, candidates=160, sample_steps=50, batch_steps=200, latents=80,
                latent_steps=8000, engines={"stage1": "eager", "stage2": "eager"}, tflop=1.5)
    now = [0.0]
    lines = []
    log = LogLines(lines.append, every=30, clock=lambda: now[0])
    log.start(plan)
    for _ in range(200):  # stage 1: 200 ticks over 100 s
        now[0] += 0.5
        log.advance("stage1")
    for _ in range(80):  # stage 2: 8000 latent-steps over 100 s
        now[0] += 1.25
        log.advance("stage2", 100)
    log.classes_done(10)
    assert log.fraction() == pytest.approx(1.0) and log.eta() == pytest.approx(0.0)
    log.close()
    assert lines[0] == plan.describe() and "8 of 10 classes to distill (2 already complete)" in lines[0]
    assert lines[1].startswith("estimate: ")
    assert lines[-1].startswith("[3:20] finished: classes 10/10")
    assert 5 <= len(lines) <= 2 + 200 // 30 + 2

    buf = io.StringIO()
    bars = Bars(file=buf)
    bars.start(plan)
    bars.advance("stage1", 3)
    assert set(bars.bars) == {"classes", "stage1"}  # the stage-2 bar is not shown while stage 1 runs
    bars.advance("stage2", 10)
    assert set(bars.bars) == {"classes", "stage1", "stage2"} and bars.bars["stage2"].n == 10
    bars.close()
    assert bars.bars == {} and plan.describe() in buf.getvalue()


# -- pictures ---------------------------------------------------------------------------------------------------------


def _sheet_parts(out, n_classes, ipc, shift):
    """Class folders with ``ipc`` random 16-px images each; stage 2 changed each image by ``shift`` grey levels."""
    import numpy as np
    from PIL import Image

    from cao2_fast import output

    rng = np.random.default_rng(0)
    parts = []
    for c in range(n_classes):
        (out / f"c{c}").mkdir(parents=True)
        recs, thumbs = [], []
        for i in range(ipc):
            before = rng.integers(0, 200, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(before + shift).save(out / f"c{c}" / f"{i}.png")
            recs.append({"file": f"c{c}/{i}.png", "prob_before": 0.5, "prob_after": None if i == 0 else 0.75})
            thumbs.append(output.thumbnail_b64(before))
        parts.append({"class_name": f"c{c}", "images": recs, "stage1_thumbnails": thumbs})
    return parts


def test_contact_sheet_shows_every_image_as_a_labelled_triple(tmp_path, monkeypatch):
    import torch
    import torchvision.utils
    from PIL import Image

    from cao2_fast import output

    parts = _sheet_parts(tmp_path, n_classes=3, ipc=12, shift=2)
    grids = []
    real = torchvision.utils.make_grid
    monkeypatch.setattr(torchvision.utils, "make_grid", lambda t, **kw: grids.append(t) or real(t, **kw))
    output.contact_sheet(parts, tmp_path)
    assert len(grids) == 3 * 12 and all(g.shape[0] == 3 for g in grids)  # all IPC images, each as a triple
    before, after, diff = grids[0]
    assert torch.allclose(diff, (0.5 + output._difference_gain([after - before]) * (after - before)).clamp(0, 1))
    assert output._difference_gain([after - before]) == 50  # 2 grey levels -> x50 puts them at about ±0.4
    full_height = Image.open(tmp_path / output.CONTACT_SHEET).height
    assert full_height > 3 * 2 * 48  # 12 images per class wrap onto a second line of 10

    grids.clear()
    output.contact_sheet(parts, tmp_path, max_classes=2)
    assert len(grids) == 2 * 12
    assert Image.open(tmp_path / output.CONTACT_SHEET).height < full_height


def test_bench_chart_is_drawn_from_the_json_rows_with_an_engine_specific_title(tmp_path, monkeypatch):
    import json as _json
    from pathlib import Path

    import matplotlib.figure

    from cao2_fast.benchmark import plot_results

    titles, axes_titles = [], []
    real_save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **kw):
        titles.append(fig._suptitle.get_text())
        axes_titles.append([ax.get_title() for ax in fig.axes])
        return real_save(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    root = Path(__file__).resolve().parent.parent / "bench" / "results"
    for name in ("bench_digits_cpu-2t", "bench_digits_cpu-2t_compile"):
        plot_results(_json.loads((root / f"{name}.json").read_text()), tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert "stage 2 eager" in titles[0] and "stage 2 torch.compile" in titles[1]
    assert axes_titles[0][0].startswith("stage 1") and axes_titles[0][-1].startswith("speed-up")
