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
(same name, .png) and writes the table (.md).
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
    "ddim 24": dict(sampler="ddim", sample_steps=24),
    "ddim 20": dict(sampler="ddim", sample_steps=20),
    # DDIM 25 with its two last steps (σ 0.14 and 0.01) on the conditional model alone: under 20 min projected
    "ddim 25 + interval 0.2-1000": dict(sampler="ddim", sample_steps=25, guidance_interval=(0.2, 1000.0)),
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
    results["imagenet_ipc10"] = {name: projection(SETTINGS[name]) for name in
                                 sorted({k.split("|")[1] for k in results["set_summary"]})}


def projection(setting: dict) -> dict:
    """The setting's ImageNet-1K IPC10 job on one H100 from the FLOP model (official: K 4, guidance 2.7)."""
    from cao2_fast.bench_early import imagenet_projection
    from cao2_fast.selection import early_checks

    checks = early_checks(setting.get("early_reject_step"), setting.get("early_reject_keep"))
    p = imagenet_projection(checks, setting.get("guidance_interval"), "H100", setting.get("sampler", "ddpm"),
                            setting.get("sample_steps", 50))
    return {k: p[k] for k in ("stage1_eflop", "exact_stage1_eflop", "stage1_flop_saved", "minutes_at_peak",
                              "exact_minutes_at_peak")}


def table_md(results: dict) -> str:
    """The merged results as a markdown table: per recipe and setting, the work saved, the projection, and per
    protocol the paired difference with its interval, and whether it passes the bar (CI lower bound ≥ −2)."""
    lines = ["| recipe | setting | stage-1 DiT forwards saved | ImageNet-1K IPC10, H100 (min) | candidates correct | "
             "soft: paired diff. (95 % CI) | hard: paired diff. (95 % CI) | n | passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in RECIPES:
        exact = results["set_summary"].get(f"{r}|exact")
        if exact is None:
            continue
        for name in SETTINGS:
            sset = results["set_summary"].get(f"{r}|{name}")
            if sset is None:
                continue
            saved = 1 - sset["stage1_dit_forwards_per_class"] / exact["stage1_dit_forwards_per_class"]
            cells, ok, ns = [], True, []
            for p in PROTOCOLS:
                e = results["paired"].get(f"{r}|{name}|{p}")
                if e is None or "ci95" not in e:
                    mean = results["summary"][f"{r}|{name}|{p}"]["mean"]
                    cells.append(f"{mean:.1f} % top-1" if name == "exact" else "–")
                    ok = False
                    continue
                lo, hi = e["ci95"]
                cells.append(f"{e['mean']:+.2f} ({lo:+.2f} to {hi:+.2f})")
                ok = ok and lo >= -2.0
                ns.append(e["n"])
            proj = results["imagenet_ipc10"][name]["minutes_at_peak"]
            lines.append(f"| {r} | {name} | {100 * saved:.0f} % | {proj:.1f} | {100 * sset['candidate_accuracy']:.1f} % | "
                         f"{cells[0]} | {cells[1]} | {min(ns) if ns else sset['n']} | "
                         f"{'–' if name == 'exact' else ('yes' if ok else 'no')} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """A forest plot per protocol: each setting's paired difference with its 95 % interval, per recipe, the
    settings labelled with the stage-1 DiT work they save; the −2-point bar dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETTINGS if n != "exact" and any(f"{r}|{n}|soft" in results["paired"] for r in RECIPES)]
    labels = []
    for n in names:
        r = next(r for r in RECIPES if f"{r}|{n}" in results["set_summary"])
        fwd = results["set_summary"][f"{r}|{n}"]["stage1_dit_forwards_per_class"]
        saved = 1 - fwd / results["set_summary"][f"{r}|exact"]["stage1_dit_forwards_per_class"]
        ns = sorted({results["paired"][k]["n"] for k in results["paired"] if k.split("|")[1] == n})
        seeds = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        labels.append(f"{n}\n({100 * saved:.0f} % saved, n = {seeds})")
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.3 + 0.62 * len(names)), sharey=True)
    colors = {"official": "tab:blue", "consistent": "tab:orange"}
    for ax, p in zip(axes, PROTOCOLS):
        for k, r in enumerate(RECIPES):
            ys, means, lo, hi = [], [], [], []
            for i, n in enumerate(names):
                e = results["paired"].get(f"{r}|{n}|{p}")
                if e is None or "ci95" not in e:
                    continue
                ys.append(i + (0.15 if k else -0.15))
                means.append(e["mean"])
                lo.append(e["mean"] - e["ci95"][0])
                hi.append(e["ci95"][1] - e["mean"])
            if ys:
                ax.errorbar(means, ys, xerr=[lo, hi], fmt="o" if p == "soft" else "s", color=colors[r], capsize=3,
                            label=f"recipe {r}")
        ax.axvline(0, color="gray", lw=0.8)
        ax.axvline(-2, color="red", lw=0.8, ls="--")
        ax.set_title(f"{p}-label protocol")
        ax.set_xlabel("top-1 minus the exact run's, same seed (points; 95 % CI)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize=8, frameon=False)
    axes[0].set_yticks(range(len(names)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Digits: stage-1 savings judged by the distilled set, paired with the exact run (dashed: -2 points)",
                 fontsize=10)
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
        atomic_write(args.out.with_suffix(".md"), table_md(results).encode())
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
