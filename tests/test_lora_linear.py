"""fastlora.lora_linear through every route against the float64 reference (three-way bound) and
finite differences (gradcheck). On a machine without a GPU the Triton backend runs in the interpreter."""
import pytest
import torch

import fastlora
from helpers import DEVICE, HAS_TRITON, ROUTES, assert_within_bound, full_suite_only
from fastlora.checks import Case, gradcheck, three_way

F16, F32, F64 = torch.float16, torch.float32, torch.float64
# fp16 stands in for the reduced-precision path on the CPU (the interpreter's bf16 arithmetic is
# wrong); bf16 runs in the GPU tests.
DTYPES = [F64, F32, F16]

CASES = [
    *[Case(M, 97, 40, r, dt) for M, r in ((1, 1), (63, 3), (97, 16)) for dt in DTYPES],
    Case(63, 45, 70, 64, F32),
    Case(63, 45, 70, 128, F16),
    Case(63, 97, 40, 16, F16, adapter_dtype=F32, bias_grad=True),
    Case(63, 97, 40, 8, F32, bias=False),
    Case(63, 97, 40, 8, F32, bias_grad=True),
    Case(63, 33, 40, 3, F16, layout="3d"),
    Case(63, 33, 40, 3, F32, layout="transposed"),
    Case(97, 33, 40, 3, F64, layout="sliced"),
    Case(63, 33, 40, 3, F32, scaling=0.0),
    Case(63, 33, 40, 3, F64, dropout_p=0.3),
    Case(63, 33, 40, 3, F16, dropout_p=0.1, layout="3d"),
    Case(97, 45, 40, 16, F32, adapter_dtype=F32, dropout_p=0.5, bias_grad=True),
]


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_three_way_bound(case, backend):
    assert_within_bound(three_way(case, backend, device=DEVICE))


@pytest.mark.parametrize("backend", full_suite_only(ROUTES, inner={"torch"}))
@pytest.mark.parametrize("dropout_p", [0.0, pytest.param(0.4, marks=pytest.mark.slow)],
                         ids=["nodrop", "drop0.4"])
def test_gradcheck_float64(backend, dropout_p):
    assert gradcheck(backend, device=DEVICE, dropout_p=dropout_p)


def _inputs(M=6, K=8, N=5, r=3, dtype=F32, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(M, K), mk(N, K), mk(N), mk(r, K), mk(N, r)


@pytest.mark.parametrize("backend", ROUTES)
def test_dropout_zero_and_eval_equal_no_dropout(backend):
    x, w, b, a, bb = _inputs()
    plain = fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend)
    assert torch.equal(fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.0, backend=backend), plain)
    assert torch.equal(fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.7, training=False,
                                            backend=backend), plain)
    dropped = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.7, backend=backend)
    assert not torch.allclose(dropped, plain)


@pytest.mark.parametrize("backend", ROUTES)
def test_dropout_is_reproducible_from_torch_seed(backend):
    x, w, b, a, bb = _inputs()
    torch.manual_seed(3)
    y1 = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.5, backend=backend)
    torch.manual_seed(3)
    y2 = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.5, backend=backend)
    y3 = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.5, backend=backend)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_torch_backend_dropout_mask_statistics_and_one_draw_per_pass(monkeypatch):
    """The fallback's keep-mask keeps 1 - p of the elements, follows its seed, and is drawn once in
    the forward and, through the hand-written backward, once in the backward (which needs it for
    dx and for dA)."""
    from fastlora.routes import Dropout
    from fastlora.torch_route import TorchRoute as TORCH
    seed = torch.tensor([7], dtype=torch.int64)
    for p in (0.1, 0.5):
        keep = TORCH.keep_mask(Dropout(seed, p), (64, 256), "cpu")
        assert keep.dtype == torch.bool
        # kept fraction within 5 standard deviations of 1 - p
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    assert torch.equal(TORCH.keep_mask(Dropout(seed, 0.5), (64, 256), "cpu"),
                       TORCH.keep_mask(Dropout(seed, 0.5), (64, 256), "cpu"))
    assert not torch.equal(TORCH.keep_mask(Dropout(seed, 0.5), (64, 256), "cpu"),
                           TORCH.keep_mask(Dropout(seed + 1, 0.5), (64, 256), "cpu"))

    from fastlora import torch_route
    draws = []
    draw = torch_route._draw_keep
    monkeypatch.setattr(torch_route, "_draw_keep", lambda *a: draws.append(a) or draw(*a))
    x, w, b, a, bb = _inputs()
    x.requires_grad_(True)
    a.requires_grad_(True)
    # small: autograd keeps the forward's mask; else the backward draws it again, once for dx and dA
    for autograd_from, total in ((2**26, 1), (-1, 2)):
        monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", autograd_from)
        draws.clear()
        y = fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, backend="torch")
        assert len(draws) == 1
        torch.autograd.grad(y, [x, a], torch.ones_like(y))
        assert len(draws) == total


