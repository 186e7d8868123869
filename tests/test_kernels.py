"""The launchers directly, with configs small enough that every program-id, edge-mask, multi-tile
and split-reduction path runs (the production configs cover these shapes in one tile under the
interpreter); both operand paths of the fused GEMM (pointers, and TMA tensor descriptors where
strides are 16-byte aligned)."""
import pytest
import torch

from helpers import DEVICE, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

if HAS_TRITON:
    from fastlora.kernels import (INTERPRETED, GemmConfig, PassConfig, dora_dy_pass, dropout_mask, dy_pass,
                                  lora_gemm, weight_pass, x_pass, xa_pass)
    from fastlora.kernels import gemm as gemm_module
    from fastlora.kernels.common import max_offset, needs_int64, tma_ready

SMALL = [GemmConfig(16, 16, 16, group_m=2), GemmConfig(16, 32, 32, group_m=3)]
SMALL_IDS = ["16x16x16-group2", "16x32x32-group3"]
PASSES = [PassConfig(16, 16, splits=1), PassConfig(16, 16, splits=3)]


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)


def _close(got, want, tol=1e-12):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def _seed(n):
    return torch.tensor([n], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("cfg", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("M,K,N,R", [(37, 45, 70, 3), (1, 16, 33, 1), (16, 40, 16, 17)])
def test_gemm_forward_xa_in_loop_matches_float64(M, K, N, R, cfg):
    x, w, a, b, bias = _rand(M, K), _rand(N, K), _rand(R, K), _rand(N, R), _rand(N)
    y, xa = lora_gemm(x, w, b, bias, 0.7, u=a, config=cfg)
    _close(y, x @ w.T + bias + 0.7 * (x @ a.T) @ b.T)
    _close(xa, x @ a.T)


@pytest.mark.parametrize("cfg", SMALL, ids=SMALL_IDS)
def test_gemm_forward_reads_given_xa(cfg):
    M, K, N, R = 37, 45, 70, 3
    x, w, b, xa = _rand(M, K), _rand(N, K), _rand(N, R), _rand(M, R)
    y, _ = lora_gemm(x, w, b, None, 0.5, xa=xa, config=cfg)
    _close(y, x @ w.T + 0.5 * xa @ b.T)


@pytest.mark.parametrize("cfg", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("in_loop", [True, False], ids=["dyb-in-loop", "dyb-read"])
@pytest.mark.parametrize("M,K,N,R", [(37, 45, 70, 3), (1, 16, 33, 1), (16, 40, 16, 17)])
def test_gemm_grad_input_reads_w_as_stored_with_dropout_epilogue(cfg, in_loop, M, K, N, R):
    """dX = dY W + s D o ((dY B) A): W [N, K], A [R, K] and B [N, R] as stored, the mask of x's
    elements; dY B either computed in the K loop from dY's tiles (and returned) or read."""
    dy, w, a, b = _rand(M, N), _rand(N, K), _rand(R, K), _rand(N, R)
    kw = dict(u=b) if in_loop else dict(xa=dy @ b)
    dx, dyb = lora_gemm(dy, w, a, None, 0.7, grad_input=True, config=cfg, **kw)
    _close(dx, dy @ w + 0.7 * (dy @ b) @ a)
    _close(dyb, dy @ b)
    dx, dyb = lora_gemm(dy, w, a, None, 0.7, grad_input=True, dropout=(_seed(5), 0.3), config=cfg, **kw)
    keep = dropout_mask(_seed(5), (M, K), 0.3).double() / 0.7
    _close(dx, dy @ w + 0.7 * keep * ((dy @ b) @ a))
    _close(dyb, dy @ b)


def test_gemm_in_loop_operand_must_be_the_adapter_as_stored():
    """u is A [R, K] forward and B [N_out, R] for dX: the other one (or a transposed view's shape)
    is refused before any launch, not read with the wrong strides."""
    M, K, N, R = 8, 24, 40, 4
    x, dy, w, a, b = _rand(M, K), _rand(M, N), _rand(N, K), _rand(R, K), _rand(N, R)
    with pytest.raises(ValueError, match=r"u must be B \[K, R\] = \[40, 4\], got shape \[4, 40\]"):
        lora_gemm(dy, w, a, None, 0.7, grad_input=True, u=b.T)
    with pytest.raises(ValueError, match=r"u must be A \[R, K\]"):
        lora_gemm(x, w, b, None, 0.7, u=a.T)


@pytest.mark.parametrize("cfg", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("in_loop", [True, False], ids=["xa-in-loop", "xa-read"])
def test_gemm_forward_scales_columns_before_the_bias(cfg, in_loop):
    """DoRA's forward: y = g o (x W^T + s xa B^T) + b, g applied in the epilogue before the bias."""
    M, K, N, R = 37, 45, 70, 3
    x, w, a, b, bias, g = _rand(M, K), _rand(N, K), _rand(R, K), _rand(N, R), _rand(N), _rand(N)
    kw = dict(u=a) if in_loop else dict(xa=x @ a.T)
    y, _ = lora_gemm(x, w, b, bias, 0.7, scale=g, config=cfg, **kw)
    _close(y, g * (x @ w.T + 0.7 * (x @ a.T) @ b.T) + bias)
    with pytest.raises(ValueError, match="scale must be"):
        lora_gemm(x, w, b, bias, 0.7, scale=g[:-1], config=cfg, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gemm_tma_forward_scales_columns(dtype):
    M, K, N, R = 37, 48, 40, 3
    x, w, a, b, bias = (_rand(*s, dtype=dtype) for s in ((M, K), (N, K), (R, K), (N, R), (N,)))
    g = _rand(N, dtype=torch.float32)
    y, _ = lora_gemm(x, w, b, bias, 0.7, u=a, scale=g,
                     config=GemmConfig(16, 32, 16, group_m=2, tma=True, epilogue_subtile=True))
    x64, w64, a64, b64 = x.double(), w.double(), a.double(), b.double()
    want = g.double() * (x64 @ w64.T + 0.7 * (x64 @ a64.T) @ b64.T) + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < tol


def test_gemm_takes_strided_views_through_pointers():
    """Sliced x and a transposed weight view (not TMA-ready) run through the pointer path."""
    M, K, N, R = 37, 45, 70, 3
    x = _rand(M, K + 5)[:, 2:K + 2]
    w = _rand(K, N).T  # [N, K] with unit stride along N
    a, b = _rand(R, K), _rand(N, R)
    y, _ = lora_gemm(x, w, b, None, 0.7, u=a, config=GemmConfig(16, 32, 32, group_m=3, tma=True))
    _close(y, x @ w.T + 0.7 * (x @ a.T) @ b.T)


@pytest.mark.parametrize("subtile", [False, True], ids=["whole-store", "subtiled-store"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gemm_tma_path_matches_float64(dtype, subtile, monkeypatch):
    """Tensor descriptors for x, W and y (16-byte-aligned strides: K, N multiples of 8), edges
    zero-filled by the descriptor: forward (W transposed in the tile) and dX (W as stored)."""
    built = []
    make = gemm_module.TensorDescriptor.from_tensor
    monkeypatch.setattr(gemm_module.TensorDescriptor, "from_tensor",
                        lambda t, block: built.append(tuple(block)) or make(t, block))
    M, K, N, R = 37, 48, 40, 3
    x, w, a, b, bias = (_rand(*s, dtype=dtype) for s in ((M, K), (N, K), (R, K), (N, R), (N,)))
    cfg = GemmConfig(16, 32, 16, group_m=2, tma=True, epilogue_subtile=subtile)
    x64, w64, a64, b64 = x.double(), w.double(), a.double(), b.double()
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    y, xa = lora_gemm(x, w, b, bias, 0.7, u=a, config=cfg)
    assert built == [(16, 16), (32, 16), (16, 16 if subtile else 32)]
    want = x64 @ w64.T + bias.double() + 0.7 * (x64 @ a64.T) @ b64.T
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < tol
    dy = _rand(M, N, dtype=dtype)
    dyb = dy.double() @ b64
    built.clear()
    dx, _ = lora_gemm(dy, w, a, None, 0.7, grad_input=True, xa=dyb.float(), config=cfg)
    assert built[1] == (16, 32)  # W [N, K] read as stored: [BLOCK_K, BLOCK_N] tiles
    want = dy.double() @ w64 + 0.7 * dyb @ a64
    assert ((dx.double() - want).abs().max() / want.abs().max()).item() < tol
    dx, got_dyb = lora_gemm(dy, w, a, None, 0.7, grad_input=True, u=b, config=cfg)  # dY B in the loop
    assert ((dx.double() - want).abs().max() / want.abs().max()).item() < tol
    assert ((got_dyb.double() - dyb).abs().max() / dyb.abs().max()).item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_warp_specialized_gemm_reads_xa_and_the_adapter_through_descriptors(dtype, monkeypatch):
    """A warp-specialized config: xa and the adapter (B forward, A dX) through descriptors too
    (their edges past M, N and R zero-filled) and y through pointers; the same results as the
    config without it, bit for bit, in the forward (with DoRA's scale), dX and dX with dropout;
    the non-specialized path where xa's rows are not 16 bytes aligned (R = 3 in float32)."""
    built = []
    make = gemm_module.TensorDescriptor.from_tensor
    monkeypatch.setattr(gemm_module.TensorDescriptor, "from_tensor",
                        lambda t, block: built.append(tuple(block)) or make(t, block))
    M, K, N, R = 37, 48, 40, 8  # (B's rows 16 bytes in float16: TMA's least)
    x, w, b, bias, dy = (_rand(*s, dtype=dtype) for s in ((M, K), (N, K), (N, R), (N,), (M, N)))
    a = _rand(R, K, dtype=dtype)
    xa, dyb, g = _rand(M, R, dtype=torch.float32), _rand(M, R, dtype=torch.float32), _rand(N, dtype=torch.float32)
    plain = GemmConfig(16, 32, 16, group_m=2, num_warps=4, tma=True, xa_in_loop=False)
    ws = GemmConfig(16, 32, 16, group_m=2, num_warps=4, tma=True, xa_in_loop=False, warp_specialize=True)
    for kwargs in (dict(v=b, bias=bias, xa=xa, scale=g), dict(v=a, bias=None, xa=dyb, grad_input=True),
                   dict(v=a, bias=None, xa=dyb, grad_input=True, dropout=(_seed(5), 0.3))):
        v, bias_ = kwargs.pop("v"), kwargs.pop("bias")
        built.clear()
        y_ws, _ = lora_gemm(dy if kwargs.get("grad_input") else x, w, v, bias_, 0.7, config=ws, **kwargs)
        assert built[2:] == ([(16, 16), (16, 32)] if kwargs.get("grad_input") else [(16, 16), (32, 16)])
        y, _ = lora_gemm(dy if kwargs.get("grad_input") else x, w, v, bias_, 0.7, config=plain, **kwargs)
        assert torch.equal(y_ws, y)
    built.clear()
    launched = []
    launch = gemm_module.launch
    monkeypatch.setattr(gemm_module, "launch", lambda *a, **k: launched.append(k) or launch(*a, **k))
    xa3 = _rand(M, 3, dtype=torch.float32)  # [M, 3] float32: 12-byte rows, no descriptor
    y3, _ = lora_gemm(x, w, b[:, :3].contiguous(), None, 0.7, xa=xa3, config=ws)
    assert len(built) == 3  # x, W and y: the TMA path without warp specialization
    # the config's 4 warps were a warpgroup's: unspecialized, its tiles get the plain configs' 8
    assert not launched[0]["WARP_SPECIALIZE"] and launched[0]["num_warps"] == 8
    lora_gemm(x, w, b, None, 0.7, xa=xa, config=ws)
    assert launched[1]["WARP_SPECIALIZE"] and launched[1]["num_warps"] == 4
    want = x.double() @ w.double().T + 0.7 * xa3.to(dtype).double() @ b[:, :3].double().T
    assert ((y3.double() - want).abs().max() / want.abs().max()).item() < (1e-5 if dtype == torch.float32 else 4e-3)


def test_tma_needs_aligned_strides():
    assert tma_ready(torch.empty(4, 8, dtype=torch.float16))
    assert not tma_ready(torch.empty(4, 7, dtype=torch.float16))          # 14-byte rows
    assert not tma_ready(torch.empty(4, 9, dtype=torch.float16)[:, 1:])   # 2-byte-offset base
    assert not tma_ready(torch.empty(8, 4, dtype=torch.float16).T)        # strided along K


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
def test_xa_pass_with_and_without_dropout(cfg):
    M, K, R = 70, 45, 5
    x, a = _rand(M, K), _rand(R, K)
    _close(xa_pass(x, a, config=cfg), x @ a.T)
    keep = dropout_mask(_seed(99), (M, K), 0.4).double() / 0.6
    _close(xa_pass(x, a, dropout=(_seed(99), 0.4), config=cfg), (x * keep) @ a.T)


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
@pytest.mark.parametrize("also", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_xa_pass_gives_an_x_dtype_copy_rounded_once(cfg, also):
    """The split route's operand for cuBLAS: xa in x's dtype beside the float32 xa it keeps, the
    same sum rounded once, written by the pass (by the last program of each row block when the
    pass splits K)."""
    M, K, R = 70, 45, 5
    x, a = _rand(M, K, dtype=torch.float32), _rand(R, K, dtype=torch.float32)
    xa, xa_x = xa_pass(x, a, also=also, config=cfg)
    assert xa.dtype == torch.float32 and xa_x.dtype == also and xa_x.shape == (M, R)
    torch.testing.assert_close(xa, xa_pass(x, a, config=cfg), rtol=0, atol=0)
    _rounded_once(xa_x, xa, also)


def test_split_partials_sum_in_index_order():
    """dY B's partials (one per column block of dY) summed in one launch: parts[0] + parts[1] + ...
    left to right in float32, bit for bit, over more elements than one program takes."""
    from fastlora.kernels.passes import _fixed_order_sum
    parts = _rand(5, 3, 700, dtype=torch.float32) * torch.logspace(-3, 3, 5, device=DEVICE)[:, None, None]
    want = parts[0].clone()
    for p in parts[1:]:
        want += p
    got = _fixed_order_sum(parts, 5)
    assert got.shape == (3, 700) and torch.equal(got, want)
    one = parts[0]
    assert _fixed_order_sum(one, 1) is one  # a single result: as the pass wrote it, nothing launched


def _in_order(parts):
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def test_the_last_program_sums_the_split_partials_in_chunk_order():
    """A split pass's result is its chunks' partial results added in chunk order in float32, bit
    for bit, whichever program finished last: each chunk's partial is that pass run alone on the
    chunk (the same blocks in the same order). Each launch leaves its counters zero."""
    from fastlora.kernels import passes
    M, N, K, R = 70, 37, 45, 5
    cfg, one = PassConfig(16, 16, splits=3), PassConfig(16, 16, splits=1)
    x, a = _rand(M, K, dtype=torch.float32), _rand(R, K, dtype=torch.float32)
    dy, xa, b = _rand(M, N, dtype=torch.float32), _rand(M, R, dtype=torch.float32), _rand(N, R, dtype=torch.float32)
    ks, rows = [slice(0, 16), slice(16, 32), slice(32, 45)], [slice(0, 32), slice(32, 64), slice(64, 70)]

    got, got16 = xa_pass(x, a, also=torch.float16, config=cfg)
    want = _in_order([xa_pass(x[:, k], a[:, k], config=one) for k in ks])
    assert torch.equal(got, want) and torch.equal(got16, want.to(torch.float16))
    wa, sq = weight_pass(x, a, config=cfg)
    parts = [weight_pass(x[:, k], a[:, k], config=one) for k in ks]
    assert torch.equal(wa, want) and torch.equal(sq, _in_order([p[1] for p in parts]))

    _, db = dy_pass(dy, xa, b, 0.3, need_dyb=False, config=cfg)
    want_db = _in_order([dy_pass(dy[r], xa[r], b, 0.3, need_dyb=False, config=one)[1] for r in rows])
    assert torch.equal(db, want_db)
    _, da = x_pass(x, xa, a, 0.3, config=cfg)
    assert torch.equal(da, _in_order([x_pass(x[r], xa[r], a, 0.3, config=one)[1] for r in rows]))
    g, y, bias = _rand(N, dtype=torch.float32), _rand(M, N, dtype=torch.float32), _rand(N, dtype=torch.float32)
    only_dm = dict(need_dyb=False, need_db=False, need_scaled=False)
    dm = dora_dy_pass(dy, xa, b, 0.3, g, y, bias, config=cfg, **only_dm)[3]
    parts = [dora_dy_pass(dy[r], xa[r], b, 0.3, g, y[r], bias, config=one, **only_dm)[3] for r in rows]
    assert torch.equal(dm, _in_order(parts))
    assert passes._COUNTERS and all(not c.any() for c in passes._COUNTERS.values())


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
def test_dy_pass_gives_dyb_and_db_from_one_read(cfg):
    M, N, R = 70, 37, 5
    dy, xa, b = _rand(M, N), _rand(M, R), _rand(N, R)
    dyb, db = dy_pass(dy, xa, b, 0.3, config=cfg)
    _close(dyb, dy @ b)
    _close(db, 0.3 * dy.T @ xa)
    only_dyb, none = dy_pass(dy, xa, b, 0.3, need_db=False, config=cfg)
    none2, only_db = dy_pass(dy, xa, b, 0.3, need_dyb=False, config=cfg)
    assert none is None and none2 is None
    _close(only_dyb, dy @ b)
    _close(only_db, 0.3 * dy.T @ xa)


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
@pytest.mark.parametrize("p", [0.0, 0.4], ids=["nodrop", "drop0.4"])
def test_x_pass_gives_dx0_and_da_with_one_mask(cfg, p):
    M, K, R = 70, 45, 5
    x, dyb, a = _rand(M, K), _rand(M, R), _rand(R, K)
    drop = (_seed(7), p) if p else None
    keep = dropout_mask(_seed(7), (M, K), p).double() / (1 - p) if p else torch.ones_like(x)
    dx0, da = x_pass(x, dyb, a, 0.3, dropout=drop, need_dx=True, config=cfg)
    _close(dx0, 0.3 * keep * (dyb @ a))
    _close(da, 0.3 * dyb.T @ (keep * x))
    dx_only, none = x_pass(x, dyb, a, 0.3, dropout=drop, need_dx=True, need_da=False, config=cfg)
    assert none is None
    _close(dx_only, 0.3 * keep * (dyb @ a))


def _rounded_once(got, acc, dtype):
    """``got`` is ``acc`` rounded to nearest (even) in ``dtype``: exactly torch's rounding, except
    where the interpreter's kernel wrote it in bfloat16: the interpreter truncates (compiled code
    rounds to nearest even), so there it must be the truncation."""
    want = acc.to(dtype)
    if not (dtype == torch.bfloat16 and INTERPRETED):
        assert torch.equal(got, want)
        return
    truncated = (acc.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)  # exact: 8 bits left
    assert torch.equal(got, truncated), "not the interpreter's truncation"


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
@pytest.mark.parametrize("out", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_db_and_da_come_in_the_adapters_dtype_rounded_once(cfg, out):
    """dB and dA as the adapters store them (dA [R, K] contiguous), each the accumulator's sum
    rounded once: written so by the kernel (by the last program of each column block when it
    splits its rows; no cast launched)."""
    M, N, K, R = 70, 37, 45, 5
    dy, xa, b = _rand(M, N, dtype=torch.float32), _rand(M, R, dtype=torch.float32), _rand(N, R, dtype=torch.float32)
    x, a = _rand(M, K, dtype=torch.float32), _rand(R, K, dtype=torch.float32)
    dyb, db = dy_pass(dy, xa, b, 0.3, db_dtype=out, config=cfg)
    _, db_acc = dy_pass(dy, xa, b, 0.3, config=cfg)
    assert db.dtype == out and db_acc.dtype == torch.float32
    _rounded_once(db, db_acc, out)
    drop = (_seed(7), 0.4)
    _, da = x_pass(x, dyb, a, 0.3, dropout=drop, da_dtype=out, config=cfg)
    _, da_acc = x_pass(x, dyb, a, 0.3, dropout=drop, config=cfg)
    assert da.shape == (R, K) and da.is_contiguous() and da_acc.is_contiguous() and da.dtype == out
    _rounded_once(da, da_acc, out)
    keep = dropout_mask(_seed(7), (M, K), 0.4).double() / 0.6
    _close(da_acc, 0.3 * dyb.double().T @ (keep * x.double()), tol=1e-5)


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
def test_weight_pass_gives_w_a_and_row_norms_from_one_read(cfg):
    N, K, R = 70, 45, 5
    w, a = _rand(N, K), _rand(R, K)
    wa, sq = weight_pass(w, a, config=cfg)
    _close(wa, w @ a.T)
    _close(sq, (w * w).sum(1))
    wa_only, none = weight_pass(w, a, need_sq=False, config=cfg)
    assert none is None
    _close(wa_only, w @ a.T)


@pytest.mark.parametrize("cfg", PASSES, ids=["splits1", "splits3"])
@pytest.mark.parametrize("shift", [True, False], ids=["bias", "nobias"])
def test_dora_dy_pass_reads_dy_scaled_and_reduces_for_dm(cfg, shift):
    """dY' = g o dY where dY is read (dY' B, dB), dY' written, sum over rows of dY o (y - b)."""
    M, N, R = 70, 37, 5
    dy, xa, b, y, g = _rand(M, N), _rand(M, R), _rand(N, R), _rand(M, N), _rand(N)
    bias = _rand(N) if shift else None
    dyb, db, scaled, dm = dora_dy_pass(dy, xa, b, 0.3, g, y, bias, config=cfg)
    dyg = dy * g
    _close(dyb, dyg @ b)
    _close(db, 0.3 * dyg.T @ xa)
    _close(scaled, dyg)
    _close(dm, (dy * (y - (bias if shift else 0))).sum(0))
    # only the magnitude's sum: nothing else computed or written
    none_dyb, none_db, none_scaled, dm_only = dora_dy_pass(dy, xa, b, 0.3, g, y, bias, need_dyb=False,
                                                          need_db=False, need_scaled=False, config=cfg)
    assert none_dyb is None and none_db is None and none_scaled is None
    _close(dm_only, dm)


def test_dora_dy_pass_rounds_dy_scaled_once_to_dy_dtype():
    dy, g = _rand(40, 24, dtype=torch.float16), _rand(24, dtype=torch.float32)
    xa, b, y = _rand(40, 3, dtype=torch.float32), _rand(24, 3, dtype=torch.float16), _rand(40, 24, dtype=torch.float16)
    _, _, scaled, _ = dora_dy_pass(dy, xa, b, 0.3, g, y, None)
    assert scaled.dtype == torch.float16
    assert torch.equal(scaled, (dy.float() * g).half())


def test_reductions_are_bitwise_deterministic():
    dy, xa, b = (_rand(*s, dtype=torch.float32) for s in ((200, 48), (200, 16), (48, 16)))
    cfg = PassConfig(16, 16, splits=4)
    first = dy_pass(dy, xa, b, 1.0, config=cfg)
    assert all(torch.equal(f, g) for _ in range(3) for f, g in zip(first, dy_pass(dy, xa, b, 1.0, config=cfg)))


def test_dropout_mask_statistics_and_seed():
    seed = _seed(7)
    for p in (0.1, 0.5):
        keep = dropout_mask(seed, (64, 256), p)
        n = keep.numel()
        # kept fraction within 5 standard deviations of 1 - p
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    other = dropout_mask(_seed(8), (64, 256), 0.5)
    assert not torch.equal(dropout_mask(seed, (64, 256), 0.5), other)
    assert torch.equal(dropout_mask(seed, (64, 256), 0.5), dropout_mask(seed, (64, 256), 0.5))
    # the mask of an element depends on its (row, col) only, not the tensor's extent
    assert torch.equal(dropout_mask(seed, (64, 256), 0.5)[:10, :20], dropout_mask(seed, (10, 20), 0.5))


def test_int64_offsets_chosen_from_extent():
    def extent(shape, strides):
        return max_offset(torch.empty_strided(shape, strides, device="meta"))
    assert not needs_int64(extent((4096, 4096), (4096, 1)))
    assert needs_int64(extent((70000, 32768), (32768, 1)))     # 2.3e9 elements
    assert needs_int64(extent((3, 8), (2**30 + 1, 1)))         # a huge row stride
    assert not needs_int64(extent((0, 8), (2**40, 1)))         # empty: no offsets at all


def _huge_stride_rows(rows, K, dtype=torch.float16):
    """rows x K values whose rows lie 2**30 elements apart (4 GiB of fp16 address space; only the
    rows' pages are touched), so that any offset computed in int32 wraps."""
    stride = 2**30
    storage = torch.empty((rows - 1) * stride + K, dtype=dtype)
    x = torch.as_strided(storage, (rows, K), (stride, 1))
    x.copy_(_rand(rows, K, dtype=dtype))
    return x


def test_int64_kernel_paths_compute_the_same():
    """x with rows 2**30 elements apart through the GEMM, the pass over x (with dropout) and the
    reduction over x's rows: the same bits as on a contiguous copy."""
    if DEVICE != "cpu":
        pytest.skip("the GPU suite has its own large-offset test")
    torch.manual_seed(0)
    x = _huge_stride_rows(3, 32)
    xc = x.contiguous()
    assert needs_int64(max_offset(x))
    w, a, b = (_rand(*s, dtype=torch.float16) for s in ((20, 32), (4, 32), (20, 4)))
    assert torch.equal(lora_gemm(x, w, b, None, 0.5, u=a)[0], lora_gemm(xc, w, b, None, 0.5, u=a)[0])
    drop = (_seed(3), 0.25)
    assert torch.equal(xa_pass(x, a, dropout=drop), xa_pass(xc, a, dropout=drop))
    dyb = _rand(3, 4, dtype=torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(x_pass(x, dyb, a, 0.5, dropout=drop, need_dx=True),
                                                 x_pass(xc, dyb, a, 0.5, dropout=drop, need_dx=True)))


@pytest.mark.parametrize("backend", ["fused", "split"])
def test_int64_offsets_through_forward_and_backward(backend):
    """lora_linear end to end on an x whose row offsets pass 2**31: the same bits as on a
    contiguous copy."""
    if DEVICE != "cpu":
        pytest.skip("the GPU suite has its own large-offset test")
    import fastlora
    x = _huge_stride_rows(3, 32)
    w, bias = _rand(20, 32, dtype=torch.float16), _rand(20, dtype=torch.float16)
    a, b = _rand(4, 32, dtype=torch.float16), _rand(20, 4, dtype=torch.float16)
    runs = []
    for xi in (x, x.contiguous()):
        leaves = [xi.detach().requires_grad_(True), a.clone().requires_grad_(True),
                  b.clone().requires_grad_(True)]
        torch.manual_seed(0)
        y = fastlora.lora_linear(leaves[0], w, bias, leaves[1], leaves[2], 0.5, dropout_p=0.2,
                                 backend=backend)
        y.backward(torch.ones_like(y))
        runs.append([y] + [t.grad for t in leaves])
    assert runs[0][0].isfinite().all()
    for name, p, q in zip(("y", "x", "lora_A", "lora_B"), *runs):
        assert torch.equal(p, q), name
