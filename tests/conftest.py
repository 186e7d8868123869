"""Test setup: without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before the kernels are defined (at import of fastlora.kernels).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"

try:
    import fastlora.kernels as _kernels  # noqa: E402
    HAS_TRITON = True
except ImportError:  # a machine without triton still runs the fallback's tests
    _kernels = None
    HAS_TRITON = False

BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]


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
    if _kernels is None:
        yield
        return
    from fastlora.kernels import lora_linear as launchers

    def alloc(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    monkeypatch.setattr(launchers, "_alloc", alloc)
    yield
