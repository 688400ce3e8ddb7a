"""Expected failures: bad paths, bad options, bad checkpoints.

A ``UserError`` is turned by the CLI into one line on stderr and exit code 2 (``CAO2_FAST_DEBUG=1`` shows the
traceback). Library callers catch it like any other exception.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """An error the user can fix; its message is the one line they see. A ``ValueError``, so code that already
    handles bad values catches it too."""


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise a one-line ``UserError`` naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file (expected {what})")
    if not p.is_file():
        raise UserError(f"{p}: is not a file (expected {what})")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing directory, else raise a one-line ``UserError`` naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such directory (expected {what})")
    if not p.is_dir():
        raise UserError(f"{p}: is not a directory (expected {what})")
    return p
