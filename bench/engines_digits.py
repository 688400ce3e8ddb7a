"""Stage-1 engines side by side: DiT (guided batch), VAE decode and classifier on eager, compile, onnx (and trt).

For each engine and model: steady-state images per second at the batch stage 1 uses, the ratio to eager, and
apart from it the one-off costs (ONNX export or TensorRT build, and the first call, which is where torch.compile
compiles). The models are the digits preset's when it is installed, else the tiny random models of the tests (the
rows say which). Engines are built into a fresh cache folder unless --engine-dir is given, so build times are real.
Every engine is built before any is timed; then each model's engines are timed in alternating rounds and a row gives
the median call over all rounds, so a shared machine's drift moves a model's engines alike, not their ratios.

    python bench/engines_digits.py                       # CPU: writes bench/results/engines_digits_cpu.{json,png}
                                                         # (under the CLI's allocator setting; --plain-malloc: not)
    python bench/engines_digits.py --threads 1 --append  # one thread, rows added to the same JSON
    python bench/engines_digits.py --device cuda --engines eager,compile,onnx,trt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cao2_fast.engines import BACKENDS, EngineCache, EngineSettings, build_engine, require, stage1_specs
from cao2_fast.errors import UserError
from cao2_fast.fileio import atomic_write, json_bytes, save_figure
from cao2_fast.generators.dit import DiTGenerator
from cao2_fast.pipeline import Distiller, preset_dir

ROOT = Path(__file__).resolve().parent.parent


def setup_models():
    """(dit, vae, classifier, stage-1 batch, description)."""
    if (preset_dir("digits") / "preset.json").is_file():
        d = Distiller.from_preset("digits", ipc=10)
        return d.generator.dit, d.generator.vae, d.classifier, d.config.stage1_batch, "digits preset"
    from cao2_fast.generators.dit import DiTConfig
    from cao2_fast.models.random import random_models

    dit, vae, clf = random_models(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10),
                                  classifier_input_size=16)
    return dit, vae, clf, 40, "tiny random models (digits preset not installed)"


def model_inputs(dit, vae, n_dit: int, n_dec: int) -> dict:
    g = torch.Generator().manual_seed(0)
    c, s = dit.cfg.in_channels, dit.cfg.input_size
    x = torch.randn(n_dit, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n_dit,), generator=g)
    y = torch.randint(0, dit.num_classes + 1, (n_dit,), generator=g)
    latents = torch.randn(n_dec, c, s, s, generator=g)
    with torch.no_grad():
        images = vae.decode(latents)
    return {"dit": (x, t, y), "vae_decode": (latents,), "classifier": (images,)}


def build(name: str, spec, args, device, cache, batch: int, settings: EngineSettings) -> dict:
    """Build (or load) one engine and make its first two calls at the timed batch (the first is where torch.compile
    compiles; the engine times it itself). A batch that runs out of device memory is halved."""
    while True:
        try:
            t0 = time.perf_counter()
            engine = build_engine(name, spec, device, "float32", cache, settings, batch=(1, batch, batch))
            setup_s = time.perf_counter() - t0
            args_dev = tuple(a.to(device) for a in args)
            with torch.no_grad():
                for _ in range(2):
                    engine(*args_dev)
            return {"engine_obj": engine, "args": args_dev, "batch": batch, "setup_s": setup_s}
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            args = tuple(a[:batch] for a in args)
            print(f"{spec.name} on {name}: out of memory, batch halved to {batch}", file=sys.stderr)


def timed_calls(engine, args, device, seconds: float) -> list[float]:
    """Seconds per call of back-to-back calls for about ``seconds`` (at least two calls)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        start = time.perf_counter()
        while len(times) < 2 or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            engine(*args)
            sync()
            times.append(time.perf_counter() - t0)
    return times


