"""DoRA (lora_linear's ``magnitude``, LoRALinear's ``use_dora``) through every route: float64
gradcheck with the norm held constant, the three-way bound against PEFT's formula in float64, the
norm's cache, what the backward keeps, the kernels a step launches, bad inputs, the layer (init,
merge, state dict) and torch.compile. tests/test_dora_peft.py holds the comparisons with real PEFT."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
import fastlora.autograd
from fastlora import dora, torch_route
from fastlora.checks import Case, gradcheck, three_way, three_way_pooled
from fastlora.reference import dora_linear_reference
from helpers import DEVICE, HAS_TRITON, ROUTES, assert_within_bound, count_launches, full_suite_only

F16, F32, F64 = torch.float16, torch.float32, torch.float64

CASES = [
    Case(1, 97, 40, 1, F16, dora=True),
    *[Case(63, 97, 40, 3, dt, dora=True) for dt in (F64, F32, F16)],
    Case(97, 97, 40, 16, F16, dora=True),
    Case(97, 45, 70, 32, F32, dora=True),
    Case(63, 97, 40, 16, F16, adapter_dtype=F32, bias_grad=True, dora=True),
    Case(63, 97, 40, 8, F16, bias=False, dora=True),
    Case(63, 33, 40, 3, F32, layout="transposed", dora=True),
    Case(97, 33, 40, 3, F64, layout="sliced", dora=True),
    Case(63, 33, 40, 3, F32, scaling=0.0, dora=True),
    Case(63, 33, 40, 3, F64, dropout_p=0.3, dora=True),
    Case(63, 33, 40, 3, F16, dropout_p=0.1, layout="3d", dora=True),
    Case(97, 45, 40, 16, F32, dropout_p=0.5, bias_grad=True, dora=True),
]


@pytest.fixture
def handwritten_torch_backward(monkeypatch):
    """The torch route through its hand-written backward whatever the size."""
    monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", -1)


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_three_way_bound(case, backend):
    """y, dx, dA, dB, dm (and db) against PEFT's formula in float64, within twice PyTorch's own
    error in the case's dtype. (M = 1 with r = 1: every dA element shares one rounding of the one
    dY' B value, so PyTorch's error is pooled over three draws, as for LoRA.)"""
    check = three_way_pooled if case.M == 1 else three_way
    assert_within_bound(check(case, backend, device=DEVICE))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_three_way_bound_handwritten_torch_backward(case, handwritten_torch_backward):
    check = three_way_pooled if case.M == 1 else three_way
    assert_within_bound(check(case, "torch", device=DEVICE))


@pytest.mark.parametrize("backend", full_suite_only(ROUTES, inner={"torch"}))
@pytest.mark.parametrize("dropout_p", [0.0, pytest.param(0.4, marks=pytest.mark.slow)],
                         ids=["nodrop", "drop0.4"])
def test_gradcheck_float64(backend, dropout_p):
    assert gradcheck(backend, device=DEVICE, dropout_p=dropout_p, dora=True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["nodrop", "drop0.4"])
def test_gradcheck_float64_handwritten_torch_backward(dropout_p, handwritten_torch_backward):
    assert gradcheck("torch", device=DEVICE, dropout_p=dropout_p, dora=True)


def _inputs(M=37, K=40, N=24, r=3, dtype=F64, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(device=device, dtype=dtype)  # noqa: E731
    x, w, b, a, bb = mk(M, K), mk(N, K), mk(N), mk(r, K), mk(N, r)
    m = torch.linalg.norm(w + 0.5 * bb @ a, dim=1) * (0.5 + torch.rand(N, generator=g, dtype=F64).to(device))
    return x, w, b, a, bb, m.to(dtype)


@pytest.mark.parametrize("backend", ROUTES)
def test_the_norm_gets_no_gradient(backend):
    """dA and dB are those of y with ||W + s B A|| held constant (PEFT's detach): the reference with
    the norm left in autograd's graph gives other gradients, which these must not equal."""
    x, w, b, a, bb, m = _inputs()
    leaves = [t.clone().requires_grad_(True) for t in (a, bb, m)]
    y = fastlora.lora_linear(x, w, b, leaves[0], leaves[1], 0.5, backend=backend, magnitude=leaves[2])
    got = torch.autograd.grad(y.square().sum(), leaves)
    ref = [t.clone().requires_grad_(True) for t in (a, bb, m)]
    want = torch.autograd.grad(dora_linear_reference(x, w, b, *ref[:2], 0.5, ref[2]).square().sum(), ref)

    def undetached(a, bb, m):  # the same formula with the norm differentiated
        g = m / torch.linalg.norm(w + 0.5 * bb @ a, dim=1)
        return x @ w.T + b + (g - 1) * (x @ w.T) + g * (0.5 * (x @ a.T) @ bb.T)
    ref2 = [t.clone().requires_grad_(True) for t in (a, bb, m)]
    other = torch.autograd.grad(undetached(*ref2).square().sum(), ref2)
    for name, gt, wt, ot in zip(("lora_A", "lora_B", "magnitude"), got, want, other):
        torch.testing.assert_close(gt, wt, rtol=1e-10, atol=1e-10, msg=name)
        if name != "magnitude":
            assert (gt - ot).abs().max() > 1e-3, f"{name}: the check cannot tell a detached norm"


@pytest.mark.parametrize("backend", ROUTES)
def test_dropout_zero_and_eval_equal_no_dropout_and_a_fresh_layer_equals_lora(backend):
    x, w, b, a, bb, m = _inputs(dtype=F32)
    plain = fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend, magnitude=m)
    for kw in (dict(dropout_p=0.0), dict(dropout_p=0.7, training=False)):
        assert torch.equal(fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend, magnitude=m, **kw),
                           plain)
    assert not torch.allclose(fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.7, backend=backend,
                                                   magnitude=m), plain)
    # m = ||W + s B A||: g = 1, DoRA is LoRA
    norm = torch.linalg.norm(w.double() + 0.5 * bb.double() @ a.double(), dim=1).float()
    torch.testing.assert_close(fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend, magnitude=norm),
                               fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the norm's cache


