"""The distilled set on disk: an ImageFolder tree plus ``manifest.json`` and ``contact_sheet.png``.

Layout::

    <out>/<class>/<index>.png       the distilled images (what ImageFolder reads)
    <out>/<class>/.complete.json    the class's manifest part; written last, it marks the class complete
    <out>/manifest.json             merged from the parts when every class is complete
    <out>/contact_sheet.png         one row per class: stage-1 pick beside its stage-2 result

Every file is written to a temporary name in the same folder and renamed into place, so a reader (or a re-run after a
crash) never sees half a file. A class counts as complete only if its marker exists, carries the run's config
fingerprint, and every image's SHA-256 matches.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .fileio import atomic_write

MARKER = ".complete.json"
MANIFEST = "manifest.json"
CONTACT_SHEET = "contact_sheet.png"
THUMB_MAX = 64


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [−1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def thumbnail_b64(arr: np.ndarray) -> str:
    img = Image.fromarray(arr)
    if max(img.size) > THUMB_MAX:
        img = img.resize((THUMB_MAX, THUMB_MAX), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_class(out: Path, class_name: str, images: np.ndarray, stage1_images: np.ndarray, records: list[dict],
                fingerprint: str) -> None:
    """Write one class's images, then its marker (with checksums and stage-1 thumbnails for the contact sheet)."""
    folder = out / class_name
    clear_class(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (arr, rec) in enumerate(zip(images, records)):
        data = png_bytes(arr)
        atomic_write(folder / f"{i}.png", data)
        rec["file"] = f"{class_name}/{i}.png"
        rec["sha256"] = sha256(data)
    part = {
        "fingerprint": fingerprint,
        "class_name": class_name,
        "images": records,
        "stage1_thumbnails": [thumbnail_b64(a) for a in stage1_images],
    }
    atomic_write(folder / MARKER, json.dumps(part, indent=1, sort_keys=True).encode())


def clear_class(folder: Path) -> None:
    """Remove what a previous, incomplete attempt left in a class folder."""
    if folder.is_dir():
        shutil.rmtree(folder)


def read_complete(out: Path, class_name: str, fingerprint: str) -> dict | None:
    """The class's manifest part if the class is complete under ``fingerprint`` with intact files, else None."""
    marker = out / class_name / MARKER
    try:
        part = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if part.get("fingerprint") != fingerprint:
        return None
    for rec in part.get("images", []):
        f = out / rec["file"]
        if not f.is_file() or sha256(f.read_bytes()) != rec["sha256"]:
            return None
    return part


def foreign_fingerprint(out: Path, fingerprint: str) -> str | None:
    """A fingerprint other than ``fingerprint`` found in the folder's manifest or class markers, if any."""
    if not out.is_dir():
        return None
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            fp = json.loads(manifest.read_text())["config"]["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            fp = "unreadable"
        if fp != fingerprint:
            return fp
    for marker in out.glob(f"*/{MARKER}"):
        try:
            fp = json.loads(marker.read_text()).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a damaged marker only makes its class incomplete
        if fp != fingerprint:
            return fp
    return None


def check_output_dir(out: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse to mix into a folder made with a different config (unless ``overwrite``), and check it is writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    other = foreign_fingerprint(out, fingerprint)
    if other is not None:
        if not overwrite:
            raise UserError(f"{out}: holds a distilled set made with a different config (fingerprint {other}, this run "
                            f"{fingerprint}); pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    for stale in out.glob(".*.tmp") if out.is_dir() else []:  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    parent = out if out.exists() else _existing_parent(out)
    try:  # a real write, not os.access: permissions, read-only mounts and a file in the path all show up here
        fd, probe = tempfile.mkstemp(prefix=".cao2-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: output folder is not writable ({e.strerror or e} at {parent})") from None


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def contact_sheet(parts: list[dict], out: Path, per_row: int = 8) -> None:
    """One row per class: for up to ``per_row`` images, the stage-1 pick and, right of it, its stage-2 result."""
    if not parts:
        return
    rows = []
    for part in parts:
        pairs = []
        for rec, thumb in list(zip(part["images"], part["stage1_thumbnails"]))[:per_row]:
            before = Image.open(io.BytesIO(base64.b64decode(thumb))).convert("RGB")
            after = Image.open(out / rec["file"]).convert("RGB")
            pairs.append((before, after))
        rows.append(pairs)
    side = max(max(a.size[0] for pair in r for a in pair) for r in rows if r)
    scale = max(1, 64 // side)
    cell = side * scale
    gap, pair_gap = 2, 8
    width = max(len(r) for r in rows) * (2 * cell + gap + pair_gap) + pair_gap
    height = len(rows) * (cell + gap) + gap
    sheet = Image.new("RGB", (width, height), (40, 40, 40))
    for r, pairs in enumerate(rows):
        x = pair_gap
        for before, after in pairs:
            for img in (before, after):
                img = img.resize((cell, cell), Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
                sheet.paste(img, (x, gap + r * (cell + gap)))
                x += cell + gap
            x += pair_gap - gap
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(out / CONTACT_SHEET, buf.getvalue())


def write_manifest(out: Path, header: dict, parts: list[dict]) -> dict:
    manifest = dict(header)
    manifest["classes"] = [{"class_name": p["class_name"], "images": p["images"]} for p in parts]
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest
