"""A finished output folder in the formats data pipelines load: WebDataset tar shards, a Hugging Face dataset.

Both read the folder's ``manifest.json`` and refuse a folder that is not a complete cao2-fast set: every class of
the config listed once in the manifest (an edited, trimmed list is refused, and so is a class folder of the set on
disk that the manifest leaves out), the config matching its fingerprint, class names that are plain folder names,
every class complete with its checksums intact (checked again as each image is read). Labels follow
``torchvision.datasets.ImageFolder``: the index of the class folder's name in sorted order, so all three readers
agree; the DiT class id and the whole per-image record travel along.

* WebDataset: ``shard-000000.tar`` … with, per image, ``<key>.png`` (the PNG bytes as written, not re-encoded),
  ``<key>.cls`` (the label as text) and ``<key>.json`` (the manifest record plus ``label`` and ``class_name``);
  ``__key__`` is ``<class folder>_<index>``. Needs ``pip install "cao2-fast[webdataset]"``.
* Hugging Face ``datasets``: ``save_to_disk`` of a Dataset with ``image`` (``Image``), ``label`` (``ClassLabel`` with
  the class folder names), ``class_name``, ``class_id``, and each field of the image's manifest record as a typed
  column (``int64``, ``float64``, ``bool`` or ``string``; null where a record lacks the field or holds no value;
  a field holding lists or objects is its JSON text). Needs ``pip install "cao2-fast[hf]"``.

The destination is built in a hidden folder beside it and renamed into place when complete (never over anything
that appeared there meanwhile); an existing destination is refused, never overwritten, and a failed write (a full
disk, a read-only folder) removes the hidden folder and leaves nothing at the destination's name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import output
from .errors import UserError, require_dir
from .fileio import overlaps

FORMATS = {"webdataset": ("webdataset", "webdataset"), "hf": ("datasets", "hf")}  # format -> (module, pip extra)


def _plain_name(name) -> bool:
    """Whether ``name`` can only be a class folder directly inside the set: one visible path component."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name and not os.path.isabs(name))


def _load_manifest(out: Path) -> tuple[dict, dict, list[str]]:
    """(manifest, its config, the class names it lists), or a one-line refusal."""
    path = out / output.MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
        config = manifest["config"]
        listed = [c["class_name"] for c in manifest["classes"]]
        if not (isinstance(config["fingerprint"], str) and isinstance(config["ipc"], int)
                and isinstance(config["class_names"], list)):
            raise TypeError
    except FileNotFoundError:
        raise UserError(f"{out}: no manifest.json, so not a finished cao2-fast set (re-run distill to finish it)") \
            from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: unreadable; re-run the same distill command to rebuild it") from None
    return manifest, config, listed


def _config_fingerprint(config: dict) -> str | None:
    """The fingerprint the recorded config has when rebuilt, or None where it cannot be rebuilt (a config written
    by another version): then only the checks against the class markers on disk apply."""
    from .config import DistillConfig, Recipe

    try:
        d = {k: v for k, v in config.items() if k != "fingerprint"}
        d["recipe"] = Recipe(**d["recipe"])
        return DistillConfig(**d).fingerprint()
    except Exception:  # noqa: BLE001  any field this version does not know: not a verdict on the set
        return None