def _count_squared_norms(monkeypatch, backend):
    """The weight products the route computes, each as its need_sq flag."""
    route = fastlora.routes.get_route(fastlora.routes.resolve(backend, torch.zeros(1, device=DEVICE), 3))
    calls = []
    real = type(route).weight_product
    monkeypatch.setattr(type(route), "weight_product",
                        lambda self, w, a, need_sq: calls.append(need_sq) or real(self, w, a, need_sq))
    return calls


@pytest.mark.parametrize("backend", ROUTES)
def test_weight_norms_are_computed_once_per_weight_version(backend, monkeypatch):
    calls = _count_squared_norms(monkeypatch, backend)
    x, w, b, a, bb, m = _inputs()
    w = torch.nn.Parameter(w, requires_grad=False)

    def check():
        y = fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend, magnitude=m)
        torch.testing.assert_close(y, dora_linear_reference(x, w, b, a, bb, 0.5, m), rtol=1e-12, atol=1e-12)

    check()
    check()  # cached: W A^T only (A changes every step)
    assert calls == [True, False]
    with torch.no_grad():
        w.mul_(1.5)  # a new version
    check()
    w.data = w.data.clone()  # new storage
    check()
    assert calls == [True, False, True, True]
    w.data.mul_(2.0)  # invisible to the version counter: forget_weight_norms() is the way out
    dora.forget_weight_norms()
    check()
    assert calls[-1] is True
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        wi = w.detach().clone()
        for _ in range(2):
            fastlora.lora_linear(x, wi, b, a, bb, 0.5, backend=backend, magnitude=m)
    assert calls[-2:] == [True, True]


def test_the_cache_dies_with_its_weight():
    import gc
    import weakref
    x, w, b, a, bb, m = _inputs()
    fastlora.lora_linear(x, w, b, a, bb, 0.5, magnitude=m)
    entry = weakref.ref(dora.cached_squared_norms(w))
    assert entry() is not None
    del w
    gc.collect()
    assert entry() is None


# ------------------------------------------------------------------------------------------------
# what the backward keeps, what it allocates, what a step launches


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_the_backward_keeps_one_m_by_n_tensor_y_itself_without_dropout(backend, p, handwritten_torch_backward):
    """Beyond LoRA's tensors DoRA keeps the norm [N] and, without dropout, y, the output itself (no
    copy); under dropout v, as PEFT keeps its drop(x) W^T."""
    x, w, b, a, bb, m = _inputs(dtype=F32)
    a.requires_grad_(True)
    y = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=p, backend=backend, magnitude=m.requires_grad_(True))
    saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.shape == y.shape]
    assert len(saved) == 1
    assert (saved[0].data_ptr() == y.data_ptr()) == (p == 0)


