"""Launch configurations: one function per kernel, from the device and the problem size.

No autotuning at run time: a configuration is a pure function of (device, dtype, bucketed shape),
so a new batch size never recompiles and the interpreter (which cannot benchmark) runs the same
code. The device's shared memory and SM count are read from the device, not assumed. Measured
choices per shape (``benchmarks/tune_routes.py``) reach the launchers as explicit configs through
fastlora's route table; these functions are what runs where the table is silent.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton

from .common import cdiv, next_power_of_2

# The Triton releases whose warp specialization compiles the fused GEMM for sm_90 (tests/aot.py):
# 3.6 (the GPU machines'); 3.7 to 3.9's Hopper pass rejects its 128-row TMA tiles ("descriptor
# block and tensor must have the same number of elements"), even a plain GEMM's. Elsewhere a
# warp-specialized config runs as the same tiles without it.
WARP_SPECIALIZED_TRITON = ("3.6",)
WARP_SPECIALIZE = ".".join(triton.__version__.split(".")[:2]) in WARP_SPECIALIZED_TRITON

# Largest rank the kernels take: the [BLOCK_M, BLOCK_R] XA block lives in registers.
MAX_RANK = 256
# Largest rank whose production configs are held to no register spills (tests/aot.py): above it
# the kernels are correct but backend="auto" prefers the torch route.
TUNED_RANK = 128
# Programs the persistent GEMM runs in the interpreter: a few, so that each walks several tiles.
_INTERPRETER_PROGRAMS = 3


@dataclass(frozen=True)
class GemmConfig:
    """The fused GEMM (kernels/gemm.py). ``tma``: operands through tensor descriptors (sm_90+ and
    16-byte-aligned strides; the launcher falls back to pointers otherwise); ``xa_in_loop``: the
    forward computes x A^T in its K loop instead of reading it from a separate pass over x, and
    dX (LoRA's) dY B instead of reading it from the pass over dY;
    ``warp_specialize`` (with ``tma``, x A^T read): Triton's warp specialization of the persistent
    tile loop, ``num_warps`` a warpgroup (on sm_90 one producer and two consumer groups)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False
    epilogue_subtile: bool = False
    xa_in_loop: bool = True
    warp_specialize: bool = False


@dataclass(frozen=True)
class PassConfig:
    """A memory-bound pass over a large [rows, cols] operand (kernels/passes.py): blocks of
    ``block_rows`` x ``block_cols``; ``splits`` chunks of the reduction axis, summed in a fixed
    order by the last program of each output block to finish. ``maxnreg``: the register cap ptxas
    gets for a split pass (None: its own choice). Without one, ptxas fitted the split forms (their
    loop over the partials after the main loop) to a higher occupancy than the passes without the
    sum and spilled 8-44 bytes in four of them (sm_80 and sm_90, triton 3.6 and 3.9: tests/aot.py);
    with 255 none spills, at more registers (sm_90, r=16: 16-82 more, median 24; 139-178 in the
    dropout forms, 2-3 programs an SM where the register file allowed 5). Unmeasured on a GPU:
    benchmarks/sweep_passes.py times both."""
    block_rows: int
    block_cols: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = 255


@dataclass(frozen=True)
class DeviceInfo:
    capability: tuple[int, int]   # (0, 0) for the interpreter
    sms: int                      # programs the persistent GEMM runs
    smem: int                     # shared memory a program may use, bytes


def rank_block(R: int) -> int:
    """The rank padded to a power of two >= 16, the smallest dot dimension a GPU takes."""
    return max(16, next_power_of_2(R))


def bucket(n: int) -> int:
    """Round a batch-like size up to a power of two, so configs are keyed on a few buckets."""
    return next_power_of_2(max(n, 1))


def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo((0, 0), _INTERPRETER_PROGRAMS, 1 << 30)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_info(index)


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return DeviceInfo(torch.cuda.get_device_capability(index), props["multiprocessor_count"],
                      props["max_shared_mem"])


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(n, 1))))


