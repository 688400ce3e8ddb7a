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
                  "--steps2", "2", "--ref-images", "1", "--repeats", "1", "--out", str(out)])
            raise SystemExit(0)
    finally:
        torch.set_num_threads(before)
    assert exc.value.code == 0
    return out, json.loads((out / "bench_tiny_cpu-1t.json").read_text())


def test_bench_writes_every_stage_and_path_with_the_fields(tiny_rows):
    out, rows = tiny_rows
    assert (out / "bench_tiny_cpu-1t.png").stat().st_size > 1000
    assert {(r["stage"], r["path"]) for r in rows} == {(s, p) for s in ("1", "2", "e2e") for p in ("reference", "fast")}
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"].startswith("cpu") and "1 threads" in r["device"]
        assert r["throughput"] > 0 and r["seconds_per_item"] > 0


def test_bench_rows_are_consistent(tiny_rows):
    _, rows = tiny_rows
    by = {(r["stage"], r["path"]): r for r in rows}
    for stage in ("1", "2", "e2e"):
        ref, fast = by[stage, "reference"], by[stage, "fast"]
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


@pytest.mark.parametrize("args,message", [
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
