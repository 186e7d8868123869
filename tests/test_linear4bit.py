"""4-bit bases (fastlora/linear4bit.py): fastlora's Linear4bit (bitsandbytes' state dict, its forward),
LoRALinear4bit against a float64 reference on the dequantized weight (the three-way bound, every
route) and float64 gradcheck, the dense weight kept out of the autograd graph, apply_lora / adapter
files / merge on models holding 4-bit layers, from_peft against PEFT's own QLoRA on a tiny Llama
loaded with a BitsAndBytesConfig, and bad input."""
import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import checks
from fastlora import quant4bit as Q
from fastlora.linear4bit import Linear4bit, LoRALinear4bit, lora_linear_4bit, quantize_4bit, route_4bit
from helpers import HAS_CUDA, HAS_TRITON, ROUTES, assert_within_bound

VARIANTS = [("nf4", 64, True), ("nf4", 128, False), ("fp4", 64, False), ("fp4", 256, True)]


def variant_id(v):
    return f"{v[0]}-bs{v[1]}-{'nested' if v[2] else 'plain'}"


def linear(K, N, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias, dtype=dtype)


def bnb_linear4bit(lin, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=None):
    """bitsandbytes' Linear4bit holding ``lin``'s weight and bias, quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                     quant_type=quant_type, compress_statistics=double_quant)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


# ------------------------------------------------------------------------------------------------
# fastlora's Linear4bit


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_quantize_4bit_state_dict_is_bitsandbytes_and_loads_both_ways(variant):
    qt, bs, nested = variant
    lin = linear(256, 24)
    ours = quantize_4bit(lin, qt, bs, double_quant=nested)
    theirs = bnb_linear4bit(lin, qt, bs, nested)
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    blank = quantize_4bit(linear(256, 24, seed=1), qt, bs, double_quant=nested)
    blank.load_state_dict(b)  # bitsandbytes' checkpoint into fastlora's module
    assert torch.equal(blank.dequantize(), ours.dequantize()) and torch.equal(blank.bias, lin.bias)
    x = torch.randn(5, 256)
    with torch.no_grad():  # the same products: equal outputs
        assert torch.equal(ours(x), theirs(x))


def test_linear4bit_keeps_its_format_through_to_dtype_and_refuses_another_layout():
    lin = linear(128, 16)
    layer = quantize_4bit(lin)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer = layer.to(torch.bfloat16).half().float()
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k != "bias")
    assert layer.dequantize().dtype == torch.float32
    plain = quantize_4bit(lin, double_quant=False)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*weight.nested_absmax"):
        plain_nested = quantize_4bit(lin)
        plain_nested.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match=r"'blocksize': 128.* this layer's .*'blocksize': 64"):
        quantize_4bit(lin).load_state_dict(quantize_4bit(lin, blocksize=128).state_dict())


def test_linear4bit_forward_and_compute_dtype():
    lin = linear(128, 16)
    layer = quantize_4bit(lin, compute_dtype=torch.float16)
    x = torch.randn(3, 128)
    y = layer(x)
    assert y.dtype == torch.float32  # computed in float16, returned in x's dtype
    w = layer.dequantize(torch.float16)
    assert torch.equal(y, nn.functional.linear(x.half(), w, lin.bias.half()).float())
    layer.compute_dtype = None
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantize(), lin.bias))
    assert "nf4 [16, 128] float32, blocks of 64, nested absmax in blocks of 256" in repr(layer)


# ------------------------------------------------------------------------------------------------
# LoRALinear4bit's numerics


@pytest.fixture
def four_bit_three_way():
    """fastlora.checks.three_way_pooled with the weight quantized to 4 bits (``Case.quant``): the
    float64 reference and PyTorch's own run on the dequantized weight, fastlora on the 4-bit one."""
    def run(case, backend, variant=("nf4", 64, True), seeds=(0, 1, 2), device="cpu"):
        return checks.three_way_pooled(dataclasses.replace(case, quant=variant), backend,
                                       device=device, seeds=seeds)
    return run


