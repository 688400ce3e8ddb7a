"""The MAR generator's two stages, batched, against the released execution, on the digits MAR preset (CPU).

  stage 1  released: one class at a time (its 2·IPC candidates per batch, every DiffLoss step of a class's few
           revealed tokens a call of its own); fast: every class of the job in one batch.
  stage 2  released: one image at a time, a fresh torch Adam, weights trainable (weight gradients computed and
           never used); fast: the block's images in one batch, gradients for the tokens only.

Both paths run the official recipe's arithmetic (the JPEG teacher view included) on the same models and draws, in
one process, repeats alternating; the ratio of the medians is reported with each side's spread.

    python bench/mar_digits.py --repeats 3          # writes bench/results/mar_digits_cpu-<threads>t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cao2_fast.fileio import atomic_write, json_bytes
from cao2_fast.generator import class_generator
from cao2_fast.generators.mar import MARStage2Noise, optimise_tokens, released_stage2_image
from cao2_fast.pipeline import Distiller


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--stage2-steps", type=int, default=10, help="steps per image in the timed stage-2 runs")
    ap.add_argument("--ref-images", type=int, default=8, help="images the released stage 2 optimises per repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes = list(range(10))
    fast = Distiller.from_preset("digits-mar", ipc=args.ipc, device="cpu", stage1_batch=len(classes) * 2 * args.ipc)
    ref = Distiller.from_preset("digits-mar", ipc=args.ipc, device="cpu", stage1_batch=2 * args.ipc)
    cfg = fast.config
    gen = fast.generator
    n_cand = len(classes) * cfg.num_candidates

    def stage1_fast():
        fast.stage1(classes)

    def stage1_ref():
        for c in classes:  # one class at a time
            ref.stage1([c])

    picks = fast.stage1(classes)
    latents = torch.cat([picks[c]["latents"] for c in classes])
    ids = torch.tensor([c for c in classes for _ in range(args.ipc)])
    tokens = gen._tokens(latents)
    steps = args.stage2_steps
    noise = MARStage2Noise.cat([MARStage2Noise.draw(args.ipc, steps, gen.mar.cfg.seq_len, gen.mar.cfg.token_embed_dim,
                                                    class_generator(cfg.seed, c, "mar-stage2")) for c in classes])
    cond = gen.stage2_condition(cfg, ids)
    rec = cfg.recipe

    def stage2_fast():
        optimise_tokens(gen.mar, tokens, cond, noise, steps, cfg.lr, cfg.lam, rec.mar_mask_rule,
                        rec.mar_target_grad == "attached", rec.mar_stage2_vb)

    def stage2_ref():
        for i in range(args.ref_images):
            one = MARStage2Noise(*(getattr(noise, f)[i] for f in ("orders", "u", "t", "eps")))
            released_stage2_image(gen.mar, tokens[i], cond[i:i + 1], one, steps, cfg.lr, cfg.lam, rec.mar_mask_rule,
                                  rec.mar_target_grad == "attached", rec.mar_stage2_vb)

    times = {k: [] for k in ("stage1_ref", "stage1_fast", "stage2_ref", "stage2_fast")}
    stage2_fast()  # warm-up of both paths' first calls
    for r in range(args.repeats):
        order = [("stage1_ref", stage1_ref), ("stage1_fast", stage1_fast), ("stage2_ref", stage2_ref),
                 ("stage2_fast", stage2_fast)]
        if r % 2:
            order = [order[1], order[0], order[3], order[2]]
        for name, fn in order:
            times[name].append(timed(fn))
            print(f"repeat {r}: {name} {times[name][-1]:.1f} s", file=sys.stderr)
    rates = {
        "stage1_ref": [n_cand / t for t in times["stage1_ref"]],
        "stage1_fast": [n_cand / t for t in times["stage1_fast"]],
        "stage2_ref": [args.ref_images * steps / t for t in times["stage2_ref"]],
        "stage2_fast": [len(tokens) * steps / t for t in times["stage2_fast"]],
    }
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "what": "digits MAR preset, official recipe, CPU; rates: stage 1 candidates/s, stage 2 latent-steps/s",
        "threads": args.threads, "ipc": args.ipc, "classes": len(classes), "candidates": n_cand,
        "sample_iterations": cfg.sample_steps, "token_steps": cfg.token_steps, "stage2_steps_timed": steps,
        "stage2_images": {"fast": len(tokens), "released": args.ref_images}, "repeats": args.repeats,
        "rates": rates, "median": med,
        "speedup": {"stage1": med["stage1_fast"] / med["stage1_ref"], "stage2": med["stage2_fast"] / med["stage2_ref"]},
        "flops": {"stage1_per_class": gen.stage1_flops(cfg), "stage2_per_image": gen.stage2_flops(cfg)},
    }
    path = args.out / f"mar_digits_cpu-{args.threads}t.json"
    atomic_write(path, json_bytes(result, sort_keys=True))
    print(json.dumps({"speedup": result["speedup"], "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
