"""Ranks of a class-sharded run (torchrun / accelerate launch): joining the group and a barrier that cannot hang.

A plain barrier waits forever for a rank that died or hangs (a launcher that does not tear the job down, such as
``srun`` or two processes started by hand, leaves the survivors blocked). :class:`BoundedBarrier` waits at most
``timeout`` seconds and turns a missing rank into one :class:`~cao2_fast.errors.UserError` line that names it.
Classes written before the stop are complete on disk, so re-running the same command finishes the job.
"""

from __future__ import annotations

import os
import time

from .errors import UserError

DEFAULT_TIMEOUT_S = 1800.0  # ranks get equal shares of groups, so the last one waits about one group's time


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join(device: str):
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) join the process group through accelerate; else None."""
    if world_size() <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


class BoundedBarrier:
    """A barrier over the ranks of the default process group that waits at most ``timeout`` seconds.

    Each rank marks its arrival in the group's key-value store (hosted by rank 0's launcher store) and polls for
    the others', so a missing rank is known by number: the barrier raises one ``UserError`` line naming the ranks
    that did not arrive. A rank that stops on an error calls :meth:`fail` first; the others then stop at once with
    its reason instead of waiting out the timeout. It needs no device work and no collective, so it works the same
    over gloo and NCCL."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, poll: float = 0.1):
        import torch.distributed as dist

        if not timeout > 0:
            raise UserError(f"--rank-timeout must be positive (got {timeout:g})")
        self.timeout, self.poll = timeout, poll
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.calls = 0

    def _key(self, what: str, rank: int) -> str:
        return f"cao2-fast/{what}/{rank}"

    def fail(self, reason: str) -> None:
        """Tell the other ranks this one is stopping (best effort: the store may be gone already)."""
        try:
            self.store.set(self._key("failed", self.rank), reason.splitlines()[0][:300] if reason else "stopped")
        except Exception:  # noqa: BLE001  (nothing more to do for a rank that is stopping anyway)
            pass

    def __call__(self) -> None:
        self.calls += 1
        arrived = self._key(f"barrier-{self.calls}", self.rank)
        deadline = time.monotonic() + self.timeout
        try:
            self.store.set(arrived, "1")
            while True:
                failed = [r for r in range(self.world) if r != self.rank
                          and self.store.check([self._key("failed", r)])]
                if failed:
                    why = self.store.get(self._key("failed", failed[0])).decode(errors="replace")
                    raise UserError(f"rank {self.rank}: rank {failed[0]} stopped ({why}); complete classes are "
                                    "kept, re-run the same command to finish")
                missing = [r for r in range(self.world) if not self.store.check([self._key(f"barrier-{self.calls}", r)])]
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise UserError(f"rank {self.rank}: rank {', '.join(map(str, missing))} did not reach the "
                                    f"barrier within {self.timeout:g} s (it stopped or hangs); complete classes are "
                                    "kept, re-run the same command to finish")
                time.sleep(self.poll)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  the store itself is gone: rank 0, which hosts it, stopped
            raise UserError(f"rank {self.rank}: lost contact with rank 0, which hosts the job's store "
                            f"({type(e).__name__}); complete classes are kept, re-run the same command to finish") \
                from None