CASES = [checks.Case(1, 64, 40, 1, torch.float32), checks.Case(63, 128, 40, 3, torch.float16),
         checks.Case(97, 192, 70, 16, torch.float32, layout="sliced"),
         checks.Case(63, 128, 40, 16, torch.float16, adapter_dtype=torch.float32, bias_grad=True),
         checks.Case(63, 64, 24, 3, torch.float32, layout="3d", dropout_p=0.3)]


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_three_way_bound_on_the_dequantized_weight(four_bit_three_way, case, backend):
    assert_within_bound(four_bit_three_way(case, backend), f"{case.id} {backend}")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_three_way_bound_in_every_format(four_bit_three_way, variant):
    case = checks.Case(33, 256, 40, 8, torch.float16)
    assert_within_bound(four_bit_three_way(case, "torch", variant), variant_id(variant))


@pytest.mark.parametrize("backend", ROUTES)
def test_gradcheck_float64_of_x_A_B_and_bias(backend):
    w4 = Q.quantize(torch.randn(5, 64) * 0.1, "nf4", 64)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, b, a, bb = rnd(3, 64), rnd(5), rnd(2, 64), rnd(5, 2)
    f = lambda x, b, a, bb: lora_linear_4bit(x, w4, b, a, bb, 0.3, backend=backend)  # noqa: E731
    assert f(x, b, a, bb).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, b, a, bb), fast_mode=backend != "torch")