def gemm_smem_bytes(cfg: GemmConfig, block_r: int, elt: int) -> int:
    """Shared memory of the pipelined main loop (x, w and, in the loop, A tiles per stage), of the
    TMA store's staging tile and of the epilogue's xa [bm, r] and B [bn, r] operands (which the
    compiler stages through shared memory: ptxas's reports in tests/aot.py match this to 24 bytes
    for the TMA configs, and it overestimates the others)."""
    per_stage = (cfg.block_m + cfg.block_n + (block_r if cfg.xa_in_loop else 0)) * cfg.block_k
    if cfg.warp_specialize:
        # the epilogue's xa (float32) and B tiles come by TMA, buffered per stage like the main
        # operands, and y leaves through pointers after a layout change in shared memory
        # (ptxas's reports in tests/aot.py under triton 3.6: within 64 bytes)
        epilogue = cfg.block_m * block_r * 4 + cfg.block_n * block_r * elt
        return cfg.num_stages * (per_stage * elt + epilogue) + 128 * max(cfg.block_n, 128) + 512
    staging = cfg.block_m * cfg.block_n // (2 if cfg.epilogue_subtile else 1) if cfg.tma else 0
    epilogue = (cfg.block_m + cfg.block_n) * block_r
    return (cfg.num_stages * per_stage + staging + epilogue) * elt


def fit_gemm(cfg: GemmConfig, block_r: int, elt: int, smem: int) -> GemmConfig:
    """``cfg`` pruned to ``smem`` bytes: fewer stages (down to 2), then narrower K steps."""
    while gemm_smem_bytes(cfg, block_r, elt) > smem and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while gemm_smem_bytes(cfg, block_r, elt) > smem and cfg.block_k > 16:
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def gemm_candidates(M: int, block_r: int, elt: int, info: DeviceInfo, *, grad_input: bool = False,
                    dropout: bool = False, warp_specialized: bool = True) -> list[GemmConfig]:
    """The configs benchmarks/tune_routes.py times for a 16-bit problem (the rule's kind first),
    each fitted to the device's shared memory, so none fails to compile for lack of it;
    ``warp_specialized``: with the warp-specialized form where Triton gives it (the tuner's --quick
    run, inside gpu_check.sh's time, leaves it to benchmarks/gpu_diag.py's main-loop lines)."""
    if M <= 64:
        bm = 16 if M <= 16 else 64
        out = [GemmConfig(bm, 32, 128, num_warps=4, num_stages=5),
               GemmConfig(bm, 64, 128, num_warps=4, num_stages=4),
               GemmConfig(bm, 32, 256, num_warps=4, num_stages=3)]
        if M <= 16 and not grad_input:
            # decoding reads W once: twice the programs (N / 16) for the 4096-wide layers, whose
            # N / 32 = 128 programs leave one to an SM; and x A^T read from a pass over x instead
            # of each program's loop re-reading A (an [r, BLOCK_K] tile beside W's [BLOCK_N,
            # BLOCK_K] at every K step)
            out += [GemmConfig(bm, 16, 256, num_warps=4, num_stages=4),
                    GemmConfig(bm, 32, 128, num_warps=4, num_stages=5, xa_in_loop=False),
                    GemmConfig(bm, 16, 256, num_warps=4, num_stages=4, xa_in_loop=False)]
        if M > 16:
            out.append(GemmConfig(64, 64, 64, num_warps=4, num_stages=4, tma=True))
    else:
        out = [GemmConfig(128, 256, 64, num_warps=8, num_stages=4, xa_in_loop=False)]
        out += [GemmConfig(128, 256, 64, num_warps=8, num_stages=s, tma=True, epilogue_subtile=True,
                           xa_in_loop=False) for s in (3, 4)]
        out += [GemmConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True, xa_in_loop=False)]
        if grad_input or not dropout:
            # x A^T (forward) or dY B (dX) in the K loop: the forward without its pass over x,
            # the backward's dY pass without dY B and the sum of its partials (a launch); the
            # rule's pointer config so too (the H200's table timed it fastest reading them)
            out.insert(1, GemmConfig(128, 256, 64, num_warps=8, num_stages=4))
            out.append(GemmConfig(128, 256, 64, num_warps=8, num_stages=3, tma=True,
                                  epilogue_subtile=True))
        if warp_specialized and WARP_SPECIALIZE and info.capability[0] >= 9:
            # 4 warps a group, 12 a program; unmeasured on a GPU so far (128 x 256 spills in
            # DoRA's form)
            out.append(GemmConfig(128, 128, 64, num_warps=4, num_stages=4, tma=True, xa_in_loop=False,
                                  warp_specialize=True))
    if grad_input and dropout:  # the dX epilogue holds Philox state per output element
        out = [dataclasses.replace(c, block_n=min(c.block_n, 64)) for c in out]
    hopper = info.capability[0] >= 9
    # before Hopper, no TMA, and a 128x256 accumulator spills (tests/aot.py)
    out = [fit_gemm(c if hopper else dataclasses.replace(c, block_n=min(c.block_n, 128), tma=False,
                                                         epilogue_subtile=False, warp_specialize=False),
                    block_r, elt, info.smem) for c in out]
    return list(dict.fromkeys(out))


