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
    for m in ("dit", "vae_decode", "classifier"):
        assert checks[f"engine onnx (CPU provider): {m}"]["result"] == "pass"
        assert checks[f"engine trt: {m}"]["result"] == "skip" and "cao2-fast[trt]" in checks[f"engine trt: {m}"]["reason"]
    assert checks["stage 2 bf16 vs fp32"]["result"] == "pass"
    assert "candidates/s" in checks["throughput stage 1"]["figure"]
    assert "latent-steps/s" in checks["throughput stage 2"]["figure"]
    assert all(c["reason"] for c in record["checks"] if c["result"] != "pass")
    assert stdout.strip().splitlines()[-1] == f"{sum(c['result'] == 'pass' for c in record['checks'])} passed, " \
        f"0 failed, {sum(c['result'] == 'skip' for c in record['checks'])} skipped"


def test_a_failing_check_exits_1_and_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "TOL", {"dit": 0.0, "vae_decode": 1e-3, "classifier": 1e-3})  # nothing is exact
    monkeypatch.setattr(selftest, "_stage2_checks", lambda *a: None)
    monkeypatch.setattr(selftest, "_throughput", lambda *a: None)
    code, stdout, _ = run_cli(["selftest", "--device", "cpu"], capsys)
    assert code == 1
    line = next(x for x in stdout.splitlines() if x.startswith("engine onnx (CPU provider): dit"))
    assert " fail " in line and "differs from eager; run with --engine eager or compile" in line


def test_a_check_that_crashes_is_a_failure_with_its_reason():
    r = selftest._Runner(lambda m: None)
    r.run("boom", lambda: 1 / 0)
    assert r.checks[0].result == "fail" and r.checks[0].reason == "ZeroDivisionError: division by zero"