@pytest.mark.parametrize("backend", ROUTES)
def test_empty_input_returns_empty(backend):
    x, w, b, a, bb = _inputs()
    x0 = torch.empty(0, 4, x.shape[1], device=DEVICE, requires_grad=True)
    a.requires_grad_(True)
    y = fastlora.lora_linear(x0, w, b, a, bb, 0.5, backend=backend)
    assert y.shape == (0, 4, w.shape[0])
    y.sum().backward()
    assert x0.grad.shape == x0.shape and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend", ROUTES)
def test_frozen_weight_gets_a_gradient_only_when_asked(backend):
    x, w, b, a, bb = _inputs(dtype=F64)
    w.requires_grad_(True)
    x.requires_grad_(True)
    fastlora.lora_linear(x, w, b, a, bb, 0.5, backend=backend).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(w.shape[0], x.shape[0], dtype=F64, device=DEVICE) @ x)


@pytest.mark.parametrize("backend", ROUTES)
def test_inputs_are_not_modified(backend):
    x, w, b, a, bb = _inputs()
    before = [t.clone() for t in (x, w, b, a, bb)]
    for t in (x, a, bb):
        t.requires_grad_(True)
    fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, backend=backend).sum().backward()
    assert all(torch.equal(t0, t1) for t0, t1 in zip(before, (x, w, b, a, bb)))


def test_no_grad_path_matches_autograd_path():
    x, w, b, a, bb = _inputs()
    with torch.no_grad():
        y0 = fastlora.lora_linear(x, w, b, a, bb, 0.5)
    y1 = fastlora.lora_linear(x, w, b, a.requires_grad_(True), bb, 0.5)
    assert y0.grad_fn is None and y1.grad_fn is not None
    assert torch.equal(y0, y1.detach())


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_auto_backend_uses_torch_on_cpu_and_triton_on_cuda():
    from fastlora.routes import resolve
    x = torch.zeros(2, 3, device=DEVICE)
    assert resolve("auto", x, 8) == ("triton" if DEVICE == "cuda" else "torch")
    assert resolve("auto", x, 10_000) == "torch"  # past the kernels' largest rank


@pytest.fixture
def handwritten_torch_backward(monkeypatch):
    """The torch route through its hand-written backward whatever the size (problems of a
    host-bound size otherwise let PyTorch's autograd differentiate the forward's ops)."""
    from fastlora import torch_route
    monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", -1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_three_way_bound_handwritten_torch_backward(case, handwritten_torch_backward):
    assert_within_bound(three_way(case, "torch", device=DEVICE))


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["nodrop", "drop0.4"])
def test_gradcheck_float64_handwritten_torch_backward(dropout_p, handwritten_torch_backward):
    assert gradcheck("torch", device=DEVICE, dropout_p=dropout_p)


def test_small_torch_problems_take_autograd_and_large_ones_the_function(monkeypatch):
    from fastlora import autograd, torch_route
    applied = []
    apply = autograd.LoRALinearFunction.apply
    monkeypatch.setattr(autograd.LoRALinearFunction, "apply",
                        lambda *a: applied.append(a[0].shape) or apply(*a))
    x, w, b, a, bb = _inputs()
    y = fastlora.lora_linear(x, w, b, a.requires_grad_(True), bb, 0.5, backend="torch")
    assert applied == [] and y.grad_fn.name() == "AddmmBackward0"
    monkeypatch.setattr(torch_route, "AUTOGRAD_FROM", x.shape[0] * w.shape[0] * w.shape[1] - 1)
    y = fastlora.lora_linear(x, w, b, a, bb, 0.5, backend="torch")
    assert applied == [x.shape] and "LoRALinearFunction" in y.grad_fn.name()
