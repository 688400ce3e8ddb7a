"""Optional dependencies: which extra of ``pip install cao2-fast[...]`` brings each, and the one-line error a
command gives when it needs one that is missing.

The core install (the pipeline, the CLI, the eager and ``torch.compile`` engines, the digits preset) needs none of
them; ``[dev]`` installs them all.
"""

from __future__ import annotations

import importlib.util

from .errors import UserError

EXTRAS = {  # importable module -> the extra that installs it
    "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
    "tensorrt": "trt",
    "triton": "triton",
    "sklearn": "eval",
    "matplotlib": "plots",
    "webdataset": "webdataset",
    "datasets": "hf",
}


def install_line(*modules: str) -> str:
    """The pip command that brings ``modules``."""
    extras = sorted({EXTRAS.get(m, m) for m in modules})
    return f'pip install "cao2-fast[{",".join(extras)}]"'


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(*modules: str, what: str) -> None:
    """Raise one ``UserError`` line naming the pip command when any of ``modules`` is not installed."""
    gone = missing(*modules)
    if gone:
        raise UserError(f"{what} needs {' and '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} not installed: "
                        f"{install_line(*gone)}")
