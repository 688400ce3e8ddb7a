"""The distilled set's format on disk: an ImageFolder tree plus ``manifest.json`` and ``contact_sheet.png``.

Layout::

    <out>/<class>/<index>.png       the distilled images (what ImageFolder reads)
    <out>/<class>/.complete.json    the class's manifest part (checksums, records, stage-1 thumbnails)
    <out>/manifest.json             merged from the parts when every class is complete
    <out>/contact_sheet.png         one row per class: stage-1 pick beside its stage-2 result
    <out>/.cao2-lock                advisory locks and the config of the runs under way (removed by the run that
                                    completes the set, when no other run is alive)

A class is written into a hidden staging folder (``.cao2-partial-<class>``) and renamed into place once its images
and marker are on disk, so a reader never sees a partial class; every file is written to a temporary name and
renamed. A class counts as complete only if its folder holds exactly the IPC images its marker records, each with
its SHA-256, the marker carries the run's config fingerprint, and nothing else is there.

cao2-fast deletes only what it wrote (see :class:`ClassFolder` and :func:`scan`): a folder holding anything else is
refused before any work, ``--overwrite`` included. Every JSON file is strict JSON (no bare NaN).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..fileio import atomic_write

MARKER = ".complete.json"
MANIFEST = "manifest.json"
CONTACT_SHEET = "contact_sheet.png"
PARTIAL_PREFIX = ".cao2-partial-"
LOCK_FILE = ".cao2-lock"
THUMB_MAX = 64


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] -> uint8 of the same shape, with the released scripts' arithmetic (torchvision
    ``save_image(x, normalize=True, value_range=(-1, 1))``): clamp to [−1, 1], map to [0, 1], ×255, +0.5, clamp to
    [0, 255], truncate — so a value on an exact half rounds up, not to even. Every float-to-byte conversion of an
    image in this package goes through here, so an image held in memory and its PNG carry the same bytes."""
    return ((images.float().clamp(-1, 1) + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [−1, 1] -> (N, H, W, 3) uint8 (:func:`quantize`), as PNG files are written."""
    return quantize(images).permute(0, 2, 3, 1).contiguous().numpy()


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


def dumps(obj) -> bytes:
    """Strict JSON (no bare NaN/Infinity: a non-finite number reaching here is a bug, so it raises)."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()


# -- what is ours --------------------------------------------------------------------------------------------------
#
# cao2-fast deletes only what it wrote: the files a class marker of ours records (and the marker), its own temporary
# names, its hidden staging folders and lock files, the manifest and the contact sheet. Everything else in an output
# folder is foreign, and a folder holding anything foreign is refused before any work, with or without --overwrite.

_ROOT_TMP = re.compile(r"^\.(manifest\.json|contact_sheet\.png)\.\w+\.tmp$")
_CLASS_TMP = re.compile(r"^\.((0|[1-9]\d*)\.png|\.complete\.json)\.\w+\.tmp$")
_INDEX_PNG = re.compile(r"^(0|[1-9]\d*)\.png$")


_INT, _NUM = (int,), (int, float)
PICK_FIELDS = {"class_id": _INT, "candidate_index": _INT, "prob_before": _NUM + (type(None),),
               "stage1_candidate_accuracy": _NUM + (type(None),)}  # a stage-1 pick's record
IMAGE_FIELDS = {**PICK_FIELDS, "prob_after": _NUM + (type(None),), "loss_first": _NUM + (type(None),),
                "loss_last": _NUM + (type(None),), "stage2_steps": _INT, "stage2_status": (str,),
                "stage1_nonfinite_candidates": _INT}  # a distilled image's, plus its generator's ``record_fields``


def records_problem(records: list, fields: dict) -> str | None:
    """Why the per-image records of a marker cannot be used (a field missing or of the wrong type), else None."""
    for i, rec in enumerate(records):
        for key, types in fields.items():
            if key not in rec:
                return f"image {i}: no {key!r}"
            v = rec[key]
            if isinstance(v, bool) or not isinstance(v, types):
                return f"image {i}: {key!r} is {type(v).__name__}"
    return None


def parse_marker(path: Path) -> dict | None:
    """A class marker as written by :func:`write_class`, or None if it is unreadable or malformed."""
    try:
        part = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(part, dict) and isinstance(part.get("fingerprint"), str)
            and isinstance(part.get("class_name"), str) and isinstance(part.get("images"), list)
            and isinstance(part.get("stage1_thumbnails", []), list)):
        return None
    for rec in part["images"]:
        if not (isinstance(rec, dict) and isinstance(rec.get("file"), str) and isinstance(rec.get("sha256"), str)
                and _INDEX_PNG.match(Path(rec["file"]).name) and Path(rec["file"]).parent.name == path.parent.name):
            return None
    return part


@dataclass
class ClassFolder:
    """One class folder (or staging folder) as found on disk."""

    path: Path
    part: dict | None  # the parsed marker; None if absent or damaged
    has_marker: bool
    ours: list[Path]  # files cao2-fast wrote here (safe to delete)
    foreign: list[Path]  # anything else

    @classmethod
    def scan(cls, path: Path, ipc: int | None = None, staging: bool = False) -> "ClassFolder":
        """Sort ``path``'s files. In a staging folder (our hidden name) every index-named image is ours."""
        marker = path / MARKER
        has_marker = marker.is_file()
        part = parse_marker(marker) if has_marker else None
        recorded = {Path(r["file"]).name for r in part["images"]} if part else set()
        ours, foreign = [], []
        for f in sorted(path.iterdir()):
            name = f.name
            if f.is_file() and not f.is_symlink() and (
                    name == MARKER and has_marker or name in recorded or _CLASS_TMP.match(name)
                    or (staging and _INDEX_PNG.match(name))
                    # a damaged marker records nothing readable: its index-named images are still ours
                    or (has_marker and part is None and _INDEX_PNG.match(name) and ipc is not None
                        and int(name.split(".")[0]) < ipc)):
                ours.append(f)
            else:
                foreign.append(f)
        return cls(path, part, has_marker, ours, foreign)

    def problem(self, fingerprint: str, ipc: int, fields: dict = IMAGE_FIELDS) -> str | None:
        """None if the class is complete under ``fingerprint``: an intact marker of this config recording exactly
        ``ipc`` images, each present with its checksum and every per-image field of ``fields`` (of its type), and
        nothing else in the folder. Else what is wrong."""
        if not self.has_marker:
            return "no marker"
        if self.part is None:
            return "damaged marker"
        if self.part["fingerprint"] != fingerprint:
            return "other config"
        if self.part["class_name"] != self.path.name or len(self.part["images"]) != ipc:
            return "marker does not match the class"
        bad = records_problem(self.part["images"], fields)
        if bad is not None:
            return f"damaged marker ({bad})"
        if self.foreign:
            return "foreign files"
        if len(self.ours) != ipc + 1:
            return "extra files"
        for rec in self.part["images"]:
            f = self.path / Path(rec["file"]).name
            if not f.is_file() or sha256(f.read_bytes()) != rec["sha256"]:
                return "image missing or changed"
        return None

    def remove_ours(self) -> None:
        """Delete our files, then the folder if that left it empty."""
        for f in self.ours:
            f.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass


def partial_dir(out: Path, class_name: str) -> Path:
    """The hidden folder a class is written into before it is renamed into place."""
    return out / f"{PARTIAL_PREFIX}{class_name}"


@dataclass
class Scan:
    """An output folder sorted into what is ours and what is not."""

    classes: dict[str, ClassFolder]  # visible class folders of ours (they hold a marker)
    partial: list[ClassFolder]  # hidden staging folders left by an interrupted write
    files: list[Path]  # our root files: manifest, contact sheet, temporaries, locks
    foreign: list[Path]
    manifest_fingerprint: str | None  # None: no manifest; "damaged": ours but unreadable

    def other_fingerprints(self, fingerprint: str, names: set[str]) -> set[str]:
        fps = {c.part["fingerprint"] for c in self.classes.values() if c.part is not None}
        fps |= {"damaged" for n, c in self.classes.items() if c.part is None and n not in names}
        fps |= {"unknown" for c in self.partial if c.path.name[len(PARTIAL_PREFIX):] not in names}
        if self.manifest_fingerprint not in (None, "damaged"):
            fps.add(self.manifest_fingerprint)
        return fps - {fingerprint}


def scan(out: Path, class_names, ipc: int) -> Scan:
    names = set(class_names)
    classes, partial, files, foreign = {}, [], [], []
    manifest_fp = None
    if not out.is_dir():
        return Scan(classes, partial, files, foreign, manifest_fp)
    pending_root = []  # manifest / contact sheet: ours only if the folder holds something else of ours
    for e in sorted(out.iterdir()):
        name = e.name
        if e.is_symlink():
            foreign.append(e)
        elif e.is_dir() and name.startswith(PARTIAL_PREFIX):
            f = ClassFolder.scan(e, ipc, staging=True)
            (partial.append(f) if not f.foreign else foreign.extend(f.foreign))
        elif e.is_dir():
            f = ClassFolder.scan(e, ipc)
            if f.has_marker:
                classes[name] = f
                foreign.extend(f.foreign)
            elif f.foreign or name not in names:
                foreign.extend(f.foreign or [e])  # a folder we did not write (an empty one of our names is harmless)
        elif e.is_file() and (_ROOT_TMP.match(name) or name == LOCK_FILE):
            files.append(e)
        elif e.is_file() and name in (MANIFEST, CONTACT_SHEET):
            pending_root.append(e)
        else:
            foreign.append(e)
    for e in pending_root:
        if e.name == MANIFEST:
            try:
                m = json.loads(e.read_text())
                manifest_fp = m["config"]["fingerprint"] if isinstance(m, dict) else None
                if not isinstance(manifest_fp, str):
                    raise TypeError
            except (OSError, ValueError):  # unreadable: ours (damaged) if the rest of the folder is ours
                manifest_fp = "damaged" if classes else None
            except (KeyError, TypeError):
                manifest_fp = None
            if manifest_fp is None:
                foreign.append(e)
                continue
        elif not (classes or manifest_fp):
            foreign.append(e)
            continue
        files.append(e)
    return Scan(classes, partial, files, foreign, manifest_fp)


def check_out_path(out, what: str = "--out") -> Path:
    """``out`` as a Path a run can create and fill, or one ``UserError`` line: it must be a non-empty path (an empty
    one would silently mean the working directory), not a symbolic link that dangles or loops, with no component
    longer than the file system allows."""
    if not isinstance(out, (str, os.PathLike)):
        raise UserError(f"{what} must be a folder path (got {type(out).__name__})")
    if not str(os.fspath(out)).strip():
        raise UserError(f"{what} is empty: name the output folder (use . for the working directory)")
    out = Path(out).expanduser()
    for p in (out, *out.parents):
        try:
            os.stat(p)
            break
        except FileNotFoundError:
            if p.is_symlink():
                raise UserError(f"{p}: is a symbolic link to nothing (its target {os.readlink(p)} does not exist); "
                                f"pass the real folder as {what}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{p}: symbolic links loop there; pass a real folder as {what}") from None
            if e.errno == errno.ENAMETOOLONG:
                raise UserError(f"{what} {str(out)[:60]}…: a name in it is longer than the file system allows") \
                    from None
            if e.errno != errno.ENOTDIR:
                raise UserError(f"{p}: cannot use it as {what} ({e.strerror or e})") from None
            break
    return out


def check_output_dir(out: Path, fingerprint: str, class_names, ipc: int, overwrite: bool, act: bool = True,
                     engines: dict | None = None) -> Scan:
    """Make ``out`` ready for a run: refuse a folder holding anything cao2-fast did not write, refuse one made with
    another config unless ``overwrite`` (which removes only our files), drop the temporaries an interrupted run
    left, and check the folder is writable. With ``act`` False it only refuses (deletes nothing), so a caller with
    several folders can check them all first. Returns the scan."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    try:
        found = scan(out, class_names, ipc)
    except OSError as e:
        raise UserError(f"{out}: cannot read the output folder ({e.strerror or e})") from None
    if found.foreign:
        shown = ", ".join(str(p.relative_to(out)) for p in found.foreign[:3])
        more = f" and {len(found.foreign) - 3} more" if len(found.foreign) > 3 else ""
        raise UserError(f"{out}: holds files cao2-fast did not write ({shown}{more}); it deletes only its own "
                        f"files, so move them away or choose another --out")
    other = found.other_fingerprints(fingerprint, set(class_names))
    if other and not overwrite:
        made = {json.dumps(c.part.get("engines"), sort_keys=True) for c in found.classes.values()
                if c.part is not None and c.part["fingerprint"] != fingerprint and c.part.get("engines")}
        why = ""
        if engines is not None and made and json.dumps(engines, sort_keys=True) not in made:
            was = json.loads(sorted(made)[0])
            why = (f": it was made with engines stage 1 {was.get('stage1')}, stage 2 {was.get('stage2')}, this run "
                   f"uses {engines.get('stage1')}, {engines.get('stage2')}, and one set holds one engine's bytes")
        raise UserError(f"{out}: holds a distilled set made with a different config (fingerprint "
                        f"{sorted(other)[0]}, this run {fingerprint}){why}; pass --overwrite to replace it or choose "
                        f"another --out")
    parent = out if out.exists() else _existing_parent(out)
    try:  # a real write, not os.access: permissions, read-only mounts and a file in the path all show up here
        fd, probe = tempfile.mkstemp(prefix=".cao2-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: output folder is not writable ({e.strerror or e} at {parent})") from None
    if not act:
        return found
    if other:
        for c in [*found.classes.values(), *found.partial]:
            c.remove_ours()
        for f in found.files:
            if f.name != LOCK_FILE:
                f.unlink(missing_ok=True)
    for f in found.files:  # a temporary left by a process killed mid-write
        if _ROOT_TMP.match(f.name):
            f.unlink(missing_ok=True)
    return found


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


# -- one class ---------------------------------------------------------------------------------------------------


def write_class(out: Path, class_name: str, images: np.ndarray, stage1_images: np.ndarray, records: list[dict],
                fingerprint: str, extra: dict | None = None) -> dict:
    """Write one class: its images and marker go into a hidden staging folder, which is renamed into place once
    complete, so a reader never sees a partial class. A previous attempt of ours at the same class is replaced; a
    class folder holding anything we did not write is refused. On any error our partial files are removed.

    Callers hold the class's lock (:class:`FolderLock`). Returns the class's manifest part."""
    final = out / class_name
    staging = partial_dir(out, class_name)
    out.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        _remove_staging(staging)
    staging.mkdir()
    try:
        for i, (arr, rec) in enumerate(zip(images, records)):
            data = png_bytes(arr)
            atomic_write(staging / f"{i}.png", data)
            rec["file"] = f"{class_name}/{i}.png"
            rec["sha256"] = sha256(data)
        part = {"fingerprint": fingerprint, "class_name": class_name, "images": records,
                "stage1_thumbnails": [thumbnail_b64(a) for a in stage1_images], **(extra or {})}
        atomic_write(staging / MARKER, dumps(part))
        if final.exists():
            old = ClassFolder.scan(final, len(records))
            if old.foreign:
                raise UserError(f"{final}: holds files cao2-fast did not write ({old.foreign[0].name}); move them "
                                "away and re-run")
            old.remove_ours()
        os.rename(staging, final)
        _fsync_dir(out)
    except BaseException:
        if staging.exists():
            _remove_staging(staging)
        raise
    return part


def _remove_staging(staging: Path) -> None:
    left = ClassFolder.scan(staging, staging=True)
    left.remove_ours()
    if left.foreign:
        raise UserError(f"{staging}: holds files cao2-fast did not write ({left.foreign[0].name}); move them away")


def read_complete(out: Path, class_name: str, fingerprint: str, ipc: int, fields: dict = IMAGE_FIELDS) -> dict | None:
    """The class's manifest part if the class is complete under ``fingerprint`` (see :meth:`ClassFolder.problem`;
    ``fields``: the per-image record fields, :data:`IMAGE_FIELDS` for a distilled set, :data:`PICK_FIELDS` for a
    stage-1 tree), else None."""
    folder = out / class_name
    if not folder.is_dir() or folder.is_symlink():
        return None
    try:
        f = ClassFolder.scan(folder, ipc)
        return f.part if f.problem(fingerprint, ipc, fields) is None else None
    except OSError:
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(out: Path, header: dict, parts: list[dict]) -> dict:
    manifest = dict(header)
    manifest["classes"] = [{k: v for k, v in p.items() if k not in ("fingerprint", "stage1_thumbnails")}
                           for p in parts]
    atomic_write(out / MANIFEST, dumps(manifest))
    return manifest
