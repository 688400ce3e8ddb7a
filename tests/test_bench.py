"""``cao2-fast bench``: the rows it writes, their arithmetic and spread, the chart, and bad input."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from helpers import run_cli

COMMON = {"device", "torch", "triton", "commit", "dtype", "stage", "path", "projected", "unit", "throughput",
          "seconds_per_item", "seconds_per_item_runs", "flop_per_item", "ratio", "repeats", "spread", "machine_load"}
MEASURED = COMMON | {"batch", "tflops", "mfu", "peak_mem_gib", "mem_measure"}
MEASURED_ONLY = {"batch", "tflops", "mfu", "peak_mem_gib", "mem_measure"}
REPEATS = 4  # the least count with quartiles


TAG = "bench_tiny_cpu-1t_compile_dpmpp25"


# The bench in a child process with torch.compile's compiled_callable traced by dynamo and run by its ``eager``
# backend, so the wiring of --compile is checked cheaply (Inductor's output against eager is tests/test_engines.py's).
# A child process, because autograd after torch.compile leaves this process unable to run autograd in forked
# children (PyTorch's autograd-and-fork limit), which the DataLoader-worker tests of test_stream.py do.
CHILD = """
import sys, torch
from cao2_fast.engines import compiled
compiled.compiled_callable = lambda module, mode, dynamic, device: torch.compile(module, backend="eager",
                                                                                  dynamic=dynamic)
