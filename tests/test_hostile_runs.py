"""Hostile runs of `distill`, `train-preset` and the Python API: configs racing on one folder, aliased paths,
mistyped or impossible settings, ranks that never come. Each is one line (exit 2 on the command line) and never a
lost or half-replaced file. Inputs are made by the tests; tiny random models (tests/test_pipeline.py) or the digits
preset, refused before any real work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cao2_fast.errors import UserError
from helpers import run_cli
from test_pipeline import make_distiller, snapshot

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A set made by one uninterrupted run; tests work on copies."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    make_distiller().run(out)
    return out


@pytest.fixture(scope="module")
def uninterrupted(finished):
    return snapshot(finished)


# -- two configs racing on one folder ----------------------------------------------------------------------------


def test_a_run_of_another_config_is_refused_while_one_is_alive(tmp_path, uninterrupted):
    """While a run (seed 0) is writing its first block, a run of another config (seed 1) starts on the same new
    folder, with and without overwrite: it must refuse, not take over the folder; the first run's set is then
    exactly an uninterrupted run's."""
    out = tmp_path / "X"
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
              "from test_pipeline import make_distiller\n"
              "from cao2_fast.errors import UserError\n"
              "for overwrite in (False, True):\n"
              "    try:\n"
              f"        make_distiller(seed=1).run({str(out)!r}, overwrite=overwrite)\n"
              "        print('wrote')\n"
              "    except UserError as e:\n"
              "        print('refused:', e)\n")
    d = make_distiller()
    other = []
    real = d.compute

    def compute(*args, **kwargs):
        if not other:  # this run holds the folder now: the other config tries its luck
            other.append(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                        env=dict(os.environ, OMP_NUM_THREADS="1")))
        return real(*args, **kwargs)

    d.compute = compute
    d.run(out)
    lines = other[0].stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("refused:") for line in lines), other[0].stdout + other[0].stderr
    assert all("another cao2-fast run is writing a distilled set of a different config" in line for line in lines)
    assert snapshot(out) == uninterrupted
    # once the first run is gone, the other config meets the ordinary refusal (and --overwrite would replace it)
    with pytest.raises(UserError, match="made with a different config"):
        make_distiller(seed=1).run(out)
    assert snapshot(out) == uninterrupted


# -- paths that name one folder twice ------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["dotdot", "symlink"])
def test_a_stage1_folder_that_is_the_set_under_another_name_is_refused(tmp_path, alias):
    out = tmp_path / "R" / "out"
    (tmp_path / "R" / "sub").mkdir(parents=True)
    if alias == "dotdot":
        s1 = tmp_path / "R" / "sub" / ".." / "out"
    else:
        out.mkdir()
        s1 = tmp_path / "link"
        s1.symlink_to(out)
    with pytest.raises(UserError, match="must lie beside --out"):
        make_distiller().run(out, stage1_out=s1)
    assert not out.exists() or not any(out.iterdir())


def test_overlap_is_judged_on_resolved_paths_and_inodes(tmp_path):
    from cao2_fast.fileio import overlaps

    (tmp_path / "R" / "out").mkdir(parents=True)
    (tmp_path / "L").symlink_to(tmp_path / "R")
    assert overlaps(tmp_path / "R" / "x" / ".." / "out", tmp_path / "R" / "out")
    assert overlaps(tmp_path / "L" / "out" / "new" / "deeper", tmp_path / "R" / "out")  # inside, through a link
    assert overlaps(tmp_path / "L", tmp_path / "R" / "new")  # around it
    assert not overlaps(tmp_path / "R" / "out-stage1", tmp_path / "R" / "out")
    assert not overlaps(tmp_path / "R" / "o", tmp_path / "R" / "out")  # a prefix of a name is not a parent


def test_an_engine_cache_inside_the_set_is_refused_before_anything_is_built(tmp_path, capsys):
    out = tmp_path / "set"
    code, _, err = run_cli(["distill", "--ipc", "1", "--classes", "0", "--engine", "onnx", "--out", str(out),
                            "--engine-dir", str(out / "engines"), "--no-progress"], capsys)
    assert code == 2 and "the engine cache must lie outside the output folder" in err, err
    assert not out.exists()
    d = make_distiller()
    d.engine_dir = tmp_path / "set2" / "cache"  # as use_engines records it for an engine with files
    with pytest.raises(UserError, match="engine cache must lie outside"):
        d.run(tmp_path / "set2")


