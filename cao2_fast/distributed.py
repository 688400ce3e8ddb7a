"""Ranks of a class-sharded run (torchrun / accelerate launch): joining the group and a barrier that cannot hang.

A plain barrier waits forever for a rank that died or hangs (a launcher that does not tear the job down, such as
``srun`` or two processes started by hand, leaves the survivors blocked). :class:`BoundedBarrier` waits at most
``timeout`` seconds and turns a missing rank into one :class:`~cao2_fast.errors.UserError` line that names it.
Classes written before the stop are complete on disk, so re-running the same command finishes the job.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

from .errors import UserError

DEFAULT_TIMEOUT_S = 1800.0  # ranks get equal shares of groups, so the last one waits about one group's time


@dataclass(frozen=True)
class Rank:
    """This process's place in a class-sharded job."""

    rank: int
    world: int


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} in the environment is not a whole number (it is set by torchrun / "
                        "accelerate launch)") from None


def world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset)."""
    world = _env_int("WORLD_SIZE")
    return 1 if world is None else world


def launch_env() -> Rank | None:
    """The rank and world size a launcher set (None for a single process), checked before anything waits on them:
    a world without a rank, a rank outside the world, or no rendezvous address are each one line."""
    world = world_size()
    if world < 1:
        raise UserError(f"WORLD_SIZE={world} in the environment: a job has at least one process")
    if world == 1:
        return None
    rank = _env_int("RANK")
    if rank is None:
        raise UserError(f"WORLD_SIZE={world} is set but RANK is not: start the ranks with torchrun or accelerate "
                        "launch (they set both), or unset WORLD_SIZE to run one process")
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks are 0..{world - 1})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UserError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        "not: start the ranks with torchrun or accelerate launch, or set the rendezvous address")
    return Rank(rank, world)


def join(device: str, timeout: float = DEFAULT_TIMEOUT_S) -> Rank | None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) join the default process group (gloo on CPU, NCCL on
    CUDA); else None. The rendezvous is bounded by ``timeout`` seconds: a rank that never comes (rank 0 absent, a
    rank stopped before the rendezvous) ends this process with one line and exit code 2 instead of a wait without
    end. (A watchdog thread does it: the rendezvous is a C++ call that cannot be interrupted.)"""
    me = launch_env()
    if me is None:
        return None
    if not timeout > 0:
        raise UserError(f"--rank-timeout must be positive (got {timeout:g})")
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    backend = "gloo"
    if device == "cuda" or str(device).startswith("cuda"):
        backend = "nccl"
        local = _env_int("LOCAL_RANK")
        torch.cuda.set_device(local if local is not None else me.rank % max(1, torch.cuda.device_count()))
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"

    def give_up() -> None:
        sys.stderr.write(f"error: rank {me.rank}: the {me.world} ranks did not all join within {timeout:g} s "
                         f"(rendezvous at {where}): a rank was not started, stopped, or cannot reach rank 0; complete "
                         "classes are kept, re-run the same command to finish (--rank-timeout sets the bound)\n")
        sys.stderr.flush()
        os._exit(2)

    watchdog = threading.Timer(timeout + 5.0, give_up)  # the rendezvous's own timeout normally ends it first
    watchdog.daemon = True
    watchdog.start()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001  a rendezvous that timed out or could not connect
        raise UserError(f"rank {me.rank}: could not join the other ranks at {where} within {timeout:g} s "
                        f"({type(e).__name__}: {_first_line(e)}); check that every rank was started, or raise "
                        "--rank-timeout") from None
    finally:
        watchdog.cancel()
    return me


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:160] if lines else "no detail"


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
