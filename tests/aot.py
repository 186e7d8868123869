"""Ahead-of-time compilation of the kernels for GPUs that are not present (triton.compile with a
GPUTarget), with the specialisations the runtime would apply, and ptxas's resource report.

Run by tests/test_aot.py (in a subprocess: the test process defined the kernels in interpreter
mode), and by hand against another triton, e.g. the GPU machines' 3.6 in a side environment:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    /tmp/t36/bin/pip install --no-deps -e . && /tmp/t36/bin/python tests/aot.py --summary
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import dataclasses
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from fastlora.kernels import configs
from fastlora.kernels.dequant import dequant_4bit_kernel
from fastlora.kernels.gemm import lora_gemm_kernel
from fastlora.kernels.passes import _SUM_BLOCK, reduce_kernel, split_options, sum_parts_kernel, xa_kernel

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# float32 dots compile with torch's default matmul precision ("highest": IEEE products); the
# tf32 form ("high") is not in this set.

# The GPUs the configs are written for: (capability, SM count, shared memory per block, name).
GPUS = [((8, 0), 108, 166912, "A100"), ((9, 0), 132, 232448, "H100")]
# Problem sizes production sees: llama projection shapes, decode to long prefill, ranks to 256.
SHAPES = [(M, N, K) for M in (1, 16, 64, 256, 8192) for N, K in ((4096, 4096), (14336, 4096))]
RANKS = (16, 64, 128, 256)
DTYPES = (torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Compiled:
    ptx: str
    shared: int
    registers: int
    spill_bytes: int


def ptxas_path(cap: int) -> str:
    """The ptxas the installed triton compiles with for sm_``cap``; a missing one is an error (a
    check that cannot run must not pass)."""
    path = get_ptxas(cap).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"triton {triton.__version__} ships no ptxas for sm_{cap} ({path!r})")
    return path


def compile_kernel(kernel, types: dict, constexprs: dict, cap: int, num_warps: int,
                   num_stages: int, **options) -> Compiled:
    """``types``: the runtime arguments' types ("*bf16", "i32", "fp64", "tensordesc<...>"); every
    other argument is a constexpr from ``constexprs``; integer arguments get the divisibility-by-16
    specialisation the runtime gives aligned sizes and strides, except M and T (not specialised).
    ``options``: further compile options the launcher passes (enable_fp_fusion)."""
    fn = kernel
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in types:
            signature[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif types[name] == "i32" and name not in ("M", "T"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
    missing = [n for n in fn.arg_names if n not in types and n not in constexprs]
    assert not missing, f"no value for {missing}"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages, **options})
    ptx = ck.asm["ptx"]
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    path = f"/tmp/fastlora_aot_{os.getpid()}.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas_path(cap), "-v", "--gpu-name", arch, path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(path)
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return Compiled(ptx, ck.metadata.shared, registers, spills)


def _acc(dtype):
    return "fp64" if dtype == torch.float64 else "fp32"


def gemm_job(item, four_bit: bool = False) -> dict:
    """Every form of the fused GEMM a config serves: forward with x A^T in the loop or read, each
    also with DoRA's per-column scale in the epilogue, dX with and without the dropout epilogue,
    each with dY B in the loop (B [N, R] read beside dY's tiles) or read;
    through descriptors when the config says TMA. ``four_bit``: W read in 4 bits (pointer path, no
    contraction, as its launcher runs it), with a plain and a nested absmax, no DoRA forms."""
    cfg, block_r, dtype, cap, dropout = item
    t = _TL[dtype]
    acc = "tl.float64" if dtype == torch.float64 else "tl.float32"
    out = {}
    forms = ([("dx_dropout", True, False), ("dx_dropout_dyb_in_loop", True, True)] if dropout else
             [("fwd_xa_in_loop", False, True), ("fwd_xa_read", False, False), ("dx", True, False),
              ("dx_dyb_in_loop", True, True)]
             + ([] if four_bit else [("fwd_dora_xa_in_loop", False, True), ("fwd_dora_xa_read", False, False)]))
    for form, grad_input, in_loop in forms:
        dora = "dora" in form
        if in_loop and not cfg.xa_in_loop:
            continue
        tma = cfg.tma and dtype != torch.float64
        ws = tma and cfg.warp_specialize  # (its forms read xa: the launcher's rule)
        xa_t, v_t = f"*{_acc(dtype)}", f"*{t}"
        if tma:
            x_t = f"tensordesc<{t}[{cfg.block_m}, {cfg.block_k}]>"
            w_t = (f"tensordesc<{t}[{cfg.block_k}, {cfg.block_n}]>" if grad_input
                   else f"tensordesc<{t}[{cfg.block_n}, {cfg.block_k}]>")
            y_t = f"tensordesc<{t}[{cfg.block_m}, {cfg.block_n // (2 if cfg.epilogue_subtile else 1)}]>"
        else:
            x_t = w_t = y_t = f"*{t}"
        if ws:
            y_t = f"*{t}"
            xa_t = f"tensordesc<{_acc(dtype)}[{cfg.block_m}, {block_r}]>"
            v_t = (f"tensordesc<{t}[{block_r}, {cfg.block_n}]>" if grad_input
                   else f"tensordesc<{t}[{cfg.block_n}, {block_r}]>")
        for nested in ((False, True) if four_bit else (None,)):
            types = {"X": x_t, "W": "*u8" if four_bit else w_t, "V": v_t, "Y": y_t,
                     "XA": xa_t, "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                     "stride_xm": "i32", "stride_ym": "i32", "scaling": "fp64", "dropout_p": "fp64"}
            if in_loop:
                types["U"] = f"*{t}"
            if not grad_input:
                types["BIAS"] = f"*{t}"
            if dora:
                types["SCALE"] = f"*{_acc(dtype)}"
            if dropout:  # (every form of a dropout item is dX's with the dropout epilogue)
                types["SEED"] = "*i64"
            # W as stored ([N, K] forward, [K, N] dX) and the small adapter operand (B [N, R]
            # forward, A [R, K] dX) have unit stride along their rows; the runtime makes a stride of
            # 1 a constant (a 4-bit W's strides are unused: zeros)
            if not four_bit:
                types["stride_wk" if grad_input else "stride_wn"] = "i32"
            types["stride_vr" if grad_input else "stride_vn"] = "i32"
            if four_bit:
                types.update(ABSMAX="*u8" if nested else "*fp32", CODE="*fp32")
                if nested:
                    types.update(ABSMAX_SCALE="*fp32", CODE8="*fp32", OFFSET="*fp32")
            const = dict(U=None, BIAS=None, SCALE=None, SEED=None, W_NK=not grad_input, INT64=False,
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
                         GROUP_M=cfg.group_m, NUM_SMS=132, EPILOGUE_SUBTILE=cfg.epilogue_subtile and tma and not ws,
                         WARP_SPECIALIZE=ws,
                         USE_TMA=tma, XA_IN_LOOP=in_loop, HAS_BIAS=not grad_input, HAS_SCALE=dora,
                         DROPOUT_OUT=dropout, EVEN_K=True,
                         # the heavier form, with the epilogue's mask of the padded rank lanes
                         R_PADDED=True, ACC_DTYPE=eval(acc, {"tl": triton.language}),
                         PRECISION="ieee",
                         CHUNKED_ACC=dtype in (torch.float32, torch.float64),
                         ABSMAX=None, CODE=None, ABSMAX_SCALE=None, CODE8=None, OFFSET=None, W4BIT=four_bit,
                         QBLOCK=64 if four_bit else 1, NESTED=bool(nested),
                         NESTED_BLOCK=256 if nested else 1,
                         **({"stride_wk": 0, "stride_wn": 0} if four_bit else
                            {"stride_wn": 1} if grad_input else {"stride_wk": 1}),
                         **({"stride_vn": 1} if grad_input else {"stride_vr": 1}))
            const = {k: v for k, v in const.items() if k not in types}
            c = compile_kernel(lora_gemm_kernel, types, const, cap, cfg.num_warps, cfg.num_stages,
                               **({"enable_fp_fusion": False} if four_bit else {}))
            out[form + ("_nested" if nested else "")] = dict(
                wgmma="wgmma" in c.ptx, tma="cp.async.bulk.tensor" in c.ptx, shared=c.shared,
                setmaxnreg="setmaxnreg" in c.ptx,
                registers=c.registers, spills=c.spill_bytes,
                **({"fma": "fma.rn" in c.ptx} if four_bit else {}))
    return out


# The forms of the reduction kernel, by the config's (dropout, expand, rank_out, dora) flags:
# (form, writes C, writes Z (dY B), writes O (dx0), dropout, DoRA's dY pass, C transposed (dA))
REDUCE_FORMS = {(False, False, True, False): [("dy_pass", True, True, False, False, False, False)],
                # dA alone, and the dY pass's dB alone (dY B in the dX GEMM's loop)
                (False, False, False, False): [("da", True, False, False, False, False, True),
                                               ("db", True, False, False, False, False, False)],
                (False, True, False, False): [("x_pass", True, False, True, False, False, True)],
                (True, False, False, False): [("da_dropout", True, False, False, True, False, True)],
                (True, True, False, False): [("x_pass_dropout", True, False, True, True, False, True)],
                (False, False, True, True): [("dy_pass_dora", True, True, False, False, True, False)]}


def _optional(types: dict, const: dict, pointers) -> None:
    """Each optional pointer argument (name, passed, type): typed where the launcher passes it, a
    None constexpr where it does not."""
    for name, on, ty in pointers:
        if on:
            types[name] = ty
        else:
            const[name] = None


def pass_job(item) -> dict:
    """The pass over x (xa; over W with ||W_n||^2 for DoRA's norm) or a reduction over rows (the
    dY pass: dB with dY B, and DoRA's with dY', dm and g o B as hi + lo; the x pass: dA with dx0,
    with and without dropout) in a config chosen for those flags; each form also split (its
    partials summed by the last program to finish: "_split", with the PTX's arrival atomic and
    L2 loads)."""
    kind, cfg, block_r, dtype, cap, flags = item
    dropout = flags[0]
    t, a = _TL[dtype], _acc(dtype)
    acc = triton.language.float64 if dtype == torch.float64 else triton.language.float32
    prec = "ieee"
    out = {}

    def record(form, kernel, types, const, split):
        c = compile_kernel(kernel, types, const, cap, cfg.num_warps, cfg.num_stages,
                           **split_options(cfg, split))
        out[form + ("_split" if split else "")] = dict(
            shared=c.shared, registers=c.registers, spills=c.spill_bytes,
            **({"arrival": ARRIVAL.search(c.ptx) is not None, "l2_loads": "ld.global.cg" in c.ptx}
               if split else {}))

    for split in (False, True):
        if kind == "xa":
            sum_sq = flags[3]
            types = {"X": f"*{t}", "A": f"*{t}", "OUT": f"*{a}", "M": "i32", "K": "i32", "R": "i32",
                     "stride_xm": "i32", "scale": "fp64", "dropout_p": "fp64"}
            const = dict(BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_R=block_r, INT64=False,
                         HAS_DROPOUT=dropout, SUM_SQ=sum_sq, SPLIT=split, ACC_DTYPE=acc, PRECISION=prec)
            # the split route's xa also comes in x's dtype (not DoRA's pass over W)
            _optional(types, const, (("SEED", dropout, "*i64"), ("SQ_OUT", sum_sq, f"*{a}"),
                                     ("OUT2", not sum_sq, f"*{t}"), ("XA", split, f"*{a}"),
                                     ("SQ", split and sum_sq, f"*{a}"), ("COUNT", split, "*i32")))
            record("weight_pass" if sum_sq else ("xa_dropout" if dropout else "xa"), xa_kernel, types,
                   const, split)
            continue
        for form, has_c, has_z, has_o, drop, dora, trans_c in REDUCE_FORMS[flags]:
            split_e = dora and dtype in (torch.float16, torch.bfloat16)
            types = {"L": f"*{t}", "S": f"*{a}", "T": "i32", "P": "i32", "R": "i32", "stride_lt": "i32",
                     "c_scale": "fp64", "o_scale": "fp64", "dropout_p": "fp64"}
            const = dict(BLOCK_T=cfg.block_rows, BLOCK_P=cfg.block_cols, BLOCK_R=block_r, INT64=False,
                         HAS_DROPOUT=drop, REDUCE=has_c, RANK_OUT=has_z, SPLIT_E=split_e, SPLIT=split,
                         EXPAND_OUT=has_o, SCALED_OUT=dora, COL_DOT=dora, HAS_SHIFT=dora,
                         TRANS_C=trans_c, ACC_DTYPE=acc, PRECISION=prec)
            # dB and dA in the adapters' dtype (16-bit adapters: their own), dm in the accumulator's
            _optional(types, const, (("C_OUT", has_c, f"*{t}"), ("Z", has_z, f"*{a}"), ("E", has_z, f"*{t}"),
                                     ("OUT", has_o, f"*{t}"), ("F", has_o, f"*{t}"), ("SEED", drop, "*i64"),
                                     ("E_LO", split_e, f"*{t}"), ("G", dora, f"*{a}"), ("LG", dora, f"*{t}"),
                                     ("Y", dora, f"*{t}"), ("SH", dora, f"*{t}"), ("DM_OUT", dora, f"*{a}"),
                                     ("C", split and has_c, f"*{a}"), ("DM", split and dora, f"*{a}"),
                                     ("COUNT", split, "*i32")))
            record(form, reduce_kernel, types, const, split)
    return out


# a split pass's arrival at its counter: one acquire-release atomic add at GPU scope
ARRIVAL = re.compile(r"atom\.global\.(gpu\.acq_rel|acq_rel\.gpu)\.add")


def production_gemm4bit_configs() -> list:
    """Unique (config, R-block, dtype, capability, dropout epilogue) the 4-bit GEMM's config
    function gives for 16-bit problems, as fitted to blocks of 64 (fp32 and fp64 share the 16-bit
    GEMM's configs, compiled above)."""
    seen = {}
    for info, dtype, M, _N, _K, R in _problems():
        if dtype != torch.bfloat16:
            continue
        block_r = configs.rank_block(R)
        for grad_input, dropout in ((False, False), (True, False), (True, True)):
            cfg = configs.fit_4bit(configs.gpu_gemm_config_4bit(configs.bucket(M), block_r, dtype, info,
                                                                grad_input, dropout), 64, grad_input)
            seen.setdefault((cfg, block_r, dtype, info.capability[0] * 10 + info.capability[1], dropout), None)
    return list(seen)


# The dequantize kernel's forms: output dtype, nested absmax, blocksize (its launcher's BLOCK and warps).
DEQUANT_FORMS = [(dtype, nested, bs) for dtype in (torch.bfloat16, torch.float16, torch.float32)
                 for nested in (False, True) for bs in (64, 128, 256)]


# dY B's split partials' sum, in the accumulator dtypes
SUM_FORMS = [torch.float32, torch.float64]


def sum_job(item) -> dict:
    """The fixed-order sum of dY B's partials, as its launcher compiles it."""
    parts, cap = item
    types = {"PARTS": f"*{_TL[parts]}", "OUT": f"*{_TL[parts]}", "numel": "i32", "n": "i32"}
    c = compile_kernel(sum_parts_kernel, types, dict(BLOCK=_SUM_BLOCK, INT64=False), cap, 4, 3)
    return {"sum": dict(shared=c.shared, registers=c.registers, spills=c.spill_bytes)}


def dequant_job(item) -> dict:
    """The 4-bit dequantize kernel as its launcher compiles it (no floating-point contraction: the
    PTX must hold no fma, or the nested absmax would round once where bitsandbytes rounds twice)."""
    dtype, nested, blocksize, cap = item
    types = {"PACKED": "*u8", "ABSMAX": "*u8" if nested else "*fp32", "CODE": "*fp32",
             "W": f"*{_TL[dtype]}", "n_bytes": "i32"}
    const = dict(HALF_BLOCKSIZE=blocksize // 2, NESTED_BLOCKSIZE=256 if nested else 1, BLOCK=1024,
                 NESTED=nested, INT64=False)
    if nested:
        types.update(SCALE="*fp32", CODE8="*fp32", OFFSET="*fp32")
    else:
        const.update(SCALE=None, CODE8=None, OFFSET=None)
    c = compile_kernel(dequant_4bit_kernel, types, const, cap, 4, 3, enable_fp_fusion=False)
    return {"dequant": dict(shared=c.shared, registers=c.registers, spills=c.spill_bytes,
                            fma="fma.rn" in c.ptx)}


def _problems():
    """(DeviceInfo, dtype, M, N, K, R) for every GPU, dtype, shape and rank production sees."""
    for cap, sms, smem, _ in GPUS:
        info = configs.DeviceInfo(cap, sms, smem)
        for dtype in DTYPES:
            for M, N, K in SHAPES:
                for R in RANKS:
                    yield info, dtype, M, N, K, R


def production_gemm_configs() -> list:
    """Unique (config, R-block, dtype, capability, dropout epilogue) the GEMM config function gives."""
    seen = {}
    for info, dtype, M, _N, _K, R in _problems():
        block_r = configs.rank_block(R)
        for grad_input, dropout in ((False, False), (True, False), (True, True)):
            cfg = configs.gpu_gemm_config(configs.bucket(M), block_r, dtype, info, grad_input, dropout)
            seen.setdefault((cfg, block_r, dtype, info.capability[0] * 10 + info.capability[1],
                             dropout), None)
    return list(seen)


def tuning_gemm_configs() -> list:
    """The configs benchmarks/tune_routes.py times (bfloat16, its ranks and sizes), as
    ``production_gemm_configs`` gives them: a candidate must compile where the tuner runs."""
    seen = {}
    for cap, sms, smem, _ in GPUS:
        info = configs.DeviceInfo(cap, sms, smem)
        for M in (16, 64, 256):  # the candidate lists' M classes
            for R in (16, 64):
                for grad_input, dropout in ((False, False), (False, True), (True, False), (True, True)):
                    for cfg in configs.gemm_candidates(M, R, 2, info, grad_input=grad_input,
                                                       dropout=dropout):
                        seen.setdefault((cfg, R, torch.bfloat16, cap[0] * 10 + cap[1],
                                         grad_input and dropout), None)
    return list(seen)


def production_pass_configs() -> list:
    """Unique (kind, config, R-block, dtype, capability, flags) the pass config functions give
    (splits dropped: every form compiles both unsplit and split); flags (dropout, expand, rank_out, dora)
    for reductions, (dropout, -, -, sum_sq) for the xa kernel (sum_sq: DoRA's pass over W)."""
    seen = {}
    for info, dtype, M, N, K, R in _problems():
        block_r = configs.rank_block(R)
        cap = info.capability[0] * 10 + info.capability[1]

        def add(kind, cfg, flags, block_r=block_r, dtype=dtype, cap=cap):
            cfg = configs.PassConfig(cfg.block_rows, cfg.block_cols, 1, cfg.num_warps, cfg.num_stages)
            seen.setdefault((kind, cfg, block_r, dtype, cap, flags), None)

        for dropout in (False, True):
            add("xa", configs.gpu_xa_config(configs.bucket(M), K, block_r, dtype, info, dropout),
                (dropout, False, False, False))
        # DoRA's norm: the xa kernel over W [N, K] (its rows are N), with ||W_n||^2
        add("xa", configs.gpu_xa_config(configs.bucket(N), K, block_r, dtype, info, False),
            (False, False, False, True))
        # the dY pass reads dY [M, N] (DoRA's also y, writing dY'; dB alone when the dX GEMM
        # computes dY B); the x pass reads x [M, K], with or without dx0 and dropout
        flag_sets = ([(N, (False, False, rank_out, dora)) for rank_out, dora in ((True, False), (True, True),
                                                                                 (False, False))]
                     + [(K, (d, e, False, False)) for d in (False, True) for e in (False, True)])
        for P, flags in flag_sets:
            add("reduce", configs.gpu_reduce_config(configs.bucket(M), P, block_r, dtype, info,
                                                     *flags), flags)
    return list(seen)


def item_id(kind, item) -> str:
    if kind == "dequant":
        dtype, nested, blocksize, cap = item
        return f"dequant-sm{cap}-{_TL[dtype]}-bs{blocksize}{'-nested' if nested else ''}"
    if kind == "sum":
        parts, cap = item
        return f"sum-sm{cap}-{_TL[parts]}"
    if kind in ("gemm", "gemm4bit"):
        cfg, block_r, dtype, cap, dropout = item
        tile = (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}" + ("-tma" if cfg.tma else "")
                + ("-subtile" if cfg.epilogue_subtile else "") + ("-ws" if cfg.warp_specialize else "")
                + ("-dropout" if dropout else ""))
    else:
        kind, cfg, block_r, dtype, cap, (dropout, expand, rank_out, dora) = item
        tile = (f"{cfg.block_rows}x{cfg.block_cols}" + ("-dropout" if dropout else "")
                + ("-dx0" if expand else "") + ("-dyb" if rank_out else "")
                + (("-dora" if kind == "reduce" else "-sumsq") if dora else ""))
    return f"{kind}-sm{cap}-{_TL[dtype]}-r{block_r}-{tile}-w{cfg.num_warps}-s{cfg.num_stages}"


def all_items() -> list:
    caps = [cap[0] * 10 + cap[1] for cap, _, _, _ in GPUS]
    gemms = dict.fromkeys(production_gemm_configs() + tuning_gemm_configs())
    # a config reading xa compiles a subset of the forms of its twin with x A^T in the loop (and
    # shares its id): one item for both
    gemms = [it for it in gemms if it[0].xa_in_loop
             or (dataclasses.replace(it[0], xa_in_loop=True), *it[1:]) not in gemms]
    return ([("gemm", it) for it in gemms]
            + [("pass", it) for it in production_pass_configs()]
            + [("dequant", (*form, cap)) for form in DEQUANT_FORMS for cap in caps]
            + [("sum", (dtype, cap)) for dtype in SUM_FORMS for cap in caps]
            + [("gemm4bit", it) for it in production_gemm4bit_configs()])


def _run(job):
    kind, item = job
    if kind == "gemm4bit":
        return gemm_job(item, four_bit=True)
    return {"gemm": gemm_job, "pass": pass_job, "dequant": dequant_job, "sum": sum_job}[kind](item)


def main() -> None:
    """Compile every production config in a pool of processes; print one JSON object (or, with
    --summary, a line per config and a verdict)."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    assert os.environ.get("TRITON_INTERPRET") != "1", "AOT compilation needs the compiling triton.jit"
    jobs = all_items()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = {item_id(*job): r for job, r in zip(jobs, pool.map(_run, jobs))}
    if "--summary" not in sys.argv:
        json.dump(results, sys.stdout)
        return
    smem = {cap[0] * 10 + cap[1]: limit for cap, _, limit, _ in GPUS}
    bad = 0
    for name, forms in results.items():
        cap = int(re.search(r"-sm(\d+)-", name).group(1))
        for form, info in forms.items():
            flag = "  SPILLS" if info["spills"] else ""
            flag += "  SHARED-MEMORY" if info["shared"] > smem[cap] else ""
            # the bar (tests/test_aot.py): bfloat16 up to TUNED_RANK spills nothing, everything fits,
            # the dequantize kernel spills nothing and fuses no multiply-add, the sum spills nothing,
            # a split pass arrives with an acquire-release atomic and reads the partials from L2
            block_r = re.search(r"-r(\d+)-", name)
            tuned = "-bf16-" in name and (block_r is None or int(block_r.group(1)) <= configs.TUNED_RANK)
            bad += bool(info["shared"] > smem[cap] or (info["spills"] and tuned)
                        or (form in ("dequant", "sum") and info["spills"])
                        or (form == "dequant" and info["fma"])
                        or (name.startswith("gemm4bit") and info["fma"])
                        or (form.endswith("_split") and not (info["arrival"] and info["l2_loads"])))
            print(f"{name:60s} {form:16s} regs {info['registers']:3d} smem {info['shared']:6d}"
                  f"{' wgmma' if info.get('wgmma') else ''}{' tma' if info.get('tma') else ''}"
                  f"{' FMA' if info.get('fma') else ''}"
                  f"{' NO-ARRIVAL-ATOMIC' if form.endswith('_split') and not info['arrival'] else ''}"
                  f"{' NO-L2-LOADS' if form.endswith('_split') and not info['l2_loads'] else ''}{flag}")
    print(f"triton {triton.__version__}: {len(results)} configs, {bad} past the bar")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
