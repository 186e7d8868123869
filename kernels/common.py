"""What the kernel files share: index and dropout helpers (device code), and the host-side rules
for dtypes, 64-bit offsets, buffers and devices.

Dropout masks come from Philox keyed by (seed, row of x, column of x): every kernel regenerates
the same mask for the same element, so a mask is never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Triton's tl.dot input_precision for float32 operands, mirroring torch's matmul setting.
_FP32_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}
_INT32_MAX = 2**31 - 1


@triton.jit
def dropout_keep(seed, rows, cols, p):
    """keep[i, j] = U(seed; rows[i], cols[j]) >= p: the dropout mask at x[rows, cols]."""
    rows, cols = tl.broadcast(rows, cols)
    zero = rows * 0
    r0, _, _, _ = tl.philox(seed, cols, rows, zero, zero)
    return tl.uint_to_uniform_float(r0) >= p


@triton.jit
def wrapped_offsets(o, n, INT64: tl.constexpr):
    """Offsets ``o`` folded into [0, n): lanes past the edge re-read valid memory (their results
    are never stored), so loads need no mask along that axis; int64 when addresses can pass 2**31."""
    o = o % n
    if INT64:
        o = o.to(tl.int64)
    return o


@triton.jit
def widened(o, INT64: tl.constexpr):
    """``o`` as int64 when addresses can pass 2**31."""
    if INT64:
        o = o.to(tl.int64)
    return o


@triton.jit
def chunk_range(i_chunk, n_chunks, length, BLOCK: tl.constexpr):
    """[start, end) of chunk ``i_chunk`` of ``n_chunks`` along an axis of ``length``, in whole
    BLOCKs: the part of a split reduction one program reduces, in order."""
    blocks_per_chunk = tl.cdiv(tl.cdiv(length, BLOCK), n_chunks)
    start = i_chunk * blocks_per_chunk * BLOCK
    return start, min(length, start + blocks_per_chunk * BLOCK)


@triton.jit
def _probe():
    pass


# True when TRITON_INTERPRET=1 was set as these kernels were defined: they then take CPU tensors.
INTERPRETED = isinstance(_probe, InterpretedFunction)


# ----------------------------------------------------------------------------------------------
# host-side rules


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """The accumulator as a Triton dtype (a kernel's ACC_DTYPE) for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of ``dtype``: torch's float32 matmul setting for
    float32, "ieee" otherwise (ignored by 16-bit dots; the only choice for float64)."""
    if dtype == torch.float32:
        return _FP32_PRECISION[torch.get_float32_matmul_precision()]
    return "ieee"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for host code: triton.cdiv is a ConstexprFunction, ~2 us a call, and a
    training step's launchers make some twenty such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n >= 1 (triton.next_power_of_2's value, for host code)."""
    return 1 << (n - 1).bit_length()


def needs_int64(*extents: int) -> bool:
    """True when an address offset (the largest element offset of an operand) can pass int32."""
    return max(extents, default=0) > _INT32_MAX


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset into ``t`` (sum of (size-1) * |stride|); 0 when it is empty."""
    n = t.numel()
    if n == 0 or t.is_contiguous():  # some ten calls a training step: a tenth of the sum's time
        return max(n - 1, 0)
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def alloc(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the launchers allocate (tests swap in a NaN-filled one to catch unwritten tiles)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def check_device(*tensors) -> None:
    """The kernels take CUDA tensors, or CPU tensors when they run in Triton's interpreter."""
    if not INTERPRETED and any(t is not None and t.device.type == "cpu" for t in tensors):
        raise RuntimeError("fastlora's Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before fastlora is imported to run them on the CPU")


def tma_ready(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be read through a TMA descriptor: 2-D, unit stride along the last
    dimension, other strides and the base address 16-byte aligned."""
    for t in tensors:
        elt = t.element_size()
        if (t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * elt) % 16 or t.data_ptr() % 16
                or t.shape[0] == 0 or t.shape[1] == 0):
            return False
    return True