class _Allocations(TorchDispatchMode):
    """The dtype of every tensor an op returns with ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                self.seen.append((str(func), t.dtype))
        return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("backend", ["fused", "split"])
def test_the_triton_backward_makes_no_accumulator_sized_m_by_n_temporary(backend):
    """dm comes from one reduction inside the dY pass: the backward's only new [M, N] tensor is
    dY' in x's dtype, for the dX product (the test's M, N and K differ, so sizes tell them apart)."""
    M, K, N = 37, 40, 24
    x, w, b, a, bb, m = _inputs(M, K, N, dtype=F16)
    x.requires_grad_(True)
    a.requires_grad_(True)
    y = fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend, magnitude=m.requires_grad_(True))
    dy = torch.randn_like(y)
    with _Allocations(M * N) as seen:
        y.backward(dy)
    assert all(dt == F16 for _, dt in seen.seen), seen.seen
    assert len([f for f, _ in seen.seen if "empty" in f or "full" in f]) == 1, seen.seen  # dY'


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("backend,fwd,bwd", [
    ("fused", ["xa_kernel", "lora_gemm_kernel"], ["reduce_kernel", "lora_gemm_kernel", "reduce_kernel"]),
    ("split", ["xa_kernel", "xa_kernel"], ["reduce_kernel", "reduce_kernel"]),
])
def test_kernel_launches_of_a_dora_training_step(backend, fwd, bwd, monkeypatch):
    """LoRA's launches plus one pass over W for the norm (W A^T): the scale rides in the GEMM's
    epilogue (fused) or one elementwise pass (split), dY' and dm in the dY pass."""
    launches = count_launches(monkeypatch)
    layer = fastlora.LoRALinear(40, 24, r=3, backend=backend, init_lora_weights=False, use_dora=True)
    x = torch.randn(37, 40, requires_grad=True)
    for _ in range(2):  # the second step finds ||W_n||^2 cached: the same launches
        launches.clear()
        y = layer(x)
        assert launches == fwd
        launches.clear()
        y.sum().backward()
        assert launches == bwd


# ------------------------------------------------------------------------------------------------
# bad inputs


def _good(**over):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), bias=torch.randn(5),
                lora_A=torch.randn(3, 8), lora_B=torch.randn(5, 3), scaling=0.5, magnitude=torch.rand(5))
    args.update(over)
    return args


BAD = [
    (dict(magnitude=torch.rand(4)), ValueError, r"magnitude must be \[out_features\] = \[5\], got shape \(4,\)"),
    (dict(magnitude=torch.rand(5, 1)), ValueError, r"magnitude must be \[out_features\] = \[5\], got shape \(5, 1\)"),
    (dict(magnitude=torch.rand(())), ValueError, r"magnitude must be \[out_features\]"),
    (dict(magnitude=torch.ones(5, dtype=torch.int64)), TypeError, "magnitude must be float16, bfloat16, "
                                                                  "float32 or float64, got torch.int64"),
    (dict(magnitude=[1.0] * 5), TypeError, "magnitude must be a torch.Tensor or None, got list"),
    (dict(magnitude=torch.rand(5, device="meta")), ValueError, "magnitude is on meta but the weight is on cpu"),
    (dict(lora_A=torch.randn(6, 8), lora_B=torch.randn(5, 6)), ValueError,
     r"DoRA needs r <= min\(in_features, out_features\) = 5, got r=6"),
    (dict(weight=torch.randn(5, 8, requires_grad=True)), ValueError,
     "DoRA computes no gradient for the weight, which requires one"),
]


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("over,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_argument_is_named_before_any_launch(over, exc, msg, backend, monkeypatch):
    def refuse(name):
        raise AssertionError(f"the {name} route was reached: the check came too late")
    monkeypatch.setattr(fastlora.autograd, "get_route", refuse)
    with pytest.raises(exc, match="lora_linear: " + msg):
        fastlora.lora_linear(**_good(backend=backend, **over))


def test_a_trainable_weight_is_fine_without_grad_mode():
    with torch.no_grad():
        fastlora.lora_linear(**_good(weight=torch.randn(5, 8, requires_grad=True)))


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(r=9), ValueError, r"DoRA needs r <= min\(in_features, out_features\) = 8, got r=9"),
    (dict(r=4, use_dora=1), ValueError, "use_dora must be True or False, got 1"),
])
def test_layer_arguments(kw, exc, msg):
    with pytest.raises(exc, match="LoRALinear: " + msg):
        fastlora.LoRALinear(8, 12, **{"use_dora": True, **kw})
    fastlora.LoRALinear(8, 12, r=9)  # plain LoRA takes any rank


def test_apply_lora_refuses_a_rank_past_a_targeted_layer_before_changing_anything():
    from helpers import Net
    net = Net(d=16)
    before = {n: type(m) for n, m in net.named_modules()}
    with pytest.raises(ValueError, match=r"DoRA needs r <= min\(in_features, out_features\) = 8, got r=12"):
        fastlora.apply_lora(net, ["q_proj", "v_proj"], r=12, use_dora=True)
    assert {n: type(m) for n, m in net.named_modules()} == before


