"""The ``cao2-fast`` command: one Typer app, one module per command group, one error handler.

Expected errors (``UserError``) print one line and exit 2; ``CAO2_FAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import UserError

app = typer.Typer(
    name="cao2-fast",
    help="Fast CaO2 dataset distillation: sample with a DiT, select with a classifier, optimise latents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from . import bench, distill, export, info  # noqa: F401
    from . import eval as eval_cmd  # noqa: F401  (each module adds its commands to ``app``)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        if os.environ.get("CAO2_FAST_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
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
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(2)
        raise
