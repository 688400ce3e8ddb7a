"""``cao2-fast bench --backbone mar``: the rows it writes (the DiT bench's fields), its paths, ratios, FLOPs and
projections, the files it writes, and the options it refuses. One tiny run serves the assertions; nothing here
asserts a speed."""

from __future__ import annotations

import functools
import json
import statistics

import pytest

from helpers import run_cli, run_cli_captured

COMMON = {"device", "torch", "triton", "commit", "dtype", "stage", "path", "projected", "unit", "throughput",
          "seconds_per_item", "seconds_per_item_runs", "flop_per_item", "ratio", "repeats", "spread", "machine_load"}
MEASURED_ONLY = {"batch", "tflops", "mfu", "peak_mem_gib", "mem_measure"}
MEASURED = COMMON | MEASURED_ONLY
PROJECTED = COMMON | {"job", "projected_minutes", "projected_from", "floor_minutes"}
PATHS = {("1", "reference"), ("1", "fast"), ("1", "fast-no-jpeg"),
         ("2", "reference"), ("2", "per-image-no-wgrad"), ("2", "fast"), ("2", "fast-compile")} | {
    (s, p) for s in ("e2e", "in1k") for p in ("reference", "fast", "fast-no-jpeg", "fast-compile")}
REPEATS, STEPS1, STEPS2, REF_IMAGES, BATCH = 2, 4, 2, 1, 4
TINY = {"ipc": 1, "classes": 2}  # the CLI times the preset's 10 classes at IPC 10; the test 2 classes at IPC 1
TAG = "bench_digits-mar_cpu-1t"


@pytest.fixture(scope="module")
def mar_run(tmp_path_factory):
    """One tiny ``bench --backbone mar --compile --json`` run: (out folder, rows from the file, stdout, stderr).
    The compiled stage-2 path is traced by dynamo and run by its ``eager`` backend: the bench's wiring is what is
    checked here, Inductor's code in tests/test_mar_engines.py."""
    import torch

    from cao2_fast import bench_mar
    from cao2_fast.engines import compiled

    out = tmp_path_factory.mktemp("bench_mar")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_mar, "run_bench_mar", functools.partial(bench_mar.run_bench_mar, **TINY))
        mp.setattr(compiled, "compiled_callable",
                   lambda module, mode, dynamic, device: torch.compile(module, backend="eager", dynamic=dynamic))
        stdout, stderr = run_cli_captured(
            ["bench", "--backbone", "mar", "--device", "cpu", "--threads", "1", "--steps1", str(STEPS1),
             "--steps2", str(STEPS2), "--ref-images", str(REF_IMAGES), "--batch", str(BATCH),
             "--repeats", str(REPEATS), "--out", str(out), "--json", "--compile"])
    return out, json.loads((out / f"{TAG}.json").read_text()), stdout, stderr


@pytest.fixture(scope="module")
def preset_cost():
    """The digits MAR preset's generator and the config the tiny run times (IPC 1, 2 classes)."""
    from cao2_fast.pipeline import Distiller

    d = Distiller.from_preset("digits-mar", ipc=TINY["ipc"], device="cpu", class_ids=list(range(TINY["classes"])))
    return d.generator, d.config


def _by(rows):
    return {(r["stage"], r["path"]): r for r in rows}


def test_every_stage_and_path_is_there_with_the_dit_bench_fields(mar_run):
    out, rows, _, _ = mar_run
    assert [(r["stage"], r["path"]) for r in rows].count(("1", "fast")) == 1
    assert {(r["stage"], r["path"]) for r in rows} == PATHS and len(rows) == len(PATHS)
    for r in rows:
        assert (PROJECTED if r["projected"] else MEASURED) <= set(r), (PROJECTED | MEASURED) - set(r)
        assert r["model"] == "digits-mar" and r["backbone"] == "mar" and r["recipe"] == "official"
        assert r["device"].startswith("cpu") and "1 threads" in r["device"]
        assert r["repeats"] == REPEATS and len(r["seconds_per_item_runs"]) == REPEATS
        assert r["throughput"] > 0 and r["seconds_per_item"] > 0
    assert {r["unit"] for r in rows if r["stage"] == "1"} == {"candidates/s"}
    assert {r["unit"] for r in rows if r["stage"] == "2"} == {"latent-steps/s"}


