"""Where the kernel tests run: natively on CUDA when present, else on CPU through Triton's interpreter.

Import this before anything imports a ``cao2_fast.kernels`` kernel module: ``@triton.jit`` reads ``TRITON_INTERPRET``
once, when the kernel is decorated. An explicit ``TRITON_INTERPRET`` in the environment is left as it is.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
