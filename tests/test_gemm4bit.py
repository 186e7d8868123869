"""The fused GEMM with W read in 4 bits (kernels/gemm.py's W4BIT form) against the same GEMM on the
dequantized W, in the interpreter: the forward (x A^T in the loop or read) and dX (with and without
the dropout epilogue), NF4/FP4, plain and nested absmax, odd M and N, a K tail in dX. The two read
the same 16-bit tile values, so float16 results are equal bit for bit; in float32 the forward's
transposed tile reaches numpy's matmul in another memory order (a rounding apart)."""
import pytest
import torch

from fastlora import quant4bit as Q
from helpers import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

from fastlora.kernels import GemmConfig, lora_gemm  # noqa: E402
from fastlora.kernels.configs import fit_4bit  # noqa: E402
from fastlora.linear4bit import packed_4bit  # noqa: E402

VARIANTS = [("nf4", 64, True), ("fp4", 64, False), ("nf4", 32, True), ("fp4", 128, True)]
# (the second's 128-deep K step is cut to the blocksize; blocksize 32 cuts both)
CONFIGS = [GemmConfig(16, 32, 64, group_m=2), GemmConfig(32, 16, 128, group_m=3)]
# float16 in the inner loop; float32 (the same code, a rounding apart) with the slow tests
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32", marks=pytest.mark.slow)]


def variant_id(v):
    return f"{v[0]}-bs{v[1]}-{'nested' if v[2] else 'plain'}"


def inner(n):
    """VARIANTS with all but the first ``n`` left to the full suite (not pytest -m "not slow")."""
    return [pytest.param(v, id=variant_id(v), marks=() if i < n else pytest.mark.slow)
            for i, v in enumerate(VARIANTS)]


def problem(M, N, K, R, dtype, variant, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    w4 = Q.quantize(torch.randn(N, K, generator=g) * K ** -0.5, *variant)
    return w4, rnd(M, K), rnd(R, K, scale=K ** -0.5), rnd(N, R, scale=R ** -0.5), rnd(N), rnd(M, N)


def same(a, b, dtype):
    if dtype == torch.float16:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=0, atol=1e-6 * b.abs().max().item())  # float32 summation orders


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", inner(2))
def test_forward_reads_w_in_4_bits_as_the_dense_gemm_reads_it(variant, dtype):
    for M, N in ((1, 40), (37, 33)):
        w4, x, a, b, bias, _ = problem(M, N, 256, 5, dtype, variant)
        dense, packed = w4.dequantize(dtype), packed_4bit(w4)
        for cfg in CONFIGS:
            fitted = fit_4bit(cfg, variant[1], grad_input=False)
            y, xa = lora_gemm(x, packed, b, bias, 0.7, u=a, config=cfg)
            y_ref, xa_ref = lora_gemm(x, dense, b, bias, 0.7, u=a, config=fitted)
            assert same(y, y_ref, dtype) and torch.equal(xa, xa_ref), (M, N, cfg)
            y, _ = lora_gemm(x, packed, b, None, 0.7, xa=xa_ref, config=cfg)
            assert same(y, lora_gemm(x, dense, b, None, 0.7, xa=xa_ref, config=fitted)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow  # (its 4-bit dX also runs in test_linear4bit's fused gradcheck)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_dx_reads_w_in_4_bits_as_the_dense_gemm_reads_it(variant, dtype):
    from fastlora.functional import draw_seed

    for M, N in ((1, 40), (37, 33)):  # N = 33 output features: a K tail in dX's loop
        w4, _, a, b, _, dy = problem(M, N, 256, 5, dtype, variant, seed=1)
        dyb = dy.float() @ b.float()
        dense, packed = w4.dequantize(dtype), packed_4bit(w4)
        torch.manual_seed(0)
        seed = draw_seed(dy.device)
        for cfg in CONFIGS:
            fitted = fit_4bit(cfg, variant[1], grad_input=True)
            for dropout in (None, (seed, 0.3)):
                got, _ = lora_gemm(dy, packed, a, None, 0.7, grad_input=True, xa=dyb, dropout=dropout, config=cfg)
                want, _ = lora_gemm(dy, dense, a, None, 0.7, grad_input=True, xa=dyb, dropout=dropout,
                                    config=fitted)
                assert torch.equal(got, want), (M, N, cfg, dropout is not None)


def test_a_tile_spans_at_most_one_quantization_block():
    cfg = GemmConfig(64, 128, 128)
    assert fit_4bit(cfg, 64, grad_input=False).block_k == 64 and fit_4bit(cfg, 64, False).block_n == 128
    assert fit_4bit(cfg, 32, grad_input=True).block_n == 32 and fit_4bit(cfg, 32, True).block_k == 128
    assert not fit_4bit(GemmConfig(128, 256, 64, tma=True, epilogue_subtile=True), 64, False).tma
