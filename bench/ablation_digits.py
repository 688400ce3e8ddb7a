"""Does each stage earn its place? The method's claim, reproduced in miniature on the digits preset.

For IPC 1 and 10 and several seeds, distilled sets are built five ways and scored under both evaluation protocols
(docs/evaluation.md, digits-scaled schedules from ``cao2_fast.eval.api.DIGITS_SETTINGS``), with the whole real train
split as the ceiling:

  real-random     IPC random real images per class from the train split
  diffusion       plain DiT samples: a random IPC of the K·IPC candidates, no selection, no stage 2
  stage1          objective-guided selection only (official recipe, 0 stage-2 steps)
  stage1+2        official recipe, both stages
  consistent      consistent recipe, both stages
  mar-official    the digits MAR preset, official recipe (stability selection, the released stage 2)
  mar-consistent  the digits MAR preset, consistent recipe
  full-train      every real train image (ceiling)

Per set it also records the classifier's view of it (stage-1 candidates' accuracy, mean p(class) before and after
stage 2), which is what explains a stage that does or does not help.

    python bench/ablation_digits.py --seeds 5              # writes bench/results/ablation_digits.{json,md,png}
    python bench/ablation_digits.py --plot-only            # redraws the chart from the JSON

Finished evaluations are kept in the JSON and skipped on a re-run.
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
from cao2_fast.fileio import atomic_write, json_bytes, save_figure
from cao2_fast.pipeline import Distiller
from cao2_fast.presets.digits_data import CLASS_NAMES, digits_split

VARIANTS = ["real-random", "diffusion", "stage1", "stage1+2", "consistent", "mar-official", "mar-consistent",
            "full-train"]
DIT_SETS = {"real-random", "diffusion", "stage1", "stage1+2", "consistent"}
PROTOCOLS = ["soft", "hard"]


def distilled_sets(ipc: int, seed: int, want: set[str]) -> tuple[dict[str, ImageSet], dict]:
    """The sets of one (IPC, seed) among ``want`` (the DiT ones are built together, each MAR one alone), plus what
    the classifier saw."""
    x, y = digits_split("train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:ipc]]
                     for c in range(10)])
    sets = {"real-random": ImageSet(x[idx], y[idx], CLASS_NAMES)}
    stats = {}

    def as_set(results, stage1_only=False):
        imgs = torch.cat([r.stage1_images if stage1_only else r.images for r in results])
        labels = torch.tensor([r.class_id for r in results for _ in range(len(r.records))])
        return ImageSet(imgs, labels, CLASS_NAMES)

    builds = [("mar", r) for r in ("official", "consistent") if f"mar-{r}" in want]
    if want & DIT_SETS:
        plain = Distiller.from_preset("digits", ipc=ipc, recipe="official", seed=seed, selection="random",
                                      stage2_steps=0)
        sets["diffusion"] = as_set(plain.distill())
        builds = [("dit", "official"), ("dit", "consistent"), *builds]
    for family, recipe in builds:
        preset = "digits" if family == "dit" else "digits-mar"
        d = Distiller.from_preset(preset, ipc=ipc, recipe=recipe, seed=seed)
        res = d.distill()
        recs = [rec for r in res for rec in r.records]
        stats[recipe if family == "dit" else f"mar {recipe}"] = {
            "candidate_accuracy": statistics.fmean(r.records[0]["stage1_candidate_accuracy"] for r in res),
            "prob_before": statistics.fmean(rec["prob_before"] for rec in recs),
            "prob_after": statistics.fmean(rec["prob_after"] for rec in recs),
            "loss_first": statistics.fmean(rec["loss_first"] for rec in recs),
            "loss_last": statistics.fmean(rec["loss_last"] for rec in recs),
        }
        if family == "mar":
            sets[f"mar-{recipe}"] = as_set(res)
        elif recipe == "official":
            sets["stage1"] = as_set(res, stage1_only=True)
            sets["stage1+2"] = as_set(res)
        else:
            sets["consistent"] = as_set(res)
    return sets, stats


def summarise(results: dict) -> dict:
    """mean ± std (over seeds) per (ipc, protocol, variant)."""
    table: dict = {}
    for key, rec in results["evals"].items():
        ipc, protocol, variant, _seed = key.split("|")
        table.setdefault(f"{ipc}|{protocol}|{variant}", []).append(rec["top1"])
    return {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "n": len(v)} for k, v in table.items()}


PAIRS = [  # (set, minus set): what each paired difference asks
    ("mar-official", "stage1+2"),  # MAR against the DiT, the released recipe
    ("mar-consistent", "consistent"),  # MAR against the DiT, the consistent recipe
    ("mar-consistent", "mar-official"),  # MAR's recipe fixes
    ("mar-official", "real-random"),  # MAR against random real images
]


def paired(results: dict) -> dict:
    """Per (IPC, protocol, pair): the mean of (set − other) over the seeds that have both, its sample std (ddof 1),
    n, and the 95 % confidence interval of the mean (Student's t)."""
    from scipy import stats as st

    out = {}
    for key in {k.rsplit("|", 2)[0] for k in results["evals"]}:
        ipc, protocol = key.split("|")
        for a, b in PAIRS:
            d = [results["evals"][f"{key}|{a}|{s}"]["top1"] - results["evals"][f"{key}|{b}|{s}"]["top1"]
                 for s in range(100) if f"{key}|{a}|{s}" in results["evals"] and f"{key}|{b}|{s}" in results["evals"]]
            if len(d) < 2:
                continue
            mean, sd = statistics.fmean(d), statistics.stdev(d)
            half = float(st.t.ppf(0.975, len(d) - 1)) * sd / len(d) ** 0.5
            out[f"{ipc}|{protocol}|{a} - {b}"] = {"mean": mean, "std": sd, "n": len(d), "ci95": [mean - half, mean + half],
                                                   "ahead": sum(x > 0 for x in d)}
    return out


def markdown(summary: dict, stats: dict, ipcs: list[int], pairs: dict | None = None) -> str:
    lines = ["| set | " + " | ".join(f"IPC {i} {p}" for i in ipcs for p in PROTOCOLS) + " |",
             "|---|" + "---|" * (len(ipcs) * len(PROTOCOLS))]
    for v in VARIANTS:
        cells = []
        for i in ipcs:
            for p in PROTOCOLS:
                s = summary.get(f"{i}|{p}|{v}")
                cells.append(f"{s['mean']:.1f} ± {s['std']:.1f} (n={s['n']})" if s else "–")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "Paired differences (same seed; points of top-1): mean [95 % CI], seeds ahead of n", "",
                  "| difference | " + " | ".join(f"IPC {i} {p}" for i in ipcs for p in PROTOCOLS) + " |",
                  "|---|" + "---|" * (len(ipcs) * len(PROTOCOLS))]
        for a, b in PAIRS:
            cells = []
            for i in ipcs:
                for p in PROTOCOLS:
                    d = pairs.get(f"{i}|{p}|{a} - {b}")
                    cells.append(f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}], {d['ahead']}/{d['n']}"
                                 if d else "–")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| recipe, IPC | stage-1 candidate accuracy | p(class) stage-1 pick | p(class) after stage 2 | "
                 "stage-2 loss first → last |")
    lines.append("|---|---|---|---|---|")
    for key, s in sorted(stats.items()):
        lines.append(f"| {key} | {s['candidate_accuracy']:.3f} | {s['prob_before']:.3f} | {s['prob_after']:.3f} | "
                     f"{s['loss_first']:.3f} → {s['loss_last']:.3f} |")
    return "\n".join(lines) + "\n"