from cao2_fast.cli.main import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    """One tiny bench run with --json and --compile: (out folder, rows from the file, stdout, stderr)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--model", "tiny", "--random-weights", "--device", "cpu", "--threads", "1", "--steps1", "1",
            "--steps2", "2", "--ref-images", "1", "--repeats", str(REPEATS), "--out", str(out), "--json",
            "--early-reject", "25", "--early-keep", "2",  # tiny: K 2, IPC 2, so 4 candidates per class
            "--sampler", "dpmpp", "--sample-steps", "25", "--compile"]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / f"{TAG}.json").read_text()), done.stdout, done.stderr


def test_bench_writes_every_stage_and_path_with_the_fields(tiny_rows):
    out, rows, _, _ = tiny_rows
    assert (out / f"{TAG}.png").stat().st_size > 1000
    assert {(r["stage"], r["path"]) for r in rows} == ({(s, p) for s in ("1", "2", "e2e") for p in ("reference", "fast")}
                                                     | {(s, p) for s in ("1", "e2e") for p in ("fast+early",
                                                                                               "fast+dpmpp",
                                                                                               "fast-compile")})
    for r in rows:
        assert (MEASURED if r["stage"] != "e2e" else COMMON) <= set(r), MEASURED - set(r)
        assert r["device"].startswith("cpu") and "1 threads" in r["device"]
        assert r["throughput"] > 0 and r["seconds_per_item"] > 0


def test_projected_rows_are_marked_and_carry_no_measured_looking_fields(tiny_rows):
    _, rows, _, _ = tiny_rows
    for r in rows:
        assert r["projected"] is (r["stage"] == "e2e")
        if r["projected"]:
            assert not MEASURED_ONLY & set(r), MEASURED_ONLY & set(r)
            stage2 = "reference" if r["path"] == "reference" else "fast"  # every fast stage 1 with the fast stage 2
            assert r["projected_from"] == [f"stage 1 {r['path']}", f"stage 2 {stage2}"]
        else:
            assert r["peak_mem_gib"] >= 0 and "RSS" in r["mem_measure"]


def test_every_figure_carries_the_spread_of_its_runs(tiny_rows):
    _, rows, _, _ = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    for r in rows:
        runs = r["seconds_per_item_runs"]
        assert len(runs) == REPEATS
        if not r["projected"]:  # a projection is made of the stage medians; its runs are those of each round
            assert r["seconds_per_item"] == pytest.approx(statistics.median(runs))
        ref_runs = by[r["stage"], "reference"]["seconds_per_item_runs"]
        ratio = r["spread"]["ratio"]
        assert (ratio["min"], ratio["max"]) == pytest.approx((min(a / b for a, b in zip(ref_runs, runs)),
                                                              max(a / b for a, b in zip(ref_runs, runs))))
        key = "projected_minutes" if r["projected"] else "throughput"
        sp = r["spread"][key]
        assert sp["n"] == REPEATS and sp["min"] <= sp["q1"] <= sp["q3"] <= sp["max"]
        if r["projected"]:
            assert (sp["min"], sp["max"]) == pytest.approx((min(runs) / 60, max(runs) / 60))
        else:
            assert (sp["min"], sp["max"]) == pytest.approx((1 / max(runs), 1 / min(runs)))
            assert r["spread"]["mfu"]["max"] == pytest.approx(r["spread"]["tflops"]["max"] / r["peak_tflops"])
            assert sp["min"] <= r["throughput"] <= sp["max"]


def test_json_goes_to_stdout_the_table_to_stderr(tiny_rows):
    _, rows, stdout, stderr = tiny_rows
    assert json.loads(stdout) == rows
    assert "min–max" in stderr and "IQR" in stderr and "min (projected)" in stderr and "wrote " in stderr


def test_the_machine_load_is_recorded_before_and_after(tiny_rows):
    _, rows, _, _ = tiny_rows
    import os

    load = rows[0]["machine_load"]
    assert all(r["machine_load"] == load for r in rows)
    for when in ("before", "after"):
        snap = load[when]
        assert len(snap["loadavg"]) == 3 and all(x >= 0 for x in snap["loadavg"])
        assert snap["cpus"] == os.cpu_count() and snap["bench_threads"] == 1
    assert isinstance(load["busy_before"], bool) and isinstance(load["busy_during"], bool)


def test_the_table_marks_projections_and_prints_ranges(tiny_rows):
    from cao2_fast.benchmark import format_table

    _, rows, _, _ = tiny_rows
    lines = format_table(rows).splitlines()
    fast2 = next(x for x in lines if x.split()[:2] == ["2", "fast"])
    r = next(x for x in rows if (x["stage"], x["path"]) == ("2", "fast"))
    lo, hi = r["spread"]["throughput"]["min"], r["spread"]["throughput"]["max"]
    assert f"{lo:,.0f}–{hi:,.0f}" in fast2 or f"{lo:.4g}" in fast2.replace(",", "")
    for line in (x for x in lines if x.split()[:1] == ["e2e"]):
        assert "min (projected)" in line and line.split()[3] == "-"  # no batch
    assert any(x.startswith("median of 4 timed runs") for x in lines)
    assert any(x.startswith("machine: 1-minute load average") for x in lines)


def test_the_chart_draws_the_ranges_as_error_bars(tiny_rows, monkeypatch):
    import matplotlib.figure
    from matplotlib.container import ErrorbarContainer

    from cao2_fast.benchmark import chart_png

    _, rows, _, _ = tiny_rows
    seen = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **kw: (seen.append(fig), real(fig, *a, **kw))[1])
    assert chart_png(rows)[:4] == b"\x89PNG"
    axes = seen[0].axes
    assert len(axes) == 4 and all(any(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in axes)


def test_bench_rows_are_consistent(tiny_rows):
    _, rows, _, _ = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    for stage, path in (("1", "fast"), ("2", "fast"), ("e2e", "fast"), ("1", "fast+early"), ("e2e", "fast+early"),
                        ("1", "fast+dpmpp"), ("e2e", "fast+dpmpp"), ("1", "fast-compile"), ("e2e", "fast-compile")):
        ref, fast = by[stage, "reference"], by[stage, path]
        assert ref["ratio"] == 1.0
        assert fast["ratio"] == pytest.approx(ref["seconds_per_item"] / fast["seconds_per_item"])
        for r in (ref, fast):
            assert r["throughput"] == pytest.approx((3600 if stage == "e2e" else 1) / r["seconds_per_item"])
            if stage != "e2e":
                assert r["tflops"] == pytest.approx(r["flop_per_item"] / r["seconds_per_item"] / 1e12)
                assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
    assert by["2", "reference"]["batch"] == 1 and by["2", "fast"]["batch"] > 1
    e2e = by["e2e", "fast"]
    job = e2e["job"]
    assert e2e["seconds_per_item"] == pytest.approx(job["candidates"] * by["1", "fast"]["seconds_per_item"]
                                                    + job["latents"] * 100 * by["2", "fast"]["seconds_per_item"])


def test_compile_times_stage_1_on_the_compiled_dit_and_keeps_its_compile_time_apart(tiny_rows):
    """--compile: stage 2's fast path runs on the compile engine, and stage 1 gains fast-compile, the fast stage 1
    with the DiT compiled; its first run is its compile_s, outside the medians; the job is projected on it too."""
    _, rows, _, stderr = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    c1, fast1 = by["1", "fast-compile"], by["1", "fast"]
    assert c1["engine"] == "compile" and c1["compile_s"] > 0 and "engine" not in fast1
    assert by["2", "fast"]["engine"] == "compile" and by["2", "fast"]["compile_s"] > 0
    assert (c1["flop_per_item"], c1["steps_timed"], c1["batch"]) == (fast1["flop_per_item"], fast1["steps_timed"],
                                                                     fast1["batch"])
    e2e = by["e2e", "fast-compile"]
    assert e2e["seconds_per_item"] == pytest.approx(e2e["job"]["candidates"] * c1["seconds_per_item"]
                                                    + e2e["job"]["latents"] * 100 * by["2", "fast"]["seconds_per_item"])
    line = next(x for x in stderr.splitlines() if x.startswith("torch.compile: first run"))
    assert f"stage 1 fast-compile {c1['compile_s']:.0f} s" in line and "stage 2 fast" in line


def test_early_rejection_is_timed_on_whole_steps_and_counted(tiny_rows):
    """--early-reject 25 --early-keep 2 on 4 candidates per class: a check halfway needs an even step count (--steps1
    1 is raised to 2), and the DiT runs 25 guided steps on 4 candidates and 25 on 2: 3/4 of the exact forwards."""
    _, rows, _, _ = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    early, fast = by["1", "fast+early"], by["1", "fast"]
    assert early["steps_timed"] == fast["steps_timed"] == by["1", "reference"]["steps_timed"] == 2
    assert early["early_reject"] == [[25, 2]] and by["e2e", "fast+early"]["early_reject"] == [[25, 2]]
    assert early["flop_per_item"] == pytest.approx(0.75 * fast["flop_per_item"])
    e2e, job = by["e2e", "fast+early"], by["e2e", "fast+early"]["job"]
    assert e2e["seconds_per_item"] == pytest.approx(job["candidates"] * early["seconds_per_item"]
                                                    + job["latents"] * 100 * by["2", "fast"]["seconds_per_item"])


def test_few_step_sampler_is_timed_on_its_share_and_projected(tiny_rows):
    """--sampler dpmpp --sample-steps 25 with 2 of 50 steps timed: 1 of its 25 steps, scaled alike; its DiT work is
    half the exact stage 1's, and its job row carries the ImageNet-1K projection, also half the stage-1 DiT FLOPs."""
    _, rows, _, stderr = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    few, fast = by["1", "fast+dpmpp"], by["1", "fast"]
    assert few["steps_timed"] == 2 and (few["sampler"], few["sample_steps"]) == ("dpmpp", 25)
    assert few["flop_per_item"] == pytest.approx(0.5 * fast["flop_per_item"])
    e2e = by["e2e", "fast+dpmpp"]
    assert e2e["seconds_per_item"] == pytest.approx(e2e["job"]["candidates"] * few["seconds_per_item"]
                                                    + e2e["job"]["latents"] * 100 * by["2", "fast"]["seconds_per_item"])
    p = e2e["imagenet_ipc10"]
    dit_share = (p["stage1_eflop"] * 1e18 / 1000 - 40 * (p["decode_flop_per_image"] + p["classify_flop_per_image"])) \
        / (40 * 50 * 2 * p["dit_flop_per_forward"])
    assert dit_share == pytest.approx(0.5)
    assert p["minutes_at_peak"] < p["exact_minutes_at_peak"] and "fast+dpmpp (dpmpp, 25 steps)" in stderr


