"""4-bit weights (bitsandbytes' NF4/FP4 layout, fastlora/quant4bit.py) in device code: the absmax of
a block (``block_absmax``, also read by the fused GEMM's 4-bit form, kernels/gemm.py) and a kernel
that dequantizes a whole weight to a dense one.

    W[2i]   = code[packed[i] >> 4] * absmax[2i // bs]       in float32, rounded once to W's dtype
    W[2i+1] = code[packed[i] & 15] * absmax[2i // bs]

with, for a nested absmax, absmax[j] = code8[qa[j]] * scale[j // nbs] + offset, rounded after the
product and after the sum (launched without floating-point contraction: a fused multiply-add would
round once, and the weight would differ from bitsandbytes' and from the torch path's in the last bit).
Memory-bound: each program turns BLOCK bytes into 2 BLOCK elements.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, check_device, needs_int64
from .launch import launch


class Packed4bit(NamedTuple):
    """A 4-bit weight [N, K] as the kernels take it (fastlora/quant4bit.py describes the format):
    ``packed`` uint8 [N K / 2], ``absmax`` float32 [N K / blocksize] (or its uint8 codes when
    nested, with ``scale``, ``code8`` [256] and ``offset`` [1]), ``code`` float32 [16]; contiguous."""
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    scale: Optional[torch.Tensor]
    code8: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    shape: tuple
    blocksize: int
    nested_blocksize: int = 1


@triton.jit
def block_absmax(ABSMAX, SCALE, CODE8, OFFSET, blk, mask, NESTED: tl.constexpr,
                 NESTED_BLOCKSIZE: tl.constexpr):
    """absmax[blk] in float32: stored, or code8[q[blk]] * scale[blk // nbs] + offset, rounded after
    the product and after the sum (the launchers turn floating-point contraction off)."""
    if NESTED:
        q = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(CODE8 + q) * tl.load(SCALE + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = absmax + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def dequant_4bit_kernel(
    PACKED, ABSMAX, CODE, SCALE, CODE8, OFFSET, W,
    n_bytes,
    HALF_BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
    NESTED: tl.constexpr, INT64: tl.constexpr,
):
    """W [2 n_bytes] from PACKED [n_bytes] uint8, ABSMAX [blocks] (float32, or uint8 codes with
    SCALE, CODE8 [256], OFFSET [1] when NESTED) and CODE [16]; blocks of 2 HALF_BLOCKSIZE elements."""
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        o_b = o_b.to(tl.int64)
    m_b = o_b < n_bytes
    b_p = tl.load(PACKED + o_b, mask=m_b, other=0)                                # [BLOCK]
    hi = tl.load(CODE + (b_p >> 4).to(tl.int32))
    lo = tl.load(CODE + (b_p & 15).to(tl.int32))
    # both codes of a byte share a block (blocksizes are even)
    absmax = block_absmax(ABSMAX, SCALE, CODE8, OFFSET, o_b // HALF_BLOCKSIZE, m_b, NESTED, NESTED_BLOCKSIZE)
    w = tl.interleave(hi * absmax, lo * absmax).to(W.dtype.element_ty)           # [2 BLOCK]
    o_w = 2 * i_b * BLOCK + tl.arange(0, 2 * BLOCK)
    if INT64:
        o_w = o_w.to(tl.int64)
    tl.store(W + o_w, w, mask=o_w < 2 * n_bytes)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple,
                    blocksize: int, dtype: torch.dtype, *,
                    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
                    block: int = 1024) -> torch.Tensor:
    """W ``shape`` in ``dtype`` from a 4-bit weight: ``packed`` (uint8, N K / 2 bytes), ``absmax``
    (float32 [N K / blocksize], or uint8 codes when ``nested=(scale, code8, offset, nested_blocksize)``)
    and ``code`` (float32 [16]); all contiguous. A fresh contiguous W."""
    scale, code8, offset, nested_bs = nested if nested is not None else (None, None, None, 1)
    check_device(packed, absmax, code, scale, code8, offset)
    if blocksize % 2:
        raise ValueError(f"dequantize_4bit: blocksize must be even, got {blocksize}")
    n_bytes = packed.numel()
    w = torch.empty(shape, device=packed.device, dtype=dtype)
    if w.numel() != 2 * n_bytes:
        raise ValueError(f"dequantize_4bit: {n_bytes} bytes hold {2 * n_bytes} codes, not a {tuple(shape)} weight")
    if n_bytes == 0:
        return w
    launch(dequant_4bit_kernel, (cdiv(n_bytes, block),),
        packed, absmax, code, scale, code8, offset, w, n_bytes,
        HALF_BLOCKSIZE=blocksize // 2, NESTED_BLOCKSIZE=nested_bs, BLOCK=block,
        NESTED=scale is not None, INT64=needs_int64(2 * n_bytes), num_warps=4, enable_fp_fusion=False,
    )
    return w
