"""The 4-bit format (fastlora/quant4bit.py) against bitsandbytes, bit for bit: the code tables,
quantize (the bytes bitsandbytes' quantize_4bit writes on the CPU) and dequantize (bitsandbytes'
dequantize_4bit) over NF4/FP4, blocksizes, plain and nested absmax, the three dtypes and odd shapes;
reading bitsandbytes' objects by attribute; bad input."""
import pytest
import torch

from fastlora import quant4bit as Q

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (N, K): one row, odd N, a nested absmax with a short last block (blocks % 256 != 0), several
# nested blocks, and rows of several blocks
SHAPES = [(1, 256), (7, 768), (33, 512), (300, 1024), (513, 256)]
VARIANTS = [(qt, bs, nested) for qt in Q.QUANT_TYPES for bs in (64, 128, 256) for nested in (False, True)]


def variant_id(v):
    qt, bs, nested = v
    return f"{qt}-bs{bs}-{'nested' if nested else 'plain'}"


def bits(t):
    """The raw bits of a tensor, so that equality also tells -0.0 from +0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def test_code_tables_are_bitsandbytes_tables():
    F = pytest.importorskip("bitsandbytes.functional")
    for qt in Q.QUANT_TYPES:
        assert torch.equal(bits(Q.code_table(qt)), bits(F.get_4bit_type(qt, device="cpu"))), qt
    assert torch.equal(bits(Q.dynamic_map()), bits(F.create_dynamic_map()))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_quantize_writes_bitsandbytes_bytes(variant, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    qt, bs, nested = variant
    for i, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed=i)
        want, state = F.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=nested)
        got = Q.quantize(w, qt, bs, double_quant=nested)
        where = f"{shape}"
        assert got.shape == tuple(state.shape) and got.dtype == state.dtype, where
        assert torch.equal(got.packed, want), f"{where}: packed codes differ"
        assert torch.equal(got.absmax, state.absmax), f"{where}: absmax differs"
        assert torch.equal(got.code, state.code), where
        assert (got.nested is None) == (not state.nested), where
        if nested:
            assert torch.equal(got.nested.scale, state.state2.absmax), f"{where}: nested absmax differs"
            assert torch.equal(got.nested.code, state.state2.code), where
            assert torch.equal(got.nested.offset, state.offset.reshape(1)), where
            assert got.nested.blocksize == state.state2.blocksize, where


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_dequantize_is_bitsandbytes_dequantize(variant, dtype):
    """Read from bitsandbytes' own Params4bit/QuantState, to the state's dtype (dequantize_4bit) and
    to the other dtypes (its gemm's dequantize_4bit op, one rounding from float32)."""
    bnb = pytest.importorskip("bitsandbytes")
    qt, bs, nested = variant
    for i, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed=10 + i)
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=bs, quant_type=qt,
                              compress_statistics=nested).to("cpu")
        read = Q.Weight4bit.from_bnb(p)
        assert torch.equal(bits(read.dequantize()), bits(bnb.functional.dequantize_4bit(p, p.quant_state)))
        for other in DTYPES.values():
            want = torch.ops.bitsandbytes.dequantize_4bit.default(p, read.absmax_float(), bs, qt, shape, other)
            assert torch.equal(bits(read.dequantize(other)), bits(want)), f"{shape} to {other}"


def test_fp4_zero_codes_are_positive_zero_as_bitsandbytes_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(-1, 1)
    w = Q.Weight4bit(packed=every_byte, absmax=torch.ones(8), shape=(4, 128), dtype=torch.float32,
                     blocksize=64, quant_type="fp4", code=Q.code_table("fp4"))
    state = bnb.functional.QuantState(absmax=torch.ones(8), shape=torch.Size((4, 128)), code=w.code,
                                      blocksize=64, quant_type="fp4", dtype=torch.float32)
    got = w.dequantize()
    assert torch.equal(bits(got), bits(bnb.functional.dequantize_4bit(every_byte, state)))
    zeros = got.reshape(-1)[_codes(w) == 8]
    assert zeros.numel() == 32 and not torch.signbit(zeros).any()  # code 8 is +0.0


def test_quantize_round_trips_within_the_code_spacing():
    """Without bitsandbytes: every element lands on the nearest code value of its block."""
    for qt in Q.QUANT_TYPES:
        w = weight((9, 128), torch.float32)
        got = Q.quantize(w, qt, 64, double_quant=False)
        blocks = w.reshape(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        values = Q.code_table(qt).sort().values
        gap = (values[1:] - values[:-1]).max().item()
        err = (got.dequantize().reshape(-1, 64) - blocks).abs() / absmax
        assert err.max().item() <= gap / 2 + 1e-6, qt
        assert torch.equal(got.absmax, absmax.reshape(-1))


def test_nested_absmax_decodes_close_to_the_plain_one():
    w = weight((64, 1024), torch.bfloat16)
    plain, nested = Q.quantize(w, "nf4", 64, False), Q.quantize(w, "nf4", 64, True)
    assert torch.equal(plain.packed, nested.packed)
    rel = ((nested.absmax_float() - plain.absmax) / plain.absmax).abs().max().item()
    assert 0 < rel < 0.02  # 8-bit codes of absmax - mean: close, not equal
    assert nested.nbytes() < plain.nbytes()


def test_reads_a_linear4bit_with_another_quant_storage():
    bnb = pytest.importorskip("bitsandbytes")
    w = weight((64, 128), torch.bfloat16)
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16)
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.bfloat16
    read = Q.Weight4bit.from_bnb(layer)  # the module or its weight
    want = bnb.functional.dequantize_4bit(layer.weight, layer.weight.quant_state)
    assert torch.equal(bits(read.dequantize()), bits(want))
    assert read.packed.data_ptr() == layer.weight.data_ptr()  # shared, not copied
    assert Q.is_bnb_4bit(layer) and not Q.is_bnb_4bit(torch.nn.Linear(2, 2))


