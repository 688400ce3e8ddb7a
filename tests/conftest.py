"""Shared fixed-seed fixtures. Imports kernels_env first: without CUDA, Triton kernels must be decorated in
interpreter mode, whichever test module happens to import them first."""

import kernels_env  # noqa: F401

import contextlib

import numpy as np
import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU torch generator with a fixed seed, fresh for each test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def np_rng() -> np.random.Generator:
    """A numpy generator with a fixed seed, fresh for each test."""
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def _kept_tf32():
    """The two TF32 switches (matmuls, cuDNN) as they were on entry, put back on exit."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(autouse=True)
def strict_fp32_on_gpu(request):
    """GPU parity tests compare with fp32 references: TF32 off for matmuls *and* cuDNN convolutions (the DiT's
    patch embedding is a convolution, and cuDNN's TF32 default is on), restored after the test."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    with _kept_tf32():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield


@pytest.fixture
def tf32_flags():
    """A test may set the two TF32 switches directly; they are put back after it. (``monkeypatch.setattr`` cannot
    restore them: they are properties of torch's backend modules, and newer pytest tries to delete what it set.)"""
    with _kept_tf32():
        yield


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Engine cache and weights index go to a folder of the test session, never the user's home (subprocesses
    inherit it through the environment)."""
    import os

    before = os.environ.get("CAO2_FAST_CACHE")
    os.environ["CAO2_FAST_CACHE"] = str(tmp_path_factory.mktemp("cao2-cache"))
    yield
    if before is None:
        os.environ.pop("CAO2_FAST_CACHE", None)
    else:
        os.environ["CAO2_FAST_CACHE"] = before
