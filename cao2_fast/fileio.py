"""Atomic file writes shared by the output folder, the engine cache, the benchmarks and the preset trainer."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, give it ``mode`` (mkstemp's 0600 would
    make shared outputs unreadable to others), then rename it into place. A reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_none(obj, where: str = "", found: list[str] | None = None):
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by None; the JSON paths replaced are appended to
    ``found``. Strict JSON readers reject bare NaN, which ``json.dumps`` writes by default."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(where or "$")
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def json_bytes(obj, status_key: str | None = None, **kw) -> bytes:
    """Strict JSON of ``obj`` (``allow_nan=False``): non-finite numbers become null, and when ``status_key`` is given
    and ``obj`` is a dict, the paths that were nulled are listed under it so a reader knows why."""
    found: list[str] = []
    clean = finite_or_none(obj, found=found)
    if found and status_key and isinstance(clean, dict):
        clean[status_key] = "non-finite values written as null: " + ", ".join(found[:20])
    kw.setdefault("indent", 1)
    return json.dumps(clean, allow_nan=False, **kw).encode()


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Render a matplotlib figure to PNG, close it, and write it atomically."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _anchors(path: Path) -> list[tuple[tuple[int, int], tuple[str, ...]]]:
    """For each existing folder on ``path`` (itself included): its (device, inode) and the rest of the path below it."""
    parts = path.parts
    out = []
    for i in range(len(parts), 0, -1):
        try:
            st = os.stat(Path(*parts[:i]))
        except OSError:
            continue
        out.append(((st.st_dev, st.st_ino), parts[i:]))
    return out


def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are the same folder or one lies inside the other, however they are spelled: paths are
    compared resolved (``..`` and symbolic links followed), and through the device and inode of every existing folder
    on them, so a bind mount of a parent is caught too. Neither needs to exist."""
    ra, rb = Path(os.path.abspath(a)).resolve(), Path(os.path.abspath(b)).resolve()
    if ra == rb or ra in rb.parents or rb in ra.parents:
        return True
    ia, ib = _anchors(ra), _anchors(rb)
    for id_a, rest_a in ia:
        for id_b, rest_b in ib:
            if id_a == id_b:
                n = min(len(rest_a), len(rest_b))
                if rest_a[:n] == rest_b[:n]:
                    return True
    return False
