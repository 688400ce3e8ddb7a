"""The distilled set on disk, and the runner that writes one.

* :mod:`.folder` — the format: the ImageFolder tree, class markers with checksums, ``manifest.json``, what counts as
  complete, what is cao2-fast's to delete, the pixel quantisation every image goes through.
* :mod:`.locks` — runs on one folder: class locks, and the claim that keeps two configs from mixing in it.
* :mod:`.sheet` — the contact sheet.
* :mod:`.run` — :func:`write_set`: a Distiller's classes into a resumable, shardable folder.
"""

from .folder import (CONTACT_SHEET, IMAGE_FIELDS, LOCK_FILE, MANIFEST, MARKER, PARTIAL_PREFIX, PICK_FIELDS,
                     ClassFolder, Scan, check_out_path, check_output_dir, dumps, parse_marker, partial_dir, png_bytes,
                     quantize, read_complete, records_problem, scan, sha256, thumbnail_b64, to_uint8, write_class,
                     write_manifest)
from .locks import CLAIM_BYTE, LIVE_BYTE, FolderLock, claim
from .run import check_folders, versions, write_set
from .sheet import SHEET_CLASSES, SHEET_PER_LINE, _difference_gain, contact_sheet

__all__ = ["CONTACT_SHEET", "IMAGE_FIELDS", "LOCK_FILE", "MANIFEST", "MARKER", "PARTIAL_PREFIX", "PICK_FIELDS",
           "ClassFolder", "Scan", "check_out_path", "check_output_dir", "dumps", "parse_marker", "partial_dir",
           "png_bytes", "quantize", "read_complete", "records_problem", "scan", "sha256", "thumbnail_b64", "to_uint8",
           "write_class", "write_manifest", "CLAIM_BYTE", "LIVE_BYTE", "FolderLock", "claim", "check_folders",
           "versions", "write_set", "SHEET_CLASSES", "SHEET_PER_LINE", "_difference_gain", "contact_sheet"]