@pytest.mark.parametrize("args,message", [
    (["--preset", "digits", "--sampler", "dpmpp"], "--sampler dpmpp needs --sample-steps N"),
    (["--preset", "digits", "--sample-steps", "20"], "add --sampler ddim or dpmpp"),
    (["--preset", "digits", "--sampler", "dpmpp", "--sample-steps", "1000"], "dpmpp takes at most 999 steps"),
    (["--preset", "digits", "--sampler", "euler", "--sample-steps", "10"], "--sampler 'euler'"),
    (["--backbone", "mar", "--sampler", "dpmpp", "--sample-steps", "10"], "drop them with --backbone mar"),
    (["--preset", "digits", "--early-reject", "10"], "needs both --early-reject STEP and --early-keep M"),
    (["--preset", "digits", "--early-reject", "10", "--early-keep", "5"], "keep between IPC (10) and K·IPC (20)"),
    (["--preset", "digits", "--early-reject", "50", "--early-keep", "10"], "a check must come after 1 to 49"),
    (["--preset", "digits", "--early-reject", "10,x", "--early-keep", "10"], "expected a whole number"),
    (["--preset", "digits", "--early-reject-grid", "--early-reject", "10", "--early-keep", "10"], "own grid"),
    ([], "choose one of --preset digits or --model"),
    (["--preset", "imagenet"], "'imagenet' is not one of 'digits'"),
    (["--model", "dit-xl-2-256"], "--random-weights"),
    (["--preset", "digits", "--threads", "0"], "--threads must be at least 1"),
    (["--preset", "digits", "--repeats", "0"], "--repeats must be at least 1"),
    (["--preset", "digits", "--batch", "0"], "--batch must be at least 1 (got 0)"),
    (["--preset", "digits", "--batch", "-4"], "--batch must be at least 1 (got -4)"),
    (["--preset", "digits", "--ops", "cuda"], "'cuda' is not one of 'torch', 'triton'"),
    (["--preset", "digits", "--dtype", "fp8"], "'fp8' is not one of"),
])
def test_bench_rejects_bad_input_in_one_line(args, message, capsys, tmp_path):
    code, out, err = run_cli(["bench", *args, "--out", str(tmp_path / "b")], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "b").exists()