@pytest.mark.parametrize("backend", ROUTES)
def test_empty_input_launches_nothing(backend, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel or BLAS call was launched for M = 0")
    route = fastlora.routes.get_route(backend)
    for method in ("forward", "backward", "weight_product"):
        monkeypatch.setattr(route, method, refuse)
    x = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    a, b, m = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((3, 8), (5, 3), (5,)))
    y = fastlora.lora_linear(x, torch.randn(5, 8, device=DEVICE), None, a, b, 0.5, dropout_p=0.1,
                             backend=backend, magnitude=m)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and not a.grad.any() and not b.grad.any() and not m.grad.any()


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_meta_tensors_give_shapes(p):
    layer = fastlora.LoRALinear(8, 5, r=3, dropout=p, device="meta", use_dora=True)
    x = torch.empty(2, 4, 8, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 4, 5) and y.device.type == "meta"
    y.sum().backward()
    assert layer.lora_magnitude_vector.grad.shape == (5,)


# ------------------------------------------------------------------------------------------------
# the layer


def test_a_fresh_dora_layer_is_its_lora_layer_and_its_magnitude_trains():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 12, r=4, init_lora_weights=False, use_dora=True, dtype=F64)
    lora = fastlora.LoRALinear(16, 12, r=4, dtype=F64)
    lora.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "lora_magnitude_vector"})
    x = torch.randn(5, 16, dtype=F64)
    torch.testing.assert_close(layer(x), lora(x), rtol=1e-12, atol=1e-12)
    assert layer.lora_magnitude_vector.requires_grad and not layer.weight.requires_grad
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude_vector"}
    assert fastlora.count_parameters(layer).trainable == 4 * 16 + 12 * 4 + 12
    assert "use_dora=True" in repr(layer)
    with torch.no_grad():
        layer.lora_B.add_(1.0)
        layer.reset_lora_parameters(False)  # the magnitude follows the new B A
    torch.testing.assert_close(layer.lora_magnitude_vector,
                               torch.linalg.norm(layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1))


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_merge_unmerge_and_merge_and_unload(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12, dtype=dtype), torch.nn.GELU(),
                                torch.nn.Linear(12, 8, dtype=dtype))
    fastlora.apply_lora(model, ["0", "2"], r=4, alpha=8, use_dora=True, backend="torch")
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)
            layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features, dtype=dtype) + 0.5)
    x = torch.randn(5, 16, dtype=dtype)
    weights = [model[0].weight.clone(), model[2].weight.clone()]
    with torch.no_grad():
        want = model(x)
        fastlora.merge(model)
        merged = model(x)
        assert model[0].merged and not torch.equal(model[0].weight, weights[0])
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(merged, want, **tol)
        # a checkpoint of the merged model holds the unmerged weights and the adapter
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert torch.equal(state["0.weight"], weights[0]) and "0.lora_magnitude_vector" in state
        fastlora.unmerge(model)
        assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[2].weight, weights[1])
        assert torch.equal(model(x), want)
        fastlora.merge(model)
        model.load_state_dict(state)  # into a merged layer: unmerged, loaded, merged again
        torch.testing.assert_close(model(x), merged, rtol=0, atol=0)
        plain = fastlora.merge_and_unload(model)
        assert type(plain[0]) is torch.nn.Linear
        torch.testing.assert_close(plain(x), merged, rtol=0, atol=0)


def test_merge_refuses_a_zero_norm_row():
    layer = fastlora.LoRALinear(4, 3, r=2, use_dora=True)
    with torch.no_grad():
        layer.weight[1].zero_()
        layer.lora_B.zero_()
    before = layer.weight.clone()
    with pytest.raises(ValueError, match="is not finite"):
        layer.merge()
    assert torch.equal(layer.weight, before) and not layer.merged


