"""Ranks of a class-sharded run (torchrun / accelerate launch): joining the group and a barrier that cannot hang.

A plain barrier waits forever for a rank that died or hangs (a launcher that does not tear the job down, such as
``srun`` or two processes started by hand, leaves the survivors blocked). :func:`bounded_barrier` waits at most
``timeout`` seconds and turns a missing rank into one :class:`~cao2_fast.errors.UserError` line that names it.
Classes written before the stop are complete on disk, so re-running the same command finishes the job.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Callable

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


def bounded_barrier(timeout: float = DEFAULT_TIMEOUT_S) -> Callable[[], None]:
    """A barrier over the default process group that raises a one-line ``UserError`` naming the ranks that did not
    arrive within ``timeout`` seconds. It runs on a gloo group (``monitored_barrier`` needs gloo; with NCCL a side
    group of gloo is made for it), so it needs no device work and reports which ranks are missing."""
    import torch.distributed as dist

    if timeout <= 0:
        raise UserError(f"--rank-timeout must be positive (got {timeout:g})")
    td = timedelta(seconds=timeout)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=td)
    rank = dist.get_rank()

    def barrier() -> None:
        try:
            dist.monitored_barrier(group=group, timeout=td, wait_all_ranks=True)
        except RuntimeError as e:
            raise UserError(_barrier_message(rank, timeout, str(e))) from None

    return barrier


def _barrier_message(rank: int, timeout: float, error: str) -> str:
    m = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", error)
    if m:
        missing = ", ".join(x.strip() for x in m.group(1).split(",") if x.strip())
        return (f"rank {rank}: rank {missing} did not reach the barrier within {timeout:g} s (it stopped or hangs; "
                "see its own error); complete classes are kept, re-run the same command to finish")
    first = error.strip().splitlines()[0][:160] if error.strip() else "no detail"
    return (f"rank {rank}: the barrier failed, another rank stopped ({first}); complete classes are kept, "
            "re-run the same command to finish")
