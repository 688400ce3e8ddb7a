"""The command line as a new user meets it: start-up, help, progress output, defaults that protect the install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_cli

HELP_PROBE = """
import sys
from cao2_fast.cli.main import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "numpy", "diffusers", "timm", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code))
"""


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["distill", "--help"], ["eval", "-h"],
                                  ["bench", "--help"], ["info", "--help"], ["export", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "HEAVY= CODE=0", (last, proc.stderr[-2000:])


def test_version_and_short_help(capsys):
    from cao2_fast import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"cao2-fast {__version__}"
    code, out, _ = run_cli(["distill", "-h"], capsys)
    assert code == 0 and "--ipc" in out and "Examples" in out


def test_flags_show_no_bool_type(capsys):
    for cmd in ([], ["distill"], ["eval"], ["bench"], ["info"], ["export"], ["train-preset"]):
        code, out, _ = run_cli([*cmd, "--help"], capsys)
        assert code == 0 and "<bool>" not in out and "--help" in out, cmd


def test_the_package_imports_its_api_on_first_use():
    code = ("import sys, cao2_fast; assert 'torch' not in sys.modules; d = cao2_fast.Distiller; "
            "assert 'torch' in sys.modules and d.__name__ == 'Distiller'; "
            "from cao2_fast import UserError, load_dit; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import cao2_fast; cao2_fast.nope"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "has no attribute 'nope'" in proc.stderr