def test_model_helpers_include_the_magnitude():
    from helpers import Net
    model = fastlora.apply_lora(Net(), ["q_proj", "v_proj"], r=4, use_dora=True)
    state = fastlora.lora_state_dict(model)
    assert "blocks.0.q_proj.lora_magnitude_vector" in state and len(state) == 4 * 3
    for p in model.parameters():
        p.requires_grad_(False)
    fastlora.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(state)


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_opcheck(backend, p):
    op = torch.ops.fastlora.lora_linear.default
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=F64, device=DEVICE, requires_grad=True)
    w, b = torch.randn(6, 8, dtype=F64, device=DEVICE), torch.randn(6, dtype=F64, device=DEVICE)
    a, bb = torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.randn(6, 3, device=DEVICE, requires_grad=True)
    m = torch.rand(6, device=DEVICE, requires_grad=True)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE) if p else None
    torch.library.opcheck(op, (x, w, b, a, bb, 0.5, p, seed, backend, m))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_no_rows_keeps_no_uninitialised_memory(backend, p):
    """At M = 0 nothing launches, but DoRA's kept norm is an output of the operator: it must not be
    whatever memory the allocator hands back (the H200's opcheck caught eager != compiled there),
    and the gradients are zeros."""
    op = torch.ops.fastlora.lora_linear.default
    torch.manual_seed(0)
    w, b = torch.randn(6, 8, dtype=F64, device=DEVICE), torch.randn(6, dtype=F64, device=DEVICE)
    a, bb = torch.randn(3, 8, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    m = torch.rand(6, device=DEVICE)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE) if p else None
    kept_norms = []
    for fill in (float("nan"), 7.0):  # what the allocator may hand back
        torch.empty(1 << 16, dtype=F64, device=DEVICE).fill_(fill)
        x = torch.empty(0, 8, dtype=F64, device=DEVICE)
        y, _, kept = op(x, w, b, a, bb, 0.5, p, seed, backend, m)
        assert y.shape == (0, 6) and len(kept) == (2 if p else 1)
        kept_norms.append(kept[0])
        x = x.requires_grad_(True)
        mm = m.clone().requires_grad_(True)
        fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=p, backend=backend,
                             magnitude=mm).sum().backward()
        assert torch.equal(mm.grad, torch.zeros_like(m))
    assert torch.equal(kept_norms[0], torch.zeros(6, dtype=F64, device=DEVICE))
    assert torch.equal(kept_norms[1], kept_norms[0])


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop0.25"])
def test_compiled_model_matches_eager(backend, p, fresh_dynamo):
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        fastlora.LoRALinear(16, 12, r=4, dropout=p, backend=backend, init_lora_weights=False,
                            use_dora=True, device=DEVICE, dtype=F64),
        torch.nn.GELU(),
        fastlora.LoRALinear(12, 8, r=2, dropout=p, bias=False, backend=backend, init_lora_weights=False,
                            use_dora=True, device=DEVICE, dtype=F64))
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(2, 5, 16, dtype=F64, device=DEVICE)
    runs = []
    for fn in (compiled, model):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        with torch._inductor.config.patch(fallback_random=True):
            y = fn(xi)
        params = [q for q in model.parameters() if q.requires_grad]
        runs.append((y, *torch.autograd.grad(y.square().sum(), [xi, *params])))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_eager_function_equals_the_operator_under_autocast(backend, monkeypatch):
    monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", -1)
    op = torch.ops.fastlora.lora_linear
    torch.manual_seed(0)
    x = torch.randn(7, 8, device=DEVICE, requires_grad=True)
    w, b = torch.randn(6, 8, device=DEVICE), torch.randn(6, device=DEVICE, requires_grad=True)
    a, bb = torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.randn(6, 3, device=DEVICE, requires_grad=True)
    m = (torch.rand(6, device=DEVICE) + 0.5).requires_grad_(True)
    args = (x, w, b, a, bb, 0.5, 0.0, None, backend, m)
    dy = torch.randn(7, 6, device=DEVICE)
    results = []
    for call in (lambda: op(*args)[0], lambda: fastlora.autograd.run_eager(*args)):
        with torch.autocast(DEVICE, dtype=F16):
            y = call()
        results.append((y, *torch.autograd.grad(y, [x, b, a, bb, m], dy.to(y.dtype))))
    assert results[0][0].dtype == F16 and results[0][-1].dtype == F32  # m's gradient in m's dtype
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("autograd_from", [2**27, -1], ids=["small-autograd", "function"])
def test_zero_magnitude_entry_gives_nan_gradient_as_documented(backend, autograd_from, monkeypatch):
    """dm = sum dY o (y - b) / m reads y, which holds no trace of v where m_n = 0 (autograd.py);
    the torch route's small problems differentiate the forward's ops instead: finite there."""
    monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", autograd_from)
    x, w, b, a, bb, m = _inputs()
    m[2] = 0.0
    m.requires_grad_(True)
    y = fastlora.lora_linear(x, w, b, a, bb, 0.5, magnitude=m, backend=backend)
    assert torch.equal(y.detach()[:, 2], b[2].expand(y.shape[0]))
    (grad,) = torch.autograd.grad(y.sum(), [m])
    assert grad[[0, 1, 3]].isfinite().all()
    if backend == "torch" and autograd_from > 0:
        assert grad.isfinite().all()
    else:
        assert math.isnan(grad[2].item())
