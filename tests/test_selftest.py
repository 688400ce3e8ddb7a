"""cao2-fast selftest on CPU: the CPU subset passes, every skip says why, a failure exits non-zero with its fix."""

from __future__ import annotations

import json

from helpers import run_cli

from cao2_fast import selftest


def test_selftest_on_cpu_passes_and_explains_every_skip(tmp_path, capsys):
    code, stdout, _ = run_cli(["selftest", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert code == 0, stdout
    record = json.loads((tmp_path / "selftest.json").read_text())
    checks = {c["name"]: c for c in record["checks"]}
    assert record["failed"] == 0 and record["device"] == "cpu"
    for m in ("dit", "vae_decode", "classifier", "mar_mae", "mar_head"):
        assert checks[f"engine onnx (CPU provider): {m}"]["result"] == "pass"
        assert checks[f"engine trt: {m}"]["result"] == "skip" and "cao2-fast[trt]" in checks[f"engine trt: {m}"]["reason"]
    assert checks["stage 2 bf16 vs fp32"]["result"] == "pass"
    for kind in ("ddim", "dpmpp"):
        c = checks[f"stage-1 sampler {kind}: split on cpu vs one run on the CPU"]
        assert c["result"] == "pass" and c["metric"] == "relative_error" and 0 <= c["value"] <= c["tol"] == 1e-3
    assert "candidates/s" in checks["throughput stage 1"]["figure"]
    assert "latent-steps/s" in checks["throughput stage 2"]["figure"]
    # the numbers behind each figure, as numbers
    assert checks["MAR head steps as a CUDA graph vs stepped"]["result"] == "skip"
    for m in ("dit", "vae_decode", "classifier", "mar_mae", "mar_head"):
        c = checks[f"engine onnx (CPU provider): {m}"]
        assert c["metric"] == "max_abs_diff" and isinstance(c["value"], float) and isinstance(c["tol"], float)
        assert 0 <= c["value"] <= c["tol"] == selftest.TOL[m] and f"{c['value']:.1e}" in c["figure"]
    bf16 = checks["stage 2 bf16 vs fp32"]
    assert (bf16["metric"], bf16["tol"]) == ("relative_error", 0.1) and 0 <= bf16["value"] <= 0.1
    for stage, unit in (("1", "candidates/s"), ("2", "latent-steps/s")):
        c = checks[f"throughput stage {stage}"]
        assert (c["metric"], c["unit"], c["tol"]) == ("throughput", unit, None) and c["value"] > 0
    assert all(c["value"] is None for c in record["checks"] if c["result"] == "skip")
    assert record["kind"] == "cao2-fast selftest"
    assert all(c["reason"] for c in record["checks"] if c["result"] != "pass")
    assert stdout.strip().splitlines()[-1] == f"{sum(c['result'] == 'pass' for c in record['checks'])} passed, " \
        f"0 failed, {sum(c['result'] == 'skip' for c in record['checks'])} skipped"


def test_a_failing_check_exits_1_and_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "TOL", {"dit": 0.0, "vae_decode": 1e-3, "classifier": 1e-3})  # nothing is exact
    monkeypatch.setattr(selftest, "_stage2_checks", lambda *a: None)
    monkeypatch.setattr(selftest, "_sampler_checks", lambda *a: None)
    monkeypatch.setattr(selftest, "_throughput", lambda *a: None)
    from cao2_fast import engines

    real = engines.stage1_specs
    monkeypatch.setattr(engines, "stage1_specs", lambda *a: {"dit": real(*a)["dit"]})  # one export is enough here
    monkeypatch.setattr(selftest, "_mar_engine_problem", lambda *a: ({}, {}, {}))
    code, stdout, _ = run_cli(["selftest", "--device", "cpu"], capsys)
    assert code == 1
    line = next(x for x in stdout.splitlines() if x.startswith("engine onnx (CPU provider): dit"))
    assert " fail " in line and "differs from eager; run with --engine eager or compile" in line


def test_a_check_that_crashes_is_a_failure_with_its_reason():
    r = selftest._Runner(lambda m: None)
    r.run("boom", lambda: 1 / 0)
    assert r.checks[0].result == "fail" and r.checks[0].reason == "ZeroDivisionError: division by zero"
