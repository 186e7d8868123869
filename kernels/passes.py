"""The memory-bound passes: the rank-r products that read a large operand once.

* ``xa_pass``: xa = drop(x) A^T, one pass over x by row blocks (and, for DoRA's norm, W A^T
  with ||W_n||^2 from one pass over W);
* ``dy_pass``: dY B and dB = s dY^T xa together, one pass over dY; for DoRA (``dora_dy_pass``) the
  same pass gives them for dY' = g o dY, writes dY' for the dX product and reduces sum over rows of
  dY o (y - b) for the magnitude's gradient;
* ``x_pass``:  dA = s (dY B)^T drop(x) and, if asked, dx0 = s D o ((dY B) A) (the low-rank part
  of dX, which cuBLAS then accumulates onto), one pass over x with one mask draw for both.

fastlora/autograd.py derives these products. Every reduction is split into a fixed number of
chunks, each reduced in a fixed order by one program, and the chunks are summed in a fixed order
afterwards by one launch (``sum_parts_kernel``) that rounds the sum once to the output's dtype
(an adapter's dA or dB, and for the split route xa in x's dtype beside the float32 xa it keeps):
deterministic, no float atomics, no cast launched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (acc_dtype, alloc, cdiv, check_device, chunk_range, dot_precision, dropout_keep,
                     max_offset, needs_int64, tl_acc_dtype, widened, wrapped_offsets)
from .configs import PassConfig, rank_block, reduce_config, xa_config
from .launch import launch


@triton.jit(do_not_specialize=["M"])
def xa_kernel(
    X, A, XA, SQ, SEED,
    M, K, R, stride_xm,
    scale: "fp64", dropout_p: "fp64",
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SUM_SQ: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """XA[s] = scale * drop(X)[:, chunk s] A[:, chunk s]^T for X [M, K], A [R, K] (contiguous),
    XA [SPLITS, M, R]; with SUM_SQ also SQ[s] = sum over chunk s of X^2, per row [SPLITS, M] (no
    dropout: DoRA's ||W_n||^2 from the same read of W). Program (i_m, s): BLOCK_M rows, the s-th
    chunk of K."""
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    k_start, k_end = chunk_range(i_s, tl.num_programs(1), K, BLOCK_K)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = wrapped_offsets(o_m, M, INT64)
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    DOT_DTYPE = X.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        p = tl.full((1, 1), dropout_p, tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    if SUM_SQ:
        acc_sq = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < k_end
        b_x = tl.load(X + rows[:, None] * stride_xm + o_k[None, :], mask=m_k[None, :], other=0.0)  # [BM, BK]
        if SUM_SQ:
            b_xf = b_x.to(ACC_DTYPE)
            acc_sq += tl.sum(b_xf * b_xf, axis=1)
        if HAS_DROPOUT:
            b_x = tl.where(dropout_keep(seed, o_m[:, None], o_k[None, :], p), b_x, 0.0)
        b_a = tl.load(A + o_r[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                      other=0.0).to(DOT_DTYPE)                                                  # [BR, BK]
        acc = tl.dot(b_x, tl.trans(b_a), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    om = widened(o_m, INT64)
    p_xa = XA + widened(i_s, INT64) * M * R + om[:, None] * R + o_r[None, :]
    acc = acc * tl.full((1, 1), scale, ACC_DTYPE)
    tl.store(p_xa, acc.to(XA.dtype.element_ty), mask=(o_m < M)[:, None] & m_r[None, :])
    if SUM_SQ:
        tl.store(SQ + widened(i_s, INT64) * M + om, acc_sq, mask=o_m < M)


@triton.jit(do_not_specialize=["T"])
def reduce_kernel(
    L, S, E, E_LO, F, C, Z, OUT, SEED, G, LG, Y, SH, DM,
    T, P, R, stride_lt,
    c_scale: "fp64", o_scale: "fp64", dropout_p: "fp64",
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, REDUCE: tl.constexpr, RANK_OUT: tl.constexpr, SPLIT_E: tl.constexpr,
    EXPAND_OUT: tl.constexpr, SCALED_OUT: tl.constexpr,
    COL_DOT: tl.constexpr, HAS_SHIFT: tl.constexpr, TRANS_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Over the rows of L [T, P]; program (i_p, c) owns BLOCK_P columns and the c-th chunk of rows:

        C[c]   = c_scale * drop(L)^T S              [P, R], the chunk's rows reduced (REDUCE)
        Z[i_p] = L[:, cols] (E + E_LO)[cols]         [T, R], one partial per column block (RANK_OUT;
                                                     E_LO, when given, what E's rounding dropped)
        OUT      = o_scale * D o (S F[:, cols])        [T, P]  (EXPAND_OUT)
        LG       = G o L                               [T, P], column p scaled by G[p] (SCALED_OUT)
        DM[c]  = sum over the chunk's rows of L o (Y - SH)   [P]  (COL_DOT)

    S [T, R], E, E_LO [P, R], F [R, P], C [SPLITS, P, R] ([SPLITS, R, P] with TRANS_C), Z
    [P_BLOCKS, T, R], OUT, LG and Y [T, P], G, SH [P] and DM [SPLITS, P] contiguous (the SPLITS
    and P_BLOCKS axes absent when 1); C is written in its own dtype; D is the dropout mask of
    element (t, p) of L, which is x under dropout. (DoRA's dY pass: L = dY, G = g, Y = y,
    SH = bias.)
    """
    i_p = tl.program_id(0)
    i_c = tl.program_id(1)
    t_start, t_end = chunk_range(i_c, tl.num_programs(1), T, BLOCK_T)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    op = widened(o_p, INT64)
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    DOT_DTYPE = L.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        p = tl.full((1, 1), dropout_p, tl.float32)
    if SPLIT_E:
        b_e_lo = tl.load(E_LO + op[:, None] * R + o_r[None, :], mask=m_p[:, None] & m_r[None, :],
                         other=0.0).to(DOT_DTYPE)                                        # [BP, BR]
    if RANK_OUT:
        b_e = tl.load(E + op[:, None] * R + o_r[None, :], mask=m_p[:, None] & m_r[None, :],
                      other=0.0).to(DOT_DTYPE)                                           # [BP, BR]
    if EXPAND_OUT:
        b_f = tl.load(F + o_r[:, None] * P + op[None, :], mask=m_r[:, None] & m_p[None, :],
                      other=0.0).to(DOT_DTYPE)                                           # [BR, BP]
    if SCALED_OUT:
        b_g = tl.load(G + op, mask=m_p, other=0.0).to(ACC_DTYPE)                        # [BP]
    if COL_DOT:
        acc_dm = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
        if HAS_SHIFT:
            b_sh = tl.load(SH + op, mask=m_p, other=0.0).to(ACC_DTYPE)                  # [BP]
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=ACC_DTYPE)
    for t0 in range(t_start, t_end, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < t_end
        ot = widened(o_t, INT64)
        m_tp = m_t[:, None] & m_p[None, :]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, o_t[:, None], o_p[None, :], p)
        if REDUCE or EXPAND_OUT:
            b_s = tl.load(S + ot[:, None] * R + o_r[None, :], mask=m_t[:, None] & m_r[None, :],
                          other=0.0).to(DOT_DTYPE)                                       # [BT, BR]
        if REDUCE or RANK_OUT or SCALED_OUT or COL_DOT:
            b_l = tl.load(L + ot[:, None] * stride_lt + op[None, :], mask=m_tp, other=0.0)  # [BT, BP]
            if COL_DOT:
                b_y = tl.load(Y + ot[:, None] * P + op[None, :], mask=m_tp, other=0.0).to(ACC_DTYPE)
                if HAS_SHIFT:
                    b_y = b_y - b_sh[None, :]
                acc_dm += tl.sum(b_l.to(ACC_DTYPE) * b_y, axis=0)
            if SCALED_OUT:
                b_lg = (b_l.to(ACC_DTYPE) * b_g[None, :]).to(LG.dtype.element_ty)
                tl.store(LG + ot[:, None] * P + op[None, :], b_lg, mask=m_tp)
            if RANK_OUT:
                b_z = tl.dot(b_l, b_e, input_precision=PRECISION, out_dtype=ACC_DTYPE)  # [BT, BR]
                if SPLIT_E:
                    b_z = tl.dot(b_l, b_e_lo, b_z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                p_z = Z + widened(i_p, INT64) * T * R + ot[:, None] * R + o_r[None, :]
                tl.store(p_z, b_z.to(Z.dtype.element_ty), mask=m_t[:, None] & m_r[None, :])
            if REDUCE:
                if HAS_DROPOUT:
                    b_l = tl.where(keep, b_l, 0.0)
                acc = tl.dot(tl.trans(b_l), b_s, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if EXPAND_OUT:
            b_o = tl.dot(b_s, b_f, input_precision=PRECISION, out_dtype=ACC_DTYPE)       # [BT, BP]
            b_o = b_o * tl.full((1, 1), o_scale, ACC_DTYPE)
            if HAS_DROPOUT:
                b_o = tl.where(keep, b_o, 0.0)
            tl.store(OUT + ot[:, None] * P + op[None, :], b_o.to(OUT.dtype.element_ty), mask=m_tp)
    if REDUCE:
        p_c = C + widened(i_c, INT64) * P * R
        if TRANS_C:  # C^T: the x pass's dA [R, K] as the adapter stores it
            p_c += o_r[None, :] * P + op[:, None]
        else:
            p_c += op[:, None] * R + o_r[None, :]
        acc = acc * tl.full((1, 1), c_scale, ACC_DTYPE)
        tl.store(p_c, acc.to(C.dtype.element_ty), mask=m_p[:, None] & m_r[None, :])
    if COL_DOT:
        tl.store(DM + widened(i_c, INT64) * P + op, acc_dm, mask=m_p)


def split_in(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hi, lo) in ``dtype`` with hi + lo = t to about twice dtype's precision (lo None when t's
    dtype is already ``dtype``): a product with t in ``dtype``'s dots as two products."""
    if t.dtype == dtype:
        return t.contiguous(), None
    hi = t.to(dtype)
    return hi, (t - hi.to(t.dtype)).to(dtype)


def _parts(n: int, shape: tuple, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A buffer for ``n`` partial results of ``shape``: [n, *shape], or ``shape`` itself when n is
    1 (the result as it is: no view to take, nothing to sum)."""
    return alloc((n, *shape) if n > 1 else shape, like, dtype)


@triton.jit
def sum_parts_kernel(PARTS, OUT, OUT2, numel, n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """OUT = PARTS[0] + PARTS[1] + ... + PARTS[n - 1] elementwise for PARTS [n, numel], summed in
    that order in PARTS' dtype (the accumulator's) and rounded once to OUT's; OUT2, when given, the
    same sum in its own dtype."""
    o = widened(tl.program_id(0), INT64) * BLOCK + tl.arange(0, BLOCK)
    m = o < numel
    acc = tl.load(PARTS + o, mask=m, other=0.0)
    for i in range(1, n):
        acc += tl.load(PARTS + widened(i, INT64) * numel + o, mask=m, other=0.0)
    tl.store(OUT + o, acc.to(OUT.dtype.element_ty), mask=m)
    if OUT2 is not None:
        tl.store(OUT2 + o, acc.to(OUT2.dtype.element_ty), mask=m)


_SUM_BLOCK = 1024  # elements a program: the partials are small ([n, M, r] or [n, N, r])


def _fixed_order_sum(parts: torch.Tensor, n: int, dtype: torch.dtype | None = None,
                     also: torch.dtype | None = None):
    """``_parts``' ``n`` partial results summed in a fixed order, rounded once to ``dtype`` (the
    accumulator's by default; a single result was written in it) in one launch, which with
    ``also`` writes the sum rounded once to that dtype too and returns both (an x-dtype copy of xa
    for cuBLAS: no cast launched)."""
    if n == 1:
        return parts if also is None else (parts, parts.to(also))
    shape = parts.shape[1:]
    out = alloc(shape, parts, dtype or parts.dtype)
    out2 = alloc(shape, parts, also) if also is not None else None
    numel = out.numel()
    if numel:
        launch(sum_parts_kernel, (cdiv(numel, _SUM_BLOCK),), parts, out, out2, numel, n,
               BLOCK=_SUM_BLOCK, INT64=needs_int64(parts.numel()))
    return out if also is None else (out, out2)


def xa_pass(x: torch.Tensor, a: torch.Tensor, *, dropout: tuple[torch.Tensor, float] | None = None,
            also: torch.dtype | None = None, config: PassConfig | None = None):
    """xa = drop(x) a^T [M, R] in the accumulator dtype, for x [M, K] (unit stride along K) and
    a [R, K]; ``dropout=(seed, p)`` applies the dropout mask of x and 1/(1-p). With ``also`` (a
    dtype), (xa, xa rounded once to it): the split route's operand for cuBLAS, written by the
    launch that sums the split partials."""
    return _xa(x, a, dropout, False, config, also)[0]


def weight_pass(w: torch.Tensor, a: torch.Tensor, *, need_sq: bool = True,
                config: PassConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DoRA's norm pre-pass, one read of w [N, K]: (w a^T [N, R], ||w_n||^2 [N] if ``need_sq``),
    both in the accumulator dtype (a [R, K] in any float dtype; the products run in w's)."""
    return _xa(w, a, None, need_sq, config)


def _xa(x, a, dropout, sum_sq: bool, config, also=None):
    check_device(x, a)
    M, K = x.shape
    R = a.shape[0]
    acc = acc_dtype(x.dtype)
    if M == 0:
        xa = torch.zeros((0, R), device=x.device, dtype=acc)
        return (xa if also is None else (xa, xa.to(also))), (x.new_zeros(0, dtype=acc) if sum_sq else None)
    if x.stride(1) != 1:
        x = x.contiguous()
    a = a.contiguous()
    cfg = config or xa_config(M, K, R, x.dtype, x.device, dropout=dropout is not None)
    ws = _parts(cfg.splits, (M, R), x, acc)
    sq = _parts(cfg.splits, (M,), x, acc) if sum_sq else None
    seed, p = dropout if dropout is not None else (None, 0.0)
    launch(xa_kernel, (cdiv(M, cfg.block_rows), cfg.splits),
        x, a, ws, sq, seed, M, K, R, x.stride(0), 1.0 / (1.0 - p), float(p),
        BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_R=rank_block(R),
        INT64=needs_int64(max_offset(x), ws.numel()),
        HAS_DROPOUT=seed is not None, SUM_SQ=sq is not None, ACC_DTYPE=tl_acc_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (_fixed_order_sum(ws, cfg.splits, also=also),
            _fixed_order_sum(sq, cfg.splits) if sum_sq else None)


def _reduce(big, s, e, f, scaling, dropout, *, reduce: bool, rank_out: bool, expand_out: bool,
            out_dtype, config, e_lo=None, scale=None, scaled_out: bool = False, y=None, shift=None,
            c_dtype=None, trans_c: bool = False):
    """Launch ``reduce_kernel``; returns (C summed [P, R] ([R, P] if ``trans_c``) in ``c_dtype``
    (the accumulator's by default) | None, Z summed [T, R] | None, OUT | None, LG | None, DM summed
    [P] | None). ``e_lo``, ``scale`` (G), ``scaled_out`` (LG), ``y`` and ``shift`` (DM): DoRA's dY
    pass."""
    T, P = big.shape
    R = (s if s is not None else e).shape[1] if (s is not None or e is not None) else 1
    acc = acc_dtype(big.dtype)
    dora = scale is not None or y is not None
    cfg = config or reduce_config(T, P, R, big.dtype, big.device, dropout=dropout is not None,
                                  expand=expand_out, rank_out=rank_out, dora=dora)
    p_blocks = cdiv(P, cfg.block_cols)
    c_dtype = c_dtype or acc
    c = (_parts(cfg.splits, (R, P) if trans_c else (P, R), big, acc if cfg.splits > 1 else c_dtype)
         if reduce else None)
    z = _parts(p_blocks, (T, R), big, acc) if rank_out else None
    o = alloc((T, P), big, out_dtype) if expand_out else None
    lg = alloc((T, P), big, big.dtype) if scaled_out else None
    dm = _parts(cfg.splits, (P,), big, acc) if y is not None else None
    seed, p = dropout if dropout is not None else (None, 0.0)
    keep_scale = 1.0 / (1.0 - p)
    int64 = needs_int64(max_offset(big), T * P, p_blocks * T * R, cfg.splits * P * R)
    launch(reduce_kernel, (p_blocks, cfg.splits),
        big, s, e, e_lo, f, c, z, o, seed, scale, lg, y, shift, dm, T, P, R, big.stride(0),
        float(scaling) * keep_scale, float(scaling) * keep_scale, float(p),
        BLOCK_T=cfg.block_rows, BLOCK_P=cfg.block_cols, BLOCK_R=rank_block(R), INT64=int64,
        HAS_DROPOUT=seed is not None, REDUCE=c is not None, RANK_OUT=z is not None,
        SPLIT_E=e_lo is not None, EXPAND_OUT=o is not None, SCALED_OUT=lg is not None,
        COL_DOT=dm is not None, HAS_SHIFT=shift is not None, TRANS_C=trans_c,
        ACC_DTYPE=tl_acc_dtype(big.dtype), PRECISION=dot_precision(big.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (_fixed_order_sum(c, cfg.splits, c_dtype) if reduce else None,
            _fixed_order_sum(z, p_blocks) if rank_out else None, o, lg,
            _fixed_order_sum(dm, cfg.splits) if y is not None else None)


def dy_pass(dy: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float, *,
            need_dyb: bool = True, need_db: bool = True, db_dtype: torch.dtype | None = None,
            config: PassConfig | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dy b [M, R] in the accumulator dtype, scaling * dy^T xa [N, R] in ``db_dtype``, the
    accumulator's by default: summed in it, rounded once) from one pass over dy [M, N]; xa [M, R],
    b [N, R]. What is not needed is neither computed nor returned."""
    check_device(dy, xa, b)
    M, N = dy.shape
    R = b.shape[1]
    acc = acc_dtype(dy.dtype)
    if M == 0:
        return (torch.zeros((0, R), device=dy.device, dtype=acc) if need_dyb else None,
                torch.zeros((N, R), device=dy.device, dtype=db_dtype or acc) if need_db else None)
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    db, dyb, *_ = _reduce(dy, xa.contiguous() if need_db else None, b.contiguous() if need_dyb else None,
                          None, scaling, None, reduce=need_db, rank_out=need_dyb, expand_out=False,
                          out_dtype=None, config=config, c_dtype=db_dtype)
    return dyb, db


def dora_dy_pass(dy: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float,
                 scale: torch.Tensor, out: torch.Tensor, shift: torch.Tensor | None, *,
                 need_dyb: bool = True, need_db: bool = True, need_scaled: bool = True,
                 need_dm: bool = True, config: PassConfig | None = None):
    """DoRA's dY pass, one read of dy [M, N] (and of out [M, N] for dm), with dY' = scale o dy
    (scale [N], accumulator dtype):

        (dY' b [M, R], scaling * dY'^T xa [N, R], dY' [M, N] in dy's dtype,
         sum over rows of dy o (out - shift) [N])

    dyb, db and the sum in the accumulator dtype; out [M, N] (y, or DoRA's v under dropout),
    shift [N] (the bias) or None. The products take g on their small side, dY' b = dy (g o b) and
    dY'^T xa = g o (dy^T xa), so dy is rounded only where dY' is written (for the dX product). What
    is not needed is neither computed nor returned (None)."""
    check_device(dy, xa, b, scale, out, shift)
    M, N = dy.shape
    R = b.shape[1]
    acc = acc_dtype(dy.dtype)
    if M == 0:
        return (torch.zeros((0, R), device=dy.device, dtype=acc) if need_dyb else None,
                torch.zeros((N, R), device=dy.device, dtype=acc) if need_db else None,
                dy.new_empty((0, N)) if need_scaled else None,
                torch.zeros(N, device=dy.device, dtype=acc) if need_dm else None)
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    g = scale.to(acc).contiguous()
    bg_hi = bg_lo = None
    if need_dyb:
        bg_hi, bg_lo = split_in(b.to(acc) * g[:, None], dy.dtype)
    db, dyb, _, scaled, dm = _reduce(
        dy, xa.contiguous() if need_db else None, bg_hi, None, scaling, None, reduce=need_db,
        rank_out=need_dyb, expand_out=False, out_dtype=None, config=config, e_lo=bg_lo,
        scale=g if need_scaled else None, scaled_out=need_scaled,
        y=out.contiguous() if need_dm else None,
        shift=shift.contiguous() if need_dm and shift is not None else None)
    return dyb, (db.mul_(g[:, None]) if need_db else None), scaled, dm


def x_pass(x: torch.Tensor, dyb: torch.Tensor, a: torch.Tensor, scaling: float, *,
           dropout: tuple[torch.Tensor, float] | None = None, need_dx: bool = False,
           need_da: bool = True, da_dtype: torch.dtype | None = None,
           config: PassConfig | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx0 [M, K] in x's dtype, dA [R, K] contiguous in ``da_dtype``, the accumulator's by default:
    summed in it, rounded once) from one pass over x [M, K]:

        dx0 = scaling * D o (dyb a)        dA = scaling * dyb^T (D o x)

    with D the dropout mask of x over 1 - p (``dropout=(seed, p)``; ones without). dyb [M, R],
    a [R, K]. What is not needed is neither computed nor returned."""
    check_device(x, dyb, a)
    M, K = x.shape
    R = a.shape[0]
    if M == 0:
        return (alloc((0, K), x, x.dtype) if need_dx else None,
                torch.zeros((R, K), device=x.device, dtype=da_dtype or acc_dtype(x.dtype)) if need_da else None)
    if x.stride(1) != 1:
        x = x.contiguous()
    da, _, dx0, *_ = _reduce(x, dyb.contiguous(), None, a.contiguous() if need_dx else None,
                             scaling, dropout, reduce=need_da, rank_out=False, expand_out=need_dx,
                             out_dtype=x.dtype, config=config, c_dtype=da_dtype, trans_c=True)
    return dx0, da


@triton.jit
def _dropout_mask_kernel(OUT, SEED, M, K, dropout_p: "fp64", BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """OUT[m, k] = keep(seed; m, k): the mask the other kernels regenerate, for tests and checks."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(SEED), o_m[:, None], o_k[None, :], tl.full((1, 1), dropout_p, tl.float32))
    mask = (o_m[:, None] < M) & (o_k[None, :] < K)
    tl.store(OUT + o_m[:, None].to(tl.int64) * K + o_k[None, :], keep.to(tl.int8), mask=mask)


def dropout_mask(seed: torch.Tensor, shape: tuple[int, int], p: float) -> torch.Tensor:
    """The [M, K] boolean keep-mask that the kernels derive from ``seed`` for an x of ``shape``."""
    check_device(seed)
    M, K = shape
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    if M and K:
        launch(_dropout_mask_kernel, (cdiv(M, 32), cdiv(K, 64)), out, seed, M, K, float(p),
               BLOCK_M=32, BLOCK_K=64)
    return out.view(torch.bool)  # 0 and 1 written: a bool tensor as it is, no conversion launched
