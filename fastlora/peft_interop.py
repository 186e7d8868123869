"""from_peft: make an existing PEFT LoRA model's Linear layers compute with fastlora.lora_linear.

Each eligible ``peft.tuners.lora.Linear`` keeps its place, its Parameters and its state dict; only
its forward is replaced (an instance attribute shadowing the class's) by one that calls
``lora_linear(x, base.weight, base.bias, lora_A[a].weight, lora_B[a].weight, scaling[a])``, the
same function PEFT computes as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``; a DoRA layer
(``use_dora``) passes its ``lora_magnitude_vector`` as lora_linear's ``magnitude``, which computes
what PEFT's ``DoraLinearVariant`` does, dropout included. PEFT's LoRA layers over a bitsandbytes
``Linear4bit`` (QLoRA) are fused too, through ``lora_linear_4bit`` (fastlora/linear4bit.py: W
dequantized to the base's compute dtype, not kept for the backward). Whatever that forward cannot
express at call time (adapters disabled or merged, several active adapters, another LoRA variant,
DoRA over a 4-bit base, lora_bias, per-sample ``adapter_names``, an x whose dtype the base weight
does not share) goes to PEFT's own forward. Under autocast the fused path casts as nn.Linear does.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import check_model
from .arguments import FLOAT_DTYPES, check_backend
from .autocast import compute_dtype
from .functional import lora_linear
from .linear4bit import is_4bit_linear, lora_linear_4bit, weight4bit


def from_peft(peft_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make the LoRA Linear layers of ``peft_model`` (from ``peft.get_peft_model`` or
    ``PeftModel.from_pretrained``) compute with fastlora's fused path, in place; returns it.

    The layers' Parameters are shared, not copied, so an optimizer built on the model, PEFT's
    ``save_pretrained``, ``merge_adapter`` and ``disable_adapter`` keep working. LoRA layers over a
    bitsandbytes 4-bit base (NF4/FP4 ``Linear4bit``) are fused too. Layers that can never be fused
    (another layer type, a base layer that is neither a plain nn.Linear nor a 4-bit one, such as an
    8-bit one or GPT-2's Conv1D, fan_in_fan_out, hooks on the base layer) and layers whose current
    state is not fusable (a variant other than DoRA, DoRA over a 4-bit base, several active
    adapters, lora_bias, merged) keep PEFT's forward and are listed in one warning.
    """
    lora = _peft_lora("from_peft")
    check_model("from_peft", peft_model, "peft_model")
    check_backend(backend, "from_peft")
    layers = [(path, m) for path, m in peft_model.named_modules() if isinstance(m, lora.LoraLayer)]
    if not layers:
        raise ValueError(f"from_peft: peft_model ({type(peft_model).__name__}) has no PEFT LoRA "
                         f"layers; pass a model from peft.get_peft_model or PeftModel.from_pretrained")
    kept = []
    for path, layer in layers:
        reason = _never_fusable(layer, lora)
        if reason is None:
            layer.forward = _FusedForward(layer, backend)
            reason = _state_reason(layer)
        if reason is not None:
            kept.append(f"{path} ({reason})")
    if kept:
        warnings.warn(f"fastlora.from_peft: {len(kept)} of {len(layers)} LoRA layers keep PEFT's "
                      f"forward: {'; '.join(kept)}", stacklevel=2)
    return peft_model


