"""Model identity for fingerprints: the SHA-256 of every byte of a weights file, hashed once per file version.

A fingerprint that hashed only part of a checkpoint would let two checkpoints that differ elsewhere share one, and a
resume would then mix their sets. So the whole content is hashed, streamed in 4 MiB blocks. Hashing a 2.7 GB
DiT-XL checkpoint takes seconds, so digests are kept in a small on-disk index keyed by (absolute path, size,
modification time in ns, inode): a file that is replaced or touched is hashed again. The index lives beside the engine
cache (``$CAO2_FAST_CACHE/weights-index.json``, else ``~/.cache/cao2-fast/weights-index.json``); if it cannot be read
or written, digests are simply recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .fileio import atomic_write, json_bytes

BLOCK = 4 << 20
_MEMO: dict[tuple, str] = {}


def index_path() -> Path:
    base = os.environ.get("CAO2_FAST_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "cao2-fast"
    return root / "weights-index.json"


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _read_index() -> dict:
    try:
        data = json.loads(index_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _still_there(skey: str) -> bool:
    try:
        return Path(json.loads(skey)[0]).is_file()
    except (ValueError, TypeError, IndexError):
        return False


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the whole file, from the index when the file is unchanged since it was hashed."""
    path = Path(path)
    key = _key(path)
    if key in _MEMO:
        return _MEMO[key]
    skey = json.dumps(key)
    index = _read_index()
    digest = index.get(skey)
    if not (isinstance(digest, str) and len(digest) == 64):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
        digest = h.hexdigest()
        if _key(path) == key:  # unchanged while it was read: worth remembering
            index = {k: v for k, v in _read_index().items()  # another process may have added entries meanwhile
                     if _still_there(k)}  # entries of deleted files would only pile up
            index[skey] = digest
            try:
                atomic_write(index_path(), json_bytes(index, sort_keys=True))
            except OSError:
                pass  # a read-only home: recompute next time
    _MEMO[key] = digest
    return digest


def weights_id(path: Path) -> dict:
    """Identity of a weights file or folder: its path, total size, and a digest over every file's name, size and
    full-content SHA-256 (in sorted order)."""
    path = Path(path)
    files = sorted(f for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file())
    h = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{size}\0{file_digest(f)}\n".encode())
    return {"path": str(path), "bytes": total, "id": h.hexdigest()[:16]}
