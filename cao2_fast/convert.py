"""A finished output folder in the formats data pipelines load: WebDataset tar shards, a Hugging Face dataset.

Both read the folder's ``manifest.json`` and refuse a folder that is not a complete cao2-fast set (every class
complete, checksums intact). Labels follow ``torchvision.datasets.ImageFolder``: the index of the class folder's name
in sorted order, so all three readers agree; the DiT class id and the whole per-image record travel along.

* WebDataset: ``shard-000000.tar`` … with, per image, ``<key>.png`` (the PNG bytes as written, not re-encoded),
  ``<key>.cls`` (the label as text) and ``<key>.json`` (the manifest record plus ``label`` and ``class_name``);
  ``__key__`` is ``<class folder>_<index>``. Needs ``pip install "cao2-fast[webdataset]"``.
* Hugging Face ``datasets``: ``save_to_disk`` of a Dataset with ``image`` (``Image``), ``label`` (``ClassLabel`` with
  the class folder names), ``class_id`` and ``record`` (the JSON record as text). Needs
  ``pip install "cao2-fast[hf]"``.

The destination is built in a hidden folder beside it and renamed into place when complete; an existing
destination is refused, never overwritten.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import output
from .errors import UserError, require_dir

FORMATS = {"webdataset": ("webdataset", "webdataset"), "hf": ("datasets", "hf")}  # format -> (module, pip extra)


def read_set(out: Path) -> tuple[dict, list[dict]]:
    """(manifest, samples) of a complete output folder; each sample has path, label, class_name, record."""
    out = require_dir(out, "a cao2-fast output folder (with manifest.json)")
    try:
        manifest = json.loads((out / output.MANIFEST).read_text())
        fp, ipc = manifest["config"]["fingerprint"], manifest["config"]["ipc"]
        classes = manifest["classes"]
    except FileNotFoundError:
        raise UserError(f"{out}: no manifest.json, so not a finished cao2-fast set (re-run distill to finish it)") \
            from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{out / output.MANIFEST}: unreadable; re-run the same distill command to rebuild it") from None
    names = sorted(c["class_name"] for c in classes)
    samples = []
    for c in classes:
        part = output.read_complete(out, c["class_name"], fp, ipc)
        if part is None:
            raise UserError(f"{out / c['class_name']}: class is not complete or its files changed; re-run the same "
                            "distill command to finish it")
        for rec in part["images"]:
            samples.append({"path": out / rec["file"], "label": names.index(c["class_name"]),
                            "class_name": c["class_name"], "record": rec})
    return manifest, samples


def _require(fmt: str) -> None:
    module, extra = FORMATS[fmt]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--to {fmt} needs the {module} package: pip install \"cao2-fast[{extra}]\"")


def _key(class_name: str, index: int) -> str:
    # WebDataset splits a sample's files at the first dot of the base name: keep keys free of dots and slashes
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', class_name)}_{index}"


def convert(out: str | Path, to: str, dest: str | Path | None = None, shard_size: int = 10_000) -> Path:
    """Convert the complete set in ``out`` to ``to`` ("webdataset" or "hf") at ``dest`` (default: ``OUT-<to>``
    beside ``out``). Returns the destination."""
    if to not in FORMATS:
        raise UserError(f"unknown format {to!r}: choose one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1 (got {shard_size})")
    _require(to)
    out = Path(out)
    manifest, samples = read_set(out)
    dest = Path(dest) if dest is not None else out.parent / f"{out.name}-{to}"
    a, b = out.absolute(), dest.absolute()
    if a == b or a in b.parents:
        raise UserError(f"{dest}: the destination must lie outside the set {out} (it must stay an ImageFolder)")
    if dest.exists():
        raise UserError(f"{dest}: already exists; choose another --dest or move it away (nothing is overwritten)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        (_webdataset if to == "webdataset" else _hf)(manifest, samples, tmp, shard_size)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own hidden build folder
        raise
    return dest


def _record(s: dict) -> dict:
    return {**s["record"], "label": s["label"], "class_name": s["class_name"]}


def _webdataset(manifest: dict, samples: list[dict], tmp: Path, shard_size: int) -> None:
    import webdataset as wds

    with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for s in samples:
            i = int(Path(s["record"]["file"]).stem)
            sink.write({"__key__": _key(s["class_name"], i), "png": s["path"].read_bytes(),
                        "cls": str(s["label"]).encode(), "json": json.dumps(_record(s), sort_keys=True).encode()})


def _hf(manifest: dict, samples: list[dict], tmp: Path, shard_size: int) -> None:
    import datasets

    names = sorted({s["class_name"] for s in samples})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names),
                                  "class_id": datasets.Value("int64"), "record": datasets.Value("string")})
    data = {"image": [{"bytes": s["path"].read_bytes(), "path": None} for s in samples],
            "label": [s["label"] for s in samples],
            "class_id": [s["record"]["class_id"] for s in samples],
            "record": [json.dumps(_record(s), sort_keys=True) for s in samples]}
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.info.description = f"cao2-fast distilled set, config fingerprint {manifest['config']['fingerprint']}"
    ds.save_to_disk(str(tmp))
