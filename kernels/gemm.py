"""The fused LoRA GEMM: one launch for y = x op(W) + bias + s * D o (xa op(V)).

It serves the forward and the backward's dX through the layout of W (fastlora/autograd.py derives
both):

* forward (``grad_input=False``): y = x W^T + bias + s * xa B^T, W [N, K] and B [N, R] as stored,
  xa = drop(x) A^T either computed in the K loop from the same x tiles (A [R, K]) or read;
* dX (``grad_input=True``): dx = dy W + s * D o ((dy B) A), W [N_out, K_in] and A [R, K_in] as
  stored (the kernel's K is N_out, its N is K_in), dy B either computed in the K loop from the same
  dy tiles (B [N_out, R] as stored; returned for the pass over x) or read from the pass over dY,
  and D the dropout mask of x (scaled by 1/(1-p)) applied to the low-rank term in the epilogue;
* DoRA's forward (``scale=g``): y = g o (x W^T + s * xa B^T) + bias, the per-output-column scale
  g applied in the epilogue before the bias (fastlora/autograd.py derives DoRA).

W may be held in 4 bits (bitsandbytes' NF4/FP4 layout, a ``Packed4bit``): its tiles are then read
as packed codes and dequantized in registers in the K loop (``W4BIT``, pointer path only), exactly
as kernels/dequant.py dequantizes the whole weight.

Output tiles are visited in grouped order (GROUP_M row blocks share each column of W tiles while
it sits in L2). Where the operands' strides allow TMA (sm_90+), they come through tensor
descriptors, the grid is persistent (one program per SM walking tiles) and the accumulator leaves
through a TMA store, in two halves when subtiled; otherwise through pointers with any strides,
one program per tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import (INTERPRETED, acc_dtype, alloc, cdiv, check_device, dot_precision, dropout_keep,
                     max_offset, needs_int64, tl_acc_dtype, tma_ready, widened, wrapped_offsets)
from .configs import WARP_SPECIALIZE, GemmConfig, device_info, fit_4bit, gemm_config, rank_block
from .dequant import Packed4bit, block_absmax
from .launch import launch


@triton.jit
def tile_coords(tile, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    """(i_m, i_n) of output tile number ``tile`` in grouped order."""
    per_group = GROUP_M * n_tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_size = min(n_tiles_m - first_m, GROUP_M)
    i_m = first_m + (tile % per_group) % group_size
    i_n = (tile % per_group) // group_size
    return i_m, i_n


@triton.jit
def _lora_tile(
    tile, tile_out, X, W, U, V, BIAS, SCALE, Y, XA, seed,
    M, N, K, R, stride_xm, stride_wk, stride_wn, stride_vr, stride_vn, stride_ym, scaling, dropout_p,
    W_NK: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, USE_TMA: tl.constexpr, XA_IN_LOOP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, DROPOUT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
    R_PADDED: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    CHUNKED_ACC: tl.constexpr,
    ABSMAX, CODE, ABSMAX_SCALE, CODE8, OFFSET, W4BIT: tl.constexpr, QBLOCK: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, LOW_DESC: tl.constexpr,
):
    """One output tile: the main loop over K for tile number ``tile``, the epilogue for tile number
    ``tile_out`` (the same tile; a persistent loop counts the two apart so that the software
    pipeline may start the next tile's loads under this one's epilogue). LOW_DESC (with USE_TMA,
    for warp specialization): XA and V are tensor descriptors and Y a pointer, since Triton's
    Hopper warp specialization fails on 2-D pointer loads feeding a dot in the loop and on a
    descriptor store."""
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    if USE_TMA:
        DOT_DTYPE = X.dtype
    else:
        DOT_DTYPE = X.dtype.element_ty
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R

    i_m, i_n = tile_coords(tile, n_tiles_m, n_tiles_n, GROUP_M)
    if not USE_TMA:
        rows = wrapped_offsets(i_m * BLOCK_M + tl.arange(0, BLOCK_M), M, INT64)
        cols = wrapped_offsets(i_n * BLOCK_N + tl.arange(0, BLOCK_N), N, INT64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    b_xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for i_k in range(tl.cdiv(K, BLOCK_K)):
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        if USE_TMA:
            b_x = X.load([i_m * BLOCK_M, i_k * BLOCK_K])                      # [BM, BK]
            if W_NK:
                b_w = W.load([i_n * BLOCK_N, i_k * BLOCK_K]).T                # [BK, BN]
            else:
                b_w = W.load([i_k * BLOCK_K, i_n * BLOCK_N])                  # [BK, BN]
        elif W4BIT:
            # W's tile read as packed 4-bit codes (two a byte along W's rows) and dequantized in
            # registers; a tile's elements of one W row share an absmax (the launcher keeps the
            # tile's extent along W's rows within a quantization block)
            p_x = X + rows[:, None] * stride_xm + o_k[None, :]
            if EVEN_K:
                b_x = tl.load(p_x)                                            # [BM, BK]
            else:
                b_x = tl.load(p_x, mask=(o_k < K)[None, :], other=0.0)
            if W_NK:  # forward: op(W)[k, n] = W[n, k], W [N, K]
                o_kb = i_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
                p_b = W + cols[:, None] * (K // 2) + o_kb[None, :]
                if EVEN_K:  # (always: BLOCK_K divides the blocksize, which divides K)
                    b_b = tl.load(p_b).to(tl.int32)                           # [BN, BK/2]
                else:
                    b_b = tl.load(p_b, mask=(o_kb < K // 2)[None, :], other=0).to(tl.int32)
                blk = cols * (K // QBLOCK) + (i_k * BLOCK_K) // QBLOCK
                m_s = cols >= 0  # rows wrapped onto valid ones: every block exists
            else:     # dX: op(W)[k, n] = W[k, n], W [K, N]
                ok = widened(o_k, INT64)
                o_nb = wrapped_offsets(i_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2), N // 2, INT64)
                p_b = W + ok[:, None] * (N // 2) + o_nb[None, :]
                b_b = tl.load(p_b, mask=(o_k < K)[:, None], other=0).to(tl.int32)      # [BK, BN/2]
                blk = ok * (N // QBLOCK) + (i_n * BLOCK_N) // QBLOCK
                m_s = o_k < K
            b_s = block_absmax(ABSMAX, ABSMAX_SCALE, CODE8, OFFSET, blk, m_s, NESTED, NESTED_BLOCK)[:, None]
            b_w = tl.interleave(tl.load(CODE + (b_b >> 4)) * b_s, tl.load(CODE + (b_b & 15)) * b_s)
            if W_NK:
                b_w = tl.trans(b_w)                                           # [BK, BN]
            # (rows past K read as finite values, which meet x's zero-filled columns)
            b_w = b_w.to(DOT_DTYPE)
        else:
            p_x = X + rows[:, None] * stride_xm + o_k[None, :]
            p_w = W + o_k[:, None] * stride_wk + cols[None, :] * stride_wn
            if EVEN_K:
                b_x = tl.load(p_x)                                            # [BM, BK]
                b_w = tl.load(p_w)                                            # [BK, BN]
            else:
                b_x = tl.load(p_x, mask=(o_k < K)[None, :], other=0.0)
                b_w = tl.load(p_w, mask=(o_k < K)[:, None], other=0.0)
        if CHUNKED_ACC:
            # float32/64: each K block sums on its own before joining the total, so rounding
            # grows with K / BLOCK_K rather than K (cuBLAS-level accuracy at large K)
            acc += tl.dot(b_x, b_w, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        else:
            acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if XA_IN_LOOP:
            if W_NK:  # forward: U = A [R, K]
                p_u = U + o_r[None, :] * K + o_k[:, None]
            else:     # dX: U = B [K, R] (the kernel's K is N_out), as stored
                p_u = U + o_k[:, None] * R + o_r[None, :]
            b_u = tl.load(p_u, mask=m_r[None, :] & (o_k < K)[:, None], other=0.0)      # [BK, BR]
            b_xa = tl.dot(b_x, b_u.to(DOT_DTYPE), b_xa, input_precision=PRECISION,
                          out_dtype=ACC_DTYPE)

    # epilogue: the low-rank term, rounded to the compute dtype as torch would round XA
    e_m, e_n = tile_coords(tile_out, n_tiles_m, n_tiles_n, GROUP_M)
    o_m = e_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = e_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    om = widened(o_m, INT64)
    on = widened(o_n, INT64)
    if LOW_DESC:  # (edges zero-filled: rows past M, columns past N, lanes past R)
        b_xa = XA.load([e_m * BLOCK_M, 0]).to(ACC_DTYPE)                               # [BM, BR]
        if W_NK:
            b_v = V.load([e_n * BLOCK_N, 0]).T.to(DOT_DTYPE)                           # [BR, BN]
        else:
            b_v = V.load([0, e_n * BLOCK_N]).to(DOT_DTYPE)
    else:
        p_xa = XA + om[:, None] * R + o_r[None, :]
        if XA_IN_LOOP:
            if e_n == 0:  # the side output, written once per row block
                tl.store(p_xa, b_xa.to(XA.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])
        else:
            b_xa = tl.load(p_xa, mask=m_m[:, None] & m_r[None, :], other=0.0).to(ACC_DTYPE)
        p_v = V + o_r[:, None] * stride_vr + on[None, :] * stride_vn
        b_v = tl.load(p_v, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN]
    b_xas = (b_xa * tl.full((1, 1), scaling, ACC_DTYPE)).to(DOT_DTYPE)
    if R_PADDED:
        # lanes r >= R hold x * 0 from U's zero padding, NaN where x is +-Inf; V's zero padding
        # would carry that NaN into every output of the row
        b_xas = tl.where(m_r[None, :], b_xas, 0.0)
    if DROPOUT_OUT:
        b_low = tl.dot(b_xas, b_v, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE),
                       input_precision=PRECISION, out_dtype=ACC_DTYPE)
        keep = dropout_keep(seed, o_m[:, None], o_n[None, :], tl.full((1, 1), dropout_p, tl.float32))
        acc += tl.where(keep, b_low / (1.0 - tl.full((1, 1), dropout_p, ACC_DTYPE)), 0.0)
    else:
        acc = tl.dot(b_xas, b_v, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_SCALE:  # DoRA: g per output column, before the bias
        acc = acc * tl.load(SCALE + on, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + on, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
    if USE_TMA and not LOW_DESC:
        if EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            Y.store([e_m * BLOCK_M, e_n * BLOCK_N], acc0.to(Y.dtype))
            Y.store([e_m * BLOCK_M, e_n * BLOCK_N + BLOCK_N // 2], acc1.to(Y.dtype))
        else:
            Y.store([e_m * BLOCK_M, e_n * BLOCK_N], acc.to(Y.dtype))
    else:
        p_y = Y + om[:, None] * stride_ym + on[None, :]
        tl.store(p_y, acc.to(Y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["M"])
def lora_gemm_kernel(
    X, W, U, V, BIAS, SCALE, Y, XA, SEED, ABSMAX, CODE, ABSMAX_SCALE, CODE8, OFFSET,
    M, N, K, R,
    stride_xm, stride_wk, stride_wn, stride_vr, stride_vn, stride_ym,
    scaling: "fp64", dropout_p: "fp64",
    W_NK: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr,
    USE_TMA: tl.constexpr, XA_IN_LOOP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, DROPOUT_OUT: tl.constexpr, EVEN_K: tl.constexpr, R_PADDED: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, CHUNKED_ACC: tl.constexpr,
    W4BIT: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """Y = SCALE o (X op(W) + s * D o (XA op(V))) + BIAS, XA = X U^T (in the loop, written to XA)
    or read; SCALE [N] per output column (DoRA's g), ones when None.

    X [M, K]; op(W) [K, N] is W^T of W [N, K] (W_NK) or W [K, N] itself; U [R, K] (W_NK: the
    forward's A) or [K, R] (dX: B as stored, XA = dY B); op(V) [R, N]
    through (stride_vr, stride_vn); XA [M, R] contiguous; Y [M, N]. With USE_TMA, X, W and Y are
    tensor descriptors (edges zero-filled on load, clipped on store) and the grid is persistent:
    min(#tiles, NUM_SMS) programs walk the tiles NUM_SMS apart. Otherwise pointers, one tile a
    program (a persistent loop costs the pointer path registers it has no use for), rows and columns
    past the edges wrapped onto valid ones (never stored) and K masked unless EVEN_K.
    WARP_SPECIALIZE (with USE_TMA, XA read): the tile loop warp-specialized by Triton (on sm_90:
    a producer warpgroup issuing the copies, two computing; num_warps=4 a group), XA and op(V) then
    descriptors too and Y a pointer.

    W4BIT: W is the packed codes of a 4-bit [N_out, K_in] weight (ABSMAX, CODE and, NESTED,
    ABSMAX_SCALE, CODE8, OFFSET its quant state, blocks of QBLOCK, nested blocks of NESTED_BLOCK), read through
    pointers and dequantized in the K loop; the strides of W are unused, and a tile spans at most
    QBLOCK elements of a W row (BLOCK_K forward, BLOCK_N for dX, dividing QBLOCK).
    """
    seed = tl.load(SEED) if DROPOUT_OUT else 0
    i_pid = tl.program_id(0)
    if USE_TMA:
        n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        tile_out = i_pid - NUM_SMS
        for tile in tl.range(i_pid, n_tiles, NUM_SMS, flatten=not WARP_SPECIALIZE,
                             warp_specialize=WARP_SPECIALIZE):
            tile_out += NUM_SMS
            _lora_tile(tile, tile_out, X, W, U, V, BIAS, SCALE, Y, XA, seed, M, N, K, R, stride_xm,
                       stride_wk, stride_wn, stride_vr, stride_vn, stride_ym, scaling, dropout_p,
                       W_NK, INT64, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, EPILOGUE_SUBTILE,
                       USE_TMA, XA_IN_LOOP, HAS_BIAS, HAS_SCALE, DROPOUT_OUT, EVEN_K, R_PADDED, ACC_DTYPE,
                       PRECISION, CHUNKED_ACC, ABSMAX, CODE, ABSMAX_SCALE, CODE8, OFFSET, W4BIT, QBLOCK,
                       NESTED, NESTED_BLOCK, WARP_SPECIALIZE)
    else:
        _lora_tile(i_pid, i_pid, X, W, U, V, BIAS, SCALE, Y, XA, seed, M, N, K, R, stride_xm,
                   stride_wk, stride_wn, stride_vr, stride_vn, stride_ym, scaling, dropout_p,
                   W_NK, INT64, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, EPILOGUE_SUBTILE,
                   USE_TMA, XA_IN_LOOP, HAS_BIAS, HAS_SCALE, DROPOUT_OUT, EVEN_K, R_PADDED, ACC_DTYPE,
                   PRECISION, CHUNKED_ACC, ABSMAX, CODE, ABSMAX_SCALE, CODE8, OFFSET, W4BIT, QBLOCK,
                   NESTED, NESTED_BLOCK, False)


_NO_4BIT = Packed4bit(None, None, None, None, None, None, (0, 0), 1)  # the 4-bit arguments of a 16-bit W


def lora_gemm(x: torch.Tensor, w: torch.Tensor | Packed4bit, v: torch.Tensor, bias: torch.Tensor | None,
              scaling: float, *, grad_input: bool = False, u: torch.Tensor | None = None,
              xa: torch.Tensor | None = None, dropout: tuple[torch.Tensor, float] | None = None,
              scale: torch.Tensor | None = None,
              config: GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) with y = scale o (x op(w) + scaling * D o (xa op(v))) + bias.

    Forward (``grad_input=False``): x [M, K], w [N, K], v = B [N, R]; op transposes.
    dX (``grad_input=True``): x = dY [M, K], w [K, N] (the base weight as stored), v = A [R, N].
    ``u`` (forward: A [R, K]; dX: B [K, R] as stored): xa = x u^T (forward) or x u (dX: dY B) is
    computed in the K loop from the same x tiles and returned; otherwise ``xa`` [M, R] (any float
    dtype) is read. ``dropout=(seed, p)`` multiplies the low-rank term by
    the dropout mask of output element (m, n) over 1 - p (the dX epilogue). ``scale`` [N] (DoRA's
    g, forward only) scales each output column before the bias. Any strides; a fresh contiguous y.
    ``w`` may be a ``Packed4bit`` (the same [N, K] / [K, N] weight in 4 bits): its tiles are
    dequantized in the K loop, through pointers.
    """
    w4 = w if isinstance(w, Packed4bit) else None
    if w4 is not None:
        w = w4.packed
    check_device(x, w, v, bias, u, xa, scale)
    M, K = x.shape
    w_shape = w4.shape if w4 is not None else w.shape
    N = w_shape[1] if grad_input else w_shape[0]
    R = v.shape[0] if grad_input else v.shape[1]
    if (u is None) == (xa is None):
        raise ValueError("lora_gemm: pass exactly one of u (x u^T in the loop) and xa")
    if scale is not None:
        if grad_input or scale.shape != (N,):
            raise ValueError(f"lora_gemm: scale must be [N] = [{N}] and forward only, got shape "
                             f"{tuple(scale.shape)} with grad_input={grad_input}")
        scale = scale.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if u is not None:
        if u.shape != ((K, R) if grad_input else (R, K)):
            raise ValueError(f"lora_gemm: u must be {'B [K, R]' if grad_input else 'A [R, K]'} = "
                             f"{[K, R] if grad_input else [R, K]}, got shape {list(u.shape)}")
        u = u.contiguous()  # (the kernel indexes its tiles as a contiguous [R, K] or [K, R])
        xa = alloc((M, R), x, acc_dtype(x.dtype))
    else:
        xa = xa.contiguous()
    y = alloc((M, N), x, x.dtype)
    if M == 0:
        return y, xa
    cfg = config or gemm_config(M, N, K, R, x.dtype, x.device, grad_input=grad_input,
                                dropout=dropout is not None, four_bit=w4 is not None)
    if w4 is not None:  # a tile spans at most one quantization block of a W row
        cfg = fit_4bit(cfg, w4.blocksize, grad_input)
    info = device_info(x.device)
    w_kn = (0, 0) if w4 is not None else (w.stride(0), w.stride(1)) if grad_input else (w.stride(1), w.stride(0))
    v_rn = (v.stride(0), v.stride(1)) if grad_input else (v.stride(1), v.stride(0))
    use_tma = (cfg.tma and w4 is None and (INTERPRETED or info.capability[0] >= 9)
               and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and tma_ready(x, w, y))
    block_r = rank_block(R)
    # warp specialization reads xa and the adapter (B [N, R] forward, A [R, N] dX) through
    # descriptors as well, and stores y through pointers (see the kernel)
    ws = (use_tma and cfg.warp_specialize and (WARP_SPECIALIZE or INTERPRETED) and u is None
          and tma_ready(xa, v))
    # a warp-specialized config's num_warps is one warpgroup (4 of the program's 12); where it runs
    # unspecialized (triton 3.7+, the pointer path, unaligned xa) its 128-row tiles take the plain
    # configs' 8 warps (at 4 the dX dropout form spills under 3.9: tests/aot.py's compile)
    warps = cfg.num_warps if ws or not cfg.warp_specialize else max(cfg.num_warps, 8)
    x_arg, w_arg, y_arg, xa_arg, v_arg = x, w, y, xa, v
    if use_tma:
        x_arg = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        w_arg = TensorDescriptor.from_tensor(w, [cfg.block_k, cfg.block_n] if grad_input
                                             else [cfg.block_n, cfg.block_k])
    if use_tma and not ws:
        y_arg = TensorDescriptor.from_tensor(
            y, [cfg.block_m, cfg.block_n // 2 if cfg.epilogue_subtile else cfg.block_n])
    if ws:
        xa_arg = TensorDescriptor.from_tensor(xa, [cfg.block_m, block_r])
        v_arg = TensorDescriptor.from_tensor(v, [block_r, cfg.block_n] if grad_input
                                             else [cfg.block_n, block_r])
    n_tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    programs = min(n_tiles, info.sms) if use_tma else n_tiles
    seed, p = dropout if dropout is not None else (None, 0.0)
    int64 = needs_int64(max_offset(x), N * K if w4 is not None else max_offset(w), max_offset(y),
                        M * block_r, max_offset(v))
    q = w4 if w4 is not None else _NO_4BIT
    launch(lora_gemm_kernel, (programs,),
        x_arg, w_arg, u, v_arg, bias, scale, y_arg, xa_arg, seed, q.absmax, q.code, q.scale, q.code8, q.offset,
        M, N, K, R,
        x.stride(0), w_kn[0], w_kn[1], v_rn[0], v_rn[1], y.stride(0),
        float(scaling), float(p),
        W_NK=not grad_input, INT64=int64,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        GROUP_M=cfg.group_m, NUM_SMS=info.sms, EPILOGUE_SUBTILE=cfg.epilogue_subtile and use_tma and not ws,
        USE_TMA=use_tma, XA_IN_LOOP=u is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        DROPOUT_OUT=seed is not None, EVEN_K=K % cfg.block_k == 0, R_PADDED=R < block_r,
        ACC_DTYPE=tl_acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        CHUNKED_ACC=x.dtype in (torch.float32, torch.float64),
        W4BIT=w4 is not None, QBLOCK=q.blocksize, NESTED=q.scale is not None, NESTED_BLOCK=q.nested_blocksize,
        WARP_SPECIALIZE=ws, num_warps=warps, num_stages=cfg.num_stages,
        # the nested absmax rounds after its product and after its sum (kernels/dequant.py)
        **({"enable_fp_fusion": False} if w4 is not None else {}),
    )
    return y, xa
