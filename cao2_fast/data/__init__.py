"""Distilled classes as a PyTorch dataset, for data pipelines that consume them without a folder on disk.

:class:`DistilledClasses` is an ``IterableDataset`` over :meth:`cao2_fast.pipeline.Distiller.stream`: each item is
one class's :class:`~cao2_fast.pipeline.ClassOutput`. Under a ``DataLoader`` with workers and under
``torch.distributed``, the config's class blocks are dealt round-robin over (rank, worker) shards, so every class is
computed exactly once across all of them, and each class's images are the same whatever the split (a class's
output depends only on seed, class and config). On CPU that holds at equal thread counts: a ``DataLoader`` worker
runs torch on one thread, and some CPU kernels (oneDNN's 1×1 convolutions, say) round differently with the thread
count, which can move a pixel by one grey level. Use ``batch_size=None`` in the ``DataLoader``: an item is already
a class.

(This package also ships the ImageNet class lists in ``imagenet/``.)
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError


class DistilledClasses(IterableDataset):
    """Distill ``class_ids`` (default: all of the config's) and yield one :class:`ClassOutput` per class.

    distiller: a ready :class:`~cao2_fast.pipeline.Distiller`, or a zero-argument function that builds one (called
        once per worker, e.g. ``lambda: Distiller.from_preset("digits")``; cheaper to send to worker processes).
    rank, world_size: this process's shard of a distributed job; default: from ``torch.distributed`` when it is
        initialised, else a single process.
    """

    def __init__(self, distiller, class_ids: list[int] | None = None, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        self._distiller = distiller
        self._made = None
        self.class_ids = None if class_ids is None else list(class_ids)
        self.rank, self.world_size = rank, world_size
        if (rank is None) != (world_size is None):
            raise UserError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")

    def distiller(self):
        if self._made is None:
            d = self._distiller
            self._made = d() if callable(d) else d
        return self._made

    def _shard(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if world is None:
            import torch.distributed as dist

            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and \
                dist.is_initialized() else (0, 1)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world * workers

    def blocks(self) -> list[list[int]]:
        """The blocks this shard computes (a block is the unit of work, see ``Distiller.blocks``)."""
        d = self.distiller()
        wanted = d._check_classes(self.class_ids)
        blocks = [b for b in d.blocks() if wanted.intersection(b)]
        shard, shards = self._shard()
        return [b for i, b in enumerate(blocks) if i % shards == shard]

    def __iter__(self) -> Iterator:
        d = self.distiller()
        wanted = d._check_classes(self.class_ids)
        for block in self.blocks():
            yield from d.stream([c for c in block if c in wanted])