# -- train-preset replaces only what it wrote ------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Every refusal of train-preset comes before training; a call that passes them records where it would write."""
    from cao2_fast.presets import train_digits

    calls = []
    monkeypatch.setattr(train_digits, "train_digits", lambda out, **kw: calls.append(out) or {})
    return calls


@pytest.mark.parametrize("foreign", ["vae/my_project/notes.txt", "dit.safetensors", "notes.txt"])
def test_train_preset_refuses_a_folder_holding_what_it_did_not_write(tmp_path, capsys, no_training, foreign):
    out = tmp_path / "mine"
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("precious")
    code, _, err = run_cli(["train-preset", "digits", "--out", str(out), "--quick"], capsys)
    assert code == 2 and "holds files train-preset did not write" in err and no_training == []
    assert (out / foreign).read_text() == "precious"


def test_train_preset_takes_its_own_earlier_folder_and_refuses_what_cannot_be_written(tmp_path, capsys, no_training):
    from cao2_fast.presets.train_digits import OWN_MARKER, prepare_out_dir

    out = tmp_path / "again"
    prepare_out_dir(out)  # as a first run leaves it, with its files
    (out / "dit.safetensors").write_bytes(b"w")
    (out / "vae").mkdir()
    (out / "vae" / "config.json").write_text("{}")
    code, _, err = run_cli(["train-preset", "digits", "--out", str(out), "--quick"], capsys)
    assert code == 0 and no_training == [out] and (out / OWN_MARKER).is_file(), err
    (tmp_path / "file").write_text("a file where a folder would go")
    code, _, err = run_cli(["train-preset", "digits", "--out", str(tmp_path / "file" / "p")], capsys)
    assert code == 2 and "cannot write there" in err and no_training == [out], err


def test_train_preset_never_reaches_the_shipped_preset_through_a_link(tmp_path, capsys, no_training):
    from cao2_fast.pipeline import preset_dir

    (tmp_path / "link").symlink_to(preset_dir("digits"))
    for out in (tmp_path / "link", preset_dir("digits") / "sub"):
        code, _, err = run_cli(["train-preset", "digits", "--out", str(out)], capsys)
        assert code == 2 and "is the shipped preset folder" in err and no_training == []


# -- settings that are not numbers, not finite or cannot fit -------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lam", "inf"], "--lam must be a finite number"),
    (["--guidance", "1e999"], "--guidance must be a finite number"),
    (["--guidance-interval", "0,1e999"], "both noise levels must be finite"),
    (["--lr", "-1"], "--lr must be above 0"),
    (["--sample-steps", "0"], "--sample-steps must be at least 1"),
    (["--sample-steps", "100000"], "takes at most 1000 steps"),
    (["--ipc", "1000000000"], "more than this machine's"),
    (["--k", "99999999999"], "more than this machine's"),
    (["--classes", ""], "--classes is empty"),
    (["--out", ""], "--out is empty"),
])
def test_settings_that_cannot_run_are_one_line_before_any_work(tmp_path, capsys, args, message):
    t0 = time.monotonic()
    code, out, err = run_cli(["distill", "--dry-run", "--out", str(tmp_path / "o"), *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and out == "", err
    assert time.monotonic() - t0 < 60 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(ipc=2.5), "--ipc must be a whole number"),
    (dict(ipc=True), "--ipc must be a whole number"),
    (dict(class_ids=[True]), "class ids must be whole numbers"),
    (dict(class_ids=[]), "the class list is empty"),
    (dict(class_ids="0"), "class ids must be a list of whole numbers"),
    (dict(k=2.5), "k must be a whole number"),
    (dict(seed="x"), "seed must be a whole number"),
    (dict(lr=float("nan")), "--lr must be a finite number"),
    (dict(guidance_scale=float("inf")), "--guidance must be a finite number"),
    (dict(engine="onnx"), "set by Distiller.use_engines"),
])
def test_api_settings_are_checked_like_the_command_line(kwargs, message):
    from cao2_fast.pipeline import Distiller

    with pytest.raises(UserError, match=message):
        Distiller.from_preset("digits", **{"ipc": 1, "class_ids": [0], **kwargs})


def test_api_calls_with_the_wrong_arguments_are_one_line():
    d = make_distiller()
    with pytest.raises(UserError, match="class 5 is not in the config"):
        d.stage1([5])
    with pytest.raises(UserError, match="class ids must be a list of whole numbers"):
        list(d.stream("0"))
    with pytest.raises(UserError, match="--out must be a folder path"):
        d.run(123)


