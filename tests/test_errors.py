"""Bad input: a clear TypeError/ValueError naming the argument, what was expected and what was
given, raised before any kernel launches; empty inputs; NaN and Inf propagate as in the reference."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastlora
import fastlora.autograd
import fastlora.routes
from helpers import DEVICE, HAS_TRITON, ROUTES
from fastlora.reference import lora_linear_reference


def good(**over):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), bias=torch.randn(5),
                lora_A=torch.randn(3, 8), lora_B=torch.randn(5, 3), scaling=0.5)
    args.update(over)
    return args


BAD = [
    (dict(x=torch.randn(4, 7)), ValueError, "x's last dimension"),
    (dict(weight=torch.randn(5, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(lora_A=torch.randn(3, 7)), ValueError, "lora_A must be"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(5, 0)), ValueError, "lora_A must be"),
    (dict(lora_B=torch.randn(5, 4)), ValueError, "lora_B must be"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be"),
    (dict(bias=torch.randn(6)), ValueError, "bias must be"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x must be float16"),
    (dict(weight=torch.randint(0, 3, (5, 8))), TypeError, "weight must be float16"),
    (dict(lora_A=torch.randint(0, 3, (3, 8))), TypeError, "lora_A must be float16"),
    (dict(lora_B=torch.ones(5, 3, dtype=torch.bool)), TypeError, "lora_B must be float16"),
    (dict(bias=torch.randint(0, 3, (5,))), TypeError, "bias must have x's dtype"),
    (dict(x=torch.randn(4, 8, dtype=torch.complex64)), TypeError, "x must be float16"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x and weight must share a dtype"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(scaling=math.inf), ValueError, "scaling must be a finite number"),
    (dict(scaling=-math.inf), ValueError, "scaling must be a finite number"),
    (dict(scaling=math.nan), ValueError, "scaling must be a finite number"),
    (dict(scaling="0.5"), ValueError, "scaling must be a finite number"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p=math.nan), ValueError, "dropout_p must be in [0, 1)"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    (dict(bias=torch.randn(5, 1)), ValueError, "bias must be"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(weight=torch.randn(0, 8), bias=None, lora_B=torch.randn(0, 3)), ValueError, "non-zero"),
]


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if the call reaches a route (and so a kernel)."""
    def refuse(name):
        raise AssertionError(f"the {name} route was reached: the check came too late")
    monkeypatch.setattr(fastlora.autograd, "get_route", refuse)


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("over,exc,msg", BAD, ids=[b[2].split()[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_argument_is_named(over, exc, msg, backend, no_launch):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        fastlora.lora_linear(**good(**{"backend": backend, **over}))
    assert "got" in str(e.value)  # what was given


@pytest.mark.parametrize("name,shape", [("weight", (5, 8)), ("bias", (5,)), ("lora_A", (3, 8)),
                                        ("lora_B", (5, 3))])
def test_devices_must_match(name, shape, no_launch):
    meta = torch.randn(*shape, device="meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        fastlora.lora_linear(**good(**{name: meta}))


@pytest.mark.slow  # a fresh interpreter (~1.5 s of imports)
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch, fastlora\n"
            "try:\n"
            "    fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),"
            " torch.randn(3, 1), 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "backend='triton' needs CUDA tensors, got x on cpu" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow  # a fresh interpreter (~1.5 s of imports)
def test_import_without_triton_works_and_falls_back():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastlora\n"
            "y = fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),"
            " torch.randn(3, 1), 1.0)\n"
            "try:\n"
            "    fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),"
            " torch.randn(3, 1), 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs the triton package" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("kw,msg", [(dict(r=0), "r must be a positive int"),
                                    (dict(r=-2), "r must be a positive int"),
                                    (dict(dropout=1.5), "dropout must be in"),
                                    (dict(alpha=math.inf), "alpha must be a finite"),
                                    (dict(alpha=True), "alpha must be a finite"),
                                    (dict(init_lora_weights=1), "init_lora_weights must be"),
                                    (dict(backend="fast"), "backend must be one of"),
                                    (dict(init_lora_weights="pissa"), "init_lora_weights must be")])
def test_layer_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fastlora.LoRALinear(8, 4, **kw)


@pytest.mark.parametrize("backend", ROUTES)
def test_empty_input_launches_nothing(backend, monkeypatch):
    """M = 0 gives an empty output and zero gradients without a kernel launch (no zero-size grid)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel or BLAS call was launched for M = 0")
    route = fastlora.routes.get_route(backend)
    for method in ("forward", "backward"):
        monkeypatch.setattr(route, method, refuse)
    x = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    a = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(5, 3, device=DEVICE, requires_grad=True)
    y = fastlora.lora_linear(x, torch.randn(5, 8, device=DEVICE), None, a, b, 0.5, dropout_p=0.1,
                             backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert not a.grad.any() and not b.grad.any()


def _pattern(t):
    return t.isnan(), t.isposinf(), t.isneginf()


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy meets the NaN
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scaling", [0.5, 0.0], ids=["s0.5", "s0"])
def test_nan_and_inf_propagate_as_in_reference(backend, dtype, seed, scaling):
    """NaN and +-Inf in x and in an adapter: the output's and every gradient's NaN / +Inf / -Inf
    pattern equals the plain-PyTorch reference's in the same dtype, for every scaling (with
    scaling 0 BLAS would skip the product, and the NaN with it, unless the route computes it)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    x, w, bias, a, b = rnd(9, 12), rnd(7, 12), rnd(7), rnd(3, 12), rnd(7, 3)
    x[1, 3], x[4, 0], x[6, 2] = math.nan, math.inf, -math.inf
    b[2, 1] = math.nan
    results = []
    for fn in ("fastlora", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        if fn == "fastlora":
            y = fastlora.lora_linear(leaves[0], w, bias, leaves[1], leaves[2], scaling,
                                     backend=backend)
        else:
            y = lora_linear_reference(leaves[0], w, bias, leaves[1], leaves[2], scaling)
        y.backward(torch.ones_like(y))
        results.append([y] + [t.grad for t in leaves])
    for name, got, ref in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), *results):
        assert ref.isnan().any() or ref.isinf().any()  # the case exercises propagation at all
        for kind, p_got, p_ref in zip(("NaN", "+Inf", "-Inf"), _pattern(got), _pattern(ref)):
            where = (p_got != p_ref).nonzero().tolist()
            assert torch.equal(p_got, p_ref), f"{name}: {kind} pattern differs at {where}"


@pytest.mark.parametrize("backend", ROUTES)
def test_numpy_scalars_are_numbers(backend):
    """numpy's scalars are real and integral numbers as Python's are (issue 11, item 7)."""
    x, w, b, a, bb = (torch.randn(*s, device=DEVICE) for s in ((4, 8), (5, 8), (5,), (3, 8), (5, 3)))
    plain = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.25, training=False, backend=backend)
    for scaling in (np.float32(0.5), np.float64(0.5)):
        got = fastlora.lora_linear(x, w, b, a, bb, scaling, dropout_p=np.float32(0.25),
                                   training=False, backend=backend)
        assert torch.equal(got, plain)
    layer = fastlora.LoRALinear(8, 5, r=np.int64(4), alpha=np.float32(8), dropout=np.float64(0.1),
                                backend=backend, device=DEVICE)
    assert (layer.r, layer.scaling, layer.dropout) == (4, 2.0, 0.1) and type(layer.r) is int
    with pytest.raises(ValueError, match=r"r must be a positive int, got np.float32\(4.0\)"):
        fastlora.LoRALinear(8, 5, r=np.float32(4))


@pytest.mark.parametrize("scaling,dtype", [(1e39, torch.float32), (-1e39, torch.float32),
                                           (10**400, torch.float32), (1e5, torch.float16),
                                           (1e300, torch.bfloat16)],
                         ids=["1e39-fp32", "-1e39-fp32", "10^400-fp32", "1e5-fp16", "1e300-bf16"])
def test_scaling_past_the_compute_dtype_is_refused(scaling, dtype, no_launch):
    """A scaling the compute dtype cannot hold is refused by name, not turned into Inf/NaN inside
    the kernels (issue 11, item 8)."""
    args = good(x=torch.randn(4, 8, dtype=dtype), weight=torch.randn(5, 8, dtype=dtype), bias=None,
                scaling=scaling)
    with pytest.raises(ValueError, match="lora_linear: scaling must"):
        fastlora.lora_linear(**args)


def test_largest_finite_scaling_of_the_dtype_is_taken():
    x, w, a, b = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, 8), torch.randn(5, 3)
    y = fastlora.lora_linear(x, w, None, a, b, torch.finfo(torch.float32).max, backend="torch")
    assert torch.equal(y, x @ w.T)  # A = 0: the low-rank term is exactly zero


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_meta_tensors_give_shapes(p):
    """On the meta device (shape inference, deferred init) the call runs with dropout too, with no
    .item() on a meta tensor (issue 11, item 9)."""
    layer = fastlora.LoRALinear(8, 5, r=3, dropout=p, device="meta")
    x = torch.empty(2, 4, 8, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 4, 5) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora_A.grad.shape == (3, 8)


@pytest.mark.slow  # a fresh interpreter (~1.5 s of imports)
def test_a_broken_triton_raises_instead_of_falling_back():
    """Only a missing triton package means "no Triton": a triton whose API moved raises, and auto on
    the CPU never imports it (issue 12, item 3)."""
    code = ("import sys; sys.modules['triton.tools.tensor_descriptor'] = None\n"
            "import torch, fastlora\n"
            "from fastlora.routes import resolve, triton_kernels\n"
            "print('cpu auto:', resolve('auto', torch.zeros(2, 3), 4))\n"
            "try:\n"
            "    triton_kernels()\n"
            "except ImportError as e:\n"
            "    print('raised for', e.name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert ("cpu auto: torch" in out.stdout
            and "raised for triton.tools.tensor_descriptor" in out.stdout), out.stdout + out.stderr
