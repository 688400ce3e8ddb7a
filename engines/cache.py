"""The on-disk engine cache: one folder per artefact, keyed by everything that changes it.

An entry is ``<root>/<model>-<kind>-<key>/`` holding the artefact files and ``meta.json``. The key hashes the
fields the backend passes (weights digest, input-shape profile, precision, build settings, library versions, GPU
name and compute capability where the artefact depends on them). An entry is built in a temporary folder beside it,
its ``meta.json`` (sizes and sha256 of every file, the key and its fields) is written last, and the folder is moved
into place with one ``os.replace``: a reader never sees a half-written entry under the final name.

Before use, an entry is checked against its metadata (key, fields, sizes, checksums) and loaded; one that fails
any of these is reported in one warning line, deleted and rebuilt, never used. With ``build=False`` (offline use)
nothing is built, deleted or rebuilt: a missing or broken entry is one ``UserError`` saying how to fill the cache.

The root is cao2-fast's own folder: whatever sits at an entry's exact name and is not a sound entry (a broken
folder, a plain file, a dangling link) is replaced by the rebuilt entry; a link is removed, never what it points to. A disk that fills up during a build is one
``UserError`` naming the cache folder; the half-built entry is removed and nothing appears under the final name.

Root: ``--engine-dir``, else ``$CAO2_FAST_CACHE/engines``, else ``~/.cache/cao2-fast/engines``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import UserError
from ..fileio import atomic_write, json_bytes

log = logging.getLogger("cao2_fast.engines")

ENV = "CAO2_FAST_CACHE"
META = "meta.json"
FORMAT = 1
T = TypeVar("T")


def default_root() -> Path:
    base = os.environ.get(ENV)
    return Path(base).expanduser() / "engines" if base else Path.home() / ".cache" / "cao2-fast" / "engines"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def listed_files(meta) -> dict | None:
    """The ``files`` table of an entry's metadata, ``{name: {"bytes", "sha256"}}``; None when it is missing, empty
    or not such a table (an incomplete or edited entry)."""
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    for name, info in files.items():
        if not (isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", "..")
                and isinstance(info, dict) and isinstance(info.get("bytes"), int)
                and isinstance(info.get("sha256"), str)):
            return None
    return files


def files_table_problem(meta) -> str | None:
    """Why an entry's metadata has no usable ``files`` table (see :func:`listed_files`), or None."""
    if listed_files(meta) is not None:
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    return "lists no files" if not files else "lists its files without their sizes and checksums"


def file_problem(folder: Path, name: str, info: dict, checksum: bool = True) -> str | None:
    """Why ``folder/name`` is not the file recorded as ``info`` (``{"bytes", "sha256"}``), or None."""
    f = folder / name
    if not f.is_file():
        return f"{name} is missing"
    size = f.stat().st_size
    if size != info.get("bytes"):
        return f"{name} has {size} bytes, meta.json says {info.get('bytes')} (truncated or overwritten)"
    if checksum and file_sha256(f) != info.get("sha256"):
        return f"{name} does not match its checksum"
    return None


def no_space(e: BaseException | None) -> OSError | None:
    """The out-of-space ``OSError`` (ENOSPC, EDQUOT) behind ``e``, following its causes (and the exception it was
    raised while handling, unless ``from None`` hid it); None if there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


def normalise(fields: dict) -> dict:
    """``fields`` as they read back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


@dataclass
class CacheEntry:
    path: Path
    meta: dict
    hit: bool  # True: found complete in the cache; False: built now

    def file(self, name: str) -> Path:
        return self.path / name


