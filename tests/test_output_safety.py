"""The output folder never loses a user's files and never passes off a wrong set as complete (tiny random models).

cao2-fast may delete only what it wrote: files recorded in its class markers, its markers, manifest, contact sheet,
temporaries, staging folders and lock file. Everything else makes the run stop before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from cao2_fast import output
from cao2_fast.errors import UserError

from test_pipeline import make_distiller, snapshot


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    d = make_distiller()
    d.run(out)
    return d, out, snapshot(out)


def test_a_class_folder_we_did_not_write_is_refused_and_kept(tmp_path):
    out = tmp_path / "X"
    (out / "0000").mkdir(parents=True)
    (out / "0000" / "precious.jpg").write_bytes(b"p")
    with pytest.raises(UserError, match=r"did not write \(0000/precious.jpg\)"):
        make_distiller().run(out)
    with pytest.raises(UserError, match="did not write"):  # --overwrite does not change that
        make_distiller().run(out, overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == ["0000", "precious.jpg"]


def test_a_class_folder_without_our_marker_is_foreign_even_with_our_names(tmp_path):
    out = tmp_path / "X"
    (out / "0002").mkdir(parents=True)
    (out / "0002" / "0.png").write_bytes(b"someone's image")
    with pytest.raises(UserError, match="0002/0.png"):
        make_distiller().run(out)
    assert (out / "0002" / "0.png").read_bytes() == b"someone's image"


@pytest.mark.parametrize("name", ["notes.txt", "photos"])
def test_unknown_entries_beside_the_set_are_refused(tmp_path, name):
    out = tmp_path / "X"
    out.mkdir()
    (out / name).mkdir() if name == "photos" else (out / name).write_text("mine")
    with pytest.raises(UserError, match=f"did not write \\({name}\\)"):
        make_distiller().run(out)
    assert (out / name).exists()


def test_overwrite_removes_only_our_files(reference, tmp_path):
    _, ref, _ = reference
    out = tmp_path / "Y"
    make_distiller(seed=5).run(out)
    with pytest.raises(UserError, match="different config"):
        make_distiller().run(out)
    make_distiller().run(out, overwrite=True)
    assert snapshot(out) == reference[2]


def test_overwrite_refuses_a_foreign_manifest_and_deletes_nothing(tmp_path):
    out = tmp_path / "Y"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "a.jpg").write_bytes(b"a")
    (out / "manifest.json").write_text(json.dumps({"name": "someone else's manifest"}))
    before = snapshot(out)
    with pytest.raises(UserError, match="did not write"):
        make_distiller().run(out, overwrite=True)
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", [b'{"config": {"finger', b"", b"\xff\xfe"])
def test_a_damaged_manifest_of_ours_is_rebuilt_without_redoing_classes(reference, tmp_path, damage):
    _, _, ref = reference
    out = tmp_path / "Z"
    d = make_distiller()
    d.run(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}
    (out / "manifest.json").write_bytes(damage)
    d.run(out)
    assert d.last_run == {"distilled": 0, "already_complete": 3}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")} == mtimes
    assert snapshot(out) == ref


@pytest.mark.parametrize("marker", [b"[]", b"null", b'{"fingerprint": "x"}', b'{"images": [], "class_name": "0002"',
                                    b"\x00\x01"])
def test_a_damaged_marker_makes_its_class_redone(reference, tmp_path, marker):
    _, _, ref = reference
    out = tmp_path / "M"
    d = make_distiller()
    d.run(out)
    (out / "0002" / ".complete.json").write_bytes(marker)
    d.run(out)
    assert snapshot(out) == ref
    assert d.last_run["distilled"] == 1


def test_a_marker_recording_no_images_is_not_complete(reference, tmp_path):
    _, _, ref = reference
    out = tmp_path / "E"
    d = make_distiller()
    d.run(out)
    marker = out / "0004" / ".complete.json"
    part = json.loads(marker.read_text())
    for rec in part["images"]:
        (out / rec["file"]).unlink()
    part["images"] = []
    marker.write_text(json.dumps(part))
    assert output.read_complete(out, "0004", d.config.fingerprint(), 2) is None
    d.run(out)
    assert snapshot(out) == ref


def test_an_extra_image_in_a_finished_class_is_refused_not_counted(reference, tmp_path):
    out = tmp_path / "C"
    d = make_distiller()
    d.run(out)
    (out / "0002" / "7.png").write_bytes((out / "0002" / "0.png").read_bytes())
    assert output.read_complete(out, "0002", d.config.fingerprint(), 2) is None
    with pytest.raises(UserError, match="0002/7.png"):
        d.run(out)
    assert (out / "0002" / "7.png").is_file()


def test_a_stale_temporary_of_ours_in_a_class_is_cleaned_by_redoing_it(reference, tmp_path):
    _, _, ref = reference
    out = tmp_path / "T"
    d = make_distiller()
    d.run(out)
    (out / "0000" / ".1.png.abc123.tmp").write_bytes(b"half")
    d.run(out)
    assert snapshot(out) == ref


def test_a_class_that_fails_to_write_leaves_nothing_visible_and_no_staging(tmp_path, monkeypatch):
    out = tmp_path / "F"
    d = make_distiller(stage1_batch=4)
    real = output.folder.atomic_write

    def failing(path, data):
        if path.name == "1.png" and "0002" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(output.folder, "atomic_write", failing)
    with pytest.raises(UserError, match="No space left"):
        d.run(out)
    assert sorted(p.name for p in out.iterdir()) == [".cao2-lock", "0000"]


def test_the_lock_makes_a_second_run_wait_for_the_classes_another_holds(tmp_path):
    """A helper process holds class 0002's lock; the run does the other groups, waits, then finishes it."""
    make_distiller(stage1_batch=4).run(tmp_path / "free")
    ref = snapshot(tmp_path / "free")
    out = tmp_path / "L"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX, 1, 1); print('held', flush=True);"
         " sys.stdin.read()", str(out / ".cao2-lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        logs = []

        def log(msg):
            logs.append(msg)
            if "waiting" in msg:
                assert (out / "0004").is_dir() and not (out / "0002").exists()  # free groups went first
                threading.Timer(0.2, holder.stdin.close).start()

        d = make_distiller(stage1_batch=4)  # one class per group: 0000, 0002, 0004
        d.run(out, log=log)
    finally:
        holder.kill()
        holder.wait()
    assert any("another cao2-fast run is working on classes 0002" in m for m in logs)
    assert snapshot(out) == ref


def test_all_json_we_write_is_strict(reference):
    _, out, _ = reference
    for f in [out / "manifest.json", *out.glob("*/.complete.json")]:
        json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"{f} holds {c}"))
    with pytest.raises(ValueError):
        output.dumps({"x": float("nan")})


def strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def test_one_nan_in_the_dit_weights_fails_every_class_and_writes_nothing(tmp_path):
    d = make_distiller()
    with torch.no_grad():
        d.generator.dit.final_layer.linear.weight[0, 0] = float("nan")
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"class 0 \(0000\): only 0 of 4 stage-1 candidates are finite .*"
                                        r"\(and 2 more classes\)"):
        d.run(out)
    assert not [p for p in out.rglob("*") if p.name != ".cao2-lock"]  # no black PNGs, no manifest


def test_a_class_without_enough_finite_candidates_fails_alone(tmp_path):
    """Class 0002's candidates all turn NaN in the classifier: 0000 and 0004 are written, 0002 is reported."""
    d = make_distiller(stage1_batch=4)  # one class per group
    real = d.classify
    calls = {"n": 0}

    def poisoned(images):
        calls["n"] += 1
        logits = real(images)
        return logits * float("nan") if calls["n"] == 3 else logits  # calls per group: stage-1 scores, final scores

    d.classify = poisoned
    out = tmp_path / "one"
    with pytest.raises(UserError, match=r"^class 2 \(0002\): only 0 of 4 .* re-run the same command"):
        d.run(out)
    assert sorted(p.name for p in out.iterdir()) == [".cao2-lock", "0000", "0004"]
    for marker in out.glob("*/.complete.json"):
        strict_json(marker)


