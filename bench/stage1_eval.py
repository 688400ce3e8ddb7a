"""Which stage-1 savings keep the distilled set's accuracy? Few-step samplers, early rejection and the guidance
interval, judged by what users keep: the digits evaluation of the distilled set, paired with the exact run of the
same seed.

For each seed and recipe, the digits preset is distilled (both stages) once exactly (``ddpm``, 50 steps) and once
per setting, on the same models, with only stage 1's setting changed; each set trains a student under the soft- and
hard-label protocols (docs/evaluation.md, digits-scaled), one repeat per seed, scored on the 450 held-out digits.
Also recorded per set: stage-1 DiT image-forwards per class, the share of candidates the classifier calls correct,
pick agreement with the exact run.

    python bench/stage1_eval.py --seeds 0-19 --out part0.json            # every setting, both recipes
    python bench/stage1_eval.py --seeds 0-9 --settings "exact,dpmpp 25" --recipes official --out a.json
    python bench/stage1_eval.py --merge a.json b.json --out bench/results/stage1_eval_digits.json

Finished (recipe, setting, protocol, seed) entries are skipped on a re-run, so workers on disjoint seeds can run side
by side and be merged. The merged file's ``paired`` table holds, per recipe, setting and protocol, the mean paired
difference (setting − exact, same seed; points of top-1) with its 95 % t-interval; ``--merge`` also draws the chart
(same name, .png).
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
RECIPES = ("official", "consistent")
# name: the stage-1 overrides (K, IPC and guidance are the run's)
SETTINGS = {
    "exact": {},
    "ddim 25": dict(sampler="ddim", sample_steps=25),
    "dpmpp 25": dict(sampler="dpmpp", sample_steps=25),
    "dpmpp 15": dict(sampler="dpmpp", sample_steps=15),
    "dpmpp 10": dict(sampler="dpmpp", sample_steps=10),
    "ddpm 25": dict(sample_steps=25, stage2_respacing=50),
    "early 10->20": dict(early_reject_step=10, early_reject_keep=20),
    "interval 0-5": dict(guidance_interval=(0.0, 5.0)),
    "dpmpp 25 + early 5->20": dict(sampler="dpmpp", sample_steps=25, early_reject_step=5, early_reject_keep=20),
    "dpmpp 25 + interval 0-5": dict(sampler="dpmpp", sample_steps=25, guidance_interval=(0.0, 5.0)),
}


def parse_seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def distilled(recipe: str, setting: dict, k: int, ipc: int, seed: int, guidance: float):
    d = Distiller.from_preset("digits", ipc=ipc, recipe=recipe, seed=seed, k=k, guidance_scale=guidance, **setting)
    res = d.distill()
    images = torch.cat([r.images for r in res])
    labels = torch.tensor([r.class_id for r in res for _ in range(len(r.records))])
    picks = {r.class_id: sorted(rec["candidate_index"] for rec in r.records) for r in res}
    stats = {"candidate_accuracy": statistics.fmean(r.records[0]["stage1_candidate_accuracy"] for r in res),
             "stage1_dit_forwards_per_class": d.generator.stage1_forwards(d.config),
             "fingerprint": d.config.fingerprint()}
    return ImageSet(images, labels, CLASS_NAMES), picks, stats


def t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def summarise(results: dict) -> None:
    """Each (recipe, setting, protocol): the sets' mean top-1, and the paired difference to the exact run."""
    table: dict = {}
    for key, rec in results["evals"].items():
        r, name, p, _ = key.split("|")
        table.setdefault(f"{r}|{name}|{p}", []).append(rec["top1"])
    results["summary"] = {k: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
                              "n": len(v)} for k, v in sorted(table.items())}
    paired: dict = {}
    for key, rec in results["evals"].items():
        r, name, p, seed = key.split("|")
        exact = results["evals"].get(f"{r}|exact|{p}|{seed}")
        if name != "exact" and exact is not None:
            paired.setdefault(f"{r}|{name}|{p}", []).append(rec["top1"] - exact["top1"])
    results["paired"] = {}
    for k, v in sorted(paired.items()):
        mean = statistics.fmean(v)
        entry = {"mean": mean, "n": len(v)}
        if len(v) > 1:
            sd = statistics.stdev(v)
            half = t95(len(v)) * sd / len(v) ** 0.5
            entry.update(sd=sd, ci95=[mean - half, mean + half])
        results["paired"][k] = entry
    sets: dict = {}
    for key, rec in results["sets"].items():
        r, name, _ = key.split("|")
        sets.setdefault(f"{r}|{name}", []).append(rec)
    results["set_summary"] = {
        k: {"n": len(v), "candidate_accuracy": statistics.fmean(s["candidate_accuracy"] for s in v),
            "stage1_dit_forwards_per_class": v[0]["stage1_dit_forwards_per_class"],
            "pick_agreement": (statistics.fmean(s["pick_agreement"] for s in v)
                               if all("pick_agreement" in s for s in v) else None)}
        for k, v in sorted(sets.items())}


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact_fwd = {r: results["set_summary"][f"{r}|exact"]["stage1_dit_forwards_per_class"]
                 for r in RECIPES if f"{r}|exact" in results["set_summary"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = {"official": "tab:blue", "consistent": "tab:orange"}
    markers = {"soft": "o", "hard": "s"}
    for ax, p in zip(axes, PROTOCOLS):
        for key, e in results["paired"].items():
            r, name, proto = key.split("|")
            if proto != p or "ci95" not in e:
                continue
            saved = 1 - results["set_summary"][f"{r}|{name}"]["stage1_dit_forwards_per_class"] / exact_fwd[r]
            dx = -0.006 if r == "official" else 0.006
            ax.errorbar(100 * saved + 100 * dx, e["mean"], yerr=[[e["mean"] - e["ci95"][0]], [e["ci95"][1] - e["mean"]]],
                        fmt=markers[p], color=colors[r], capsize=3, label=r if name == "dpmpp 25" else None)
            if r == "official":
                ax.annotate(name, (100 * saved, e["ci95"][1]), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=7, rotation=60)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(-2, color="red", lw=0.8, ls="--")
        ax.axvline(50, color="gray", lw=0.8, ls=":")
        ax.set_title(f"{p}-label protocol")
        ax.set_xlabel("stage-1 DiT FLOPs saved (%)")
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("top-1 minus the exact run's, same seed (points; 95% CI)")
    n = max(e["n"] for e in results["paired"].values())
    fig.suptitle(f"Digits distilled sets: each stage-1 saving paired with the exact run (n = {n} seeds; "
                 "dashed: the -2-point bar)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.7)
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-19"))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", type=Path, nargs="+", help="merge these result files into --out (and chart it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stage1_eval_digits.json")
    args = ap.parse_args(argv)
    if args.merge:
        results = {"evals": {}, "sets": {}}
        for f in args.merge:
            part = json.loads(f.read_text())
            results["evals"].update(part["evals"])
            results["sets"].update(part["sets"])
            results.setdefault("settings", part.get("settings"))
        summarise(results)
        atomic_write(args.out, json_bytes(results, sort_keys=True))
        chart(results, args.out.with_suffix(".png"))
        for k, e in results["paired"].items():
            ci = e.get("ci95")
            print(f"{k}: {e['mean']:+.2f} (95% CI {ci[0]:+.2f} to {ci[1]:+.2f}, n={e['n']})" if ci else k)
        return 0
    names = [s.strip() for s in args.settings.split(",")]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        ap.error(f"unknown setting {bad[0]!r}: choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"evals": {}, "sets": {}}
    results["settings"] = {n: SETTINGS[n] for n in SETTINGS}
    results["run"] = {"k": args.k, "ipc": args.ipc, "guidance": args.guidance, "threads": args.threads}

    def save():
        atomic_write(args.out, json_bytes(results, sort_keys=True))

    for seed in args.seeds:
        for recipe in args.recipes.split(","):
            todo = [n for n in dict.fromkeys(["exact", *names])
                    if any(f"{recipe}|{n}|{p}|{seed}" not in results["evals"] for p in PROTOCOLS)]
            if not todo:
                continue
            t0 = time.perf_counter()
            exact_picks = None
            for name in dict.fromkeys(["exact", *names]):
                if name not in todo and name != "exact":
                    continue
                if name == "exact" and "exact" not in todo and f"{recipe}|exact|{seed}" in results["sets"]:
                    exact_picks = results["sets"][f"{recipe}|exact|{seed}"]["picks"]
                    continue
                images, picks, stats = distilled(recipe, SETTINGS[name], args.k, args.ipc, seed, args.guidance)
                picks = {str(c): v for c, v in picks.items()}
                stats["picks"] = picks
                if name == "exact":
                    exact_picks = picks
                else:
                    shared = sum(len(set(exact_picks[c]) & set(picks[c])) for c in exact_picks)
                    stats["pick_agreement"] = shared / sum(len(v) for v in exact_picks.values())
                results["sets"][f"{recipe}|{name}|{seed}"] = stats
                for p in PROTOCOLS:
                    key = f"{recipe}|{name}|{p}|{seed}"
                    if key in results["evals"]:
                        continue
                    rec = evaluate(images, protocol=p, dataset="digits", repeats=1, seed=seed, threads=args.threads)
                    results["evals"][key] = {"top1": rec["top1"][0], "seconds": rec["seconds_total"]}
                    print(f"seed {seed} {recipe:10s} {p} {name:28s} {rec['top1'][0]:.1f}%", file=sys.stderr)
                save()
            print(f"seed {seed} {recipe}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