def test_reads_a_weight_bitsandbytes_repacked_for_its_cpu_kernel():
    """An eval-mode forward without gradients on an AVX512-BF16 CPU repacks the weight in place
    (absmax rounded to bfloat16): read it as that, the weight bitsandbytes computes with."""
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    w = weight((64, 256), torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    before = Q.Weight4bit.from_bnb(p)
    packed, state = F._convert_weight_packed_for_cpu(p.data.clone(), F.QuantState(
        absmax=p.quant_state.absmax.clone(), shape=p.quant_state.shape, code=p.quant_state.code,
        blocksize=64, quant_type="nf4", dtype=torch.bfloat16, offset=p.quant_state.offset,
        state2=p.quant_state.state2))
    repacked = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    read = Q.Weight4bit.from_bnb(repacked)
    assert torch.equal(read.packed, before.packed)
    want = (before.code[_codes(before)].reshape(-1, 64).float()
            * before.absmax_float().to(torch.bfloat16).float()[:, None]).reshape(64, 256)
    assert torch.equal(read.dequantize(torch.float32), want)


def _codes(w):
    b = w.packed.reshape(-1).long()
    return torch.stack((b >> 4, b & 15), 1).reshape(-1)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_a_clear_error():
    w = weight((4, 192), torch.float32)
    with pytest.raises(ValueError, match=r"blocksize 128 does not divide the row \(in_features 192\)"):
        Q.quantize(w, "nf4", 128)
    with pytest.raises(ValueError, match=r"unsupported quant_type 'int4'"):
        Q.quantize(w, "int4", 64)
    with pytest.raises(ValueError, match=r"blocksize must be one of .* got 48"):
        Q.quantize(w, "nf4", 48)
    with pytest.raises(TypeError, match=r"weight must be float16, bfloat16 or float32, got torch.float64"):
        Q.quantize(w.double(), "nf4", 64)
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        Q.quantize(torch.full((2, 64), float("nan")), "nf4", 64)
    with pytest.raises(ValueError, match=r"must be 2-D"):
        Q.quantize(torch.zeros(64), "nf4", 64)
    with pytest.raises(ValueError, match="double_quant must be True or False"):
        Q.quantize(w, "nf4", 64, double_quant="yes")

    good = Q.quantize(w, "nf4", 64, double_quant=True)
    fields = dict(packed=good.packed, absmax=good.absmax, shape=good.shape, dtype=good.dtype,
                  blocksize=good.blocksize, quant_type=good.quant_type, code=good.code, nested=good.nested)

    def make(**changes):
        return Q.Weight4bit(**{**fields, **changes})

    make()  # the untouched fields are fine
    with pytest.raises(ValueError, match=r"quant state does not match the weight: packed holds 384 values "
                                         r"where the shape .* needs 192"):
        make(shape=(2, 192))
    with pytest.raises(ValueError, match=r"absmax holds 12 values where the shape and blocksize needs 6"):
        make(blocksize=128, shape=(2, 384))
    with pytest.raises(TypeError, match=r"absmax must be torch.uint8, got torch.float32"):
        make(absmax=good.absmax_float())  # a float absmax with a nested state
    with pytest.raises(TypeError, match=r"absmax must be torch.float32, got torch.uint8"):
        make(nested=None)  # nested codes without the nested state
    with pytest.raises(ValueError, match=r"unsupported quant_type 'af4'"):
        make(quant_type="af4")
    with pytest.raises(ValueError, match=r"blocksize 256 does not divide the row"):
        make(blocksize=256)
    with pytest.raises(TypeError, match=r"dtype .* must be float16, bfloat16 or float32, got torch.float64"):
        make(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape must be \(out_features, in_features\)"):
        make(shape=(768,))
    with pytest.raises(TypeError, match=r"packed must be torch.uint8, got torch.int8"):
        make(packed=good.packed.view(torch.int8))
    with pytest.raises(TypeError, match="Weight4bit.from_bnb: expected a bitsandbytes Params4bit"):
        Q.Weight4bit.from_bnb(torch.nn.Linear(4, 4))


def test_a_quant_state_that_does_not_match_its_weight():
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(weight((8, 128), torch.float32), requires_grad=False, quant_type="nf4",
                          compress_statistics=False).to("cpu")
    p.quant_state.shape = torch.Size((16, 128))  # the packed data is for [8, 128]
    with pytest.raises(ValueError, match="quant state does not match the weight: packed holds 512"):
        Q.Weight4bit.from_bnb(p)
    p.quant_state.shape = torch.Size((8, 128))
    p.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="unsupported quant_type 'int4'"):
        Q.Weight4bit.from_bnb(p)