@pytest.mark.parametrize("kind", ["loop", "dangling", "too-long"])
def test_an_out_path_that_cannot_be_a_folder_is_one_line(tmp_path, kind):
    if kind == "loop":
        out = tmp_path / "loop"
        out.symlink_to(out)
    elif kind == "dangling":
        out = tmp_path / "dangling"
        out.symlink_to(tmp_path / "nowhere" / "x")
    else:
        out = tmp_path / ("n" * 300)
    with pytest.raises(UserError) as e:
        make_distiller().run(out / "sub" if kind == "loop" else out)
    assert len(str(e.value).splitlines()) == 1
    assert {"loop": "loop", "dangling": "to nothing", "too-long": "longer than"}[kind] in str(e.value)


def test_the_stage1_tree_of_the_working_directory_is_named_after_it(tmp_path, monkeypatch):
    from cao2_fast.cli.distill import _folders

    monkeypatch.chdir(tmp_path)
    cfg = make_distiller().config
    out, s1 = _folders(cfg, Path("."), None, True, "eager", None)
    assert s1 == tmp_path.parent / f"{tmp_path.name}-stage1"


# -- damaged class markers are redone, not trusted -------------------------------------------------------------------


def test_a_marker_with_a_bad_per_image_field_redoes_its_class(tmp_path, finished, uninterrupted):
    out = tmp_path / "set"
    shutil.copytree(finished, out)
    for name, damage in (("0000", "missing"), ("0004", "wrong type")):
        marker = out / name / ".complete.json"
        part = json.loads(marker.read_text())
        if damage == "missing":
            del part["images"][1]["prob_after"]
        else:
            part["images"][0]["stage2_status"] = 7
        marker.write_text(json.dumps(part))
    d = make_distiller()
    d.run(out)
    assert d.last_run["distilled"] == 2 and snapshot(out) == uninterrupted


# -- one set, one engine's bytes -------------------------------------------------------------------------------------


def test_the_engines_enter_the_fingerprint_and_a_set_of_another_engine_is_refused(tmp_path, finished):
    from cao2_fast.config import with_overrides

    d = make_distiller()
    eager_fp = d.config.fingerprint()
    onnx = with_overrides(d.config, engine="onnx")
    assert onnx.fingerprint() != eager_fp
    assert with_overrides(onnx, engine="eager").fingerprint() == eager_fp  # eager keeps the fingerprint it had
    assert with_overrides(d.config, stage2_engine="compile").fingerprint() != eager_fp
    out = tmp_path / "set"
    shutil.copytree(finished, out)
    other = make_distiller()
    other.config = onnx  # as use_engines("onnx") leaves it (building the engines is not what is tested here)
    with pytest.raises(UserError, match="made with engines stage 1 eager, stage 2 eager, this run uses onnx, eager"):
        other.run(out)


# -- ranks that never come -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR and MASTER_PORT are not"),
])
def test_a_launch_environment_that_cannot_make_a_job_is_one_line(capsys, monkeypatch, env, message):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")  # the command would otherwise set it for this process
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run_cli(["distill", "--dry-run", "--ipc", "1", "--classes", "0"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_rank_whose_rank_0_never_comes_stops_within_its_timeout(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29587",
               OMP_NUM_THREADS="1", CAO2_FAST_NO_PROGRESS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cao2_fast", "distill", "--device", "cpu", "--rank-timeout", "3",
                           "--ipc", "1", "--classes", "0", "--out", str(tmp_path / "o")], env=env, capture_output=True,
                          text=True, timeout=120)
    waited = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: rank 1:"), proc.stderr[-2000:]
    assert "within 3 s" in lines[0] and "frame #" not in proc.stderr and waited < 60
    assert not (tmp_path / "o").exists()


def test_engine_build_never_fails_on_a_cache_miss_before_writing_anything(tmp_path, capsys):
    code, _, err = run_cli(["distill", "--ipc", "1", "--classes", "0", "--engine", "onnx", "--engine-build", "never",
                            "--engine-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o"), "--no-progress"],
                           capsys)
    assert code == 2 and "building is off; fill it first with: cao2-fast export --engine onnx" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_a_rank_reports_the_whole_job_and_its_share(tmp_path):
    from cao2_fast.progress import LogLines

    lines = []
    d = make_distiller()
    d.progress = LogLines(write=lines.append)
    (tmp_path / "o").mkdir()  # rank 0 makes the folder before the ranks meet
    assert d.run(tmp_path / "o", rank=1, world_size=2) is None  # blocks [0, 2] and [4]: rank 1 does [4]
    assert lines[0].startswith("plan: 3 of 3 classes to distill over 2 ranks, 1 of them on rank 1"), lines
