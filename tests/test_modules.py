"""LoRALinear: PEFT-compatible parameters and initialisation, sharing in from_linear, training."""
import math

import pytest
import torch
from torch import nn

import fastlora
from helpers import BACKENDS, DEVICE, DoubledLinear, TaggedLinear
from fastlora.reference import LoRALinearReference, lora_linear_reference


def test_fresh_layer_equals_its_base_and_only_adapters_train():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 8, r=4, alpha=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4


def test_scaling_and_rslora():
    assert fastlora.LoRALinear(8, 8, r=16, alpha=32).scaling == 2.0
    assert fastlora.LoRALinear(8, 8, r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_gaussian_and_random_init():
    torch.manual_seed(0)
    g = fastlora.LoRALinear(512, 8, r=4, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 4) < 0.02 and not g.lora_B.any()
    r = fastlora.LoRALinear(512, 8, r=4, init_lora_weights=False)
    assert r.lora_B.abs().sum() > 0


def test_from_linear_shares_weights_and_freezes_them():
    lin = nn.Linear(12, 6)
    layer = fastlora.LoRALinear.from_linear(lin, r=2, alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert (layer.in_features, layer.out_features, layer.scaling) == (12, 6, 2.0)
    nobias = fastlora.LoRALinear.from_linear(nn.Linear(12, 6, bias=False), r=2)
    assert nobias.bias is None
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        fastlora.LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("kw,match", [(dict(use_rslora=1), "use_rslora must be True or False, got 1"),
                                      (dict(use_rslora="yes"), "use_rslora must be True or False, got 'yes'"),
                                      (dict(use_rslora=None), "use_rslora must be True or False, got None"),
                                      (dict(alpha=10 ** 400), "alpha must be a finite number, got 1000")])
def test_use_rslora_must_be_a_bool_and_alpha_a_float(kw, match):
    """As load_adapter demands of adapter_config.json: a truthy "yes" must not switch rsLoRA on."""
    with pytest.raises(ValueError, match=match):
        fastlora.LoRALinear(8, 4, **kw)
    with pytest.raises(ValueError, match=match):
        fastlora.LoRALinear.from_linear(nn.Linear(8, 4), **kw)
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=match):
        fastlora.apply_lora(lin, "all-linear", **kw)
    assert lin.weight.requires_grad  # untouched


def test_from_linear_refuses_a_subclass_with_its_own_forward():
    with pytest.raises(TypeError, match=r"LoRALinear.from_linear: linear is a DoubledLinear, whose "
                                        r"forward is not nn.Linear's"):
        fastlora.LoRALinear.from_linear(DoubledLinear(8, 4))
    lin = TaggedLinear(8, 4)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fastlora.LoRALinear.from_linear(lin)(x), lin(x), rtol=0, atol=0)


def test_base_checkpoint_loads_unchanged():
    lin = nn.Linear(12, 6)
    layer = fastlora.LoRALinear(12, 6, r=2)
    missing, unexpected = layer.load_state_dict(lin.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    assert torch.equal(layer.weight, lin.weight)


def test_repr_and_parameter_counts():
    layer = fastlora.LoRALinear(64, 32, r=4, alpha=8, backend="torch")
    text = repr(layer)
    for part in ("in_features=64", "out_features=32", "r=4", "alpha=8", "backend='torch'"):
        assert part in text
    counts = fastlora.count_parameters(layer)
    assert counts == (4 * 64 + 32 * 4, 64 * 32 + 32 + 4 * 64 + 32 * 4)
    assert str(counts).startswith("trainable params: 384 || all params: 2,464")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_reference_layer_in_training(backend):
    torch.manual_seed(0)
    ref = LoRALinearReference(24, 10, r=4, alpha=8).double().to(DEVICE)
    nn.init.normal_(ref.lora_B)
    layer = fastlora.LoRALinear(24, 10, r=4, alpha=8, backend=backend, dtype=torch.float64, device=DEVICE)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24, dtype=torch.float64, device=DEVICE)
    for m in (ref, layer):
        m(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, ref.lora_A.grad)
    torch.testing.assert_close(layer.lora_B.grad, ref.lora_B.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_few_steps_lower_the_loss(backend):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(DEVICE)
    layer = fastlora.LoRALinear.from_linear(lin, r=4, alpha=4, backend=backend)
    delta = torch.randn(16, 2, device=DEVICE) @ torch.randn(2, 32, device=DEVICE) * 0.3
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=2e-2)
    x = torch.randn(64, 32, device=DEVICE)
    target = lin(x).detach() + x @ delta.T
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert lin.weight.grad is None


def test_reference_function_reads_like_the_equation():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    a, bb = torch.randn(2, 6), torch.randn(3, 2)
    keep = torch.rand(4, 6) > 0.5
    y = lora_linear_reference(x, w, b, a, bb, 0.5, dropout_mask=keep, dropout_p=0.5, upcast=True)
    assert y.dtype == torch.float64
    xd = x.double() * keep / 0.5
    torch.testing.assert_close(y, x.double() @ w.double().T + b.double()
                               + 0.5 * xd @ a.double().T @ bb.double().T)