def test_the_paths_are_what_they_say(mar_run):
    _, rows, _, _ = mar_run
    by = _by(rows)
    n = 2 * TINY["ipc"]  # candidates per class
    s1 = {p: by["1", p] for p in ("reference", "fast", "fast-no-jpeg")}
    assert {p: r["teacher_io"] for p, r in s1.items()} == {"reference": "jpeg", "fast": "jpeg",
                                                            "fast-no-jpeg": "tensor"}
    assert s1["reference"]["batch"] == 2 * n  # one class per batch, guided (two rows per candidate)
    assert s1["fast"]["batch"] == s1["fast-no-jpeg"]["batch"] == 2 * n * TINY["classes"]
    assert all(r["steps_timed"] == STEPS1 and r["sample_steps"] == 16 for r in s1.values())
    assert all(0 <= r["decode_score_share"] <= 1 for r in s1.values())
    s2 = {p: by["2", p] for p in ("reference", "per-image-no-wgrad", "fast", "fast-compile")}
    assert {p: (r["batch"], r["weight_grads"], r["dtype"], r["engine"]) for p, r in s2.items()} == {
        "reference": (1, True, "float32", "eager"), "per-image-no-wgrad": (1, False, "float32", "eager"),
        "fast": (BATCH, False, "float32", "eager"), "fast-compile": (BATCH, False, "float32", "compile")}
    assert s2["fast-compile"]["compile_s"] > 0 and all(r["compile_s"] is None for p, r in s2.items()
                                                        if p != "fast-compile")


def test_ratios_are_reference_time_over_path_time(mar_run):
    _, rows, _, _ = mar_run
    by = _by(rows)
    for r in rows:
        ref = by[r["stage"], "reference"]
        assert r["ratio"] == pytest.approx(ref["seconds_per_item"] / r["seconds_per_item"])
        per_round = [a / b for a, b in zip(ref["seconds_per_item_runs"], r["seconds_per_item_runs"])]
        assert (r["spread"]["ratio"]["min"], r["spread"]["ratio"]["max"]) == pytest.approx(
            (min(per_round), max(per_round)))
        if not r["projected"]:
            assert r["seconds_per_item"] == pytest.approx(statistics.median(r["seconds_per_item_runs"]))
    assert by["1", "reference"]["ratio"] == by["2", "reference"]["ratio"] == 1.0


def test_flops_per_item_come_from_the_generators_cost_model(mar_run, preset_cost):
    from cao2_fast.config import with_overrides

    _, rows, _, _ = mar_run
    gen, cfg = preset_cost
    per_candidate = gen.stage1_flops(cfg) / cfg.num_candidates  # the preset's 16 iterations
    per_latent_step = gen.stage2_flops(cfg) / cfg.stage2_steps
    timed = gen.stage1_flops(with_overrides(cfg, sample_steps=STEPS1))
    for r in rows:
        if r["stage"] in ("1", "2"):
            want = per_candidate if r["stage"] == "1" else per_latent_step
            assert r["flop_per_item"] == pytest.approx(want, rel=1e-12)
            assert r["tflops"] == pytest.approx(want / r["seconds_per_item"] / 1e12)
            assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
        if r["stage"] == "1":  # a shorter schedule's sampling time is scaled to the preset's by the FLOP ratio
            assert r["sampling_scale"] == pytest.approx(gen.stage1_flops(cfg) / timed) and r["sampling_scale"] > 1


def test_projected_rows_are_marked_and_carry_no_measured_looking_fields(mar_run):
    _, rows, _, _ = mar_run
    by = _by(rows)
    for r in rows:
        assert r["projected"] is (r["stage"] in ("e2e", "in1k"))
        if not r["projected"]:
            assert "RSS" in r["mem_measure"] and r["peak_mem_gib"] >= 0
            continue
        assert not MEASURED_ONLY & set(r), MEASURED_ONLY & set(r)
        s1 = r["path"]
        s1 = "fast" if r["path"] == "fast-compile" else s1
        s2 = "fast" if r["path"] == "fast-no-jpeg" else r["path"]
        assert r["projected_from"] == [f"stage 1 {s1}", f"stage 2 {s2}"]
        r1, r2 = by["1", s1], by["2", s2]
        job = r["job"]
        if r["stage"] == "e2e":  # the digits job `distill --backbone mar` runs: 10 classes at IPC 10
            assert job == {"candidates": 200, "latents": 100}
            seconds = 200 * r1["seconds_per_item"] + 100 * 100 * r2["seconds_per_item"]
        else:  # mar_base's FLOPs at the TFLOP/s each stage row reached
            assert job == {"candidates": 20_000, "latents": 10_000}
            assert r["flop_stage1"] / 20_000 == pytest.approx(9.1e12, rel=0.01)  # docs/mar.md, Cost
            assert r["flop_stage2"] / 10_000 == pytest.approx(18.7e12, rel=0.01)
            assert r["flop_per_item"] == pytest.approx(r["flop_stage1"] + r["flop_stage2"])
            seconds = r["flop_stage1"] / (r1["tflops"] * 1e12) + r["flop_stage2"] / (r2["tflops"] * 1e12)
            assert r["floor_minutes_h100"] == pytest.approx(r["flop_per_item"] / 798e12 / 60)
        assert r["projected_minutes"] == pytest.approx(seconds / 60)
        assert r["floor_minutes"] == pytest.approx(r["flop_per_item"] / (r["peak_tflops"] * 1e12) / 60)