def test_paths_are_timed_alternately_and_the_medians_reported(monkeypatch):
    from cao2_fast import benchmark

    order = []
    fake = {"ref": [5.0, 1.0, 3.0], "fast": [0.2, 0.4, 9.0]}
    monkeypatch.setattr(benchmark, "_timed", lambda fn, device: fn())

    def path(name):
        def run():
            order.append(name)
            return fake[name][sum(o == name for o in order) - 1]
        return run

    t_ref, t_fast = benchmark._timed_pair(path("ref"), path("fast"), "cpu", 3)
    assert order == ["ref", "fast"] * 3
    assert (t_ref, t_fast) == (fake["ref"], fake["fast"])  # run by run, so each round pairs up
    assert (statistics.median(t_ref), statistics.median(t_fast)) == (3.0, 0.4)


def test_stage1_timing_scales_the_sampling_and_counts_the_decodes_once(monkeypatch):
    """A stage-1 path timed over a shortened schedule: its sampling time is scaled to 50 steps, the time it spends
    decoding and scoring (inside its clock) is not; medians over the alternating runs."""
    from types import SimpleNamespace

    from cao2_fast import benchmark

    now, order = [0.0], []
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def path(name, sampling, decode):
        runs = iter(zip(sampling, decode))

        def run(clock):
            order.append(name)
            s, d = next(runs)
            now[0] += s
            with clock:
                now[0] += d
        return run

    totals, inside = benchmark._timed_scaled([path("a", [2, 4, 3], [1, 1, 5]), path("b", [1, 1, 1], [0, 0, 0])],
                                             "cpu", 3, scale=10)
    assert order == ["a", "b"] * 3
    assert totals == [[21, 41, 35], [10, 10, 10]]  # a per run: 2·10 + 1, 4·10 + 1, 3·10 + 5
    assert inside == [[1, 1, 5], [0, 0, 0]]


