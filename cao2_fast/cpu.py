"""CPU process settings for the stage loops.

A batched stage-2 step allocates and frees tens of megabytes of activations. glibc hands blocks that large back to
the kernel on ``free`` and maps them afresh on the next ``malloc``, so every step pays a page fault per 4 KiB it
touches first — on a virtual machine about 2 µs each, which made fresh-output ops 5–10× slower than in-place ones
here. :func:`keep_freed_memory` raises glibc's mmap and trim thresholds so freed blocks stay in the heap and are
reused. It is process-wide, so only the command-line entry points call it, never the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_TRIM = 1 << 30

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB in the process (glibc only; elsewhere a no-op). Returns whether it took."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
    return _done
