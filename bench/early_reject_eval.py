"""Does early rejection (or a guidance interval) cost accuracy? The digits preset distilled with and without it,
scored by both protocols.

For each seed the official recipe (both stages) runs twice on the same models — exact stage 1, and stage 1 with the
given early-rejection checks and/or guidance interval — and each distilled set trains a student under the soft- and
hard-label protocols (docs/evaluation.md, digits-scaled: ``cao2_fast.eval.api.DIGITS_SETTINGS``), one repeat per seed,
scored on the 450 held-out digits. Also recorded per set: pick agreement with the exact run, stage-1 DiT forwards,
candidates' accuracy.

    python bench/early_reject_eval.py --k 4 --checks 10:20 --seeds 3
    python bench/early_reject_eval.py --k 4 --checks 5:30,15:15     # two checks
    python bench/early_reject_eval.py --k 4 --guidance-interval 0,5  # guidance only for σ <= 5

Writes bench/results/early_reject_eval_digits.json; finished (set, protocol, seed) entries are skipped on a re-run.
The summary has each set's mean and population std over seeds, and for each setting the paired difference to the
exact run of the same seed (mean and sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cao2_fast.eval.api import evaluate
from cao2_fast.eval.data import ImageSet
from cao2_fast.fileio import atomic_write, json_bytes
from cao2_fast.pipeline import Distiller
from cao2_fast.presets.digits_data import CLASS_NAMES

PROTOCOLS = ("soft", "hard")


def parse_checks(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split(":")) for part in text.split(",")]


def parse_interval(text: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def distilled(k: int, ipc: int, seed: int, guidance: float, checks: list[tuple[int, int]] | None,
              interval: tuple[float, float] | None = None):
    kw = {} if interval is None else {"guidance_interval": interval}
    if checks:
        steps, keeps = zip(*checks)
        kw.update(early_reject_step=steps[0] if len(steps) == 1 else steps,
                  early_reject_keep=keeps[0] if len(keeps) == 1 else keeps)
    d = Distiller.from_preset("digits", ipc=ipc, recipe="official", seed=seed, k=k, guidance_scale=guidance, **kw)
    res = d.distill()
    images = torch.cat([r.images for r in res])
    labels = torch.tensor([r.class_id for r in res for _ in range(len(r.records))])
    picks = {r.class_id: sorted(rec["candidate_index"] for rec in r.records) for r in res}
    stats = {"candidate_accuracy": statistics.fmean(r.records[0]["stage1_candidate_accuracy"] for r in res),
             "stage1_dit_forwards_per_class": d.generator.stage1_forwards(d.config)}
    return ImageSet(images, labels, CLASS_NAMES), picks, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.7)
    ap.add_argument("--checks", type=parse_checks, help="STEP:KEEP[,STEP:KEEP]")
    ap.add_argument("--guidance-interval", type=parse_interval, help="LO,HI: guidance only for σ in (LO, HI]")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "early_reject_eval_digits.json")
    args = ap.parse_args(argv)
    if not args.checks and not args.guidance_interval:
        ap.error("give --checks and/or --guidance-interval")
    torch.set_num_threads(args.threads)
    parts = []
    if args.checks:
        parts.append("early " + " then ".join(f"{s}->{m}" for s, m in args.checks))
    if args.guidance_interval:
        parts.append("interval ({:g},{:g}]".format(*args.guidance_interval))
    setting = " ".join(parts)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"evals": {}, "sets": {}}
    tag = f"K{args.k} g{args.guidance} IPC{args.ipc}"

    def save():
        atomic_write(args.out, json_bytes(results, sort_keys=True))

    for seed in range(args.seeds):
        names = {"exact": (None, None), setting: (args.checks, args.guidance_interval)}
        todo = [(n, p) for n in names for p in PROTOCOLS if f"{tag}|{n}|{p}|{seed}" not in results["evals"]]
        if not todo:
            continue
        t0 = time.perf_counter()
        sets, picks = {}, {}
        for name, (checks, interval) in names.items():
            sets[name], picks[name], stats = distilled(args.k, args.ipc, seed, args.guidance, checks, interval)
            results["sets"][f"{tag}|{name}|{seed}"] = stats
        shared = sum(len(set(picks["exact"][c]) & set(picks[setting][c])) for c in picks["exact"])
        results["sets"][f"{tag}|{setting}|{seed}"]["pick_agreement"] = shared / (10 * args.ipc)
        print(f"seed {seed}: sets built in {time.perf_counter() - t0:.0f} s, pick agreement "
              f"{shared / (10 * args.ipc):.2f}", file=sys.stderr)
        for name, p in todo:
            rec = evaluate(sets[name], protocol=p, dataset="digits", repeats=1, seed=seed)
            results["evals"][f"{tag}|{name}|{p}|{seed}"] = {"top1": rec["top1"][0], "seconds": rec["seconds_total"]}
            print(f"  {p:4s} {name:24s} {rec['top1'][0]:.1f}%", file=sys.stderr)
            save()
    table: dict = {}
    for key, rec in results["evals"].items():
        t, name, p, _ = key.split("|")
        table.setdefault(f"{t}|{name}|{p}", []).append(rec["top1"])
    results["summary"] = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "n": len(v)}
                          for k, v in sorted(table.items())}
    paired: dict = {}
    for key, rec in results["evals"].items():
        t, name, p, seed = key.split("|")
        exact = results["evals"].get(f"{t}|exact|{p}|{seed}")
        if name != "exact" and exact is not None:
            paired.setdefault(f"{t}|{name}|{p}", []).append(rec["top1"] - exact["top1"])
    results["paired_difference"] = {
        k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}
        for k, v in sorted(paired.items())}
    save()
    for k, s in results["summary"].items():
        print(f"{k}: {s['mean']:.1f} ± {s['std']:.1f} (n={s['n']})")
    for k, s in results["paired_difference"].items():
        print(f"{k} minus exact, same seed: {s['mean']:+.1f} (sd {s['std'] or 0:.1f}, n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