def test_autocast_computes_in_the_autocast_dtype_as_nn_linear():
    layer = LoRALinear4bit(quantize_4bit(linear(128, 16)), r=2, init_lora_weights=False, backend="torch")
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        want = fastlora.lora_linear(x, layer.base_layer.dequantize(torch.bfloat16), layer.bias, layer.lora_A,
                                    layer.lora_B, layer.scaling, backend="torch")
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_torch_compile_gives_the_eager_outputs_and_gradients(fresh_dynamo):
    from torch._dynamo.utils import counters

    layer = LoRALinear4bit(quantize_4bit(linear(128, 64)), r=4, init_lora_weights=False, backend="torch")
    x = torch.randn(8, 128, requires_grad=True)
    results = []
    for model in (layer, torch.compile(layer)):
        y = model(x)
        results.append([y, *torch.autograd.grad(y.sum(), [x, layer.lora_A, layer.lora_B])])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(*results))
    assert not counters["graph_break"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (bfloat16 is wrong in the interpreter)")
@pytest.mark.parametrize("M", [16, 1024])
@pytest.mark.parametrize("backend", ["fused", "split", "auto"])
def test_gpu_bf16_three_way_bound(four_bit_three_way, backend, M):
    case = checks.Case(M, 4096, 1536, 16, torch.bfloat16, adapter_dtype=torch.float32)
    assert_within_bound(four_bit_three_way(case, backend, seeds=(0,), device="cuda"), f"{case.id} {backend}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fused_route_holds_no_dense_weight():
    """A decode-sized training step of a 4096 -> 14336 layer through fused4bit: its peak memory
    beyond the 4-bit weight stays far below the dense bfloat16 weight (117 MB)."""
    base = nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear4bit(quantize_4bit(base), r=16, backend="fused")
    del base
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # compiles
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 14336 * 4096 * 2 // 8


# ------------------------------------------------------------------------------------------------
# the dense weight is not kept for the backward


def saved_shapes(fn):
    """The shapes of every tensor autograd saves while ``fn`` runs (seen by outer hooks, as
    activation checkpointing's would be), and fn's result."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


DENSE_ROUTES = [r for r in ROUTES if r != "fused"]  # the routes that run on a dequantized W


@pytest.mark.parametrize("backend", DENSE_ROUTES)
def test_the_dense_weight_is_dequantized_again_not_kept(backend, monkeypatch):
    import fastlora.linear4bit as L

    layer = LoRALinear4bit(quantize_4bit(linear(128, 48)), r=4, init_lora_weights=False, backend=backend)
    made = []
    real = L.dense_weight
    monkeypatch.setattr(L, "dense_weight", lambda *a, **k: made.append(1) or real(*a, **k))
    x = torch.randn(6, 128, requires_grad=True)
    shapes, y = saved_shapes(lambda: layer(x))
    assert (48, 128) not in shapes and (128, 48) not in shapes, shapes
    assert (6, 128) in shapes  # x went to the outer hooks
    assert made == [1]
    y.backward(torch.ones_like(y))
    assert made == [1, 1]  # once more, for dX
    # the same gradients as lora_linear on the dense weight, which it keeps
    x2, a, b = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    w = layer.base_layer.dequantize()
    shapes, y2 = saved_shapes(lambda: fastlora.lora_linear(x2, w, layer.bias, a, b, layer.scaling,
                                                           backend=backend))
    assert (48, 128) in shapes or (128, 48) in shapes  # (the check above can see it)
    y2.backward(torch.ones_like(y2))
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(layer.lora_A.grad, a.grad)


@pytest.mark.skipif(not HAS_TRITON, reason="the fused route needs triton")
def test_the_fused_route_reads_w_in_4_bits_and_keeps_no_dense_weight(monkeypatch):
    import fastlora.linear4bit as L

    layer = LoRALinear4bit(quantize_4bit(linear(128, 48)), r=4, init_lora_weights=False, backend="fused")
    made, launched = [], []
    monkeypatch.setattr(L, "dense_weight", lambda *a, **k: made.append(1))
    kernels = L.triton_kernels()
    real = kernels.lora_gemm
    monkeypatch.setattr(kernels, "lora_gemm",
                        lambda x, w, *a, **k: launched.append(type(w).__name__) or real(x, w, *a, **k))
    x = torch.randn(2, 3, 128, requires_grad=True)
    shapes, y = saved_shapes(lambda: layer(x))
    assert (48, 128) not in shapes and (128, 48) not in shapes and (6, 128) in shapes, shapes
    y.backward(torch.ones_like(y))
    assert made == [] and launched == ["Packed4bit", "Packed4bit"]  # the forward and dX
    w = layer.weight4bit().dequantize()
    x2, a, b = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    y2 = fastlora.lora_linear(x2, w, layer.bias, a, b, layer.scaling, backend="torch")
    y2.backward(torch.ones_like(y2))
    for got, want in ((y, y2), (x.grad, x2.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton routes need triton")
def test_which_route_runs_over_a_4bit_weight():
    x = torch.randn(3, 64)
    assert route_4bit("fused", x, 8) == "fused4bit"
    assert route_4bit("triton", torch.randn(2, 32, 64), 8) == "fused4bit"  # 64 rows
    assert route_4bit("triton", torch.randn(65, 64), 8) == "triton"       # dequantize, then lora_linear
    assert route_4bit("split", x, 8) == "split" and route_4bit("torch", x, 8) == "torch"
    assert route_4bit("auto", x, 8) == ("fused4bit" if x.is_cuda else "torch")
    assert route_4bit("fused", torch.randn(0, 64), 8) == "fused"  # nothing to launch


def test_under_activation_checkpointing_the_block_is_recomputed():
    from torch.utils.checkpoint import checkpoint

    layer = LoRALinear4bit(quantize_4bit(linear(128, 48)), r=4, init_lora_weights=False, backend="torch")
    runs = []

    def block(x):
        runs.append(1)
        return torch.tanh(layer(torch.sin(x)))

    x = torch.randn(6, 128, requires_grad=True)
    expected = torch.autograd.grad(block(x).sum(), [x, layer.lora_A])
    runs.clear()
    shapes, y = saved_shapes(lambda: checkpoint(block, x, use_reentrant=False))
    got = torch.autograd.grad(y.sum(), [x, layer.lora_A])
    assert runs == [1, 1]  # the forward, then its recomputation for the backward
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# ------------------------------------------------------------------------------------------------
# bitsandbytes' Linear4bit as the base


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_a_bitsandbytes_base_computes_as_the_same_bytes_in_fastlora(variant):
    lin = linear(256, 40)
    theirs = LoRALinear4bit(bnb_linear4bit(lin, *variant), r=4, init_lora_weights=False, backend="torch")
    ours = LoRALinear4bit(quantize_4bit(lin, *variant), r=4, backend="torch")
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A)
        ours.lora_B.copy_(theirs.lora_B)
    x = torch.randn(2, 7, 256)
    assert torch.equal(theirs(x), ours(x))
    assert theirs.lora_A.dtype == torch.float32 and not theirs.base_layer.weight.requires_grad


def test_bitsandbytes_compute_dtype_is_followed():
    lin = linear(128, 16)
    layer = LoRALinear4bit(bnb_linear4bit(lin, compute_dtype=torch.float16), r=2, init_lora_weights=False)
    x = torch.randn(3, 128)
    y = layer(x)
    w = Q.Weight4bit.from_bnb(layer.base_layer).dequantize(torch.float16)
    want = fastlora.lora_linear(x.half(), w, lin.bias.half(), layer.lora_A, layer.lora_B, layer.scaling)
    assert y.dtype == torch.float32 and torch.equal(y, want.float())


# ------------------------------------------------------------------------------------------------
# models: apply_lora, adapter files, merge


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.q_proj = quantize_4bit(linear(d, d, seed=1))
        self.v_proj = quantize_4bit(linear(d, d, bias=False, seed=2), "fp4", 64, False)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.out_proj(torch.tanh(self.v_proj(self.q_proj(x))))


def test_apply_lora_on_a_model_with_4bit_layers(tmp_path):
    model = Block()
    x = torch.randn(4, 64)
    before = model(x)
    fastlora.apply_lora(model, "all-linear", r=4, alpha=8, backend="torch")
    assert isinstance(model.q_proj, LoRALinear4bit) and isinstance(model.out_proj, fastlora.LoRALinear)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}" for m in ("q_proj", "v_proj", "out_proj") for ab in "AB"}
    fastlora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert model.q_proj.bias.requires_grad and model.q_proj.bias is model.q_proj.base_layer.bias
    assert "q_proj.bias" in fastlora.lora_state_dict(model, bias="lora_only")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    fastlora.save_adapter(model, tmp_path, bias="lora_only")
    fresh = fastlora.load_adapter(Block(), tmp_path, backend="torch")
    assert isinstance(fresh.v_proj, LoRALinear4bit)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_merge_requantizes_with_a_warning_and_unmerge_restores_the_bytes():
    model = Block()
    fastlora.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights=False, backend="torch")
    x = torch.randn(4, 64)
    unmerged = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="requantizes W \\+ s B A"):
        fastlora.merge(model)
    assert model.q_proj.merged and "merged=True" in repr(model.q_proj)
    merged = model(x)
    # within a 4-bit rounding of the merged weight, not equal
    assert 0 < (merged - unmerged).abs().max() < 0.2 * unmerged.abs().max()
    fastlora.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)
    with pytest.warns(UserWarning):
        out = fastlora.merge_and_unload(model)
    assert isinstance(out.q_proj, Linear4bit) and isinstance(out.v_proj, Linear4bit)
    torch.testing.assert_close(out(x), merged, rtol=0, atol=0)


def test_merge_is_what_requantizing_w_plus_delta_gives():
    lin = linear(128, 32)
    layer = LoRALinear4bit(bnb_linear4bit(lin), r=4, init_lora_weights=False)
    w4 = layer.weight4bit()
    expected = Q.quantize((w4.dequantize() + layer.scaling * layer.lora_B @ layer.lora_A).detach(), "nf4", 64)
    with pytest.warns(UserWarning):
        layer.merge()
    got = layer.weight4bit()
    assert torch.equal(got.packed, expected.packed) and torch.equal(got.absmax, expected.absmax)
    assert got.packed.data_ptr() == w4.packed.data_ptr()  # bitsandbytes' own tensors, in place


# ------------------------------------------------------------------------------------------------
# from_peft on PEFT's QLoRA


def test_from_peft_fuses_peft_qlora_and_trains_as_it_does():
    from hf_tiny import assert_same_as_peft, input_ids, logits_and_lora_grads, peft_twin, tiny_llama_4bit
    from test_peft_interop import train

    import fastlora.peft_interop as PI

    base = tiny_llama_4bit(("q_proj", "v_proj")).train()  # train mode: bitsandbytes repacks in eval
    theirs = peft_twin(base, ["q_proj", "v_proj"]).train()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ours = copy.deepcopy(theirs)
    calls = []
    real = PI.lora_linear_4bit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer fuses: no warning
        fastlora.from_peft(ours, backend="torch")
    PI.lora_linear_4bit = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ids = input_ids()
        assert_same_as_peft(logits_and_lora_grads(ours, ids), logits_and_lora_grads(theirs, ids),
                            torch.float32, "QLoRA")
        assert len(calls) == 4
        expected, got = train(theirs), train(ours)
    finally:
        PI.lora_linear_4bit = real
    assert expected[-1] < expected[0] - 0.1
    assert max(abs(g - e) / e for g, e in zip(got, expected)) <= 1e-5, (got, expected)


def test_apply_lora_and_load_adapter_on_a_bitsandbytes_model_match_peft(tmp_path):
    from hf_tiny import assert_same_as_peft, input_ids, logits_and_lora_grads, peft_twin, tiny_llama_4bit

    theirs = peft_twin(tiny_llama_4bit(("q_proj", "v_proj")), ["q_proj", "v_proj"]).train()
    theirs.save_pretrained(tmp_path)
    ours = fastlora.apply_lora(tiny_llama_4bit(("q_proj", "v_proj")), ["q_proj", "v_proj"], r=8, alpha=16,
                               backend="torch")
    ours = fastlora.load_adapter(ours, tmp_path).train()
    assert isinstance(ours.model.layers[1].self_attn.v_proj, LoRALinear4bit)
    ids = input_ids()
    assert_same_as_peft(logits_and_lora_grads(ours, ids), logits_and_lora_grads(theirs, ids), torch.float32)


def test_a_bf16_4bit_model_takes_peft_float32_qlora_adapters_as_they_are(tmp_path):
    from hf_tiny import input_ids, peft_twin, tiny_llama_4bit

    targets = ("q_proj", "v_proj")
    theirs = peft_twin(tiny_llama_4bit(targets, dtype=torch.bfloat16, compute_dtype=torch.bfloat16),
                       list(targets)).train()
    theirs.save_pretrained(tmp_path)
    ours = fastlora.apply_lora(tiny_llama_4bit(targets, dtype=torch.bfloat16, compute_dtype=torch.bfloat16),
                               list(targets), r=8, alpha=16, backend="torch")
    assert ours.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    ours = fastlora.load_adapter(ours, tmp_path).train()  # no dtype conversion needed
    theirs_p = {n.replace("base_model.model.", "").replace(".default.weight", ""): p
                for n, p in theirs.named_parameters() if "lora_" in n}
    ours_p = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert theirs_p.keys() == ours_p.keys() and all(torch.equal(ours_p[k], theirs_p[k]) for k in ours_p)
    ids = input_ids()
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    # bfloat16 logits; the LoRA branch in bfloat16 here, in float32 in PEFT
    assert (got.float() - want.float()).abs().max() <= 0.05 * want.float().abs().max()


def test_from_peft_keeps_working_after_bitsandbytes_repacks_for_its_cpu_kernel():
    """PEFT's own forward in eval mode without gradients (here under disable_adapter) lets
    bitsandbytes repack its weights in place on an AVX512-BF16 CPU; the fused path then reads that
    layout (absmax now in bfloat16) and merging into it is refused."""
    from hf_tiny import input_ids, peft_twin, tiny_llama_4bit

    model = fastlora.from_peft(peft_twin(tiny_llama_4bit(), ["q_proj", "v_proj"]), backend="torch")  # eval
    ids = input_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with model.disable_adapter():
            model(input_ids=ids)
        q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
            pytest.skip("bitsandbytes did not repack here (no AVX512-BF16)")
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() <= 2e-3 * before.abs().max()  # the absmax's bfloat16 rounding
    with pytest.raises(ValueError, match="repacked this base for its CPU inference kernel"):
        LoRALinear4bit(q).merge()


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="LoRALinear4bit: base_layer must be a fastlora Linear4bit"):
        LoRALinear4bit(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="quantize_4bit: linear must be an nn.Linear, got Conv1d"):
        quantize_4bit(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"blocksize 64 does not divide the row \(in_features 100\)"):
        quantize_4bit(nn.Linear(100, 8))
    with pytest.raises(ValueError, match="unsupported quant_type 'int8'"):
        quantize_4bit(nn.Linear(64, 8), quant_type="int8")
    with pytest.raises(ValueError, match="LoRALinear4bit: r must be a positive int, got 0"):
        LoRALinear4bit(quantize_4bit(nn.Linear(64, 8)), r=0)
    with pytest.raises(TypeError, match="takes a floating-point tensor x, got torch.int64"):
        quantize_4bit(nn.Linear(64, 8))(torch.zeros(2, 64, dtype=torch.long))
    layer = LoRALinear4bit(quantize_4bit(nn.Linear(64, 8)))
    with pytest.raises(ValueError, match="x's last dimension must equal weight's in_features 64"):
        layer(torch.zeros(2, 32))
    with pytest.raises(TypeError, match="already a bitsandbytes 4-bit layer"):
        quantize_4bit(bnb_linear4bit(nn.Linear(64, 8)))
