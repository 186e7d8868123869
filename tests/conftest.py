"""Test setup: without a GPU the Triton kernels run in Triton's interpreter on CPU tensors, so
TRITON_INTERPRET is set here, before any test module imports them (it is read when the kernels are
defined). Shared helpers live in tests/helpers.py; this file holds the fixtures."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches and counters emptied before and after the test (compile tests count
    the graphs they make)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def nan_filled_kernel_outputs(monkeypatch):
    """Every buffer the kernel launchers allocate starts as NaN, so an unwritten tile fails loudly."""
    try:
        from fastlora.kernels import gemm, passes
    except ImportError:
        yield
        return

    def alloc(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    for module in (gemm, passes):
        monkeypatch.setattr(module, "alloc", alloc)
    yield
