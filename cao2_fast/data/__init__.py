"""Distilled classes as a PyTorch dataset, for data pipelines that consume them without a folder on disk.

:class:`DistilledClasses` is an ``IterableDataset`` over :meth:`cao2_fast.pipeline.Distiller.stream`: each item is
one class, as :meth:`cao2_fast.pipeline.ClassOutput.as_item` gives it (a dict of tensors, ints and strings that
torch's default collate takes). A class is always computed inside its config block
(:meth:`~cao2_fast.pipeline.Distiller.blocks`), so its images are the bytes the CLI writes, whatever the split.

Splitting (see :meth:`DistilledClasses.shares`): under ``torch.distributed`` every rank yields the same number of
items, at least one, so the collectives of a training step line up and nothing hangs. Whole blocks are dealt
round-robin over the ranks when that gives every rank the same number of classes; otherwise the classes (in config
order) are cut into equal contiguous slices, the last ones padded by wrapping around to the first classes exactly
as ``torch.utils.data.DistributedSampler`` (``drop_last=False``) pads. Then a few classes appear twice in an epoch
(on different ranks), and a block that straddles two ranks is computed on both (each yields only its own classes
of it). Inside a rank, its classes grouped by block are dealt round-robin over the ``DataLoader`` workers, so no
block is computed twice by one rank.

On CPU the bytes hold at equal thread counts: a ``DataLoader`` worker runs torch on one thread, and some CPU kernels
(oneDNN's 1×1 convolutions, say) round differently with the thread count, which can move a pixel by one grey level.

(This package also ships the ImageNet class lists in ``imagenet/``.)
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import pickle
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError


class DistilledClasses(IterableDataset):
    """Distill ``class_ids`` (default: all of the config's) and yield one item per class (see
    :meth:`~cao2_fast.pipeline.ClassOutput.as_item`), each rank its share (:meth:`shares`).

    distiller: a ready :class:`~cao2_fast.pipeline.Distiller`, or a zero-argument callable that builds one, called
        once in each process that needs it (a ``fork`` worker shares one built before it started). Worker
        processes started by ``spawn`` or ``forkserver`` (the default on macOS, and what CUDA in workers needs)
        receive it pickled, so it must be picklable: a lambda or a local function is not. :meth:`from_preset`
        builds a picklable one; so does ``functools.partial(Distiller.from_paths, ...)``. A ready Distiller is
        pickled whole (its models) for such workers; a factory is cheaper.
    class_ids: a subset of the config's classes; they are yielded in config order, each once per epoch (except
        for the padding described in :meth:`shares`).
    rank, world_size: this process's place in a distributed job; default: from ``torch.distributed`` when it is
        initialised, else a single process. Under torchrun (``WORLD_SIZE`` > 1 in the environment) with no
        process group and neither given, iterating is one ``UserError``: every rank would compute every class.

    An item is a class (IPC images), so give the ``DataLoader`` ``batch_size=None`` (or 1). With a larger batch
    size and workers, each worker batches its own items, and ranks can end up with different numbers of batches
    even though they yield the same number of items. A class that fails (see ``Distiller.run``) cannot be an item:
    reaching it raises one ``UserError`` naming it and why.
    """

    def __init__(self, distiller, class_ids: list[int] | None = None, rank: int | None = None,
                 world_size: int | None = None):
        from ..pipeline import Distiller

        super().__init__()
        if isinstance(distiller, Distiller):
            self._factory, self._made = None, distiller
        elif callable(distiller):
            self._factory, self._made = distiller, None
        else:
            raise UserError(f"DistilledClasses needs a Distiller or a zero-argument callable that returns one "
                            f"(got {type(distiller).__name__})")
        self.class_ids = None if class_ids is None else _class_list(class_ids)
        for name, v in (("rank", rank), ("world_size", world_size)):
            if v is not None and not _is_int(v):
                raise UserError(f"{name} must be a whole number (got {v!r})")
        if (rank is None) != (world_size is None):
            raise UserError("give both rank and world_size, or neither")
        if world_size is not None and world_size < 1:
            raise UserError(f"world_size must be at least 1 (got {world_size})")
        if world_size is not None and not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.rank = None if rank is None else int(rank)
        self.world_size = None if world_size is None else int(world_size)
        self._launcher: tuple[int, int] | None = None  # the process group's (rank, world) when sent to a worker

    @classmethod
    def from_preset(cls, name: str = "digits", *, class_ids: list[int] | None = None, rank: int | None = None,
                    world_size: int | None = None, **distiller_kwargs) -> "DistilledClasses":
        """The dataset of an embedded preset, with a picklable factory (fine under every worker start method):
        ``functools.partial(Distiller.from_preset, name, **distiller_kwargs)``. ``class_ids`` picks classes of the
        preset's config; to change the config's own class list (and so its blocks), pass
        ``functools.partial(Distiller.from_preset, name, class_ids=[...])`` to the constructor instead."""
        from ..pipeline import Distiller, read_preset

        read_preset(name)  # an unknown preset is one line here, not in every worker
        return cls(functools.partial(Distiller.from_preset, name, **distiller_kwargs), class_ids=class_ids,
                   rank=rank, world_size=world_size)

    def distiller(self):
        """The Distiller (built on first use in each process; a factory builds it there)."""
        if self._made is None:
            from ..pipeline import Distiller

            made = self._factory()
            if not isinstance(made, Distiller):
                raise UserError(f"the distiller factory returned {type(made).__name__}, not a Distiller")
            self._made = made
        return self._made

    def __getstate__(self) -> dict:
        """Sent to a worker process (``spawn``/``forkserver``): a factory goes without the models it built here,
        and the rank of an initialised process group goes along (the worker has no process group)."""
        state = self.__dict__.copy()
        if self._factory is not None:
            state["_made"] = None
            try:
                pickle.dumps(self._factory)
            except Exception as e:  # noqa: BLE001  (pickle raises several types for the same problem)
                what = getattr(self._factory, "__qualname__", type(self._factory).__name__)
                raise UserError(f"the distiller factory {what} cannot be pickled ({type(e).__name__}), and worker "
                                "processes started by spawn or forkserver need it: use DistilledClasses.from_preset"
                                "(...) or a functools.partial of a module-level function") from None
        if self.world_size is None and self._launcher is None:
            state["_launcher"] = _process_group()
        return state

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        if self._launcher is not None:
            return self._launcher
        group = _process_group()
        if group is not None:
            return group
        env = os.environ.get("WORLD_SIZE", "").strip()
        if env.isdigit() and int(env) > 1:
            raise UserError(f"WORLD_SIZE={env} but torch.distributed is not initialised: call "
                            "torch.distributed.init_process_group(...) before iterating DistilledClasses, or pass "
                            "rank= and world_size=")
        return 0, 1

    def _wanted(self) -> list[int]:
        d = self.distiller()
        wanted = d._check_classes(self.class_ids)
        return [c for c in d.config.class_ids if c in wanted]

    def _plan(self, world: int) -> list[list[tuple[list[int], list[int]]]]:
        """Per rank, its work: (config block, the classes of it that the rank yields), each block once."""
        d = self.distiller()
        wanted = set(self._wanted())
        blocks = [b for b in d.blocks() if wanted.intersection(b)]
        dealt: list[list[list[int]]] = [blocks[r::world] for r in range(world)]
        counts = {sum(len(wanted.intersection(b)) for b in bs) for bs in dealt}
        if len(counts) == 1 and 0 not in counts:
            return [[(b, [c for c in b if c in wanted]) for b in bs] for bs in dealt]
        ids = [c for b in blocks for c in b if c in wanted]
        per_rank = math.ceil(len(ids) / world)
        padded = _pad(ids, per_rank * world)
        block_of = {c: i for i, b in enumerate(blocks) for c in b}
        plan = []
        for r in range(world):
            mine = padded[r * per_rank:(r + 1) * per_rank]
            order = dict.fromkeys(block_of[c] for c in mine)  # the rank's blocks, each once
            plan.append([(blocks[i], [c for c in blocks[i] if c in mine]) for i in order])
        return plan

    def shares(self, world_size: int | None = None) -> list[list[int]]:
        """The classes each rank yields, rank by rank, in the order a rank without ``DataLoader`` workers yields
        them (workers interleave them). ``world_size``: default, this process's (see the class). Every share has
        the same length, at least one: whole blocks dealt round-robin when that comes out even, else equal
        contiguous slices of the classes padded as ``DistributedSampler`` pads (so with more ranks than classes
        every rank still gets one, some classes repeated). Builds the Distiller, if not built yet, to read the
        config's blocks, and computes nothing."""
        if world_size is not None and (not _is_int(world_size) or world_size < 1):
            raise UserError(f"world_size must be a whole number of at least 1 (got {world_size!r})")
        world = self._rank_world()[1] if world_size is None else int(world_size)
        return [[c for _, cs in work for c in cs] for work in self._plan(world)]

    def _work(self) -> list[tuple[list[int], list[int]]]:
        """This (rank, DataLoader worker)'s part of its rank's share."""
        rank, world = self._rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self._plan(world)[rank][worker::workers]

    def blocks(self) -> list[list[int]]:
        """The config blocks this process (rank and ``DataLoader`` worker) computes, each whole (see
        ``Distiller.blocks``); it yields only its share's classes of them."""
        return [b for b, _ in self._work()]

    def __iter__(self) -> Iterator[dict]:
        work = self._work()  # a rank that cannot be known stops here, before any model is built
        d = self.distiller()
        for _, classes in work:
            for out in d.stream(classes):
                yield out.as_item()


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _class_list(class_ids) -> list[int]:
    from ..config import check_class_ids

    try:
        ids = check_class_ids(class_ids, "class_ids")
    except UserError as e:
        if "empty" not in str(e):
            raise
        raise UserError("class_ids is empty: give at least one class, or None for all of the config's") from None
    return list(dict.fromkeys(ids))


def _pad(ids: list[int], total: int) -> list[int]:
    """``ids`` evened up to ``total`` by wrapping around to the first ones, as ``DistributedSampler`` pads."""
    short = total - len(ids)
    return ids + (ids * math.ceil(short / len(ids)))[:short] if short > 0 else list(ids)


def _process_group() -> tuple[int, int] | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None
