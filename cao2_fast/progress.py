"""How a run reports its progress. The library only calls a :class:`Progress` object; it draws nothing unless asked.

``Distiller(progress=...)`` takes ``False`` (nothing, the default), ``True`` (bars on stderr) or any ``Progress``.
The command line picks :class:`Bars` when stderr is a terminal and :class:`LogLines` otherwise (CI, ``2> log``,
Slurm), so a log file gets a few plain lines instead of thousands of redraws.

Work is counted in the units the stages tick in: stage 1 in sampling steps of one DiT batch, stage 2 in
latent-steps (one Adam step of one latent). Both cost about two DiT forwards per candidate-step or latent-step
(docs/method.md, cost model), so the share of the job done — and the time left — is the FLOP-weighted sum of the two
fractions.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Plan:
    """What a run is about to do (this process's share), known before any work starts."""

    classes: int  # in the whole job
    already_complete: int  # complete on disk when the run started
    todo: int  # classes this process will distill
    candidates: int  # stage-1 candidates to sample (todo × K·IPC)
    sample_steps: int  # sampling steps per candidate
    batch_steps: int  # stage-1 ticks: sampling steps × DiT batches
    latents: int  # stage-2 latents (todo × IPC)
    latent_steps: int  # stage-2 ticks: latents × Adam steps
    engines: dict = field(default_factory=dict)
    tflop: float | None = None  # the generator's work of both stages (this process's share)
    stage1_tflop: float | None = None  # of it, stage 1's (weighs the two stages in the done fraction)
    rank: int = 0  # this process in a class-sharded run ...
    world: int = 1  # ... of this many processes
    job_todo: int | None = None  # classes the whole job (all ranks) has left to distill

    def describe(self) -> str:
        if self.world > 1:
            left = self.todo if self.job_todo is None else self.job_todo
            head = (f"{left} of {self.classes} classes to distill over {self.world} ranks, {self.todo} of them on "
                    f"rank {self.rank}")
        else:
            head = f"{self.todo} of {self.classes} classes to distill"
        if self.already_complete:
            head += f" ({self.already_complete} already complete)"
        engines = ", ".join(f"{k} {v}" for k, v in self.engines.items())
        work = f", generator {self.tflop:.3g} TFLOP" if self.tflop is not None else ""
        return (f"plan: {head}; stage 1: {self.candidates} candidates × {self.sample_steps} sampling steps; stage 2: "
                f"{self.latents} latents, {self.latent_steps} latent-steps; engines: {engines or 'eager'}{work}")

    def weights(self) -> tuple[float, float]:
        """Shares of the job's generator work in stage 1 and stage 2 (they sum to 1; equal split if there is
        none): their FLOPs when the plan has them, else candidate-steps against latent-steps."""
        if self.tflop is not None and self.stage1_tflop is not None:
            w1, w2 = self.stage1_tflop, self.tflop - self.stage1_tflop
        else:
            w1, w2 = self.candidates * self.sample_steps, self.latent_steps
        total = w1 + w2
        return (0.5, 0.5) if total == 0 else (w1 / total, w2 / total)


class Progress:
    """The callbacks a run makes; this base class ignores them all. Subclass it to feed your own logger or UI."""

    def start(self, plan: Plan) -> None:
        """Called once, before any work."""

    def advance(self, stage: str, n: int = 1) -> None:
        """``stage`` is "stage1" (``n`` sampling steps of a DiT batch) or "stage2" (``n`` latent-steps). ``n`` may be
        negative: a stage-2 chunk that ran out of memory is taken back and redone smaller."""

    def classes_done(self, total: int) -> None:
        """``total`` classes of the job are complete on disk (all ranks together)."""

    def close(self) -> None:
        """Called once, when the run stops (finished or not)."""


class _Tracker(Progress):
    """Counts work and derives the done fraction, the rate and the time left; subclasses decide how to show them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.plan: Plan | None = None
        self.done = {"stage1": 0, "stage2": 0}
        self.classes = 0
        self.stage = "stage1"
        self.t0 = clock()

    def start(self, plan: Plan) -> None:
        self.plan, self.t0, self.classes = plan, self.clock(), plan.already_complete
        self.done, self.stage = {"stage1": 0, "stage2": 0}, "stage1"

    def advance(self, stage: str, n: int = 1) -> None:
        self.done[stage] += n
        self.stage = stage

    def classes_done(self, total: int) -> None:
        self.classes = max(self.classes, total)

    def fraction(self) -> float:
        p = self.plan
        if p is None:
            return 0.0
        w1, w2 = p.weights()
        f1 = self.done["stage1"] / p.batch_steps if p.batch_steps else 1.0
        f2 = self.done["stage2"] / p.latent_steps if p.latent_steps else 1.0
        return min(1.0, max(0.0, w1 * f1 + w2 * f2))

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        f = self.fraction()
        return None if f <= 0 else self.elapsed() * (1 - f) / f


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LogLines(_Tracker):
    """A few plain lines for logs: the plan, an estimate once the first DiT batch is through, then one line every
    ``every`` seconds (stage, classes done, work done, rate, time left), and a last line at the end.

    Not a tqdm bar on purpose: tqdm redraws one line with carriage returns, which a log file (CI, Slurm, ``2> log``)
    keeps as thousands of fragments; these are whole lines, and their time left weighs both stages by their DiT
    work, which a bar over one counter cannot."""

    def __init__(self, write: Callable[[str], None] | None = None, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.every = every
        self.last = None
        self.estimated = False

    def start(self, plan: Plan) -> None:
        super().start(plan)
        self.last = self.t0
        self.write(plan.describe())

    def advance(self, stage: str, n: int = 1) -> None:
        super().advance(stage, n)
        p = self.plan
        if p is None:
            return
        if not self.estimated and stage == "stage1" and self.done["stage1"] >= min(p.sample_steps, p.batch_steps):
            self.estimated = True
            self.write(f"estimate: {clock_text(self.elapsed() + (self.eta() or 0))} in all "
                       f"(from the first DiT batch: {clock_text(self.elapsed())})")
        if self.clock() - self.last >= self.every:
            self._line()

    def _line(self, head: str | None = None) -> None:
        self.last = self.clock()
        p = self.plan
        rate = self.done[self.stage] / max(self.elapsed(), 1e-9)
        unit = "batch-steps/s" if self.stage == "stage1" else "latent-steps/s"
        self.write(f"[{clock_text(self.elapsed())}] {head or self.stage.replace('stage', 'stage ')}: "
                   f"classes {self.classes}/{p.classes}, {100 * self.fraction():.0f} % of the work, "
                   f"{rate:.3g} {unit}, ETA {clock_text(self.eta())}")

    def close(self) -> None:
        if self.plan is not None:
            self.write(f"[{clock_text(self.elapsed())}] finished: classes {self.classes}/{self.plan.classes}")
        self.plan = None


class Bars(_Tracker):
    """tqdm bars on stderr for a terminal: classes, and one bar per stage, shown once that stage has begun."""

    def __init__(self, file=None):
        super().__init__()
        self.file = file or sys.stderr
        self.bars: dict = {}

    def start(self, plan: Plan) -> None:
        from tqdm.auto import tqdm

        super().start(plan)
        tqdm.write(plan.describe(), file=self.file)
        self.bars["classes"] = tqdm(total=plan.classes, initial=plan.already_complete, desc="classes", unit="class",
                                    position=0, file=self.file, dynamic_ncols=True)

    def advance(self, stage: str, n: int = 1) -> None:
        from tqdm.auto import tqdm

        super().advance(stage, n)
        if self.plan is None:
            return
        if stage not in self.bars:  # a stage's bar appears when it starts, never sitting at 0 before
            total = self.plan.batch_steps if stage == "stage1" else self.plan.latent_steps
            desc, unit = ("stage 1", "batch-step") if stage == "stage1" else ("stage 2", "latent-step")
            self.bars[stage] = tqdm(total=total, desc=desc, unit=unit, unit_scale=total >= 10_000,
                                    position=1 if stage == "stage1" else 2, leave=False, file=self.file,
                                    dynamic_ncols=True)
        self.bars[stage].update(n)

    def classes_done(self, total: int) -> None:
        super().classes_done(total)
        bar = self.bars.get("classes")
        if bar is not None:
            bar.n = self.classes
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
        self.plan = None


def as_progress(progress) -> Progress | None:
    """``Distiller``'s ``progress`` argument as an object: None for False/None, :class:`Bars` for True."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return Bars()
    if isinstance(progress, Progress):
        return progress
    raise TypeError(f"progress must be a bool or a cao2_fast.progress.Progress, not {type(progress).__name__}")


# -- the callbacks the stages tick ---------------------------------------------------------------------------------


class StageBar:
    """One stage's progress as the stages call it: a zero-argument tick (stage 1, one sampling step of a batch) or
    ``update(n)`` (stage 2, latent-steps), passed on to a run's :class:`Progress`."""

    def __init__(self, reporter: Progress, stage: str):
        self.reporter, self.stage = reporter, stage

    def __call__(self):
        self.reporter.advance(self.stage, 1)

    def update(self, n):
        self.reporter.advance(self.stage, n)

    def close(self):
        pass


class ClassCount(StageBar):
    """Counts complete classes; ``on_disk()`` (a run's folder) can report more, so rank 0 reports the progress of
    all ranks. Closing it ends the report."""

    def __init__(self, reporter: Progress, done: int, on_disk: Callable[[], int] | None = None):
        super().__init__(reporter, "classes")
        self.n, self.on_disk = done, on_disk

    def update(self, n):
        self.n = max(self.n + n, self.on_disk() if self.on_disk is not None else 0)
        self.reporter.classes_done(self.n)

    def close(self):
        self.reporter.close()


def stage_bars(reporter: Progress | None, plan: Plan, on_disk: Callable[[], int] | None = None) -> dict:
    """The callbacks of one call (``classes``, ``stage1``, ``stage2``) reporting to ``reporter``, which is told
    ``plan`` first; empty when there is no reporter."""
    if reporter is None:
        return {}
    reporter.start(plan)
    return {"classes": ClassCount(reporter, plan.already_complete, on_disk), "stage1": StageBar(reporter, "stage1"),
            "stage2": StageBar(reporter, "stage2")}


class RetryTicks:
    """Stage-2 progress of one chunk in latent-steps: :meth:`start` (re)begins it for ``b`` latents, taking back
    what an attempt that ran out of memory had counted; each call is one step of all of them."""

    def __init__(self, bar):
        self.bar, self.b, self.n = bar, 0, 0

    def start(self, b: int) -> None:
        if self.bar is not None and self.n:
            self.bar.update(-self.n)
        self.b, self.n = b, 0

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update(self.b)
            self.n += self.b


class BlockClock:
    """Logs (``log``, e.g. a logger's ``info``) each block of classes as it is done, with the rate so far and the
    time left for ``total`` classes of ``ipc`` images."""

    def __init__(self, total: int, ipc: int, log: Callable[..., None]):
        self.total, self.ipc, self.log = total, ipc, log
        self.done_classes, self.blocks, self.t0 = 0, 0, time.perf_counter()

    def done(self, block: list[int]) -> None:
        self.blocks += 1
        self.done_classes += len(block)
        elapsed = time.perf_counter() - self.t0
        rate = self.done_classes * self.ipc / max(elapsed, 1e-9)
        left = (self.total - self.done_classes) * self.ipc / rate if rate > 0 else None
        self.log("block %d done (classes %s): %d/%d classes in %s, %.3g images/s, ETA %s", self.blocks,
                 ", ".join(map(str, block)), self.done_classes, self.total, clock_text(elapsed), rate,
                 clock_text(max(left, 0.0)) if left is not None else "?")
