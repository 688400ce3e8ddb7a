"""Expected failures: bad paths, bad options, bad checkpoints.

A ``UserError`` is turned by the CLI into one line on stderr and exit code 2 (``CAO2_FAST_DEBUG=1`` shows the
traceback). Library callers catch it like any other exception.
"""

from __future__ import annotations

import stat
from pathlib import Path


class UserError(ValueError):
    """An error the user can fix; its message is the one line they see. A ``ValueError``, so code that already
    handles bad values catches it too."""


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing regular file, else raise a one-line ``UserError`` naming it.

    Only regular files pass: a FIFO, socket or device would block or stream without end when opened, so it is
    refused before anything opens it."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{p}: no such file (expected {what})") from None
    except OSError as e:  # a loop of links, a component that is a file, no permission to look
        raise UserError(f"{p}: cannot be read ({e.strerror or type(e).__name__}; expected {what})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{p}: is a directory (expected {what})")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{p}: is not a regular file (expected {what})")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing directory, else raise a one-line ``UserError`` naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such directory (expected {what})")
    if not p.is_dir():
        raise UserError(f"{p}: is not a directory (expected {what})")
    return p
