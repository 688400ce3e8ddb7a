"""``cao2-fast bench``: the rows it writes, their arithmetic, the chart, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli

REQUIRED = {"device", "torch", "triton", "commit", "dtype", "batch", "stage", "path", "unit", "throughput",
            "seconds_per_item", "flop_per_item", "tflops", "mfu", "peak_mem_gib", "ratio", "repeats"}


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = torch.get_num_threads()
    from cao2_fast.cli.main import main

    try:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--model", "tiny", "--random-weights", "--device", "cpu", "--threads", "1", "--steps1", "1",
                  "--steps2", "2", "--ref-images", "1", "--repeats", "1", "--out", str(out),
                  "--early-reject", "25", "--early-keep", "2"])  # tiny: K 2, IPC 2, so 4 candidates per class
            raise SystemExit(0)
    finally:
        torch.set_num_threads(before)
    assert exc.value.code == 0
    return out, json.loads((out / "bench_tiny_cpu-1t.json").read_text())


def test_bench_writes_every_stage_and_path_with_the_fields(tiny_rows):
    out, rows = tiny_rows
    assert (out / "bench_tiny_cpu-1t.png").stat().st_size > 1000
    assert {(r["stage"], r["path"]) for r in rows} == ({(s, p) for s in ("1", "2", "e2e") for p in ("reference", "fast")}
                                                     | {("1", "fast+early"), ("e2e", "fast+early")})
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"].startswith("cpu") and "1 threads" in r["device"]
        assert r["throughput"] > 0 and r["seconds_per_item"] > 0


def test_bench_rows_are_consistent(tiny_rows):
    _, rows = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    for stage, path in (("1", "fast"), ("2", "fast"), ("e2e", "fast"), ("1", "fast+early"), ("e2e", "fast+early")):
        ref, fast = by[stage, "reference"], by[stage, path]
        assert ref["ratio"] == 1.0
        assert fast["ratio"] == pytest.approx(ref["seconds_per_item"] / fast["seconds_per_item"])
        for r in (ref, fast):
            assert r["throughput"] == pytest.approx((3600 if stage == "e2e" else 1) / r["seconds_per_item"])
            assert r["tflops"] == pytest.approx(r["flop_per_item"] / r["seconds_per_item"] / 1e12)
            assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
    assert by["2", "reference"]["batch"] == 1 and by["2", "fast"]["batch"] > 1
    e2e = by["e2e", "fast"]
    job = e2e["job"]
    assert e2e["seconds_per_item"] == pytest.approx(job["candidates"] * by["1", "fast"]["seconds_per_item"]
                                                    + job["latents"] * 100 * by["2", "fast"]["seconds_per_item"])


def test_early_rejection_is_timed_on_whole_steps_and_counted(tiny_rows):
    """--early-reject 25 --early-keep 2 on 4 candidates per class: a check halfway needs an even step count (--steps1
    1 is raised to 2), and the DiT runs 25 guided steps on 4 candidates and 25 on 2: 3/4 of the exact forwards."""
    _, rows = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    early, fast = by["1", "fast+early"], by["1", "fast"]
    assert early["steps_timed"] == fast["steps_timed"] == by["1", "reference"]["steps_timed"] == 2
    assert early["early_reject"] == [[25, 2]] and by["e2e", "fast+early"]["early_reject"] == [[25, 2]]
    assert early["flop_per_item"] == pytest.approx(0.75 * fast["flop_per_item"])
    e2e, job = by["e2e", "fast+early"], by["e2e", "fast+early"]["job"]
    assert e2e["seconds_per_item"] == pytest.approx(job["candidates"] * early["seconds_per_item"]
                                                    + job["latents"] * 100 * by["2", "fast"]["seconds_per_item"])


@pytest.mark.parametrize("args,message", [
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
    assert (t_ref, t_fast) == (3.0, 0.4)


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
    assert totals == [35, 10]  # a per run: 2·10 + 1, 4·10 + 1, 3·10 + 5
    assert inside == [1, 0]


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