def _check_classes(out: Path, config: dict, listed: list[str]) -> None:
    """Refuse a manifest whose class list is not its config's, a config that does not match its fingerprint, class
    names that are not plain folder names, and a class folder of this set on disk that the manifest leaves out."""
    fp, names = config["fingerprint"], config["class_names"]
    where = out / output.MANIFEST
    bad = next((n for n in [*names, *listed] if not _plain_name(n)), None)
    if bad is not None:
        raise UserError(f"{where}: class name {bad!r} is not a plain folder name (no '/', '..', leading '.' or "
                        "absolute path); the manifest was edited, re-run distill to rebuild it")
    if len(set(listed)) != len(listed) or sorted(listed) != sorted(names):
        missing = sorted(set(names) - set(listed))
        extra = sorted(set(listed) - set(names))
        detail = (f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "") + \
                 ("; " if missing and extra else "") + (f"{len(extra)} not in the config ({', '.join(extra[:3])})"
                                                        if extra else "") or "a class listed twice"
        raise UserError(f"{where}: lists {len(listed)} classes but its config has {len(names)}: {detail}; refusing "
                        "to export a partial set, re-run the same distill command to rebuild the manifest")
    ids = config.get("class_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(names)):
        raise UserError(f"{where}: the config's class_ids and class_names differ in length; the manifest was edited")
    rebuilt = _config_fingerprint(config)
    if rebuilt is not None and rebuilt != fp:
        raise UserError(f"{where}: its config does not match its fingerprint {fp} (it reads as {rebuilt}); the "
                        "manifest was edited, re-run the same distill command to rebuild it")
    try:
        folders = sorted(e.name for e in os.scandir(out) if e.is_dir(follow_symlinks=False)
                         and not e.name.startswith("."))  # staging folders of an interrupted run are hidden
    except OSError as e:
        raise UserError(f"{out}: cannot list the set ({e.strerror or e})") from None
    for name in folders:
        part = output.parse_marker(out / name / output.MARKER) if name not in names else None
        if part is not None and part["fingerprint"] == fp:
            raise UserError(f"{out / name}: a class of this set (its marker carries fingerprint {fp}) that "
                            f"manifest.json does not list; refusing to export a partial set")


def read_set(out: Path) -> tuple[dict, list[dict]]:
    """(manifest, samples) of a complete output folder; each sample has path, label, class_name, record (see the
    module's checks)."""
    out = require_dir(out, "a cao2-fast output folder (with manifest.json)")
    manifest, config, listed = _load_manifest(out)
    _check_classes(out, config, listed)
    fp, ipc = config["fingerprint"], config["ipc"]
    ids = dict(zip(config["class_names"], config.get("class_ids") or []))
    names = sorted(listed)
    samples = []
    for name in listed:
        part = output.read_complete(out, name, fp, ipc)
        if part is None:
            raise UserError(f"{out / name}: class is not complete or its files changed; re-run the same "
                            "distill command to finish it")
        for rec in part["images"]:
            file = Path(rec["file"]).name
            if rec["file"] != f"{name}/{file}" or (name in ids and rec.get("class_id") != ids[name]):
                raise UserError(f"{out / name / output.MARKER}: a record names another class ({rec['file']}, "
                                f"class id {rec.get('class_id')}); re-run the same distill command to redo the class")
            samples.append({"path": out / name / file, "label": names.index(name), "class_name": name,
                            "record": rec})
    return manifest, samples


def _png(s: dict) -> bytes:
    """The sample's PNG bytes, checked against its recorded SHA-256 as they are read."""
    data = s["path"].read_bytes()
    if hashlib.sha256(data).hexdigest() != s["record"]["sha256"]:
        raise UserError(f"{s['path']}: changed while the set was being converted; re-run the same distill command "
                        "to repair the class, then convert again")
    return data


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
    return Path(convert_set(out, to, dest, shard_size)["dest"])


def convert_set(out: str | Path, to: str, dest: str | Path | None = None, shard_size: int = 10_000) -> dict:
    """:func:`convert`, returning a summary of what it wrote: format, source and destination, fingerprint, classes,
    images, and every file written with its size."""
    if to not in FORMATS:
        raise UserError(f"unknown format {to!r}: choose one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1 (got {shard_size})")
    _require(to)
    out = Path(out).expanduser()
    manifest, samples = read_set(out)
    dest = Path(dest).expanduser() if dest is not None else out.parent / f"{out.name}-{to}"
    if overlaps(dest, out):
        raise UserError(f"{dest}: the destination must lie outside the set {out} (it must stay an ImageFolder)")
    if os.path.lexists(dest):
        raise UserError(f"{dest}: already exists; choose another --dest or move it away (nothing is overwritten)")
    made = [d for d in (dest.parent, *dest.parent.parents) if not os.path.lexists(d)]  # folders this call creates
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    except OSError as e:
        _remove_empty(made)
        raise UserError(f"{dest}: cannot write there ({e.strerror or e})") from None
    try:
        (_webdataset if to == "webdataset" else _hf)(manifest, samples, tmp, shard_size)
        files = sorted((str(p.relative_to(tmp)), p.stat().st_size) for p in tmp.rglob("*") if p.is_file())
        os.chmod(tmp, 0o755)
        _rename_new(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # our own hidden build folder
        _remove_empty(made)
        if isinstance(e, OSError):
            raise UserError(f"{dest}: cannot write the {to} set ({e.strerror or e}); nothing was left there") \
                from None
        raise
    return {"format": to, "source": str(out.resolve()), "dest": str(dest.resolve()),
            "fingerprint": manifest["config"]["fingerprint"], "classes": len({s["class_name"] for s in samples}),
            "images": len(samples), "bytes": sum(n for _, n in files),
            "files": [{"path": f, "bytes": n} for f, n in files]}


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed conversion created on the way to its destination (deepest first), each only
    if still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a
    check just before a plain rename). Something there is a one-line refusal."""
    taken = UserError(f"{dst}: appeared while the set was being converted; nothing is overwritten, convert again "
                      "to another --dest")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise taken
        if err not in (errno.EINVAL, errno.ENOSYS):  # a file system without the flag: the plain way below
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise taken
    os.rename(src, dst)


def _record(s: dict) -> dict:
    return {**s["record"], "label": s["label"], "class_name": s["class_name"]}


def _webdataset(manifest: dict, samples: list[dict], tmp: Path, shard_size: int) -> None:
    import webdataset as wds

    with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for s in samples:
            i = int(Path(s["record"]["file"]).stem)
            sink.write({"__key__": _key(s["class_name"], i), "png": _png(s),
                        "cls": str(s["label"]).encode(), "json": json.dumps(_record(s), sort_keys=True).encode()})


def _column(values: list) -> tuple[str, list]:
    """A record field as an Arrow column: (value type, values), None kept as null. Integers alone are int64, numbers
    float64, booleans bool, text string; lists, objects and mixed kinds their JSON text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return "bool", values
    if kinds and kinds <= {int}:
        return "int64", values
    if kinds and kinds <= {int, float}:
        return "float64", [None if v is None else float(v) for v in values]
    if kinds <= {str}:
        return "string", values
    return "string", [None if v is None else json.dumps(v, sort_keys=True) for v in values]


def record_columns(records: list[dict], taken=()) -> dict[str, tuple[str, list]]:
    """The manifest records as typed columns (see :func:`_column`), one per field any record has, None where a
    record lacks it; a field whose name is in ``taken`` gets the prefix ``record_``."""
    keys = sorted({k for r in records for k in r})
    return {(f"record_{k}" if k in taken else k): _column([r.get(k) for r in records]) for k in keys}


def _hf(manifest: dict, samples: list[dict], tmp: Path, shard_size: int) -> None:
    import datasets

    names = sorted({s["class_name"] for s in samples})
    fixed = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names),
             "class_name": datasets.Value("string"), "class_id": datasets.Value("int64")}
    data = {"image": [{"bytes": _png(s), "path": None} for s in samples], "label": [s["label"] for s in samples],
            "class_name": [s["class_name"] for s in samples],
            "class_id": [s["record"].get("class_id") for s in samples]}
    columns = record_columns([{k: v for k, v in s["record"].items() if k != "class_id"} for s in samples], set(fixed))
    features = datasets.Features({**fixed, **{k: datasets.Value(t) for k, (t, _) in columns.items()}})
    data.update({k: v for k, (_, v) in columns.items()})
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.info.description = f"cao2-fast distilled set, config fingerprint {manifest['config']['fingerprint']}"
    ds.save_to_disk(str(tmp))
