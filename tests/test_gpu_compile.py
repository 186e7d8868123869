"""GPU-only checks of the production features with the compiled Triton kernels: opcheck, torch.compile
(fullgraph, inductor, dynamic shapes), CUDA autocast in bfloat16 and float16 (the interpreter's bf16
arithmetic is wrong, so CI cannot check these), activation checkpointing with dropout, inference.
CI runs the same features on the CPU in test_compile.py, test_autocast.py, test_checkpoint.py and
test_inference.py."""
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import fastlora
from helpers import HAS_CUDA, HAS_TRITON

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
OP = torch.ops.fastlora.lora_linear.default
BACKWARD_OP = torch.ops.fastlora.lora_linear_backward.default


def _rand(*shape, dtype=BF16, grad=False, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype,p", [(BF16, 0.0), (BF16, 0.1), (F32, 0.0), (F16, 0.2)],
                         ids=["bf16", "bf16-p0.1", "fp32", "fp16-p0.2"])
@pytest.mark.parametrize("M", [300, 0])
def test_opcheck_triton_on_cuda(dtype, p, M):
    torch.manual_seed(0)
    K, N, r = 256, 192, 16
    x = _rand(M, K, dtype=dtype, grad=True)
    w, b = _rand(N, K, dtype=dtype, scale=K ** -0.5), _rand(N, dtype=dtype, grad=True)
    a, bb = _rand(r, K, dtype=F32, grad=True, scale=K ** -0.5), _rand(N, r, dtype=F32, grad=True)
    seed = torch.tensor([99], dtype=torch.int64, device="cuda") if p else None
    torch.library.opcheck(OP, (x, w, b, a, bb, 0.5, p, seed, "triton"))
    y, xa, _ = OP(x.detach(), w, b, a.detach(), bb.detach(), 0.5, p, seed, "triton")
    torch.library.opcheck(BACKWARD_OP, (torch.randn_like(y), x.detach(), w, a.detach(), bb.detach(),
                                        xa, seed, 0.5, p, "triton", [True, False, True, True, True, False],
                                        None, None, []))
    m = _rand(N, dtype=F32, grad=True) + 1.0  # DoRA's magnitude
    torch.library.opcheck(OP, (x, w, b, a, bb, 0.5, p, seed, "triton", m.detach().requires_grad_(True)))


def _model(p, dtype=BF16, backend="triton"):
    torch.manual_seed(0)
    kw = dict(r=16, alpha=32, dropout=p, backend=backend, init_lora_weights=False, device="cuda",
              dtype=dtype)
    return nn.Sequential(fastlora.LoRALinear(512, 1024, **kw), nn.GELU(),
                         fastlora.LoRALinear(1024, 512, bias=False, **kw))


def _run(model, x, seed=1, autocast=None, params=None):
    """Output and the gradients of x and of every trainable parameter (of ``params``, default
    ``model``) for one forward (under ``autocast``'s dtype, if given) and backward."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=autocast or BF16, enabled=autocast is not None):
        y = model(x)
    params = [p for p in (params or model).parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    y.float().square().sum().backward()  # not autograd.grad: reentrant checkpoint refuses it
    return y.detach(), [x.grad] + [p.grad for p in params]


def _close(a, b, dtype):
    tol = {BF16: 2e-2, F16: 2e-3, F32: 1e-4}[dtype]
    scale = b.float().abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_compiled_model_matches_eager_on_cuda(dtype, p, fresh_dynamo):
    model = _model(p, dtype)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = _rand(4, 128, 512, dtype=dtype)
    with torch._inductor.config.patch(fallback_random=True):
        y_c, g_c = _run(compiled, x)
    y_e, g_e = _run(model, x)
    _close(y_c, y_e, dtype)
    for a, b in zip(g_c, g_e):
        _close(a, b, dtype)
    assert counters["stats"]["unique_graphs"] == 1


def test_dynamic_shapes_on_cuda(fresh_dynamo):
    model = _model(0.0)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for bsz, seq in [(2, 64), (3, 100), (2, 257), (5, 77)]:
        x = _rand(bsz, seq, 512)
        y_c, g_c = _run(compiled, x)
        y_e, g_e = _run(model, x)
        _close(y_c, y_e, BF16)
        for a, b in zip(g_c, g_e):
            _close(a, b, BF16)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_cuda_autocast_casts_inputs(dtype):
    """Under CUDA autocast the layer (float32 parameters) computes exactly what it computes on
    inputs cast by hand, and the parameters get float32 gradients of that computation."""
    layer = _model(0.0, dtype=F32)[0]
    x = torch.randn(3, 100, 512, device="cuda")
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(xi)
    y.float().square().sum().backward()
    assert y.dtype == dtype and xi.grad.dtype == layer.lora_A.grad.dtype == F32

    xc = x.to(dtype).requires_grad_(True)
    a = layer.lora_A.detach().to(dtype).requires_grad_(True)
    b = layer.lora_B.detach().to(dtype).requires_grad_(True)
    y_ref = fastlora.lora_linear(xc, layer.weight.to(dtype), layer.bias.to(dtype), a, b,
                                 layer.scaling, backend="triton")
    y_ref.float().square().sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(layer.lora_A.grad, a.grad.float())
    assert torch.equal(layer.lora_B.grad, b.grad.float())
    assert torch.equal(xi.grad, xc.grad.float())


def test_cuda_autocast_under_compile(fresh_dynamo):
    model = _model(0.0, dtype=F32)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(2, 64, 512, device="cuda")
    y_c, g_c = _run(compiled, x, autocast=BF16)
    y_e, g_e = _run(model, x, autocast=BF16)
    assert y_c.dtype == BF16 and all(g.dtype == F32 for g in g_c)
    _close(y_c, y_e, BF16)
    for a, b in zip(g_c, g_e):
        _close(a, b, BF16)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpoint_with_dropout_on_cuda(reentrant):
    model = _model(0.1)
    x = _rand(2, 128, 512)
    _, plain = _run(model, x, seed=3)

    def checkpointed(x):
        for layer in model:
            x = checkpoint(layer, x, use_reentrant=reentrant)
        return x

    _, grads = _run(checkpointed, x, seed=3, params=model)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads))


def test_inference_mode_saves_nothing_on_cuda():
    model = _model(0.1)
    saved = []
    with torch.inference_mode(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t,
                                                                           lambda t: t):
        y = model(_rand(2, 64, 512))
    assert not saved and y.grad_fn is None and y.is_inference()
