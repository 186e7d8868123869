"""The memory-bound passes: the rank-r products that read a large operand once.

* ``xa_pass``: xa = drop(x) A^T, one pass over x by row blocks (and, for DoRA's norm, W A^T
  with ||W_n||^2 from one pass over W);
* ``dy_pass``: dY B and dB = s dY^T xa together, one pass over dY; for DoRA (``dora_dy_pass``) the
  same pass gives them for dY' = g o dY, writes dY' for the dX product and reduces sum over rows of
  dY o (y - b) for the magnitude's gradient;
* ``x_pass``:  dA = s (dY B)^T drop(x) and, if asked, dx0 = s D o ((dY B) A) (the low-rank part
  of dX, which cuBLAS then accumulates onto), one pass over x with one mask draw for both.

fastlora/autograd.py derives these products. Every reduction is split into a fixed number of
chunks, each reduced in a fixed order by one program that writes its partial result; the last
program of an output block to finish (an integer counter per block says which) sums the block's
partials in chunk order in the accumulator dtype and rounds the sum once to the output's dtype
(an adapter's dA or dB, and for the split route xa also in x's dtype): deterministic whichever
program finishes last, no float atomics, no launch to sum or cast. dY B's partials, one per
column block of dY each over all of a chunk's rows, are summed by a launch of their own
(``sum_parts_kernel``): too much for one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from .common import (acc_dtype, alloc, cdiv, check_device, chunk_range, dot_precision, dropout_keep,
                     max_offset, needs_int64, tl_acc_dtype, widened, wrapped_offsets)
from .configs import PassConfig, rank_block, reduce_config, xa_config
from .launch import launch


@triton.jit
def last_to_arrive(COUNT, n):
    """Whether this program is the last of the ``n`` that arrive at the int32 counter ``COUNT``
    (zero before the first), which the last sets back to zero for the next launch. Every thread's
    stores before the arrival are visible to the last program's loads after it: a barrier, then
    one acquire-release atomic at GPU scope (as Inductor's grid barrier), then a barrier."""
    tl.debug_barrier()
    last = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu") == n - 1
    tl.debug_barrier()
    if last:
        tl.store(COUNT, 0)
    return last


@triton.jit
def sum_range(PARTS, OUT, OUT2, start, end, n, stride, BLOCK: tl.constexpr):
    """OUT[start:end] = PARTS[0] + PARTS[1] + ... + PARTS[n - 1] there (partial i at i * ``stride``),
    added in that order in their dtype (the accumulator's) and rounded once to OUT's (and OUT2's,
    when given); BLOCK elements at a time, read from L2 (other programs of this launch wrote them)."""
    for o0 in range(start, end, BLOCK):
        o = o0 + tl.arange(0, BLOCK)
        m = o < end
        acc = tl.load(PARTS + o, mask=m, other=0.0, cache_modifier=".cg")
        for i in range(1, n):
            acc += tl.load(PARTS + i * stride + o, mask=m, other=0.0, cache_modifier=".cg")
        tl.store(OUT + o, acc.to(OUT.dtype.element_ty), mask=m)
        if OUT2 is not None:
            tl.store(OUT2 + o, acc.to(OUT2.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["M"])
def xa_kernel(
    X, A, XA, OUT, OUT2, SQ, SQ_OUT, COUNT, SEED,
    M, K, R, stride_xm,
    scale: "fp64", dropout_p: "fp64",
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SUM_SQ: tl.constexpr, SPLIT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """OUT = scale * drop(X) A^T [M, R] for X [M, K], A [R, K] (contiguous), in OUT's dtype, and
    in OUT2's when given; with SUM_SQ also SQ_OUT = sum over K of X^2, per row [M] (no dropout:
    DoRA's ||W_n||^2 from the same read of W). Program (i_m, s): BLOCK_M rows, the s-th chunk of
    K. With SPLIT (more than one chunk) each program writes its chunk's partials, XA[s] [SPLITS,
    M, R] and SQ[s] [SPLITS, M] in the accumulator dtype, and the last of a row block's programs
    to finish sums them in chunk order (COUNT: a zeroed int32 counter per row block)."""
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
    o_xa = om[:, None] * R + o_r[None, :]
    m_xa = (o_m < M)[:, None] & m_r[None, :]
    acc = acc * tl.full((1, 1), scale, ACC_DTYPE)
    if SPLIT:
        tl.store(XA + widened(i_s, INT64) * M * R + o_xa, acc, mask=m_xa)
        if SUM_SQ:
            tl.store(SQ + widened(i_s, INT64) * M + om, acc_sq, mask=o_m < M)
        if last_to_arrive(COUNT + i_m, tl.num_programs(1)):  # XA [M, R]: the row block's elements
            m0 = widened(i_m, INT64) * BLOCK_M  # are contiguous, as are SQ's
            m1 = tl.minimum(m0 + BLOCK_M, M)
            sum_range(XA, OUT, OUT2, m0 * R, m1 * R, tl.num_programs(1), widened(M, INT64) * R, 1024)
            if SUM_SQ:
                sum_range(SQ, SQ_OUT, None, m0, m1, tl.num_programs(1), widened(M, INT64), BLOCK_M)
    else:
        tl.store(OUT + o_xa, acc.to(OUT.dtype.element_ty), mask=m_xa)
        if OUT2 is not None:
            tl.store(OUT2 + o_xa, acc.to(OUT2.dtype.element_ty), mask=m_xa)
        if SUM_SQ:
            tl.store(SQ_OUT + om, acc_sq, mask=o_m < M)


@triton.jit(do_not_specialize=["T"])
def reduce_kernel(
    L, S, E, E_LO, F, C, C_OUT, Z, OUT, SEED, G, LG, Y, SH, DM, DM_OUT, COUNT,
    T, P, R, stride_lt,
    c_scale: "fp64", o_scale: "fp64", dropout_p: "fp64",
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, REDUCE: tl.constexpr, RANK_OUT: tl.constexpr, SPLIT_E: tl.constexpr,
    SPLIT: tl.constexpr,
    EXPAND_OUT: tl.constexpr, SCALED_OUT: tl.constexpr,
    COL_DOT: tl.constexpr, HAS_SHIFT: tl.constexpr, TRANS_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Over the rows of L [T, P]; program (i_p, c) owns BLOCK_P columns and the c-th chunk of rows:

        C_OUT  = c_scale * drop(L)^T S              [P, R] (REDUCE)
        Z[i_p] = L[:, cols] (E + E_LO)[cols]         [T, R], one partial per column block (RANK_OUT;
                                                     E_LO, when given, what E's rounding dropped)
        OUT    = o_scale * D o (S F[:, cols])        [T, P]  (EXPAND_OUT)
        LG     = G o L                               [T, P], column p scaled by G[p] (SCALED_OUT)
        DM_OUT = sum over rows of L o (Y - SH)       [P]  (COL_DOT)

    S [T, R], E, E_LO [P, R], F [R, P], C_OUT [P, R] ([R, P] with TRANS_C) in its own dtype, Z
    [P_BLOCKS, T, R] (the axis absent when 1), OUT, LG and Y [T, P], G, SH and DM_OUT [P], all
    contiguous; D is the dropout mask of element (t, p) of L, which is x under dropout. (DoRA's
    dY pass: L = dY, G = g, Y = y, SH = bias.) With SPLIT (more than one chunk of rows) each
    program writes its chunk's partials of C_OUT and DM_OUT, C[c] and DM[c] ([SPLITS, ...] in the
    accumulator dtype), and the last of a column block's programs to finish sums them in chunk
    order (COUNT: a zeroed int32 counter per column block).
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
    if REDUCE or COL_DOT:
        if TRANS_C:  # C^T: the x pass's dA [R, K] as the adapter stores it
            o_c = o_r[None, :] * P + op[:, None]
        else:
            o_c = op[:, None] * R + o_r[None, :]
        m_c = m_p[:, None] & m_r[None, :]
        acc = acc * tl.full((1, 1), c_scale, ACC_DTYPE)
        if SPLIT:
            if REDUCE:
                tl.store(C + widened(i_c, INT64) * P * R + o_c, acc, mask=m_c)
            if COL_DOT:
                tl.store(DM + widened(i_c, INT64) * P + op, acc_dm, mask=m_p)
            if last_to_arrive(COUNT + i_p, tl.num_programs(1)):
                p0 = widened(i_p, INT64) * BLOCK_P
                p1 = tl.minimum(p0 + BLOCK_P, P)
                if REDUCE:
                    if TRANS_C:  # C^T [R, P]: a contiguous run of the column block in each row
                        for r in range(R):
                            row = widened(r, INT64) * P
                            sum_range(C, C_OUT, None, row + p0, row + p1, tl.num_programs(1),
                                      widened(P, INT64) * R, BLOCK_P)
                    else:  # C [P, R]: the column block's rows are contiguous
                        sum_range(C, C_OUT, None, p0 * R, p1 * R, tl.num_programs(1),
                                  widened(P, INT64) * R, 1024)
                if COL_DOT:
                    sum_range(DM, DM_OUT, None, p0, p1, tl.num_programs(1), widened(P, INT64), BLOCK_P)
        else:
            if REDUCE:
                tl.store(C_OUT + o_c, acc.to(C_OUT.dtype.element_ty), mask=m_c)
            if COL_DOT:
                tl.store(DM_OUT + op, acc_dm, mask=m_p)


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
def sum_parts_kernel(PARTS, OUT, numel, n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """OUT = PARTS[0] + PARTS[1] + ... + PARTS[n - 1] elementwise for PARTS [n, numel], summed in
    that order in their dtype (the accumulator's)."""
    start = widened(tl.program_id(0), INT64) * BLOCK
    sum_range(PARTS, OUT, None, start, tl.minimum(start + BLOCK, numel), n, widened(numel, INT64), BLOCK)


_SUM_BLOCK = 1024  # elements a program: the partials are small ([n, M, r])


def _fixed_order_sum(parts: torch.Tensor, n: int) -> torch.Tensor:
    """``_parts``' ``n`` partial results summed in a fixed order in one launch (dY B's partials,
    one per column block of dY: each is summed over a column block's rows, too many to sum in the
    pass's last program)."""
    if n == 1:
        return parts
    out = alloc(parts.shape[1:], parts, parts.dtype)
    numel = out.numel()
    if numel:
        launch(sum_parts_kernel, (cdiv(numel, _SUM_BLOCK),), parts, out, numel, n,
               BLOCK=_SUM_BLOCK, INT64=needs_int64(parts.numel()))
    return out


def split_options(cfg: PassConfig, split: bool) -> dict:
    """The compile options a pass adds to its warps and stages: a split pass's register cap."""
    return {"maxnreg": cfg.maxnreg} if split and cfg.maxnreg is not None else {}


_COUNTERS: dict = {}


def arrival_counters(like: torch.Tensor, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``like``'s device for the passes' last-to-arrive
    sums. A launch leaves its counters zero again, so launches in one stream's order share a
    buffer: one per device and stream, grown when too small; a fresh one while a CUDA graph is
    captured (the graph keeps it: its replays share no counter with other work)."""
    device = like.device
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, device=device, dtype=torch.int32)
        key = (device.index, driver.active.get_current_stream(device.index))
    else:  # (the interpreter: one program at a time)
        key = (device.type, None)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(2 * n, 1024), device=device, dtype=torch.int32)
    return buf


def xa_pass(x: torch.Tensor, a: torch.Tensor, *, dropout: tuple[torch.Tensor, float] | None = None,
            also: torch.dtype | None = None, config: PassConfig | None = None):
    """xa = drop(x) a^T [M, R] in the accumulator dtype, for x [M, K] (unit stride along K) and
    a [R, K]; ``dropout=(seed, p)`` applies the dropout mask of x and 1/(1-p). With ``also`` (a
    dtype), (xa, xa rounded once to it): the split route's operand for cuBLAS, written by the
    same launch."""
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
    split = cfg.splits > 1
    m_blocks = cdiv(M, cfg.block_rows)
    xa = alloc((M, R), x, acc)
    xa2 = alloc((M, R), x, also) if also is not None else None
    sq = alloc((M,), x, acc) if sum_sq else None
    ws = alloc((cfg.splits, M, R), x, acc) if split else None
    ws_sq = alloc((cfg.splits, M), x, acc) if split and sum_sq else None
    seed, p = dropout if dropout is not None else (None, 0.0)
    launch(xa_kernel, (m_blocks, cfg.splits),
        x, a, ws, xa, xa2, ws_sq, sq, arrival_counters(x, m_blocks) if split else None, seed,
        M, K, R, x.stride(0), 1.0 / (1.0 - p), float(p),
        BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_R=rank_block(R),
        INT64=needs_int64(max_offset(x), cfg.splits * M * R),
        HAS_DROPOUT=seed is not None, SUM_SQ=sum_sq, SPLIT=split, ACC_DTYPE=tl_acc_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **split_options(cfg, split),
    )
    return (xa if also is None else (xa, xa2)), sq


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
    split = cfg.splits > 1 and (reduce or y is not None)
    c = alloc((R, P) if trans_c else (P, R), big, c_dtype or acc) if reduce else None
    c_parts = alloc((cfg.splits, *c.shape), big, acc) if reduce and split else None
    z = _parts(p_blocks, (T, R), big, acc) if rank_out else None
    o = alloc((T, P), big, out_dtype) if expand_out else None
    lg = alloc((T, P), big, big.dtype) if scaled_out else None
    dm = alloc((P,), big, acc) if y is not None else None
    dm_parts = alloc((cfg.splits, P), big, acc) if y is not None and split else None
    seed, p = dropout if dropout is not None else (None, 0.0)
    keep_scale = 1.0 / (1.0 - p)
    int64 = needs_int64(max_offset(big), T * P, p_blocks * T * R, cfg.splits * P * R)
    launch(reduce_kernel, (p_blocks, cfg.splits),
        big, s, e, e_lo, f, c_parts, c, z, o, seed, scale, lg, y, shift, dm_parts, dm,
        arrival_counters(big, p_blocks) if split else None, T, P, R, big.stride(0),
        float(scaling) * keep_scale, float(scaling) * keep_scale, float(p),
        BLOCK_T=cfg.block_rows, BLOCK_P=cfg.block_cols, BLOCK_R=rank_block(R), INT64=int64,
        HAS_DROPOUT=seed is not None, REDUCE=reduce, RANK_OUT=z is not None,
        SPLIT_E=e_lo is not None, SPLIT=split, EXPAND_OUT=o is not None, SCALED_OUT=lg is not None,
        COL_DOT=dm is not None, HAS_SHIFT=shift is not None, TRANS_C=trans_c,
        ACC_DTYPE=tl_acc_dtype(big.dtype), PRECISION=dot_precision(big.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **split_options(cfg, split),
    )
    return c, (_fixed_order_sum(z, p_blocks) if rank_out else None), o, lg, dm


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