class EngineCache:
    """Get-or-build of cached artefacts under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    @staticmethod
    def key(fields: dict) -> str:
        return hashlib.sha256(json.dumps(normalise(fields), sort_keys=True).encode()).hexdigest()

    def entry_path(self, kind: str, model: str, key: str) -> Path:
        return self.root / f"{model}-{kind}-{key[:20]}"

    def lookup(self, kind: str, model: str, fields: dict) -> tuple[Path, str | None]:
        """The entry's path and why it cannot be used (None: usable; ``"absent"``: never built)."""
        key = self.key(fields)
        path = self.entry_path(kind, model, key)
        if not path.exists():
            return path, "absent"
        return path, self.problem(path, key, fields)

    def problem(self, path: Path, key: str, fields: dict) -> str | None:
        if not path.is_dir():
            return "not an entry folder (a file or a dangling link of the entry's name)"
        meta_file = path / META
        if not meta_file.is_file():
            return "incomplete entry (no meta.json)"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            return f"unreadable meta.json ({type(e).__name__})"
        if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("fields") != normalise(fields):
            return "meta.json does not match the entry's key"
        files = listed_files(meta)
        if files is None:
            return f"meta.json {files_table_problem(meta)}"
        for name, info in files.items():
            bad = file_problem(path, name, info)
            if bad:
                return bad
        return None

    def get_or_build(self, kind: str, model: str, fields: dict, build: Callable[[Path], dict | None],
                     load: Callable[[CacheEntry], T],
                     refuse: Callable[[Path, str], BaseException] | None = None) -> tuple[T, CacheEntry]:
        """Load the entry for ``fields``, or build it with ``build(folder)`` (which writes the artefact files into
        ``folder`` and returns extra metadata) and load that. A broken entry is reported, deleted and rebuilt.

        ``refuse(path, why)``: never build; when the entry is absent (``why`` is ``"absent"``) or would have to be
        rebuilt, raise what it returns and leave the cache as it is."""
        path, problem = self.lookup(kind, model, fields)
        if problem is None:
            entry = CacheEntry(path, json.loads((path / META).read_text()), hit=True)
            try:
                return load(entry), entry
            except UserError:  # the environment, not the entry (e.g. a runtime without its CUDA provider)
                raise
            except Exception as e:
                problem = f"cannot be loaded ({type(e).__name__}: {_first_line(e)})"
        if refuse is not None:
            raise refuse(path, problem)
        if problem != "absent":
            log.warning("engine cache: %s: %s; rebuilding it", path, problem)
            remove(path)
        entry = self._build(kind, model, fields, path, build)
        return load(entry), entry

    def _out_of_space(self, model: str, kind: str) -> UserError:
        return UserError(f"the engine cache at {self.root} ran out of space while building the {model} {kind} "
                         f"engine; free space there, or pass --engine-dir with a folder on a disk with room (or set "
                         f"{ENV})")

    def _build(self, kind: str, model: str, fields: dict, path: Path, build: Callable[[Path], dict | None]) -> CacheEntry:
        key = self.key(fields)
        try:  # the only place the cache writes to its root: a bad --engine-dir shows up here, before any export
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.root))
        except OSError as e:
            if no_space(e):
                raise self._out_of_space(model, kind) from None
            what = "is a file, not a folder" if self.root.is_file() or isinstance(e, FileExistsError) else \
                f"is not writable ({e.strerror or e})"
            raise UserError(f"{self.root}: engine cache folder {what}; pass --engine-dir with a writable folder "
                            f"(or set {ENV})") from None
        tmp.chmod(0o755)  # mkdtemp makes it private; entries are shared like any cache file
        try:
            t0 = time.perf_counter()
            extra = build(tmp) or {}
            seconds = time.perf_counter() - t0
            files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
                     for f in sorted(tmp.iterdir()) if f.is_file()}
            meta = {"format": FORMAT, "kind": kind, "model": model, "key": key, "fields": normalise(fields),
                    "files": files, "build_seconds": round(seconds, 3),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **normalise(extra)}
            atomic_write(tmp / META, json_bytes(meta, sort_keys=True))
            try:
                os.replace(tmp, path)
            except OSError:  # a concurrent builder put a complete entry there first: keep theirs if it is sound
                if self.problem(path, key, fields) is None:
                    remove(tmp)
                    meta = json.loads((path / META).read_text())
                else:
                    remove(path)
                    try:
                        os.replace(tmp, path)
                    except OSError as e:
                        if no_space(e):
                            raise
                        raise UserError(f"{path}: cannot replace what is there with the rebuilt engine "
                                        f"({e.strerror or e}); delete it by hand, or pass --engine-dir with another "
                                        "folder") from None
        except BaseException as e:
            remove(tmp)
            if no_space(e):
                raise self._out_of_space(model, kind) from None
            raise
        return CacheEntry(path, meta, hit=False)

    def entries(self) -> list[dict]:
        """Every entry under the root with its kind, model, size and state; sizes are checked, checksums are not
        (use it for listing; loading checks everything)."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            row = {"name": d.name, "path": str(d), "bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file())}
            try:
                meta = json.loads((d / META).read_text())
                files = listed_files(meta)
                bad = [f"meta.json {files_table_problem(meta)}"] if files is None else [
                    p for n, i in files.items() if (p := file_problem(d, n, i, checksum=False))]
                row.update(kind=meta["kind"], model=meta["model"], created=meta.get("created"),
                           build_seconds=meta.get("build_seconds"), state="broken: " + bad[0] if bad else "ok")
                for k in ("exporter", "precision"):
                    if k in meta or k in meta["fields"]:
                        row[k] = meta.get(k, meta["fields"].get(k))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                row["state"] = "incomplete (no readable meta.json)"
            out.append(row)
        return out


def never_build(cache: EngineCache, model: str, engine: str, options: str = ""):
    """The ``refuse`` of :meth:`EngineCache.get_or_build` when building is off: one line naming the model, the cache
    folder and the ``cao2-fast export`` command that fills it (``options``: what else it must be given)."""
    import shlex

    def refuse(path: Path, why: str) -> UserError:
        state = "not built yet" if why == "absent" else f"its entry {path.name} would have to be rebuilt: {why}"
        return UserError(f"the engine cache at {cache.root} has no {engine} engine for the {model} model with these "
                         f"weights and options ({state}) and building is off; fill it first with: cao2-fast export "
                         f"--engine {engine} --engine-dir {shlex.quote(str(cache.root))}{options} and the same models "
                         "(--preset, or --dit/--vae/--classifier) and --recipe")
    return refuse


def remove(path: Path) -> None:
    """Delete an entry folder, or whatever else sits at its name (a file or a link: the link, not its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else ""
