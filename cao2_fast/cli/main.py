"""The ``cao2-fast`` command: one Typer app, one module per command group, one error handler.

Expected errors (``UserError``) print one line and exit 2; ``CAO2_FAST_DEBUG=1`` shows the traceback instead.
Nothing here or in the command modules imports torch at module level: each command imports what it needs when it
runs, so ``--help`` and ``--version`` answer without loading it (``tests/test_cli_ux.py`` checks this).
"""

from __future__ import annotations

import os
import sys
import unicodedata
from typing import Annotated

import typer

from typer.core import TyperGroup

from .. import __version__
from ..errors import UserError


def _plain_flags(command, ctx) -> None:
    """Show on/off flags without a ``<bool>`` type label: they take no value. (Only this command's own option
    objects change; typer's classes are left as they are.)"""
    for p in command.get_params(ctx):
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""


class _Group(TyperGroup):
    def get_command(self, ctx, cmd_name):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _plain_flags(cmd, ctx)
        return cmd

    def format_help(self, ctx, formatter) -> None:
        _plain_flags(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
    name="cao2-fast",
    help="Fast CaO2 dataset distillation: sample with a DiT, select with a classifier, optimise latents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"cao2-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Fast CaO2 dataset distillation: sample with a DiT, select with a classifier, optimise latents."""


def _register() -> None:
    from . import bench, convert, distill, export, info, selftest  # noqa: F401
    from . import eval as eval_cmd  # noqa: F401  (each module adds its commands to ``app``)


def one_line(text: str) -> str:
    """``text`` as one printable line: line breaks and other control characters (a newline in a path, a terminal
    escape) are written as their backslash escapes, so an error stays one line whatever a path holds."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Zl", "Zp")
                   else ch for ch in text)


def main(argv: list[str] | None = None) -> None:
    if os.environ.get("WORLD_SIZE", "1") != "1" and not os.environ.get("CAO2_FAST_DEBUG"):
        # ranks that lose each other turn it into one line; torch's C++ side would first log every failed connect
        # with a backtrace (before torch is imported, or it is too late to ask)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    _register()
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # click returns an Exit's code instead of raising it here
            sys.exit(code)
    except UserError as e:
        if os.environ.get("CAO2_FAST_DEBUG"):
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # a usage error (bad option or value)
            # typer words a refused choice "Value error, 'x' is not one of ..."; the first two words add nothing
            print(f"error: {one_line(e.format_message().replace('Value error, ', ''))}", file=sys.stderr)
            sys.exit(2)
        raise
