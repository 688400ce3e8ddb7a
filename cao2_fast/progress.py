"""How a run reports its progress. The library only calls a :class:`Progress` object; it draws nothing unless asked.

``Distiller(progress=...)`` takes ``False`` (nothing, the default), ``True`` (bars on stderr) or any ``Progress``.
The command line picks :class:`Bars` when stderr is a terminal and :class:`LogLines` otherwise (CI, ``2> log``,
Slurm), so a log file gets a few plain lines instead of thousands of redraws.

Work is counted in the units the stages tick in: stage 1 in sampling steps of one DiT batch, stage 2 in
latent-steps (one Adam step of one latent). Both cost about two DiT forwards per candidate-step or latent-step
(SPEC §5), so the share of the job done — and the time left — is the FLOP-weighted sum of the two fractions.
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
    dit_tflop: float | None = None  # DiT work of both stages (this process's share)
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
        work = f", DiT {self.dit_tflop:.3g} TFLOP" if self.dit_tflop is not None else ""
        return (f"plan: {head}; stage 1: {self.candidates} candidates × {self.sample_steps} sampling steps; stage 2: "
                f"{self.latents} latents, {self.latent_steps} latent-steps; engines: {engines or 'eager'}{work}")

    def weights(self) -> tuple[float, float]:
        """Shares of the job's DiT work in stage 1 and stage 2 (they sum to 1; equal split if there is none)."""
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
