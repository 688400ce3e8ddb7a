"""cao2-fast convert: WebDataset shards and a Hugging Face dataset, each read back with its own library."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import run_cli
from test_pipeline import make_distiller, snapshot

from cao2_fast.convert import convert


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "set"
    make_distiller().run(out)
    return out, json.loads((out / "manifest.json").read_text())


def expected(out, manifest):
    """(key-ish name, label, png sha256) per image, with ImageFolder's labels."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(out))
    rows = []
    for c in manifest["classes"]:
        for rec in c["images"]:
            rows.append((rec["file"], folder.class_to_idx[c["class_name"]], rec["sha256"]))
    return sorted(rows)


def test_webdataset_round_trip(finished, tmp_path, capsys):
    import webdataset as wds

    out, manifest = finished
    dest = tmp_path / "wds"
    code, stdout, err = run_cli(["convert", str(out), "--to", "webdataset", "--dest", str(dest),
                                 "--shard-size", "4", "--json"], capsys)
    assert code == 0, err
    shards = sorted(str(p) for p in dest.glob("shard-*.tar"))
    assert len(shards) == 2  # 6 images, 4 per shard
    summary = json.loads(stdout)  # --json: what was written, as JSON on stdout
    assert (summary["format"], summary["dest"], summary["images"], summary["classes"]) == \
        ("webdataset", str(dest.resolve()), 6, 3)
    written = [(p.name, p.stat().st_size) for p in sorted(dest.iterdir())]
    assert [(f["path"], f["bytes"]) for f in summary["files"]] == written
    assert summary["fingerprint"] == manifest["config"]["fingerprint"]
    got = []
    for sample in wds.WebDataset(shards, shardshuffle=False):
        rec = json.loads(sample["json"])
        assert sample["__key__"] == f"{rec['class_name']}_{rec['file'].split('/')[1][:-4]}"
        assert int(sample["cls"]) == rec["label"]
        got.append((rec["file"], rec["label"], hashlib.sha256(sample["png"]).hexdigest()))
    assert sorted(got) == expected(out, manifest)


def test_hf_round_trip(finished, tmp_path):
    import datasets

    out, manifest = finished
    dest = convert(out, "hf", tmp_path / "hf")
    ds = datasets.load_from_disk(str(dest))
    assert ds.features["label"].names == ["0000", "0002", "0004"]
    assert isinstance(ds.features["image"], datasets.Image)
    records = {r["file"]: r for c in manifest["classes"] for r in c["images"]}
    # each manifest field a typed column: ints, floats and strings as themselves, not one JSON string
    assert "record" not in ds.features
    types = {k: ds.features[k].dtype for k in ("class_id", "candidate_index", "prob_after", "loss_first", "file",
                                                "sha256", "stage2_status", "stage2_steps", "class_name")}
    assert types == {"class_id": "int64", "candidate_index": "int64", "prob_after": "float64", "loss_first": "float64",
                     "file": "string", "sha256": "string", "stage2_status": "string", "stage2_steps": "int64",
                     "class_name": "string"}
    got = []
    for row in ds.cast_column("image", datasets.Image(decode=False)):
        rec = records[row["file"]]
        assert {k: row[k] for k in rec} == rec and row["class_name"] == rec["file"].split("/")[0]
        got.append((row["file"], row["label"], hashlib.sha256(row["image"]["bytes"]).hexdigest()))
    assert sorted(got) == expected(out, manifest)
    img = ds[0]["image"]  # decodes as a PIL image
    assert img.size == (16, 16)


def test_an_incomplete_folder_is_refused_and_nothing_is_written(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(finished[0], out)
    (out / "0002" / "1.png").write_bytes(b"changed")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["convert", str(out), "--to", "hf"], capsys)
    assert code == 2 and "0002: class is not complete" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    (out / "manifest.json").unlink()
    code, _, err = run_cli(["convert", str(out), "--to", "webdataset"], capsys)
    assert code == 2 and "no manifest.json" in err


def test_an_existing_destination_is_never_overwritten(finished, tmp_path, capsys):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("k")
    code, _, err = run_cli(["convert", str(finished[0]), "--to", "webdataset", "--dest", str(dest)], capsys)
    assert code == 2 and "already exists" in err and (dest / "keep.txt").read_text() == "k"
    code, _, err = run_cli(["convert", str(finished[0]), "--to", "hf", "--dest", str(finished[0] / "x")], capsys)
    assert code == 2 and "must lie outside the set" in err


def test_a_missing_optional_library_is_one_line_with_the_install_command(finished, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    code, _, err = run_cli(["convert", str(finished[0]), "--to", "hf"], capsys)
    assert code == 2 and 'pip install "cao2-fast[hf]"' in err


def test_record_columns_are_typed_with_none_where_missing():
    from cao2_fast.convert import record_columns

    cols = record_columns([{"a": 1, "b": 0.5, "c": "x", "d": True, "e": [1, 2], "label": 3},
                           {"a": None, "b": 2, "c": None, "d": False}], taken={"label"})
    assert cols == {"a": ("int64", [1, None]), "b": ("float64", [0.5, 2.0]), "c": ("string", ["x", None]),
                    "d": ("bool", [True, False]), "e": ("string", ["[1, 2]", None]),
                    "record_label": ("int64", [3, None])}


def test_info_lists_the_packages_convert_can_use(tmp_path, capsys):
    import importlib.util

    code, out, _ = run_cli(["info", "--json", "--engine-dir", str(tmp_path)], capsys)
    assert code == 0
    optional = json.loads(out)["optional"]
    assert {m: optional[m] for m in ("webdataset", "datasets")} == \
        {m: importlib.util.find_spec(m) is not None for m in ("webdataset", "datasets")}
    code, out, _ = run_cli(["info", "--engine-dir", str(tmp_path)], capsys)
    line = next(x for x in out.splitlines() if x.startswith("optional"))
    assert "webdataset " in line and "datasets " in line