def gemm_config(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device, *,
                grad_input: bool = False, dropout: bool = False, four_bit: bool = False) -> GemmConfig:
    """The fused GEMM's config for y [M, N] = x [M, K] op(W) + low-rank term of rank R.
    ``grad_input``: the backward's dX (W read as stored, [K, N]); ``dropout``: its epilogue
    regenerates the dropout mask of every output element; ``four_bit``: W is read in 4 bits
    (``gpu_gemm_config_4bit``)."""
    info = device_info(device)
    if device.type != "cuda":
        # Interpreter: each (program x K step) costs milliseconds whatever its size, so blocks
        # are as large as the problem allows.
        return GemmConfig(_pow2_clamp(M, 16, 64), _pow2_clamp(N, 16, 64), _pow2_clamp(K, 16, 128),
                          group_m=4)
    if four_bit:
        return gpu_gemm_config_4bit(bucket(M), rank_block(R), dtype, info, grad_input, dropout)
    return gpu_gemm_config(bucket(M), rank_block(R), dtype, info, grad_input, dropout)


@functools.lru_cache(maxsize=1024)
def gpu_gemm_config(M: int, block_r: int, dtype: torch.dtype, info: DeviceInfo, grad_input: bool,
                     dropout: bool) -> GemmConfig:
    """The GEMM config on a GPU described by ``info``, M already bucketed (``gemm_config``)."""
    hopper = info.capability[0] >= 9
    if dtype == torch.float64:  # no tensor cores, no TMA
        cfg = GemmConfig(32 if block_r <= 64 else 16, 64, 16, num_warps=4 if block_r <= 32 else 8,
                         num_stages=2)
    elif dtype == torch.float32:
        # IEEE float32 dots (torch's default precision) run on FMA units with operands broadcast
        # across threads: small tiles, or the compiler spills (tests/aot.py)
        cfg = GemmConfig(16, 32, 16, num_warps=4, num_stages=2)
    elif M <= 64:
        # decode: bound by reading W once; narrow output tiles so that every SM streams a slice,
        # and x A^T in the loop (one launch)
        cfg = GemmConfig(16 if M <= 16 else 64, 32, 128, num_warps=4, num_stages=5)
    elif hopper:
        # through pointers, 4 stages: the H200's tuner run (fastlora/route_table.json, 2026-11-29)
        # timed it fastest of the fused configs in 31 of its 32 problems at M >= 2048, forward and
        # backward, 1% behind in the other (the best persistent TMA config, 3 stages beside its
        # store's staging tile, 12-36% slower: benchmarks/NOTES.md); the dX dropout form narrows it
        # to 128x64, also that run's fastest there
        cfg = GemmConfig(128, 256, 64, num_warps=8, num_stages=4, xa_in_loop=False)
    else:
        cfg = GemmConfig(128, 128, 64, num_warps=8, num_stages=3)
    return _fit_device(cfg, block_r, dtype, info, dropout)


def _fit_device(cfg: GemmConfig, block_r: int, dtype: torch.dtype, info: DeviceInfo,
                dropout: bool) -> GemmConfig:
    """``cfg`` pruned to the registers and shared memory of the GPU ``info`` describes."""
    # Registers: the XA block [bm, block_r] lives beside the accumulator; keep it to <= 32
    # registers a thread (a float64 element takes two).
    regs_per_elt = 2 if dtype == torch.float64 else 1
    bm = cfg.block_m
    while bm > 16 and bm * block_r * regs_per_elt > 32 * 32 * cfg.num_warps:
        bm //= 2
    bn = cfg.block_n
    if block_r > 64:
        bn = min(bn, 128)  # the A tiles [bk, block_r] and XA crowd out a 256-wide accumulator
    # The dropout epilogue (dX) holds Philox state for every output element: <= 32 a thread.
    while dropout and bn > 32 and bm * bn > 32 * 32 * cfg.num_warps:
        bn //= 2
    # x A^T in the loop holds [block_k, block_r] A tiles beside the main operands: ranks past 64
    # read xa from its own pass instead
    tma = cfg.tma and info.capability[0] >= 9
    cfg = dataclasses.replace(cfg, block_m=bm, block_n=bn, tma=tma,
                              warp_specialize=cfg.warp_specialize and tma,
                              xa_in_loop=cfg.xa_in_loop and block_r <= 64)
    return fit_gemm(cfg, block_r, dtype.itemsize, info.smem)


