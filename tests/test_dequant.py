"""The Triton dequantize kernel (kernels/dequant.py) against the plain-PyTorch dequantization
(fastlora/quant4bit.py, itself held to bitsandbytes in tests/test_quant4bit.py): equal bit for bit
over NF4/FP4, blocksizes, plain and nested absmax, and the output dtypes. In the interpreter
float32 and float16 outputs; bfloat16 on a GPU (the interpreter rounds to bfloat16 by truncation)."""
import pytest
import torch

from fastlora import quant4bit as Q
from fastlora.linear4bit import dense_weight
from helpers import DEVICE, HAS_CUDA, HAS_TRITON

if not HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

from fastlora import kernels  # noqa: E402

VARIANTS = [(qt, bs, nested) for qt in Q.QUANT_TYPES for bs in (64, 128, 256) for nested in (False, True)]
OUT = {"fp32": torch.float32, "fp16": torch.float16}


def variant_id(v):
    return f"{v[0]}-bs{v[1]}-{'nested' if v[2] else 'plain'}"


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def quantized(shape, dtype, variant, seed=0):
    qt, bs, nested = variant
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return Q.quantize(w.to(DEVICE), qt, bs, double_quant=nested)


def launch(w4, dtype, block=256):
    n = w4.nested
    return kernels.dequantize_4bit(w4.packed, w4.absmax, w4.code, w4.shape, w4.blocksize, dtype, block=block,
                                   nested=None if n is None else (n.scale, n.code, n.offset, n.blocksize))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_kernel_equals_torch_bit_for_bit(variant):
    # 7 x 768: a partial program at the end (2688 bytes, blocks of 256 bytes), 42-84 blocks and a
    # nested absmax with a short last block
    for source in (torch.float32, torch.bfloat16):
        w4 = quantized((7, 768), source, variant)
        for name, out in OUT.items():
            got = launch(w4, out)
            assert got.shape == (7, 768) and got.dtype == out
            assert torch.equal(bits(got), bits(w4.dequantize(out))), f"from {source} to {name}"


def test_kernel_to_float64_and_in_several_programs():
    w4 = quantized((3, 128), torch.float16, ("nf4", 64, True))
    assert torch.equal(launch(w4, torch.float64, block=32), w4.dequantize(torch.float64))


def test_dense_weight_takes_the_kernel_where_the_triton_routes_run(monkeypatch):
    w4 = quantized((5, 64), torch.float32, ("fp4", 64, True))
    calls = []
    real = kernels.dequantize_4bit
    monkeypatch.setattr(kernels, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = w4.dequantize(torch.float16)
    assert torch.equal(dense_weight(w4, torch.float16, "torch"), ref) and not calls
    assert torch.equal(dense_weight(w4, torch.float16, "triton"), ref) and calls == [1]
    dense_weight(w4, torch.float16, "auto")
    assert len(calls) == (2 if HAS_CUDA else 1)  # auto: the kernel on CUDA, PyTorch on the CPU


def test_kernel_errors():
    w4 = quantized((2, 64), torch.float32, ("nf4", 64, False))
    with pytest.raises(ValueError, match=r"64 bytes hold 128 codes, not a \(4, 64\) weight"):
        kernels.dequantize_4bit(w4.packed, w4.absmax, w4.code, (4, 64), 64, torch.float32)
    with pytest.raises(ValueError, match="blocksize must be even"):
        kernels.dequantize_4bit(w4.packed, w4.absmax, w4.code, (2, 64), 63, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bfloat16 rounding is wrong in the interpreter)")
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_kernel_bf16_on_gpu(variant):
    w4 = quantized((4096 + 64, 4096), torch.bfloat16, variant)
    assert torch.equal(bits(launch(w4, torch.bfloat16, block=1024)), bits(w4.dequantize(torch.bfloat16)))
