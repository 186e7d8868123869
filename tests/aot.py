"""Ahead-of-time compilation of the kernels for GPUs that are not present (triton.compile with a
GPUTarget), with the specialisations the runtime would apply, and ptxas's resource report."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlora.kernels import configs
from fastlora.kernels.lora_linear import _ACC_DTYPE, _lora_gemm_kernel, _lora_skinny_kernel

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Streams the kernels read with unit stride at run time (Triton specialises ints equal to 1).
_UNIT_STRIDES = {
    _lora_gemm_kernel: {"stride_xk": 1, "stride_wk": 1, "stride_ak": 1, "stride_br": 1, "stride_yn": 1,
                        "stride_xar": 1},
    _lora_skinny_kernel: {"stride_lp": 1, "stride_sr": 1, "stride_cr": 1},
}


@dataclass
class Compiled:
    ptx: str
    shared: int
    registers: int
    spill_bytes: int


def _ptxas() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    return path if os.path.exists(path) else None


def compile_kernel(fn, dtype: torch.dtype, constexprs: dict, cap: int, num_warps: int,
                   num_stages: int, side_dtype: str = "fp32") -> Compiled:
    ptr_dtype = _TL[dtype]
    ptrs = {"X": ptr_dtype, "W": ptr_dtype, "Y": ptr_dtype, "A": ptr_dtype, "B": ptr_dtype,
            "BIAS": ptr_dtype, "XA": side_dtype, "SEED": "i64", "L": ptr_dtype, "S": side_dtype,
            "C": side_dtype}
    ones = _UNIT_STRIDES[fn]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            signature[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ones or name in constexprs:
            signature[name] = "constexpr"
        elif name in ("scaling", "dropout_p"):
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("N", "K", "P"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs={**constexprs, **ones}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = ck.asm["ptx"]
    registers = spills = -1
    ptxas = _ptxas()
    if ptxas is not None:
        arch = "sm_90a" if cap == 90 else f"sm_{cap}"
        path = f"/tmp/fastlora_aot_{os.getpid()}.ptx"
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        os.remove(path)
        registers = int(re.search(r"Used (\d+) registers", out).group(1))
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return Compiled(ptx, ck.metadata.shared, registers, spills)


def gemm_constexprs(cfg: configs.GemmConfig, R: int, dtype: torch.dtype, *, bias: bool,
                    xa_in_loop: bool, dropout_out: bool) -> dict:
    block_r = configs.rank_block(R)
    return dict(HAS_BIAS=bias, XA_IN_LOOP=xa_in_loop, DROPOUT_OUT=dropout_out,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                # R_PADDED: the heavier form, with the epilogue's mask of the padded rank lanes
                BLOCK_R=block_r, R_PADDED=True, GROUP_M=cfg.group_m, TILES_N=cfg.tiles_n,
                EVEN_K=True, INT64=False, ACC_DTYPE=_ACC_DTYPE[dtype],
                PRECISION="tf32" if dtype == torch.float32 else "ieee",
                CHUNKED_ACC=dtype in (torch.float32, torch.float64))


def skinny_constexprs(cfg: configs.SkinnyConfig, R: int, dtype: torch.dtype, *, dropout: bool) -> dict:
    return dict(DROPOUT_L=dropout, L_IS_XT=False, BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_p,
                BLOCK_R=configs.rank_block(R), INT64=False, ACC_DTYPE=_ACC_DTYPE[dtype],
                PRECISION="tf32" if dtype == torch.float32 else "ieee")


# The GPUs the configs are written for: (capability, SM count, name).
GPUS = [((8, 0), 108, "A100"), ((9, 0), 132, "H100")]
# Problem sizes production sees: llama projection shapes, decode to long prefill, ranks to 256.
SHAPES = [(M, N, K) for M in (1, 16, 64, 256, 8192) for N, K in ((4096, 4096), (11008, 4096))]
RANKS = (16, 64, 128, 256)


def _production_problems():
    """(capability, SM count, dtype, M, N, K, R, R-block) for every GPU, dtype, shape and rank."""
    for cap, n_sm, _ in GPUS:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for M, N, K in SHAPES:
                for R in RANKS:
                    yield cap, n_sm, dtype, M, N, K, R, configs.rank_block(R)


def production_gemm_configs():
    """Unique (cfg, R-block, dtype, capability) the config function hands out for SHAPES x RANKS."""
    seen = {}
    for cap, n_sm, dtype, M, N, K, _, block_r in _production_problems():
        for dropout, n_major in ((False, False), (False, True), (True, True)):
            cfg = configs._gpu_gemm_config(M, N, K, block_r, dtype, cap, n_sm, dropout, n_major)
            seen.setdefault((cfg, block_r, dtype, cap[0] * 10 + cap[1], dropout), None)
    return list(seen)


def production_skinny_configs():
    seen = {}
    for cap, n_sm, dtype, M, N, K, _, block_r in _production_problems():
        for T, P in ((M, N), (M, K), (K, M)):
            cfg = configs._gpu_skinny_config(configs._bucket(T), P, block_r, dtype, cap, n_sm)
            key = (configs.SkinnyConfig(cfg.block_t, cfg.block_p, 1, cfg.num_warps, cfg.num_stages),
                   block_r, dtype, cap[0] * 10 + cap[1])
            seen.setdefault(key, None)
    return list(seen)


def _gemm_job(item):
    cfg, block_r, dtype, cap, dropout = item
    out = {}
    # a config chosen for the dropout epilogue serves dX with dropout; the others the forward
    # (XA in the loop, or given when the forward has dropout) and dX without dropout
    modes = ((("dx_dropout", dict(bias=False, xa_in_loop=True, dropout_out=True)),) if dropout else
             (("fwd", dict(bias=True, xa_in_loop=True, dropout_out=False)),
              ("fwd_xa_given", dict(bias=True, xa_in_loop=False, dropout_out=False))))
    # ranks below the block (r = 4, 8: block 16) add the R_PADDED epilogue's select
    ranks = ((block_r, ""), (block_r - 1, "_rpad")) if block_r == 16 else ((block_r, ""),)
    for (mode, kw), (R, tag) in ((m, r) for m in modes for r in ranks):
        c = compile_kernel(_lora_gemm_kernel, dtype, gemm_constexprs(cfg, R, dtype, **kw), cap,
                           cfg.num_warps, cfg.num_stages,
                           side_dtype="fp64" if dtype == torch.float64 else "fp32")
        out[mode + tag] = dict(wgmma="wgmma" in c.ptx, shared=c.shared, registers=c.registers,
                               spills=c.spill_bytes)
    return out


def _skinny_job(item):
    cfg, block_r, dtype, cap = item
    out = {}
    for mode, dropout in (("plain", False), ("dropout", True)):
        c = compile_kernel(_lora_skinny_kernel, dtype, skinny_constexprs(cfg, block_r, dtype, dropout=dropout),
                           cap, cfg.num_warps, cfg.num_stages,
                           side_dtype="fp64" if dtype == torch.float64 else "fp32")
        out[mode] = dict(wgmma="wgmma" in c.ptx, shared=c.shared, registers=c.registers, spills=c.spill_bytes)
    return out


def item_id(kind, item) -> str:
    cfg, block_r, dtype, cap = item[:4]
    dt = _TL[dtype]
    if kind == "gemm":
        tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}-t{cfg.tiles_n}" + ("-dropout" if item[4] else "")
    else:
        tile = f"{cfg.block_t}x{cfg.block_p}"
    return f"{kind}-sm{cap}-{dt}-r{block_r}-{tile}-w{cfg.num_warps}-s{cfg.num_stages}"


def main() -> None:
    """Compile every production config in a pool of processes; print one JSON object."""
    import json
    import sys
    from concurrent.futures import ProcessPoolExecutor

    assert os.environ.get("TRITON_INTERPRET") != "1", "AOT compilation needs the compiling triton.jit"
    jobs = [("gemm", it) for it in production_gemm_configs()] + \
           [("skinny", it) for it in production_skinny_configs()]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = [pool.submit(_gemm_job if kind == "gemm" else _skinny_job, it) for kind, it in jobs]
        results = {item_id(kind, it): f.result() for (kind, it), f in zip(jobs, futures)}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