@functools.lru_cache(maxsize=1024)
def gpu_gemm_config_4bit(M: int, block_r: int, dtype: torch.dtype, info: DeviceInfo, grad_input: bool,
                         dropout: bool) -> GemmConfig:
    """The GEMM config when W is read in 4 bits and dequantized in the K loop (pointer path, no TMA):
    the unpacked tile, its codes and scales take registers a 16-bit tile does not, so tiles are
    smaller than ``gpu_gemm_config``'s (tests/aot.py holds them to no spills). Unmeasured on a GPU."""
    if dtype in (torch.float32, torch.float64):
        return gpu_gemm_config(M, block_r, dtype, info, grad_input, dropout)
    if M <= 16:
        cfg = GemmConfig(16, 32, 64, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = GemmConfig(64, 32, 64, num_warps=4, num_stages=4)
    else:  # (sm_80: a 64-deep K step spilled in tests/aot.py)
        cfg = GemmConfig(128, 64, 64 if info.capability[0] >= 9 else 32, num_warps=8, num_stages=3)
    return _fit_device(cfg, block_r, dtype, info, dropout)


def fit_4bit(cfg: GemmConfig, blocksize: int, grad_input: bool) -> GemmConfig:
    """``cfg`` for a W read in 4 bits in blocks of ``blocksize``: no TMA, and a tile's extent along W's
    rows (BLOCK_K forward, BLOCK_N for dX) within one block."""
    cfg = dataclasses.replace(cfg, tma=False, epilogue_subtile=False, warp_specialize=False)
    if grad_input:
        return dataclasses.replace(cfg, block_n=min(cfg.block_n, blocksize))
    return dataclasses.replace(cfg, block_k=min(cfg.block_k, blocksize))


# Registers a thread may give the tiles of a pass (of 255), leaving the rest for addresses.
_PASS_REGISTERS = 96


def _words(dtype: torch.dtype) -> float:
    """32-bit registers an element of ``dtype`` takes."""
    return dtype.itemsize / 4


def _fit_pass(rows: int, per_stage, stages: int, smem: int) -> tuple[int, int]:
    """(rows, stages) with ``per_stage(rows)`` bytes a pipeline stage pruned to a quarter under
    ``smem`` (the compiler adds layout-conversion scratch): fewer stages, then rows."""
    budget = smem * 3 // 4
    while per_stage(rows) * stages > budget and stages > 2:
        stages -= 1
    while per_stage(rows) * stages > budget and rows > 16:
        rows //= 2
    return rows, stages


def xa_config(M: int, K: int, R: int, dtype: torch.dtype, device: torch.device, *,
              dropout: bool = False) -> PassConfig:
    """xa = drop(x) A^T, a pass over x [M, K] by row blocks (kernels/passes.py)."""
    info = device_info(device)
    if device.type != "cuda":
        return PassConfig(_pow2_clamp(M, 16, 64), _pow2_clamp(K, 16, 128))
    return gpu_xa_config(bucket(M), K, rank_block(R), dtype, info, dropout)


@functools.lru_cache(maxsize=1024)
def gpu_xa_config(M: int, K: int, block_r: int, dtype: torch.dtype, info: DeviceInfo,
                   dropout: bool) -> PassConfig:
    """The xa pass's config on a GPU described by ``info``, M already bucketed (``xa_config``)."""
    warps = 4 if block_r <= 64 else 8
    threads = 32 * warps
    w, acc = _words(dtype), 2 if dtype == torch.float64 else 1

    def regs(bm, bk):  # accumulator, x tile, A tile, and the x tile's Philox state under dropout
        return (bm * block_r * acc + bm * bk * w + block_r * bk * w + (4 * bm * bk if dropout else 0)) / threads

    block_m, block_k = (64 if M >= 64 else 16), 128
    while block_m > 16 and block_m * block_r * acc > 32 * threads:  # the accumulator: <= 32 a thread
        block_m //= 2
    while regs(block_m, block_k) > _PASS_REGISTERS and block_k > 32:
        block_k //= 2
    while regs(block_m, block_k) > _PASS_REGISTERS and block_m > 16:
        block_m //= 2
    while regs(block_m, block_k) > _PASS_REGISTERS and block_k > 16:
        block_k //= 2
    # shared memory: x and A tiles per stage
    block_k, stages = _fit_pass(block_k, lambda bk: (block_m + block_r) * bk * dtype.itemsize,
                                3, info.smem)
    m_blocks = cdiv(M, block_m)
    # enough programs to cover the SMs twice, each reading at least four K steps
    splits = max(1, min(cdiv(2 * info.sms, m_blocks), cdiv(K, 4 * block_k)))
    return PassConfig(block_m, block_k, splits=splits, num_warps=warps, num_stages=stages)


def reduce_config(T: int, P: int, R: int, dtype: torch.dtype, device: torch.device, *,
                  dropout: bool = False, expand: bool = False, rank_out: bool = False,
                  dora: bool = False) -> PassConfig:
    """A reduction over the rows of L [T, P] (dA, dB, and the passes that add dY B or dx0).
    ``dropout``: the mask of every L element is drawn; ``expand``: an [T, P] output (dx0) is
    written; ``rank_out``: L E [T, R] (dY B) is written; ``dora``: DoRA's dY pass, which also reads
    y [T, P] and writes the scaled dY' [T, P]."""
    info = device_info(device)
    if device.type != "cuda":
        return PassConfig(_pow2_clamp(T, 16, 128), _pow2_clamp(P, 16, 64))
    return gpu_reduce_config(bucket(T), P, rank_block(R), dtype, info, dropout, expand, rank_out, dora)


@functools.lru_cache(maxsize=1024)
def gpu_reduce_config(T: int, P: int, block_r: int, dtype: torch.dtype, info: DeviceInfo,
                       dropout: bool, expand: bool, rank_out: bool, dora: bool = False) -> PassConfig:
    """A reduction's config on a GPU described by ``info``, T already bucketed (``reduce_config``)."""
    warps = 4 if block_r <= 32 else 8
    threads = 32 * warps
    w, acc = _words(dtype), 2 if dtype == torch.float64 else 1

    def regs(bt, bp):
        n = bp * block_r * acc + bt * bp * w + bt * block_r * w   # accumulator, L and S tiles
        if rank_out:
            n += bp * block_r * w + bt * block_r * acc            # E, and the L E tile
        if expand:
            n += block_r * bp * w + bt * bp * acc                 # F, and the output tile
        if dropout:
            n += 4 * bt * bp                                      # Philox state per element
        if dora:
            # the y tile, the scaled dY' tile and their float32 products; g, b and dm's sums;
            # E's low part (what ptxas reported for these tiles: tests/aot.py)
            n += bt * bp * (w + 2 * acc) + 3 * bp * acc + (bp * block_r * w if rank_out else 0)
        return n / threads

    # the accumulator [block_p, block_r] alone at most 32 registers a thread (the compilers keep
    # less headroom than the estimate suggests past that)
    block_p = 128
    while block_p > 16 and block_p * block_r * acc > 32 * threads:
        block_p //= 2
    # DoRA's dY pass before Hopper (mma.sync holds both dots' operands in registers) at r >= 64:
    # sm_80, r=64, ptxas spilled at 16 x 128 (16 bytes, triton 3.9) and 32 x 64 (24), not at 16 x 64
    tight = dora and rank_out and info.capability[0] < 9 and block_r >= 64
    if tight:
        block_p = min(block_p, 64)
    block_t = 16 if dtype == torch.float64 or tight else (64 if info.capability[0] >= 9 else 32)
    while regs(block_t, block_p) > _PASS_REGISTERS and block_t > 16:
        block_t //= 2
    while regs(block_t, block_p) > _PASS_REGISTERS and block_p > 16:
        block_p //= 2
    # shared memory: the L tile and the S rows (accumulator dtype) per stage
    acc_bytes = 8 if dtype == torch.float64 else 4
    tiles = 2 if dora else 1  # DoRA's dY pass pipelines y's tile beside dY's
    block_t, stages = _fit_pass(block_t, lambda bt: bt * (tiles * block_p * dtype.itemsize
                                                          + block_r * acc_bytes), 3, info.smem)
    p_blocks = cdiv(P, block_p)
    # enough programs to cover the SMs twice, each reducing at least a few T blocks
    splits = max(1, min(cdiv(2 * info.sms, p_blocks), cdiv(T, 4 * block_t)))
    return PassConfig(block_t, block_p, splits=splits, num_warps=warps, num_stages=stages)
