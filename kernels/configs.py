"""Launch configurations: one function per kernel, from the device generation and problem size.

No autotuning at run time: the choice is a pure function of (device, dtype, bucketed shape), so a
new batch size never recompiles and the interpreter (which cannot benchmark) runs the same code.
The GPU tables come from measurements recorded in benchmarks/NOTES.md.
"""
from __future__ import annotations

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


def gemm_config(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    block_r = max(16, triton.next_power_of_2(R))
    if device.type != "cuda":
        # Interpreter: each (program x K step) costs milliseconds whatever its size, so blocks
        # are as large as the problem allows.
        return GemmConfig(_pow2_clamp(M, 16, 64), _pow2_clamp(N, 16, 64), _pow2_clamp(K, 16, 128),
                          group_m=4)
    cap, n_sm = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    return _gpu_gemm_config(M, N, K, block_r, dtype, cap, n_sm)


@functools.lru_cache(maxsize=1024)
def _gpu_gemm_config(M: int, N: int, K: int, block_r: int, dtype: torch.dtype,
                     cap: tuple[int, int], n_sm: int) -> GemmConfig:
    M = _bucket(M)
    elt = dtype.itemsize
    if dtype == torch.float64:
        cfg = GemmConfig(64, 64, 16, num_warps=4, num_stages=2)
    elif dtype == torch.float32:
        cfg = GemmConfig(128, 64, 32, num_warps=4, num_stages=3)
    elif M <= 64:
        # decode: bound by reading W once; narrow output tiles so every SM streams a slice of it
        cfg = GemmConfig(max(16, _pow2_clamp(M, 16, 64)), 64, 128, num_warps=4, num_stages=4)
        if triton.cdiv(N, cfg.block_n) < n_sm:
            cfg = GemmConfig(cfg.block_m, 32, 128, num_warps=4, num_stages=5)
    elif cap[0] >= 9:
        cfg = GemmConfig(128, 128, 64, num_warps=8, num_stages=4)
    else:
        cfg = GemmConfig(128, 128, 32, num_warps=4, num_stages=4)
    if block_r > 64:
        # the XA block [BLOCK_M, BLOCK_R] and the A tiles compete with the accumulator
        cfg = GemmConfig(min(cfg.block_m, 64), cfg.block_n, cfg.block_k, cfg.group_m, cfg.tiles_n,
                         cfg.num_warps, cfg.num_stages)
    while gemm_smem_bytes(cfg, block_r, elt) > _smem_bytes(cap) and cfg.num_stages > 2:
        cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.tiles_n,
                         cfg.num_warps, cfg.num_stages - 1)
    while gemm_smem_bytes(cfg, block_r, elt) > _smem_bytes(cap):
        cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k // 2, cfg.group_m, cfg.tiles_n,
                         cfg.num_warps, cfg.num_stages)
    return cfg


def skinny_config(T: int, P: int, R: int, dtype: torch.dtype, device: torch.device) -> SkinnyConfig:
    if device.type != "cuda":
        return SkinnyConfig(_pow2_clamp(T, 16, 128), _pow2_clamp(P, 16, 64))
    cap, n_sm = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    return _gpu_skinny_config(_bucket(T), P, max(16, triton.next_power_of_2(R)), dtype, cap, n_sm)


@functools.lru_cache(maxsize=1024)
def _gpu_skinny_config(T: int, P: int, block_r: int, dtype: torch.dtype,
                       cap: tuple[int, int], n_sm: int) -> SkinnyConfig:
    if dtype == torch.float64:
        block_t, block_p, warps = 32, 32, 4
    else:
        block_t, block_p, warps = (64, 128, 4) if block_r <= 64 else (32, 64, 4)
    p_blocks = triton.cdiv(P, block_p)
    # enough programs to cover the SMs twice, each reducing at least a few T blocks
    splits = max(1, min(triton.cdiv(2 * n_sm, p_blocks), triton.cdiv(T, 4 * block_t)))
    return SkinnyConfig(block_t, block_p, splits=splits, num_warps=warps, num_stages=3)


def _bucket(n: int) -> int:
    """Round a batch-like size up to a power of two, so configs are keyed on a few buckets."""
    return triton.next_power_of_2(max(n, 1))