LABELS = {  # what each bar is, in words a reader of the chart needs no glossary for
    "real-random": "random real images",
    "diffusion": "plain DiT samples (no selection, no stage 2)",
    "stage1": "stage 1 only (selected samples)",
    "stage1+2": "stage 1 + stage 2, official recipe",
    "consistent": "stage 1 + stage 2, consistent recipe",
    "mar-official": "MAR, stage 1 + 2, official recipe",
    "mar-consistent": "MAR, stage 1 + 2, consistent recipe",
    "full-train": "whole real train split (ceiling)",
}
COLORS = ["#999999", "#7aabbf", "#4a90c0", "#23629a", "#c7702a", "#6b9e4a", "#2f6b2a", "#cccccc"]


def plot(summary: dict, ipcs: list[int], path: Path) -> None:
    """One panel per (IPC, protocol); bars are the sets of ``LABELS`` (legend below), error bars ±1 std over
    seeds, with the seed counts read from the summary and stated in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(i, p) for i in ipcs for p in PROTOCOLS]
    fig, axes = plt.subplots(1, len(cells), figsize=(3.0 * len(cells), 3.8), sharey=True, layout="constrained")
    for ax, (i, p) in zip(axes, cells):
        vals = [summary.get(f"{i}|{p}|{v}") for v in VARIANTS]
        bars = ax.bar(range(len(VARIANTS)), [s["mean"] if s else 0 for s in vals],
                      yerr=[s["std"] if s else 0 for s in vals], capsize=2, color=COLORS)
        texts = ax.bar_label(bars, labels=[f"{s['mean']:.0f}" if s else "" for s in vals], label_type="center",
                             fontsize=7, color="white")  # inside the bars: the error bars above stay clear
        texts[-1].set_color("black")  # on the light ceiling bar
        ax.set_xticks([])
        ax.set_title(f"IPC {i}, {p}-label protocol", fontsize=9)
        ax.set_ylim(0, 108)
    axes[0].set_ylabel("top-1 on the 450 held-out digits (%)", fontsize=8)
    seeds = sorted({s["n"] for k, s in summary.items() if not k.startswith("all|") and "full-train" not in k})
    ceiling = sorted({s["n"] for k, s in summary.items() if "full-train" in k})
    seed_text = "/".join(map(str, seeds)) + (f" (ceiling: {'/'.join(map(str, ceiling))})" if ceiling != seeds else "")
    fig.suptitle(f"digits ablation: bar = mean top-1, error bar = ±1 std over {seed_text} seeds", fontsize=9)
    fig.legend(bars, [LABELS[v] for v in VARIANTS], loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--full-train-seeds", type=int, default=None, help="seeds for the ceiling (default --seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the chart from the JSON's summary; run nothing")
    args = ap.parse_args(argv)
    if args.plot_only:
        summary = json.loads((args.out / "ablation_digits.json").read_text())["summary"]
        plot(summary, args.ipc, args.out / "ablation_digits.png")
        return 0
    torch.set_num_threads(args.threads)
    jpath = args.out / "ablation_digits.json"
    results = json.loads(jpath.read_text()) if jpath.is_file() else {"evals": {}, "stats": {}}
    xs, ys = digits_split("train")
    full = ImageSet(xs, ys, CLASS_NAMES)

    def save():
        atomic_write(jpath, json_bytes(results, sort_keys=True))

    for seed in range(args.seeds):
        for ipc in args.ipc:
            todo = [(p, v) for p in PROTOCOLS for v in VARIANTS[:-1] if f"{ipc}|{p}|{v}|{seed}" not in results["evals"]]
            if not todo:
                continue
            t0 = time.perf_counter()
            sets, stats = distilled_sets(ipc, seed, {v for _, v in todo})
            for recipe, s in stats.items():
                results["stats"][f"{recipe}, IPC {ipc}, seed {seed}"] = s
            print(f"ipc {ipc} seed {seed}: sets built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for p, v in todo:
                rec = evaluate(sets[v], protocol=p, dataset="digits", repeats=1, seed=seed)
                results["evals"][f"{ipc}|{p}|{v}|{seed}"] = {"top1": rec["top1"][0], "seconds": rec["seconds_total"]}
                print(f"  {p:4s} {v:11s} {rec['top1'][0]:.1f}%", file=sys.stderr)
                save()
        for p in PROTOCOLS:  # the ceiling does not depend on IPC: one entry per protocol and seed
            if seed < (args.full_train_seeds or args.seeds) and f"all|{p}|full-train|{seed}" not in results["evals"]:
                rec = evaluate(full, protocol=p, dataset="digits", repeats=1, seed=seed)
                results["evals"][f"all|{p}|full-train|{seed}"] = {"top1": rec["top1"][0], "seconds":
                rec["seconds_total"]}
                print(f"  {p:4s} full-train  {rec['top1'][0]:.1f}%", file=sys.stderr)
                save()
    summary = summarise(results)
    for p in PROTOCOLS:  # show the ceiling in every IPC column
        if f"all|{p}|full-train" in summary:
            for ipc in args.ipc:
                summary[f"{ipc}|{p}|full-train"] = summary[f"all|{p}|full-train"]
    stats = {}
    for key, s in results["stats"].items():
        recipe_ipc = key.rsplit(", seed", 1)[0]
        stats.setdefault(recipe_ipc, []).append(s)
    stats = {k: {f: statistics.fmean(x[f] for x in v) for f in v[0]} for k, v in stats.items()}
    results["summary"] = summary
    results["paired_difference"] = paired(results)
    save()
    md = markdown(summary, stats, args.ipc, results["paired_difference"])
    atomic_write(args.out / "ablation_digits.md", md.encode())
    plot(summary, args.ipc, args.out / "ablation_digits.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