def alternate(built: dict, device, seconds: float, rounds: int) -> dict:
    """Per (engine, model): the median seconds per call over ``rounds`` rounds. Each round times every engine of a
    model in turn, for seconds/rounds each, so a shared machine that slows down or speeds up during the run moves
    all the engines of a model alike, not their ratios."""
    times = {key: [] for key in built}
    for _ in range(rounds):
        for key, b in built.items():
            times[key] += timed_calls(b["engine_obj"], b["args"], device, seconds / rounds)
    return {key: (sorted(t)[len(t) // 2], len(t)) for key, t in times.items()}


def environment(device) -> dict:
    import onnx
    import onnxruntime

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor() or platform.machine())
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version()}
    try:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        versions["tensorrt"] = None

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"device": name, "device_type": dev.type, "threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(), "versions": versions,
            "commit": git("rev-parse", "--short", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain")),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run(engines: list[str], device: str, seconds: float, engine_dir: Path | None,
        settings: EngineSettings, rounds: int = 5) -> list[dict]:
    """Build every engine of every model first, then time them in alternating rounds (:func:`alternate`)."""
    dit, vae, clf, stage1_batch, which = setup_models()
    for m in (dit, vae, clf):
        m.to(device)
    specs = stage1_specs(DiTGenerator(dit, vae), clf)
    batches = {"dit": 2 * stage1_batch, "vae_decode": min(stage1_batch, 64), "classifier": min(stage1_batch, 64)}
    inputs = model_inputs(dit, vae, batches["dit"], batches["vae_decode"])
    env = environment(device)
    tmp = None if engine_dir else tempfile.TemporaryDirectory(prefix="cao2-engines-")
    cache = EngineCache(engine_dir or tmp.name)
    rows, built = [], {}
    try:
        for name in engines:
            try:
                require(name, device)
            except UserError as e:
                print(f"skipping {name}: {e}", file=sys.stderr)
                rows.append({"bench": "engines_digits", "models": which, "engine": name, "skipped": str(e), **env})
                continue
            for model, spec in specs.items():
                built[(model, name)] = build(name, spec, inputs[model], device, cache, batches[model], settings)
                print(f"{model:<10} {name:<8} built", file=sys.stderr)
        timed = alternate(dict(sorted(built.items(), key=lambda kv: list(specs).index(kv[0][0]))), device, seconds,
                          rounds)
        for (model, name), b in built.items():
            per_call, iters = timed[(model, name)]
            engine = b["engine_obj"]
            r = {"engine": name, "batch": b["batch"], "iters": iters, "rounds": rounds, "ms_per_call": 1e3 * per_call,
                 "images_per_s": b["batch"] / per_call, "setup_s": b["setup_s"], "build_s": engine.build_seconds,
                 "first_call_s": engine.first_call_seconds, "cache_hit": engine.cache_hit,
                 **{k: engine.details[k] for k in ("exporter", "compile_mode", "providers") if k in engine.details}}
            if model == "dit":
                r["gflop_per_s"] = r["images_per_s"] * dit.cfg.flops_per_forward() / 1e9
            rows.append({"bench": "engines_digits", "models": which, "model": model, "precision": "float32",
                         **r, **env, "load_average": [round(v, 2) for v in os.getloadavg()]})
            print(f"{model:<10} {name:<8} {r['images_per_s']:>10.1f} img/s", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    eager = {r["model"]: r["images_per_s"] for r in rows if r.get("engine") == "eager" and "model" in r}
    for r in rows:
        if "model" in r and r["model"] in eager:
            r["ratio_to_eager"] = r["images_per_s"] / eager[r["model"]]
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':<10} {'engine':<8} {'batch':>5} {'images/s':>10} {'vs eager':>8} {'ms/call':>8} "
            f"{'export/build s':>14} {'first call s':>12}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            out.append(f"{'-':<10} {r['engine']:<8} skipped: {r['skipped']}")
            continue
        out.append(f"{r['model']:<10} {r['engine']:<8} {r['batch']:>5} {r['images_per_s']:>10.1f} "
                   f"{r.get('ratio_to_eager', float('nan')):>7.2f}x {r['ms_per_call']:>8.2f} "
                   f"{r['build_s']:>14.1f} {r['first_call_s']:>12.2f}")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "model" in r]
    models = list(dict.fromkeys(r["model"] for r in done))
    engines = list(dict.fromkeys(r["engine"] for r in done))
    fig, ax = plt.subplots(figsize=(6, 3))
    w = 0.8 / len(engines)
    for i, e in enumerate(engines):
        vals = [next((r["ratio_to_eager"] for r in done if r["model"] == m and r["engine"] == e), 0) for m in models]
        ax.bar([j + i * w for j in range(len(models))], vals, w, label=e)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([j + w * (len(engines) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("throughput / eager")
    ax.set_title(f"{done[0]['models']} on {done[0]['device'][:40]}, {done[0]['threads']} thread(s)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="eager,compile,onnx", help=f"comma-separated, of {', '.join(BACKENDS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per engine and model (after warm-up), "
                   "spread over the rounds")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds: each times every engine of a model in "
                   "turn; a row's figure is the median call over all rounds")
    p.add_argument("--engine-dir", type=Path, default=None, help="reuse this engine cache (default: a fresh one)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA, "
                   "default on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--append", action="store_true", help="keep the rows already in the JSON (e.g. another thread count)")
    p.add_argument("--plain-malloc", action="store_true", help="leave glibc's allocator as it is (the CLI keeps freed "
                   "memory in the process: cao2_fast.cpu.keep_freed_memory); default: the CLI's conditions")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    kept_freed = False
    if not a.plain_malloc and torch.device(a.device).type == "cpu":
        from cao2_fast.cpu import keep_freed_memory

        kept_freed = keep_freed_memory()
    torch.manual_seed(0)
    rows = run([e.strip() for e in a.engines.split(",") if e.strip()], a.device, a.seconds, a.engine_dir,
               EngineSettings(compile_mode=a.compile_mode), a.rounds)
    for r in rows:
        r["keep_freed_memory"] = kept_freed
    tag = f"engines_digits_{torch.device(a.device).type}"
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{tag}.json"
    kept = json.loads(path.read_text()) if a.append and path.is_file() else []
    atomic_write(path, json_bytes(kept + rows))
    if any("model" in r for r in rows):
        plot(rows, a.out / f"{tag}.png")
    print(f"{rows[0]['models']} on {rows[0]['device']} ({rows[0]['threads']} threads, load average "
          f"{rows[0]['load_average'][0]} on {rows[0]['cpu_count']} cores), torch {torch.__version__}")
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
