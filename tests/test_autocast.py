"""torch.autocast: LoRALinear behaves as nn.Linear does. Inputs (x, weight, bias and the adapters)
are cast to the autocast dtype in force, float64 is left alone, the output has the autocast dtype and
the gradients come back in the parameters' own dtype.

On CPU the Triton backend runs in the interpreter, whose bfloat16 arithmetic is wrong: it is tested
here under float16 autocast only (bfloat16 in tests/test_gpu_compile.py)."""
import pytest
import torch
from torch import nn

import fastlora
from helpers import DEVICE, HAS_TRITON
from fastlora.checks import ATOL
from fastlora.reference import LoRALinearReference, lora_linear_reference

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# (backend, autocast dtype) pairs this machine can check
COMBOS = [("torch", BF16), ("torch", F16)] + ([("triton", F16)] if HAS_TRITON else [])
if HAS_TRITON and DEVICE == "cuda":
    COMBOS.append(("triton", BF16))
IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in COMBOS]


def _layer(backend, init_lora_weights=False):
    torch.manual_seed(0)
    return fastlora.LoRALinear(32, 24, r=4, alpha=8, backend=backend, device=DEVICE,
                               init_lora_weights=init_lora_weights)


def _grads(layer, x, dtype, autocast: bool):
    x = x.detach().requires_grad_(True)
    layer.zero_grad()
    with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
        y = layer(x)
    y.float().square().sum().backward()
    return y, x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("backend,dtype", COMBOS, ids=IDS)
def test_inputs_are_cast_to_the_autocast_dtype(backend, dtype):
    """Under autocast the layer computes exactly what it computes on inputs cast by hand, and the
    float32 parameters receive that computation's gradients, upcast."""
    layer = _layer(backend)
    x = torch.randn(3, 5, 32, device=DEVICE)
    y, dx, da, db = _grads(layer, x, dtype, autocast=True)
    assert y.dtype == dtype
    assert dx.dtype == da.dtype == db.dtype == F32  # the parameters' (and x's) dtype

    xc = x.to(dtype).requires_grad_(True)
    a, b = (layer.lora_A.detach().to(dtype).requires_grad_(True),
            layer.lora_B.detach().to(dtype).requires_grad_(True))
    y_ref = fastlora.lora_linear(xc, layer.weight.to(dtype), layer.bias.to(dtype), a, b,
                                 layer.scaling, backend=backend)
    y_ref.float().square().sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, xc.grad.float())
    assert torch.equal(da, a.grad.float()) and torch.equal(db, b.grad.float())


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_fresh_layer_equals_nn_linear_under_autocast(dtype):
    """B = 0: the layer is its base, and under autocast it returns nn.Linear's output and input
    gradient bit for bit (same cast, same GEMM)."""
    layer = _layer("torch", init_lora_weights=True)
    base = nn.Linear(32, 24, device=DEVICE)
    base.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(7, 32, device=DEVICE)
    out = []
    for m in (layer, base):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=dtype):
            y = m(xi)
        y.float().square().sum().backward()
        out.append((y, xi.grad))
    assert out[0][0].dtype == out[1][0].dtype == dtype
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("backend,dtype", COMBOS, ids=IDS)
def test_autocast_error_within_bound_of_reference_module(backend, dtype):
    """Against float64 on the same cast inputs, the layer under autocast is at most about twice as
    wrong as the plain-PyTorch reference module under the same autocast."""
    layer = _layer(backend)
    ref = LoRALinearReference(32, 24, r=4, alpha=8, device=DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(9, 32, device=DEVICE)
    y, dx, da, db = _grads(layer, x, dtype, autocast=True)
    y_t, dx_t, da_t, db_t = _grads(ref, x, dtype, autocast=True)

    c = {k: v.detach().to(dtype).double().requires_grad_(True)
         for k, v in dict(x=x, lora_A=layer.lora_A, lora_B=layer.lora_B).items()}
    y64 = lora_linear_reference(c["x"], layer.weight.to(dtype).double(), layer.bias.to(dtype).double(),
                                c["lora_A"], c["lora_B"], layer.scaling)
    y64.square().sum().backward()
    for name, got, theirs, exact in (("y", y, y_t, y64), ("x", dx, dx_t, c["x"].grad),
                                     ("lora_A", da, da_t, c["lora_A"].grad),
                                     ("lora_B", db, db_t, c["lora_B"].grad)):
        err = (got.double() - exact).abs().max().item()
        torch_err = (theirs.double() - exact).abs().max().item()
        bound = 2 * torch_err + ATOL[dtype] * max(1.0, exact.abs().max().item())
        assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g}"


def test_mixed_dtypes_are_accepted_only_under_autocast():
    """A bfloat16 activation (what the previous autocast layer returns) into float32 weights."""
    layer = _layer("torch")
    x = torch.randn(4, 32, device=DEVICE, dtype=BF16)
    with pytest.raises(TypeError, match="x and weight must share a dtype"):
        layer(x)
    with torch.autocast(DEVICE, dtype=BF16):
        assert layer(x).dtype == BF16


def test_float64_is_not_cast():
    """As nn.Linear: autocast leaves float64 tensors (and their computation) alone."""
    layer = _layer("torch").double()
    x = torch.randn(4, 32, device=DEVICE, dtype=F64)
    with torch.autocast(DEVICE, dtype=BF16):
        y = layer(x)
    assert y.dtype == F64
    assert torch.equal(y, layer(x))


@pytest.mark.slow
def test_autocast_under_compile():
    """The autocast rule is a dispatcher kernel, so torch.compile traces the casts: the compiled
    layer under autocast gives eager's dtype and (within bfloat16 rounding) eager's numbers. (Two
    correct bfloat16 computations: the compiled operator's hand-written backward, and at this size
    eager autograd's, round their partial sums differently, by up to an ulp of the largest.)"""
    torch._dynamo.reset()
    layer = _layer("torch")
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(3, 5, 32, device=DEVICE)
    y_c, dx_c, da_c, db_c = _grads(compiled, x, BF16, autocast=True)
    y_e, dx_e, da_e, db_e = _grads(layer, x, BF16, autocast=True)
    assert y_c.dtype == BF16 and da_c.dtype == db_c.dtype == F32
    torch.testing.assert_close(y_c, y_e)  # bf16 tolerance
    for gc, ge in ((dx_c, dx_e), (da_c, da_e), (db_c, db_e)):
        torch.testing.assert_close(gc, ge, rtol=1.6e-2, atol=2**-8 * ge.abs().max().item())
    torch._dynamo.reset()
