"""``cao2-fast convert``: a finished output folder as WebDataset shards or a Hugging Face dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .main import app


class Format(str, Enum):
    webdataset = "webdataset"
    hf = "hf"


EXAMPLES = """
Examples:

  cao2-fast convert cao2-out/digits-ipc10 --to webdataset     # -> cao2-out/digits-ipc10-webdataset/

  cao2-fast convert cao2-out/digits-ipc10 --to hf --dest /data/digits-hf

  cao2-fast convert cao2-out/digits-ipc10 --to webdataset --json   # a summary of what was written, as JSON
"""


@app.command(epilog=EXAMPLES)
def convert(
    out: Annotated[Path, typer.Argument(help="A finished output folder of cao2-fast distill.")],
    to: Annotated[Format, typer.Option("--to", help="webdataset: tar shards (.png, .cls, .json per image); hf: a datasets.Dataset saved with save_to_disk.")],
    dest: Annotated[Path | None, typer.Option(help="Destination folder (default: OUT-webdataset or OUT-hf beside OUT); must not exist.")] = None,
    shard_size: Annotated[int, typer.Option(help="Images per WebDataset shard.")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary of what was written (format, destination, classes, images, every file and its size).")] = False,
) -> None:
    """Convert a finished distilled set into the formats data pipelines load (refuses an incomplete or edited
    folder, and never writes over anything)."""
    import json

    from ..convert import convert_set

    summary = convert_set(out, to.value, dest, shard_size)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"wrote {to.value} set to {summary['dest']} ({summary['images']} images, {summary['classes']} classes, "
              f"{len(summary['files'])} files)")
