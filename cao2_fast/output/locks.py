"""Advisory locks on an output folder: runs of one config share its classes; a run of another config is refused
while one is alive (:func:`claim`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from .folder import LOCK_FILE


CLAIM_BYTE = 1 << 30  # byte ranges of the lock file beyond every class index: the folder's claim ...
LIVE_BYTE = CLAIM_BYTE + 1  # ... and the runs alive on it (each holds a shared lock on this byte)


class FolderLock:
    """Advisory locks on one output folder, so that runs on the same folder share the work and never mix configs.

    One lock file per folder (``.cao2-lock``); POSIX record locks (``lockf``) on its bytes:

    * class i of the config is byte i: a class is written under its byte's exclusive lock, so two runs of one config
      do different classes instead of both doing each;
    * every run alive on the folder holds a shared lock on :data:`LIVE_BYTE`, and the file's content names the
      config fingerprint those runs write. :func:`claim` reads and sets both under the exclusive lock on
      :data:`CLAIM_BYTE`, so the check "which config owns this folder" and the claim are one step: a run of another
      config is refused while a run is alive, and the folder is prepared (refusals, ``--overwrite``'s deletions)
      only by a run that holds the claim.

    Record locks belong to the process and closing any descriptor of the file drops them all, so a run keeps this
    one descriptor open until :meth:`close`. The file is removed only by :meth:`retire`, under the claim lock and when
    no other run is alive; a run that opened it before that notices (:meth:`begin_claim`) and opens the new one.
    Where ``fcntl`` is missing (not POSIX), locking is a no-op."""

    def __init__(self, out: Path, class_names):
        self.root = out
        self.path = out / LOCK_FILE
        self.index = {n: i for i, n in enumerate(class_names)}
        try:
            import fcntl
        except ImportError:
            self.fcntl, self.fh = None, None
            return
        self.fcntl = fcntl
        self.fh = open(self.path, "a+")

    def _lock(self, cmd: int, start: int, wait: bool = False) -> bool:
        flags = cmd if wait or cmd == self.fcntl.LOCK_UN else cmd | self.fcntl.LOCK_NB
        try:
            self.fcntl.lockf(self.fh, flags, 1, start)
        except OSError:
            return False
        return True

    def try_acquire(self, names) -> bool:
        """Lock every class of ``names`` without waiting; all or none."""
        if self.fh is None:
            return True
        taken = []
        for name in names:
            if not self._lock(self.fcntl.LOCK_EX, self.index[name]):
                self.release(taken)
                return False
            taken.append(name)
        return True

    def release(self, names) -> None:
        if self.fh is None:
            return
        for name in names:
            self._lock(self.fcntl.LOCK_UN, self.index[name])

    # -- the folder's claim (see claim()) --

    def begin_claim(self) -> None:
        """Take the claim lock, waiting for another run's claim step (a moment); reopen the lock file if a run that
        finished the set removed it meanwhile."""
        if self.fh is None:
            return
        while True:
            self._lock(self.fcntl.LOCK_EX, CLAIM_BYTE, wait=True)
            try:
                same = os.path.samestat(os.fstat(self.fh.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return
            self.fh.close()
            self.fh = open(self.path, "a+")

    def end_claim(self) -> None:
        if self.fh is not None:
            self._lock(self.fcntl.LOCK_UN, CLAIM_BYTE)

    def others_alive(self) -> bool:
        """Whether another run holds the folder (call under the claim lock). When none does, this run keeps the live
        byte exclusively until :meth:`go_live` shares it."""
        return self.fh is not None and not self._lock(self.fcntl.LOCK_EX, LIVE_BYTE)

    def recorded(self) -> str | None:
        """The fingerprint the folder's live runs write (None if unreadable)."""
        if self.fh is None:
            return None
        self.fh.seek(0)
        try:
            value = json.loads(self.fh.read() or "null")
        except ValueError:
            return None
        return value.get("fingerprint") if isinstance(value, dict) else None

    def go_live(self, fingerprint: str) -> None:
        """Record ``fingerprint`` as the folder's config and hold the live byte shared, as every live run does."""
        if self.fh is None:
            return
        if self.recorded() != fingerprint:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.write(json.dumps({"fingerprint": fingerprint}))
            self.fh.flush()
        self._lock(self.fcntl.LOCK_SH, LIVE_BYTE, wait=True)

    def retire(self) -> None:
        """The set is complete: remove the lock file if no other run is alive (it would still be waiting on it)."""
        if self.fh is None:
            return
        self.begin_claim()
        try:
            if self._lock(self.fcntl.LOCK_EX, LIVE_BYTE):
                self.path.unlink(missing_ok=True)
        finally:
            self.end_claim()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def claim(locks: list[FolderLock], fingerprint: str, prepare=None) -> None:
    """Make this run one of the runs writing ``fingerprint`` into the folders of ``locks`` (the set and, with
    ``--save-stage1``, its stage-1 tree), or refuse: while a run of another config is alive on one of them, this run
    stops with one line, ``--overwrite`` included. ``prepare(lock, alone)`` is called for each folder while all the
    claim locks are held (``alone``: no other run is alive there, so deleting our files of another config cannot pull
    them from under a live run). Claim locks are taken in the order of the folders' paths, so two runs that share
    two folders cannot wait on each other."""
    ordered = sorted(locks, key=lambda lock: str(lock.path))
    for lock in ordered:
        lock.begin_claim()
    try:
        alone = {}
        for lock in locks:
            alone[id(lock)] = not lock.others_alive()
            other = None if alone[id(lock)] else lock.recorded()
            if other is not None and other != fingerprint:
                raise UserError(f"{lock.root}: another cao2-fast run is writing a distilled set of a different config "
                                f"there (fingerprint {other}, this run {fingerprint}); wait for it to finish, or choose "
                                "another --out (--overwrite does not replace a set while its run is alive)")
        if prepare is not None:
            for lock in locks:
                prepare(lock, alone[id(lock)])
        for lock in locks:
            lock.go_live(fingerprint)
    finally:
        for lock in ordered:
            lock.end_claim()
