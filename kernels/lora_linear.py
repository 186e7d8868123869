"""Triton kernels for the LoRA linear layer and their launchers.

Two kernels serve the forward and the backward through operand roles:

* ``_lora_gemm_kernel``:  ``Y = X W^T + bias + s * (XA) B^T`` with ``XA = X A^T`` either accumulated
  from the same X tiles as the base GEMM or loaded precomputed. The forward runs it as written;
  the backward's ``dX = dY W + s (dY B) A`` is the same kernel with ``X := dY``, ``W := W^T``,
  ``A := B^T``, ``B := A^T`` (strides swapped, nothing copied), its side output being ``dY B``.
* ``_lora_skinny_kernel``: ``C = s * L^T S`` for a large ``L`` [T, P] and a skinny ``S`` [T, R],
  reducing over the long axis T. It gives ``dB = s dY^T (XA)``, ``dA^T = s drop(X)^T (dY B)`` and,
  when dropout is on, the forward's ``XA = drop(X) A^T`` (``L := X^T``).

Dropout masks come from Philox keyed by (seed, row of x, column of x): every kernel regenerates the
same mask for the same element, so it is never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .configs import GemmConfig, SkinnyConfig, gemm_config, rank_block, skinny_config

# Triton's tl.dot input_precision for float32 operands, mirroring torch's matmul setting.
_FP32_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}
_ACC_DTYPE = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
              torch.float64: tl.float64}
_INT32_MAX = 2**31 - 1


@triton.jit
def _dropout_keep(seed, rows, cols, p):
    """keep[i, j] = U(seed; cols[j], rows[i]) >= p: the dropout mask at x[rows, cols]."""
    rows, cols = tl.broadcast(rows, cols)
    zero = rows * 0
    r0, _, _, _ = tl.philox(seed, cols, rows, zero, zero)
    return tl.uint_to_uniform_float(r0) >= p


@triton.jit(do_not_specialize=["M"])
def _lora_gemm_kernel(
    X, W, A, B, BIAS, Y, XA, SEED,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_ym, stride_yn, stride_xam, stride_xar,
    scaling: "fp64", dropout_p: "fp64",
    HAS_BIAS: tl.constexpr, XA_IN_LOOP: tl.constexpr, DROPOUT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_PADDED: tl.constexpr, GROUP_M: tl.constexpr, TILES_N: tl.constexpr, EVEN_K: tl.constexpr,
    INT64: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, CHUNKED_ACC: tl.constexpr,
):
    """Y = X W^T + bias + s * XA B^T, with XA = X A^T (written to XA) or read from XA.

    X [M, K], W [N, K], A [R, K], B [N, R], Y [M, N], XA [M, R]. DROPOUT_OUT multiplies the
    low-rank term by the dropout mask of element (m, n) (the backward's dX epilogue).
    One program owns BLOCK_M rows and TILES_N consecutive BLOCK_N-wide output tiles; with
    XA_IN_LOOP it accumulates XA while computing the first of them and reuses it for the rest.
    """
    i_pid = tl.program_id(0)
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n = tl.cdiv(tl.cdiv(N, BLOCK_N), TILES_N)
    # grouped ordering: GROUP_M row blocks share W tiles while they sit in L2
    n_pid_in_group = GROUP_M * n_pid_n
    i_group = i_pid // n_pid_in_group
    first_m = i_group * GROUP_M
    group_size = min(n_pid_m - first_m, GROUP_M)
    i_m = first_m + (i_pid % n_pid_in_group) % group_size
    i_ng = (i_pid % n_pid_in_group) // group_size

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_r = o_r < R
    # rows past M re-read valid rows, so the main loop's loads need no row mask (never stored)
    rows = o_m % M
    if INT64:
        om = o_m.to(tl.int64)
        rows = rows.to(tl.int64)
    else:
        om = o_m
    DOT_DTYPE = X.dtype.element_ty

    if XA_IN_LOOP:
        b_xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    else:
        p_xa = XA + om[:, None] * stride_xam + o_r[None, :] * stride_xar
        b_xa = tl.load(p_xa, mask=m_m[:, None] & m_r[None, :], other=0.0).to(ACC_DTYPE)  # [BM, BR]

    for t in tl.static_range(TILES_N):
        o_n = (i_ng * TILES_N + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        cols = o_n % N
        if INT64:
            on = o_n.to(tl.int64)
            cols = cols.to(tl.int64)
        else:
            on = o_n
        p_x = X + rows[:, None] * stride_xm + o_k[None, :] * stride_xk
        p_w = W + o_k[:, None] * stride_wk + cols[None, :] * stride_wn
        p_a = A + o_k[:, None] * stride_ak + o_r[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                b_x = tl.load(p_x)  # [BM, BK]
                b_w = tl.load(p_w)  # [BK, BN]
            else:
                m_k = o_k < K - k * BLOCK_K
                b_x = tl.load(p_x, mask=m_k[None, :], other=0.0)
                b_w = tl.load(p_w, mask=m_k[:, None], other=0.0)
            if CHUNKED_ACC:
                # float32/64: each K block sums on its own before joining the total, so rounding
                # grows with K / BLOCK_K rather than K (cuBLAS-level accuracy at large K)
                acc += tl.dot(b_x, b_w, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:
                acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if XA_IN_LOOP and t == 0:
                if EVEN_K:
                    b_a = tl.load(p_a, mask=m_r[None, :], other=0.0)  # [BK, BR]
                else:
                    b_a = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0)
                b_xa = tl.dot(b_x, b_a.to(DOT_DTYPE), b_xa, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                p_a += BLOCK_K * stride_ak
            p_x += BLOCK_K * stride_xk
            p_w += BLOCK_K * stride_wk

        if XA_IN_LOOP and t == 0:
            # the side output XA is written once per row block, by the first output tile
            if i_ng == 0:
                p_xa = XA + om[:, None] * stride_xam + o_r[None, :] * stride_xar
                tl.store(p_xa, b_xa.to(XA.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])

        # epilogue: the low-rank term, rounded to the compute dtype as torch would round XA
        p_bt = B + o_r[:, None] * stride_br + on[None, :] * stride_bn
        b_bt = tl.load(p_bt, mask=m_r[:, None] & m_n[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BN]
        b_xas = (b_xa * tl.full((1, 1), scaling, ACC_DTYPE)).to(DOT_DTYPE)
        if R_PADDED:
            # lanes r >= R hold x * 0 from A's zero padding, NaN where x is +-Inf; B's zero padding
            # would carry that NaN into every output of the row
            b_xas = tl.where(m_r[None, :], b_xas, 0.0)
        if DROPOUT_OUT:
            b_lora = tl.dot(b_xas, b_bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE),
                            input_precision=PRECISION, out_dtype=ACC_DTYPE)
            seed = tl.load(SEED)
            keep = _dropout_keep(seed, o_m[:, None], o_n[None, :], tl.full((1, 1), dropout_p, tl.float32))
            acc += tl.where(keep, b_lora / (1.0 - tl.full((1, 1), dropout_p, ACC_DTYPE)), 0.0)
        else:
            acc = tl.dot(b_xas, b_bt, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            acc += tl.load(BIAS + on, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
        p_y = Y + om[:, None] * stride_ym + on[None, :] * stride_yn
        tl.store(p_y, acc.to(Y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["T"])
def _lora_skinny_kernel(
    L, S, C, SEED,
    T, P, R,
    stride_lt, stride_lp, stride_st, stride_sr, stride_cs, stride_cp, stride_cr,
    scaling: "fp64", dropout_p: "fp64",
    DROPOUT_L: tl.constexpr, L_IS_XT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    INT64: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[split] = s * drop(L)[T_split]^T S[T_split]: L [T, P], S [T, R], C [SPLITS, P, R].

    Program (i_p, i_s) reduces its BLOCK_P columns of L over the i_s-th chunk of T in a fixed order;
    the launcher sums the chunks, so the result is deterministic. DROPOUT_L applies the dropout mask
    to L, whose element (t, p) is x[t, p], or x[p, t] when L_IS_XT.
    """
    i_p = tl.program_id(0)
    i_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    blocks_per_split = tl.cdiv(n_t_blocks, n_split)
    t_start = i_s * blocks_per_split * BLOCK_T
    t_end = min(T, t_start + blocks_per_split * BLOCK_T)

    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_r = tl.arange(0, BLOCK_R)
    o_t = tl.arange(0, BLOCK_T)
    m_p = o_p < P
    m_r = o_r < R
    if INT64:
        op = o_p.to(tl.int64)
        ot = t_start.to(tl.int64) + o_t
    else:
        op = o_p
        ot = t_start + o_t
    DOT_DTYPE = L.dtype.element_ty
    if DROPOUT_L:
        seed = tl.load(SEED)
        p_keep = tl.full((1, 1), dropout_p, tl.float32)

    p_l = L + ot[:, None] * stride_lt + op[None, :] * stride_lp
    p_s = S + ot[:, None] * stride_st + o_r[None, :] * stride_sr
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=ACC_DTYPE)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + o_t
        m_t = rows < t_end
        b_l = tl.load(p_l, mask=m_t[:, None] & m_p[None, :], other=0.0)  # [BT, BP]
        if DROPOUT_L:
            if L_IS_XT:
                keep = _dropout_keep(seed, o_p[None, :], rows[:, None], p_keep)
            else:
                keep = _dropout_keep(seed, rows[:, None], o_p[None, :], p_keep)
            b_l = tl.where(keep, b_l, 0.0).to(DOT_DTYPE)
        b_s = tl.load(p_s, mask=m_t[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)  # [BT, BR]
        acc = tl.dot(tl.trans(b_l), b_s, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        p_l += BLOCK_T * stride_lt
        p_s += BLOCK_T * stride_st

    scale = tl.full((1, 1), scaling, ACC_DTYPE)
    if DROPOUT_L:
        scale = scale / (1.0 - tl.full((1, 1), dropout_p, ACC_DTYPE))
    p_c = C + i_s * stride_cs + op[:, None] * stride_cp + o_r[None, :] * stride_cr
    tl.store(p_c, (acc * scale).to(C.dtype.element_ty), mask=m_p[:, None] & m_r[None, :])


@triton.jit
def _dropout_mask_kernel(OUT, SEED, M, K, stride_om, dropout_p: "fp64",
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[m, k] = keep(seed; m, k): the mask the other kernels regenerate, for tests and debugging."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(tl.load(SEED), o_m[:, None], o_k[None, :], tl.full((1, 1), dropout_p, tl.float32))
    mask = (o_m[:, None] < M) & (o_k[None, :] < K)
    tl.store(OUT + o_m[:, None].to(tl.int64) * stride_om + o_k[None, :], keep.to(tl.int8), mask=mask)


# True when TRITON_INTERPRET=1 was set as these kernels were defined: they then take CPU tensors.
INTERPRETED = isinstance(_lora_gemm_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------------------------
# launchers


def _alloc(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the launchers allocate (tests swap in a NaN-filled one to catch unwritten tiles)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return _FP32_PRECISION[torch.get_float32_matmul_precision()]
    return "ieee"  # ignored for 16-bit dots; the only choice for float64


def _needs_int64(*views) -> bool:
    """True when an address offset (sum of (size-1) * |stride|) of any (sizes, strides) can pass int32."""
    return any(sum((n - 1) * abs(s) for n, s in zip(sizes, strides) if n > 0) > _INT32_MAX
               for sizes, strides in views)


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(*tensors: torch.Tensor) -> None:
    if not INTERPRETED and any(t is not None and t.device.type == "cpu" for t in tensors):
        raise RuntimeError("fastlora's Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before fastlora is imported to run them on the CPU")


def lora_gemm(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              bias: torch.Tensor | None, scaling: float, *,
              xa: torch.Tensor | None = None, xa_in_loop: bool = True,
              dropout_out: tuple[torch.Tensor, float] | None = None,
              out: torch.Tensor | None = None,
              config: GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x w^T + bias + scaling * (x a^T) b^T with x [M, K], w [N, K], a [R, K], b [N, R].

    Any strides (views such as ``w.t()`` are how the backward passes ``W^T``). With ``xa_in_loop``
    the kernel computes ``x a^T`` and writes it to ``xa`` (allocated [M, R] in the accumulator dtype
    if None); otherwise it reads the given ``xa``. ``dropout_out=(seed, p)`` masks the low-rank term
    by the dropout mask of output element (m, n). Returns (y, xa).
    """
    _check_device(x, w, a, b, bias)
    M, K = x.shape
    N, R = b.shape
    acc_torch = _acc_torch(x.dtype)
    if out is None:
        out = _alloc((M, N), x, x.dtype)
    if xa is None:
        if not xa_in_loop:
            raise ValueError("lora_gemm: xa_in_loop=False needs a precomputed xa")
        xa = _alloc((M, R), x, acc_torch)
    if M == 0:
        return out, xa
    cfg = config or gemm_config(M, N, K, R, x.dtype, x.device, dropout_epilogue=dropout_out is not None,
                                w_n_major=w.stride(0) == 1 and w.stride(1) != 1)
    if a.stride(1) != 1 or (a.stride(0) * a.element_size()) % 16:
        # a's [BLOCK_K, BLOCK_R] tiles feed the in-loop dot: give them unit stride along K and
        # 16-byte aligned rows (a is tiny; the backward passes B^T, strided along K)
        a = a.contiguous()
    seed, p = dropout_out if dropout_out is not None else (x, 0.0)  # SEED unused without dropout
    int64 = _needs_int64((x.shape, x.stride()), (w.shape, w.stride()), (out.shape, out.stride()),
                         (xa.shape, xa.stride()), (a.shape, a.stride()), (b.shape, b.stride()))
    block_r = rank_block(R)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(triton.cdiv(N, cfg.block_n), cfg.tiles_n),)
    _lora_gemm_kernel[grid](
        x, w, a, b, bias if bias is not None else x, out, xa, seed,
        M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), out.stride(0), out.stride(1), xa.stride(0), xa.stride(1),
        float(scaling), float(p),
        HAS_BIAS=bias is not None, XA_IN_LOOP=xa_in_loop, DROPOUT_OUT=dropout_out is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        R_PADDED=R < block_r, GROUP_M=cfg.group_m, TILES_N=cfg.tiles_n, EVEN_K=K % cfg.block_k == 0,
        INT64=int64,
        ACC_DTYPE=_ACC_DTYPE[x.dtype], PRECISION=_precision(x.dtype),
        CHUNKED_ACC=x.dtype in (torch.float32, torch.float64),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, xa


def lora_skinny(l: torch.Tensor, s: torch.Tensor, scaling: float, *,
                dropout: tuple[torch.Tensor, float, bool] | None = None,
                config: SkinnyConfig | None = None) -> torch.Tensor:
    """c = scaling * drop(l)^T s, in float32 (float64 for float64 l): l [T, P], s [T, R] -> c [P, R].

    Deterministic: the T axis is split into a fixed number of chunks, each reduced in order by one
    program, and the chunks are summed by torch in a fixed order. ``dropout=(seed, p, l_is_xt)``
    masks l with the dropout mask of x, where l is x ([T, P]) or, with ``l_is_xt``, x^T.
    """
    _check_device(l, s)
    T, P = l.shape
    R = s.shape[1]
    acc_torch = _acc_torch(l.dtype)
    if T == 0:
        return torch.zeros((P, R), device=l.device, dtype=acc_torch)
    cfg = config or skinny_config(T, P, R, l.dtype, l.device)
    ws = _alloc((cfg.splits, P, R), l, acc_torch)
    seed, p, l_is_xt = dropout if dropout is not None else (l, 0.0, False)
    int64 = _needs_int64((l.shape, l.stride()), (s.shape, s.stride()), (ws.shape, ws.stride()))
    grid = (triton.cdiv(P, cfg.block_p), cfg.splits)
    _lora_skinny_kernel[grid](
        l, s, ws, seed, T, P, R,
        l.stride(0), l.stride(1), s.stride(0), s.stride(1), ws.stride(0), ws.stride(1), ws.stride(2),
        float(scaling), float(p),
        DROPOUT_L=dropout is not None, L_IS_XT=l_is_xt,
        BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_p, BLOCK_R=rank_block(R),
        INT64=int64, ACC_DTYPE=_ACC_DTYPE[l.dtype], PRECISION=_precision(l.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return ws[0] if cfg.splits == 1 else ws.sum(0)


def dropout_mask(seed: torch.Tensor, shape: tuple[int, int], p: float) -> torch.Tensor:
    """The [M, K] boolean keep-mask that the kernels derive from ``seed`` for an x of ``shape``."""
    _check_device(seed)
    M, K = shape
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 64))
    if M and K:
        _dropout_mask_kernel[grid](out, seed, M, K, out.stride(0), float(p), BLOCK_M=32, BLOCK_K=64)
    return out.bool()