@pytest.mark.parametrize("extra, expected", [([], 7), (["--repeats", "2"], 2)])
def test_bench_repeats_default_to_seven_on_cpu(monkeypatch, extra, expected):
    """Short runs on a shared CPU swing with its load: the CPU default takes the median of 7 alternating runs."""
    import cao2_fast.benchmark as benchmark
    from cao2_fast.cli.main import main

    seen = {}

    def record(*args, repeats, **kwargs):
        seen["repeats"] = repeats
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "run_bench", record)
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "digits", "--device", "cpu", *extra])
    assert seen == {"repeats": expected}


def test_spread_gives_quartiles_from_four_runs():
    from cao2_fast.benchmark import spread

    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "max": 3.0, "q1": None, "q3": None, "n": 3}
    sp = spread([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (sp["min"], sp["max"], sp["q1"], sp["q3"], sp["n"]) == (1.0, 10.0, 2.0, 4.0, 5)


def test_cpu_memory_is_the_growth_during_the_run_not_the_lifetime_peak():
    """A run that allocates and touches 64 MiB grows the resident set by about that much; a run that allocates
    nothing reads near 0, although the process peaked far higher before it (ru_maxrss would report that peak)."""
    from cao2_fast.benchmark import _RssSampler, rss_growth

    big = bytearray(256 << 20)  # the process's lifetime peak goes up by 256 MiB, then comes down
    del big
    none, how = rss_growth(lambda: None)
    held = []
    grown, _ = rss_growth(lambda: held.append(torch.ones(64 << 20, dtype=torch.uint8)))  # written: resident
    assert none < 16 / 1024 and "RSS" in how
    assert 60 / 1024 <= grown <= 100 / 1024
    with _RssSampler() as s:  # where the peak mark cannot be reset: sampled
        base = s.peak_kib
        held.append(torch.ones(32 << 20, dtype=torch.uint8))
    assert s.peak_kib - base >= 30 << 10


def test_a_busy_machine_gets_a_warning_line(monkeypatch, capsys, tmp_path):
    import os

    from cao2_fast import benchmark
    from cao2_fast.errors import UserError

    def stop(*a, **kw):
        raise UserError("stopped after the load check")

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 60.0, 50.0))
    monkeypatch.setattr(benchmark, "build_setup", stop)
    code, out, err = run_cli(["bench", "--model", "tiny", "--random-weights", "--device", "cpu", "--threads", "1",
                              "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and err.splitlines()[-1] == "error: stopped after the load check"
    warning = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warning) == 1 and "busy before the bench (1-minute load average 64.00" in warning[0]
    quiet = {"loadavg": [0.1, 0.1, 0.1], "cpus": 2, "bench_threads": 1}
    assert not benchmark.is_busy(quiet, bench_ran=False)
    assert benchmark.is_busy(dict(quiet, loadavg=[1.8, 1, 1]), bench_ran=False)  # 1.8 others > 2 − 1 free + 0.5
    assert not benchmark.is_busy(dict(quiet, loadavg=[1.8, 1, 1]), bench_ran=True)  # 1 of it was the bench
    # an idle machine's background (a shell) is no reason to distrust a bench that uses every core
    assert not benchmark.is_busy({"loadavg": [0.42, 0.8, 0.9], "cpus": 2, "bench_threads": 2}, bench_ran=False)


@pytest.mark.parametrize("case", ["foreign-json", "foreign-png", "out-is-a-file"])
def test_bench_never_overwrites_what_it_did_not_write(case, capsys, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    target = {"foreign-json": out / "bench_tiny_cpu-1t.json", "foreign-png": out / "bench_tiny_cpu-1t.png",
              "out-is-a-file": tmp_path / "file"}[case]
    target.write_bytes(b"my notes")
    where = target if case == "out-is-a-file" else out
    code, _, err = run_cli(["bench", "--model", "tiny", "--random-weights", "--device", "cpu", "--threads", "1",
                            "--out", str(where)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {target}:"), err
    assert target.read_bytes() == b"my notes" and len(list(out.iterdir())) == (0 if case == "out-is-a-file" else 1)