def test_json_and_chart_are_written_under_a_mar_name(mar_run):
    out, rows, stdout, stderr = mar_run
    assert sorted(p.name for p in out.iterdir()) == [f"{TAG}.json", f"{TAG}.png"]
    assert (out / f"{TAG}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(stdout) == rows  # --json: the rows on stdout, the table on stderr
    assert "fast-no-jpeg" in stderr and "per-image-no-wgrad" in stderr
    assert "projected ImageNet-1K IPC10 on mar_base" in stderr and "min at 100 % of an H100" in stderr
    assert f"wrote {out / TAG}.json" in stderr


@pytest.mark.parametrize("args, message", [
    (["--early-reject", "10", "--early-keep", "10"], "--early-reject: early rejection is a DiT sampler option"),
    (["--early-keep", "10"], "--early-keep: early rejection is a DiT sampler option"),
    (["--early-reject-grid"], "--early-reject-grid: early rejection is a DiT sampler option"),
    (["--ops", "triton"], "--ops triton: the Triton stage-2 kernels are the DiT's"),
    (["--model", "dit-xl-2-256", "--random-weights"], "--model dit-xl-2-256 builds a DiT architecture"),
    (["--model", "tiny"], "--model tiny builds a DiT architecture"),
    (["--preset", "digits"], "--preset digits is a DiT preset"),
    (["--steps1", "1"], "--steps1 must be at least 2 for MAR"),
    (["--steps2", "0"], "--steps2 must be at least 1 (got 0)"),
])
def test_options_that_mean_nothing_with_mar_exit_2_in_one_line(args, message, capsys, tmp_path):
    code, out, err = run_cli(["bench", "--backbone", "mar", "--device", "cpu", *args, "--out", str(tmp_path / "b")],
                             capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == "" and not (tmp_path / "b").exists()


def test_backbone_mar_alone_benches_the_preset_with_its_full_schedule(monkeypatch, tmp_path):
    """Without options: the digits-mar preset (its full sampling schedule, steps1 None), 3 repeats, on the CPU."""
    from cao2_fast import bench_mar
    from cao2_fast.cli.main import main

    seen = {}

    def record(out_dir, device, log, warn, **kw):
        seen.update(kw, device=device, tag=bench_mar.tag(device))
        raise SystemExit(0)

    monkeypatch.setattr(bench_mar, "run_and_write", record)
    with pytest.raises(SystemExit):
        main(["bench", "--backbone", "mar", "--device", "cpu", "--out", str(tmp_path)])
    assert seen["steps1"] is None and seen["repeats"] == 3 and seen["fast_dtype"] is None
    assert (seen["steps2"], seen["ref_images"], seen["fast_batch"]) == (5, 2, None)
    assert seen["device"] == "cpu" and "mar" in seen["tag"] and seen["tag"].startswith("bench_digits-mar_cpu-")


def test_the_dit_bench_keeps_its_defaults(monkeypatch):
    """``--backbone`` defaults to dit, whose stage 1 still times 5 steps unless told otherwise."""
    import cao2_fast.benchmark as benchmark
    from cao2_fast.cli.main import main

    seen = {}

    def record(*args, **kwargs):
        seen["args"] = args
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "run_bench", record)
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "digits", "--device", "cpu"])
    assert seen["args"][:5] == ("digits", "cpu", None, 5, 5)


@pytest.mark.parametrize("kw, message", [({"steps1": 1}, "steps1 must be a whole number of at least 2"),
                                         ({"classes": 11}, "the digits-mar preset has 10 classes"),
                                         ({"repeats": 0}, "repeats must be a whole number of at least 1")])
def test_the_library_call_refuses_bad_settings_before_any_work(kw, message):
    from cao2_fast.bench_mar import run_bench_mar
    from cao2_fast.errors import UserError

    with pytest.raises(UserError, match=message):
        run_bench_mar("cpu", log=lambda m: pytest.fail(f"work began: {m}"), **kw)


def test_the_chart_draws_every_path_and_its_ratio(mar_run, monkeypatch):
    """The attribution paths are bars too: each stage panel has its paths, in the rows' order, and the
    speed-up panel every non-reference path's ratio."""
    from cao2_fast import benchmark

    _, rows, _, _ = mar_run
    drawn = []
    real = benchmark._bars
    monkeypatch.setattr(benchmark, "_bars", lambda ax, names, vals, *a: (drawn.append((names, vals)),
                                                                           real(ax, names, vals, *a)))
    benchmark.chart_png(rows)
    stage1, stage2, job, ratios = drawn
    assert [n.replace("\n", "") for n in stage1[0]] == ["reference", "fast", "fast-no-jpeg"]
    assert [n.replace("\n", "") for n in stage2[0]] == ["reference", "per-image-no-wgrad", "fast", "fast-compile"]
    assert [n.replace("\n", "") for n in job[0]] == ["reference", "fast", "fast-no-jpeg", "fast-compile"]
    want = [r["ratio"] for s in ("1", "2", "e2e") for r in rows if r["stage"] == s and r["path"] != "reference"]
    assert ratios[1] == want and len(want) == 8