def test_non_finite_candidates_are_never_kept_and_are_counted(tmp_path):
    d = make_distiller(class_ids=(1,), k=3)  # 6 candidates, 2 kept
    real = d.classify
    first = {"done": False}

    def poisoned(images):
        logits = real(images)
        if not first["done"]:  # stage-1 scoring: candidates 0 and 3 become NaN
            first["done"] = True
            logits = logits.clone()
            logits[[0, 3]] = float("nan")
        return logits

    d.classify = poisoned
    manifest = d.run(tmp_path / "some")
    recs = manifest["classes"][0]["images"]
    assert {r["candidate_index"] for r in recs}.isdisjoint({0, 3})
    assert all(r["stage1_nonfinite_candidates"] == 2 for r in recs)
    assert all(r["prob_before"] is not None for r in recs)
    strict_json(tmp_path / "some" / "manifest.json")


@pytest.mark.parametrize("valid,expect", [
    ([True] * 6, None),
    ([False, True, True, False, True, True], "subset"),
])
def test_select_skips_invalid_candidates_under_every_rule(valid, expect):
    from cao2_fast.selection import select

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 3, generator=g), 1)
    valid = torch.tensor(valid)
    for rule in ("confident", "el2n", "random"):
        keep = select(probs, 1, 3, rule, "desc", torch.Generator().manual_seed(1), valid=valid)
        assert len(keep) == 3 and len(set(keep.tolist())) == 3
        assert all(bool(valid[i]) for i in keep), (rule, keep)
        if expect is None:
            assert keep.tolist() == select(probs, 1, 3, rule, "desc", torch.Generator().manual_seed(1)).tolist()


def test_save_stage1_writes_the_picks_as_their_own_imagefolder_beside_the_set(reference, tmp_path):
    from torchvision.datasets import ImageFolder

    _, _, ref = reference
    out, s1 = tmp_path / "set", tmp_path / "set-stage1"
    d = make_distiller()
    manifest = d.run(out, stage1_out=s1)
    assert snapshot(out)["0000/0.png"] == ref["0000/0.png"]  # the main set does not change
    assert sorted(p.name for p in out.iterdir()) == ["0000", "0002", "0004", "contact_sheet.png", "manifest.json"]
    ds = ImageFolder(str(s1))
    assert ds.classes == ["0000", "0002", "0004"] and len(ds) == 6
    assert manifest["stage1_folder"] == "../set-stage1"
    s1_manifest = json.loads((s1 / "manifest.json").read_text())
    assert s1_manifest["main_folder"] == "../set"
    picks = [r["candidate_index"] for c in s1_manifest["classes"] for r in c["images"]]
    assert picks == [r["candidate_index"] for c in manifest["classes"] for r in c["images"]]
    # each stage-1 PNG is the pick the main set's contact sheet shows before stage 2
    import base64
    import io

    from PIL import Image

    part = json.loads((out / "0002" / ".complete.json").read_text())
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(part["stage1_thumbnails"][1]))))
    assert (np.asarray(Image.open(s1 / "0002" / "1.png")) == thumb).all()


def test_save_stage1_added_later_fills_the_stage1_tree_without_rewriting_the_set(tmp_path):
    out, s1 = tmp_path / "set", tmp_path / "picks"
    make_distiller().run(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}
    d = make_distiller()
    d.run(out, stage1_out=s1)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")} == mtimes
    assert len(list(s1.glob("*/*.png"))) == 6 and d.last_run["distilled"] == 3


@pytest.mark.parametrize("where", ["inside", "same", "around"])
def test_the_stage1_tree_never_lies_inside_the_set(tmp_path, where):
    out = tmp_path / "set"
    s1 = {"inside": out / "stage1", "same": out, "around": tmp_path}[where]
    with pytest.raises(UserError, match="must lie beside --out"):
        make_distiller().run(out, stage1_out=s1)
    assert not out.exists()


def test_json_bytes_writes_non_finite_numbers_as_null_with_a_status():
    from cao2_fast.fileio import json_bytes

    data = json.loads(json_bytes({"acc": float("nan"), "runs": [1.5, float("-inf")], "ok": 2}, status_key="status"))
    assert data == {"acc": None, "runs": [1.5, None], "ok": 2,
                    "status": "non-finite values written as null: acc, runs[1]"}
    assert json.loads(json_bytes({"x": 1.0}, status_key="status")) == {"x": 1.0}  # no status when all is finite