class _FusedForward:
    """The replacement forward of one peft lora.Linear or lora.bnb.Linear4bit (a picklable,
    deep-copyable callable)."""

    def __init__(self, layer: nn.Module, backend: str):
        self.layer = layer
        self.backend = backend

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        base = layer.base_layer
        four_bit = is_4bit_linear(base)
        # x and the base weight must meet in one dtype, as in nn.Linear: their own, or under
        # autocast the autocast dtype (lora_linear then casts as nn.Linear does); a 4-bit weight
        # is dequantized to the dtype the layer computes in
        if (args or any(v is not None for v in kwargs.values()) or _state_reason(layer) is not None
                or _base_reason(base) is not None or not torch.is_tensor(x)
                or (not four_bit and compute_dtype(x) != compute_dtype(base.weight))):
            return type(layer).forward(layer, x, *args, **kwargs)
        name = next(a for a in layer.active_adapters if a in layer.lora_A)
        dropout = layer.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        magnitude, training = None, dropout.training
        if _is_dora(layer, name):
            magnitude = layer.lora_magnitude_vector[name].weight
            # PEFT's DoRA drops x only when the layer itself trains too (DoraLinearVariant.forward)
            training = training and layer.training
        if four_bit:  # (_state_reason keeps DoRA over a 4-bit base on PEFT's forward)
            return lora_linear_4bit(x, weight4bit(base), base.bias, layer.lora_A[name].weight,
                                    layer.lora_B[name].weight, layer.scaling[name], dropout_p=p,
                                    training=training, backend=self.backend,
                                    compute_dtype=getattr(base, "compute_dtype", None))
        return lora_linear(x, base.weight, base.bias, layer.lora_A[name].weight,
                           layer.lora_B[name].weight, layer.scaling[name], dropout_p=p,
                           training=training, backend=self.backend, magnitude=magnitude)


def _is_dora(layer: nn.Module, name: str) -> bool:
    """True when adapter ``name`` of ``layer`` is DoRA (PEFT's use_dora: a magnitude vector, and
    the DoRA variant computing with it)."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    magnitudes = getattr(layer, "lora_magnitude_vector", {})
    return (type(variant).__name__ == "DoraLinearVariant" and name in magnitudes
            and magnitudes[name].weight.dim() == 1)


def _never_fusable(layer: nn.Module, lora) -> str | None:
    """Why ``layer`` can never take the fused path, or None."""
    if type(layer) is not lora.Linear and type(layer) is not _peft_linear_4bit():
        return f"{type(layer).__name__}: only LoRA Linear layers are fused"
    # a _FusedForward is from_peft's own, from an earlier call: it is replaced (new backend)
    if "forward" in layer.__dict__ and not isinstance(layer.__dict__["forward"], _FusedForward):
        return "its forward is already replaced, e.g. by accelerate hooks"
    reason = _base_reason(layer.base_layer)
    if reason is None and layer.fan_in_fan_out:
        reason = "fan_in_fan_out"
    return reason


def _base_reason(base: nn.Module) -> str | None:
    """Why the fused path cannot stand in for ``base``'s own forward, or None."""
    hooked = (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__
              or hasattr(base, "_hf_hook"))
    if is_4bit_linear(base):
        return "its base layer has hooks, e.g. accelerate offloading" if hooked else None
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if hooked:
        return "its base layer has hooks, e.g. accelerate offloading"
    if type(base.weight.data) is not torch.Tensor or base.weight.dtype not in FLOAT_DTYPES:
        return f"base weight is {type(base.weight.data).__name__} of {base.weight.dtype}, e.g. quantized"
    return None


def _state_reason(layer: nn.Module) -> str | None:
    """Why ``layer``'s current adapter state is not the plain LoRA the fused path computes, or None."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    # getattr: older PEFT releases lack lora_variant and lora_bias
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and not _is_dora(layer, name):
        return type(variant).__name__
    if getattr(layer, "use_dora", {}).get(name) and not _is_dora(layer, name):
        return "DoRA without PEFT's DoRA variant (an older PEFT)"
    if _is_dora(layer, name) and is_4bit_linear(layer.get_base_layer()):
        return "DoRA over a 4-bit base"
    if _is_dora(layer, name):  # what lora_linear refuses for DoRA (fastlora/arguments.py)
        weight, r = layer.get_base_layer().weight, layer.lora_A[name].weight.shape[0]
        if r > min(weight.shape):
            return f"DoRA with r={r} > min(in_features, out_features)={min(weight.shape)}"
        if weight.requires_grad:
            return "DoRA with a trainable base weight"
    if getattr(layer, "lora_bias", {}).get(name):
        return "lora_bias"
    if type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _peft_linear_4bit():
    """PEFT's LoRA layer class over bitsandbytes' Linear4bit, or None (PEFT defines it only where
    bitsandbytes imports)."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def _peft_lora(caller: str):
    try:
        from peft.tuners import lora
    except ImportError as err:
        raise ImportError(f"{caller} needs the peft package: pip install peft (or, from a fastlora "
                          f"checkout, pip install -e '.[peft]')") from err
    return lora
