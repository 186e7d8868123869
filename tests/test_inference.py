"""Inference: under torch.inference_mode(), torch.no_grad(), or when nothing requires grad, the layer
saves nothing for backward and builds no graph; in training it does (so the count can fail)."""
import contextlib

import pytest
import torch

import fastlora
from helpers import BACKENDS, DEVICE


class SaveCounter:
    """Counts the tensors autograd saves for backward while active."""

    def __init__(self):
        self.saved = 0

    def pack(self, t):
        self.saved += 1
        return t

    @contextlib.contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


def _layer(backend, frozen_adapters=False):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 12, r=4, dropout=0.2, backend=backend, init_lora_weights=False,
                                device=DEVICE)
    if frozen_adapters:
        layer.requires_grad_(False)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "nothing_requires_grad", "eval_no_grad"])
def test_nothing_saved_without_grad(backend, mode):
    layer = _layer(backend, frozen_adapters=mode == "nothing_requires_grad")
    if mode == "eval_no_grad":
        layer.eval()
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(
        mode.replace("eval_", ""), contextlib.nullcontext)
    x = torch.randn(3, 5, 16, device=DEVICE)
    with ctx(), SaveCounter()() as counter:
        y = layer(x)
    assert counter.saved == 0
    assert y.grad_fn is None and not y.requires_grad
    if mode == "inference_mode":
        assert y.is_inference()


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_saves_for_backward(backend):
    """The positive control: the counter sees what the backward keeps when the adapters train (the
    Function's x, weight, A, B, xa and seed; for a small torch-route call, what autograd keeps of
    the forward's products for the adapters' gradients: drop(x), xa, B)."""
    layer = _layer(backend)
    with SaveCounter()() as counter:
        y = layer(torch.randn(3, 5, 16, device=DEVICE))
    assert counter.saved >= 3 and y.grad_fn is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_output_equals_training_output(backend):
    layer = _layer(backend).eval()
    x = torch.randn(7, 16, device=DEVICE)
    with torch.inference_mode():
        y_inf = layer(x)
    assert torch.equal(y_inf, layer(x).detach())
