"""The core install runs the main job without the optional packages; a command that needs one says which extra to
install, in one line. A subprocess hides the optional packages as if they were not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HIDDEN = ("triton", "onnx", "onnxscript", "onnxruntime", "tensorrt", "sklearn", "matplotlib", "accelerate",
          "webdataset", "datasets")

SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys
    HIDDEN = set(sys.argv[1].split(","))
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name.split(".")[0] in HIDDEN else real(name, package)

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    importlib.util.find_spec = find_spec
    sys.meta_path.insert(0, Hide())
    from cao2_fast.cli.main import main

    out = {}
    for name, args in json.loads(sys.argv[2]).items():
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out[name] = code
    print("RESULT " + json.dumps({"codes": out, "loaded": sorted(m for m in HIDDEN if m in sys.modules)}))
""")


def test_the_core_install_runs_the_digits_job_and_names_the_extra_a_command_needs(tmp_path):
    small = ["--ipc", "1", "--classes", "0,1", "--sample-steps", "4", "--stage2-steps", "2", "--t-max", "2",
             "--no-progress",
             "--device", "cpu"]
    runs = {
        "distill": ["distill", *small, "--out", str(tmp_path / "set")],
        "onnx": ["distill", *small, "--out", str(tmp_path / "other"), "--engine", "onnx"],
        "convert": ["convert", str(tmp_path / "set"), "--to", "webdataset", "--dest", str(tmp_path / "wds")],
        "eval": ["eval", "--dataset", "digits", "--distilled", str(tmp_path / "set")],
        "bench": ["bench", "--model", "tiny", "--random-weights", "--out", str(tmp_path / "bench")],
    }
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(HIDDEN), json.dumps(runs)], capture_output=True,
                          text=True, timeout=600)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1]) if "RESULT " in proc.stdout else None
    assert result is not None, proc.stderr[-3000:]
    assert result["codes"]["distill"] == 0 and (tmp_path / "set" / "manifest.json").is_file(), proc.stderr[-3000:]
    assert result["loaded"] == []  # none of them was imported
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    for name, extra in (("onnx", "onnx"), ("convert", "webdataset"), ("eval", "eval"), ("bench", "plots")):
        assert result["codes"][name] == 2, proc.stderr[-3000:]
        assert any(f'pip install "cao2-fast[{extra}]"' in line for line in errors), (name, errors)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "wds").exists() and not (tmp_path / "bench").exists()
