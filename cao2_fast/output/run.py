"""Writing a distilled set: a Distiller's classes into a resumable, shardable folder (the job ``cao2-fast distill``
runs).

:func:`write_set` takes a :class:`~cao2_fast.pipeline.Distiller` (for its config and its :meth:`stream`) and a
folder. It claims the folder for the config (:func:`~cao2_fast.output.locks.claim`), skips the classes already
complete there, computes the rest block by block under the classes' locks (this rank's share of the blocks), writes
each class through a staging folder, and on rank 0 merges ``manifest.json`` and the contact sheet. Classes already
in hand (``results``, e.g. from ``Distiller.distill``) are written without computing them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import overlaps
from ..progress import BlockClock
from . import folder as fmt
from .locks import FolderLock, claim
from .sheet import contact_sheet

LOCK_POLL_S = 0.5  # how often a run waiting for another run's classes looks again


def write_set(distiller, out: str | Path, *, results: Iterable | None = None, overwrite: bool = False,
              stage1_out: str | Path | None = None, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] | None = None, log: Callable[[str], None] | None = None) -> dict | None:
    """Distill ``distiller``'s config into the folder ``out``: skip complete classes, redo incomplete ones, merge
    the manifest on rank 0 (returned; None on the other ranks).

    results: :class:`~cao2_fast.pipeline.ClassOutput` s already computed by ``distiller`` (``distill()`` or
        ``stream()``): a block whose classes are all there is written from them, not computed again.
    overwrite: replace a set of another config (only cao2-fast's own files are ever deleted).
    stage1_out: also write each class's stage-1 picks (before stage 2) as an ImageFolder tree of its own there,
        with the same staging, checksums and resume; it must lie outside ``out`` (and ``out`` outside it), and a
        class counts as complete only when both trees hold it.
    rank, world_size, barrier: this process's share of a class-sharded job: block b runs on rank b mod world_size,
        so every class sees the same batches however many ranks share the job; ``barrier()`` waits for all ranks.
    log: notes for a person (a waiting run, a halved batch, what this rank did).

    A block is worked on under advisory locks of its classes: a second run of the same config does the blocks
    nobody holds and waits for the rest; a run of another config is refused while one is alive. A class whose
    stage 1 cannot fill IPC with finite candidates fails alone: the other classes are written, then one
    ``UserError`` names it. ``distiller.last_run`` counts what this process did (``distilled``, ``already_complete``).
    """
    writer = _SetWriter(distiller, out, stage1_out, results, log)
    try:
        return writer.run(overwrite, rank, world_size, barrier)
    except BaseException as e:
        if hasattr(barrier, "fail"):  # tell the other ranks at once instead of letting them wait it out
            barrier.fail(f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e))
        raise


def check_folders(distiller, out: str | Path, overwrite: bool = False, stage1_out: str | Path | None = None,
                  engine: str | None = None, stage2_engine: str | None = None) -> None:
    """Raise the refusal :func:`write_set` would raise for these folders, writing nothing, for ``distiller``'s config
    run on ``engine``/``stage2_engine`` (default: its current ones): a caller checks before it spends minutes
    building engines for a folder that is then refused."""
    from ..config import with_overrides

    out, stage1_out = _check_paths(distiller, out, stage1_out)
    cfg = with_overrides(distiller.config, engine=engine or distiller.config.engine,
                         stage2_engine=stage2_engine or distiller.config.stage2_engine)
    for root in [out] if stage1_out is None else [out, stage1_out]:
        fmt.check_output_dir(root, cfg.fingerprint(), cfg.class_names, cfg.ipc, overwrite, act=False,
                             engines={"stage1": cfg.engine, "stage2": cfg.stage2_engine})


def _check_paths(distiller, out, stage1_out) -> tuple[Path, Path | None]:
    out = fmt.check_out_path(out, "--out")
    stage1_out = None if stage1_out is None else fmt.check_out_path(stage1_out, "--stage1-out")
    if stage1_out is not None and overlaps(out, stage1_out):
        raise UserError(f"{stage1_out}: the stage-1 folder must lie beside --out {out}, not inside it (or around "
                        "it, or be it under another name): the main root holds only the distilled class folders")
    engine_dir = getattr(distiller, "engine_dir", None)
    if engine_dir is not None:
        for root in [out, stage1_out]:
            if root is not None and overlaps(engine_dir, root):
                raise UserError(f"{engine_dir}: the engine cache must lie outside the output folder {root} "
                                "(engine files are not part of a distilled set); pass another --engine-dir")
    return out, stage1_out


class _SetWriter:
    """One call of :func:`write_set`: the folders, the classes in hand and what this process did."""

    def __init__(self, distiller, out, stage1_out, results, log):
        self.d, self.cfg = distiller, distiller.config
        self.out, self.stage1_out = _check_paths(distiller, out, stage1_out)
        self.results = {} if results is None else {o.class_id: o for o in results}
        if log is not None:
            distiller.log = log
        self.log = distiller.log
        self.fp = self.cfg.fingerprint()
        self.names = dict(zip(self.cfg.class_ids, self.cfg.class_names))
        self.roots = [self.out] if self.stage1_out is None else [self.out, self.stage1_out]

    def fields(self, root: Path) -> dict:
        """The per-image record fields a class marker in ``root`` must hold (a stage-1 tree records the picks)."""
        return {**fmt.IMAGE_FIELDS, **self.d.generator.record_fields} if root == self.out else fmt.PICK_FIELDS

    def complete(self, classes: list[int]) -> bool:
        return all(fmt.read_complete(root, self.names[c], self.fp, self.cfg.ipc, self.fields(root)) is not None
                   for root in self.roots for c in classes)

    # -- the run ---------------------------------------------------------------------------------------------------

    def run(self, overwrite: bool, rank: int, world_size: int, barrier) -> dict | None:
        cfg, fp = self.cfg, self.fp
        engines = self.d.engines

        def prepare(lock: FolderLock, alone: bool) -> None:
            # under the folders' claim: refusals again (the folder may have changed since the first check), and
            # --overwrite's deletions only while no other run is alive there
            fmt.check_output_dir(lock.root, fp, cfg.class_names, cfg.ipc, overwrite, act=alone, engines=engines)

        with contextlib.ExitStack() as stack:
            if rank == 0:
                for root in self.roots:  # every refusal before anything is written or deleted, in either tree
                    fmt.check_output_dir(root, fp, cfg.class_names, cfg.ipc, overwrite, act=False, engines=engines)
                for root in self.roots:
                    root.mkdir(parents=True, exist_ok=True)
                locks = [stack.enter_context(FolderLock(root, cfg.class_names)) for root in self.roots]
                claim(locks, fp, prepare)
            if barrier is not None:
                barrier()
            if rank != 0:  # rank 0 holds the claim: the other ranks join it
                locks = [stack.enter_context(FolderLock(root, cfg.class_names)) for root in self.roots]
                claim(locks, fp)
            return self.work(locks, rank, world_size, barrier)

    def work(self, locks: list[FolderLock], rank: int, world_size: int, barrier) -> dict | None:
        """This rank's share of the blocks, each under its classes' locks, then (rank 0) the merge."""
        cfg, d = self.cfg, self.d
        complete = {c for c in cfg.class_ids if self.complete([c])}  # read once: checksums every image
        mine = [b for i, b in enumerate(d.blocks()) if i % world_size == rank]
        todo = [b for b in mine if not complete.issuperset(b)]
        d.last_run = {"distilled": 0, "already_complete": sum(map(len, mine)) - sum(map(len, todo))}
        failed: dict[int, str] = {}
        t0 = time.perf_counter()
        compute = [b for b in todo if not self.in_hand(b)]
        if self.log and len(compute) < len(todo):
            self.log(f"{sum(map(len, todo)) - sum(map(len, compute))} classes in hand: written without computing them")
        plan = d._plan([g for g in d.groups() if any(set(g) <= set(b) for b in compute)], len(complete), rank,
                       world_size, job_todo=len(cfg.class_ids) - len(complete))
        bars = d._bars(plan, lambda: len(list(self.out.glob(f"*/{fmt.MARKER}"))))
        try:
            self.take_blocks(locks[0], todo, bars, failed)
        finally:
            for b in bars.values():
                b.close()
        if self.log:
            self.log(f"rank {rank}: {d.last_run['distilled']} classes distilled in {time.perf_counter() - t0:.1f} s")
        if rank != 0:  # done with the folder before rank 0 merges: it removes the lock file when no run is alive
            for lock in locks:
                lock.close()
        if barrier is not None:
            barrier()
        if failed:
            first = next(iter(failed))
            raise UserError(f"class {first} ({self.names[first]}): {failed[first]}"
                            + (f" (and {len(failed) - 1} more classes)" if len(failed) > 1 else "")
                            + "; the other classes are written, re-run the same command after fixing it")
        if rank != 0:
            return None
        manifest = self.merge()
        for lock in locks:
            lock.retire()  # the set is complete: nothing left to share
        return manifest

    def take_blocks(self, lock: FolderLock, todo: list[list[int]], bars: dict, failed: dict) -> None:
        """Compute and write each block of ``todo`` under its classes' locks: a block another run on this folder
        holds is left for later (and skipped if that run completes it), so two runs of one config share the work."""
        import logging

        pending, said = list(todo), False
        clock = BlockClock(sum(len(b) for b in todo if not self.in_hand(b)), self.cfg.ipc,
                           logging.getLogger("cao2_fast").info)
        while pending:
            progressed = False
            for block in list(pending):
                block_names = [self.names[c] for c in block]
                if not lock.try_acquire(block_names):
                    continue
                try:
                    pending.remove(block)
                    progressed = True
                    if self.complete(block):  # finished meanwhile by another run on this folder
                        self.d.last_run["already_complete"] += len(block)
                        continue
                    self.write_block(block, bars, failed)
                    if not self.in_hand(block):
                        clock.done(block)
                finally:
                    lock.release(block_names)
            if pending and not progressed:
                if not said and self.log:
                    busy = ", ".join(self.names[c] for b in pending for c in b)
                    self.log(f"another cao2-fast run is working on classes {busy} in {self.out}; waiting for it")
                    said = True
                time.sleep(LOCK_POLL_S)

    def in_hand(self, block: list[int]) -> bool:
        return all(c in self.results for c in block)

    def block_outputs(self, block: list[int], bars: dict):
        """The block's classes: those in hand, else computed (the whole block, as the CLI computes it)."""
        if self.in_hand(block):
            return [self.results[c] for c in block]
        return self.d.stream(block, bars=bars)

    def write_block(self, block: list[int], bars: dict, failed: dict[int, str]) -> None:
        for o in self.block_outputs(block, bars):
            if o.failure is not None:
                failed[o.class_id] = o.failure
                if self.log:
                    self.log(f"class {o.class_id} ({o.class_name}) failed: {o.failure}")
                continue
            if self.write_class(o):
                self.d.last_run["distilled"] += 1
                if "classes" in bars:
                    bars["classes"].update(1)

    def write_class(self, o) -> bool:
        """Write one class into each tree that does not hold it yet; whether anything was written."""
        stage1_images = fmt.to_uint8(o.stage1_images)
        records = [dict(r) for r in o.records]  # write_class adds each file's name and checksum
        writes = [(self.out, o.images_uint8.numpy(), records)]
        if self.stage1_out is not None:
            picks = [{k: r[k] for k in fmt.PICK_FIELDS} for r in records]
            writes.insert(0, (self.stage1_out, stage1_images, picks))
        wrote = False
        for root, images, recs in writes:
            if fmt.read_complete(root, o.class_name, self.fp, self.cfg.ipc, self.fields(root)) is not None:
                continue  # complete already; it shared its block's batches with a class that was not
            wrote = True
            try:
                fmt.write_class(root, o.class_name, images, stage1_images, recs, self.fp,
                                extra={"engines": dict(self.d.engines)})
            except OSError as e:
                raise UserError(f"{root / o.class_name}: cannot write ({e.strerror or e}); classes already "
                                f"complete are kept, re-run the same command to resume") from None
        return wrote

    # -- the merge -------------------------------------------------------------------------------------------------

    def merge(self) -> dict:
        """Write ``manifest.json`` and the contact sheet from the class markers (a damaged manifest is rebuilt)."""
        cfg, out, stage1_out = self.cfg, self.out, self.stage1_out
        parts, stage1_parts = [], []
        for c, name in zip(cfg.class_ids, cfg.class_names):
            for root, into in ((out, parts), (stage1_out, stage1_parts)):
                if root is None:
                    continue
                part = fmt.read_complete(root, name, self.fp, cfg.ipc, self.fields(root))
                if part is None:
                    raise UserError(f"{root / name}: class {c} is not complete; re-run the same command to finish it")
                into.append(part)
        header = self.header(parts)
        try:
            if stage1_out is not None:
                fmt.write_manifest(stage1_out, {**header, "stage1_folder": None, "main_folder": os.path.relpath(
                    out.absolute(), stage1_out.absolute()), "contents": "stage-1 picks, before stage 2"},
                    stage1_parts)
            manifest = fmt.write_manifest(out, header, parts)
            contact_sheet(parts, out)
        except OSError as e:
            raise UserError(f"{out}: cannot write the manifest ({e.strerror or e}); all classes are complete, "
                            "re-run the same command to merge") from None
        return manifest

    def header(self, parts: list[dict]) -> dict:
        """The manifest's header: config, versions, engines and a summary of the class parts."""
        acc = [rec["stage1_candidate_accuracy"] for p in parts for rec in p["images"][:1]]
        header = {
            "config": self.cfg.to_json(),
            "versions": versions(),
            "seed": self.cfg.seed,
            "engines": [json.loads(e) for e in sorted({json.dumps(p.get("engines"), sort_keys=True) for p in parts})],
            "summary": {
                "classes": len(parts),
                "images": sum(len(p["images"]) for p in parts),
                "stage1_candidate_accuracy": _mean(acc),
                "mean_prob_before": _mean(r["prob_before"] for p in parts for r in p["images"]),
                "mean_prob_after": _mean(r["prob_after"] for p in parts for r in p["images"]),
                "stage2_stopped": sum(r["stage2_status"] != "ok" for p in parts for r in p["images"]),
            },
        }
        if self.stage1_out is not None:
            header["stage1_folder"] = os.path.relpath(self.stage1_out.absolute(), self.out.absolute())
        return header


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 6) if v else None


def versions() -> dict:
    """The library versions a manifest records."""
    import diffusers
    import timm

    from .. import __version__

    return {"cao2_fast": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": sys.platform}
