"""``cao2-fast selftest``: check every engine, kernel and stage-2 path this machine offers, on random weights."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .common import Device, DeviceOpt
from .main import app

RECORD = "selftest.json"
RECORD_KIND = "cao2-fast selftest"


class SelftestModel(str, Enum):
    tiny = "tiny"
    dit_s = "dit-s-2-256"
    dit_b = "dit-b-2-256"
    dit_l = "dit-l-2-256"
    dit_xl = "dit-xl-2-256"


EXAMPLES = """
Examples:

  cao2-fast selftest                          # this machine's engines, kernels, stage 2

  cao2-fast selftest --device cuda --model dit-xl-2-256 --out selftest/
"""


@app.command(epilog=EXAMPLES)
def selftest(
    device: DeviceOpt = Device.auto,
    model: Annotated[SelftestModel | None, typer.Option(help="Random-weight models at this size (default: dit-s-2-256 on CUDA, tiny on CPU).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for selftest.json (the table as JSON); created if missing. An existing selftest.json there is replaced only if selftest wrote it.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Also check torch.compile on CPU (about a minute; always checked on CUDA).")] = False,
) -> None:
    """Check this machine: every available engine against eager, the Triton kernels against their references, a
    CUDA-graph stage-2 step against the plain one, bf16 stage 2 against fp32, and a throughput figure per stage.
    Exit code 0 only if nothing failed."""
    import platform

    import torch

    from .. import __version__
    from ..fileio import atomic_write, json_bytes
    from ..selftest import run_checks
    from .common import resolve_device

    target = _check_out(out) if out is not None else None  # before minutes of checks
    dev = resolve_device(device)
    name = (model.value if model else None) or ("dit-s-2-256" if dev == "cuda" else "tiny")
    checks = run_checks(dev, name, with_compile=True if compile else None,
                        log=(lambda m: None) if json_out else (lambda m: print(m, file=sys.stderr)))
    gpu = torch.cuda.get_device_name() if dev == "cuda" else None
    record = {"kind": RECORD_KIND, "cao2_fast": __version__, "torch": torch.__version__,
              "python": platform.python_version(),
              "device": dev, "gpu": gpu, "model": name, "checks": [c.to_json() for c in checks],
              "failed": sum(c.result == "fail" for c in checks)}
    if target is not None:
        _check_out(out)  # once more: something may have taken the name while the checks ran
        try:
            atomic_write(target, json_bytes(record))
        except OSError as e:
            raise UserError(f"{target}: cannot write the selftest record ({e.strerror or e})") from None
    if json_out:
        print(json_bytes(record).decode())  # strict JSON: numbers as numbers, a non-finite one as null
    else:
        width = max(len(c.name) for c in checks)
        print(f"cao2-fast {__version__} selftest on {gpu or dev} ({name} random weights)")
        for c in checks:
            print(f"{c.name:<{width}}  {c.result:<4}  {c.figure}{'  ' if c.figure and c.reason else ''}{c.reason}")
        counts = {k: sum(c.result == k for c in checks) for k in ("pass", "fail", "skip")}
        print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    if record["failed"]:
        raise typer.Exit(1)


def _ours(path: Path) -> bool:
    """Whether ``path`` holds a record selftest wrote: a JSON object whose ``kind`` is ``cao2-fast selftest``, or
    one from before that field (``checks``, ``failed`` and the cao2_fast version)."""
    import json

    try:
        if path.stat().st_size > 16 << 20:
            return False
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and (rec.get("kind") == RECORD_KIND
                                      or {"checks", "failed", "cao2_fast"} <= set(rec))


def _check_out(out: Path) -> Path:
    """The record's path in the folder ``out``, refused with one line when ``out`` is not a folder (a file, or a
    path through one) or when a selftest.json there was not written by selftest."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; --out takes a folder to write {RECORD} into")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is a file, so the folder cannot be made; --out takes a folder")
    target = out / RECORD
    if target.is_symlink() or (target.exists() and not (target.is_file() and _ours(target))):
        raise UserError(f"{target}: exists and was not written by selftest; move it away or choose another --out "
                        "(nothing is overwritten)")
    return target
