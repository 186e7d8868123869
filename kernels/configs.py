"""Launch configurations: one function per kernel, from the device generation and problem size.

No autotuning at run time: the choice is a pure function of (device, dtype, bucketed shape), so a
new batch size never recompiles and the interpreter (which cannot benchmark) runs the same code.
The GPU tables come from measurements recorded in benchmarks/NOTES.md.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton

# Largest rank the kernels take: the [BLOCK_M, BLOCK_R] XA block lives in registers.
MAX_RANK = 256

# Usable shared memory per block, by compute capability major.minor.
_SMEM_BYTES = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    tiles_n: int = 1          # output tiles one program walks, reusing its XA block
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class SkinnyConfig:
    block_t: int
    block_p: int
    splits: int = 1           # chunks of the reduction axis, summed afterwards in a fixed order
    num_warps: int = 4
    num_stages: int = 3


def rank_block(R: int) -> int:
    """The rank padded to a power of two >= 16, the smallest dot dimension a GPU takes."""
    return max(16, triton.next_power_of_2(R))


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _smem_bytes(cap: tuple[int, int]) -> int:
    return _SMEM_BYTES.get(cap, _SMEM_BYTES.get((cap[0], 0), 99 * 1024))


def gemm_smem_bytes(cfg: GemmConfig, block_r: int, elt: int) -> int:
    """Shared memory the pipelined main loop needs: x, w and a tiles per stage."""
    return cfg.num_stages * (cfg.block_m + cfg.block_n + block_r) * cfg.block_k * elt


def gemm_config(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device,
                dropout_epilogue: bool = False, w_n_major: bool = False) -> GemmConfig:
    """``w_n_major``: W's tiles are contiguous along N (the backward's W^T), which favours narrower
    tiles walked several at a time; ``dropout_epilogue``: the dX epilogue regenerates the mask."""
    block_r = rank_block(R)
    if device.type != "cuda":
        # Interpreter: each (program x K step) costs milliseconds whatever its size, so blocks
        # are as large as the problem allows.
        return GemmConfig(_pow2_clamp(M, 16, 64), _pow2_clamp(N, 16, 64), _pow2_clamp(K, 16, 128),
                          group_m=4)
    cap, n_sm = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    return _gpu_gemm_config(_bucket(M), N, K, block_r, dtype, cap, n_sm, dropout_epilogue, w_n_major)


@functools.lru_cache(maxsize=1024)
def _gpu_gemm_config(M: int, N: int, K: int, block_r: int, dtype: torch.dtype,
                     cap: tuple[int, int], n_sm: int, dropout_epilogue: bool = False,
                     w_n_major: bool = False) -> GemmConfig:
    tiles = 1
    if dtype == torch.float64:
        bm, bn, bk, stages = (32 if block_r <= 64 else 16), 64, 16, 2
        warps = 4 if block_r <= 32 else 8
    elif dtype == torch.float32:
        bm, bn, bk, warps, stages = 64, 64, 32, (4 if block_r <= 64 else 8), 3
    elif M <= 64:
        # decode: bound by reading W once; narrow output tiles so that every SM streams a slice
        bm, bn, bk, warps, stages = (16 if M <= 16 else 64), 32, 128, 4, 5
    elif cap[0] >= 9 and w_n_major:
        # H100 sweeps (benchmarks/NOTES.md): for dX (W^T), 128x128 tiles walked 4 to a program,
        # reusing dY B across them, beat 128x256 in both runs (1.31-1.38x cuBLAS vs 1.43-1.50x)
        bm, bn, bk, warps, stages, tiles = 128, 128, 64, 8, 4, 4
    elif cap[0] >= 9:
        # ... and for the forward 128x256x64 with 4 stages was the fastest tried (1.40x cuBLAS)
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    # Registers: the XA block [bm, block_r] lives beside the accumulator; keep it to <= 32
    # registers a thread (a float64 element takes two).
    regs_per_elt = 2 if dtype == torch.float64 else 1
    while bm > 16 and bm * block_r * regs_per_elt > 32 * 32 * warps:
        bm //= 2
    if block_r > 64:
        bn = min(bn, 128)  # the A tiles [bk, block_r] and XA crowd out a 256-wide accumulator
    if block_r > 128:
        tiles = 1  # four unrolled tiles beside a [bm, 256] XA block spill
    # The dropout epilogue (dX) holds Philox state for every output element: <= 32 a thread.
    while dropout_epilogue and bn > 32 and bm * bn > 32 * 32 * warps:
        bn //= 2
    cfg = GemmConfig(bm, bn, bk, tiles_n=tiles, num_warps=warps, num_stages=stages)
    elt = dtype.itemsize
    while gemm_smem_bytes(cfg, block_r, elt) > _smem_bytes(cap) and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while gemm_smem_bytes(cfg, block_r, elt) > _smem_bytes(cap):
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def skinny_config(T: int, P: int, R: int, dtype: torch.dtype, device: torch.device) -> SkinnyConfig:
    if device.type != "cuda":
        return SkinnyConfig(_pow2_clamp(T, 16, 128), _pow2_clamp(P, 16, 64))
    cap, n_sm = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    return _gpu_skinny_config(_bucket(T), P, rank_block(R), dtype, cap, n_sm)


@functools.lru_cache(maxsize=1024)
def _gpu_skinny_config(T: int, P: int, block_r: int, dtype: torch.dtype,
                       cap: tuple[int, int], n_sm: int) -> SkinnyConfig:
    # accumulator [block_p, block_r] and the L tile [block_t, block_p] (with Philox state under
    # dropout) each kept to ~32 registers a thread
    warps = 4 if block_r <= 32 else 8
    regs_per_elt = 2 if dtype == torch.float64 else 1
    # H100 sweep: 64-row steps read dY / x at ~1.45 TB/s against ~1.05 TB/s with 32 (on sm_80
    # the 64-row L tile spills)
    block_t = 16 if dtype == torch.float64 else (64 if cap[0] >= 9 else 32)
    block_p = 128
    while block_p > 32 and block_p * block_r * regs_per_elt > 32 * 32 * warps:
        block_p //= 2
    p_blocks = triton.cdiv(P, block_p)
    # enough programs to cover the SMs twice, each reducing at least a few T blocks
    splits = max(1, min(triton.cdiv(2 * n_sm, p_blocks), triton.cdiv(T, 4 * block_t)))
    return SkinnyConfig(block_t, block_p, splits=splits, num_warps=warps, num_stages=3)


def _bucket(n: int) -> int:
    """Round a batch-like size up to a power of two, so configs are keyed on a few buckets."""
    return triton.next_power_of_2(max(n, 1))
