"""torch.compile: the registered operators pass torch.library.opcheck and compute what eager mode's
autograd.Function computes, bit for bit; a model of LoRALinear layers compiles with fullgraph=True
(no graph break) to the eager numbers, and new batch/sequence lengths do not recompile per size.
On CPU the Triton backend runs in the interpreter; it works under compile because the operator is
opaque to the compiler (the fake implementation gives the shapes)."""
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import fastlora
from helpers import BACKENDS, DEVICE

F16, F32, F64 = torch.float16, torch.float32, torch.float64
OP = torch.ops.fastlora.lora_linear.default
BACKWARD_OP = torch.ops.fastlora.lora_linear_backward.default


def _rand(*shape, dtype=F32, grad=False):
    return torch.randn(*shape, dtype=F64, device=DEVICE).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [5, 0], ids=["M5", "M0"])
@pytest.mark.parametrize("dtype,p,bias", [(F32, 0.0, True), pytest.param(F16, 0.3, True, marks=pytest.mark.slow),
                                          (F64, 0.3, False)],
                         ids=["fp32", "fp16-p0.3", "fp64-p0.3-nobias"])
def test_opcheck(backend, M, dtype, p, bias):
    """Schema, autograd registration, fake tensors and AOT dispatch (static and dynamic) of both
    operators: the forward with trainable x, A, B (bias too when given), the backward directly."""
    torch.manual_seed(0)
    x = _rand(M, 8, dtype=dtype, grad=True)
    w, b = _rand(6, 8, dtype=dtype), _rand(6, dtype=dtype, grad=True) if bias else None
    a, bb = _rand(3, 8, grad=True), _rand(6, 3, grad=True)  # float32 adapters over any base
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE) if p else None
    args = (x, w, b, a, bb, 0.5, p, seed, backend)
    torch.library.opcheck(OP, args)

    y, xa, kept = OP(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    assert kept == []  # DoRA's, none for LoRA
    needs = [True, False, bias, True, True, False]
    torch.library.opcheck(BACKWARD_OP, (torch.randn_like(y), x.detach(), w, a.detach(), bb.detach(),
                                        xa, seed, 0.5, p, backend, needs, None, None, []))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_eager_function_equals_the_operator(backend, p, autocast, monkeypatch):
    """Eager calls go through a plain autograd.Function, compiled ones through the operator; both
    wrap the same forward and backward, so outputs and all five gradients agree exactly, under
    autocast too (the operator's autocast kernel and the eager path cast the same way). (Torch-
    route problems of a host-bound size, as this one, otherwise skip the Function in eager mode:
    tests/test_lora_linear.py holds that path to the bound.)"""
    from fastlora import torch_route
    monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", -1)
    torch.manual_seed(0)
    x = _rand(7, 8, grad=True)
    w, b = _rand(6, 8, grad=True), _rand(6, grad=True)
    a, bb = _rand(3, 8, grad=True), _rand(6, 3, grad=True)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE) if p else None
    args = (x, w, b, a, bb, 0.5, p, seed, backend)
    dy = _rand(7, 6)
    results = []
    for call in (lambda: OP(*args)[0], lambda: fastlora.autograd.run_eager(*args)):
        with torch.autocast(DEVICE, dtype=F16, enabled=autocast):
            y = call()
        results.append((y, *torch.autograd.grad(y, [x, w, b, a, bb], dy.to(y.dtype))))
    assert results[0][0].dtype == (F16 if autocast else F32)
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _model(backend, p, dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(
        fastlora.LoRALinear(16, 12, r=4, dropout=p, backend=backend, init_lora_weights=False,
                            device=DEVICE, dtype=dtype),
        nn.GELU(),
        fastlora.LoRALinear(12, 8, r=2, dropout=p, bias=False, backend=backend,
                            init_lora_weights=False, device=DEVICE, dtype=dtype),
    )


def _run(model, x, seed=1):
    """Output and the gradients of x and every trainable parameter, for one forward/backward."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop0.25"])
def test_compiled_model_matches_eager(backend, p, fresh_dynamo):
    """fullgraph=True raises on any graph break; inductor compiles the GELU and the seed draw
    around the opaque operator. ``fallback_random`` makes inductor draw the dropout seed with eager's
    generator, so the masks, and hence all numbers, must agree."""
    model = _model(backend, p)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = _rand(2, 5, 16, dtype=F64)
    with torch._inductor.config.patch(fallback_random=True):
        y_c, grads_c = _run(compiled, x)
    y_e, grads_e = _run(model, x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1
    if p:  # the dropout really ran: another seed gives other numbers
        assert not torch.equal(_run(model, x, seed=2)[0], y_e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_shapes_do_not_recompile_per_size(backend, fresh_dynamo):
    """Four (batch, sequence) sizes: dynamo compiles once for the first size and once more with
    dynamic shapes at the second, then reuses that graph. Each size is checked against eager."""
    model = _model(backend, 0.0)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    sizes = [(2, 3), (3, 5), (2, 9), (4, 7)]  # dynamo specialises sizes 0 and 1, so none here
    for bsz, seq in sizes:
        x = _rand(bsz, seq, 16, dtype=F64)
        y_c, grads_c = _run(compiled, x)
        y_e, grads_e = _run(model, x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_marked_dynamic_compiles_once(fresh_dynamo):
    model = _model("torch", 0.0)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for n in (6, 10, 35):
        x = _rand(n, 16, dtype=F64)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
