"""What callers pass, and how it is checked: one definition of each rule, shared by
``lora_linear``, ``LoRALinear`` and the model helpers. Every check runs before any kernel launches
and names the argument, what was expected and what was given."""
from __future__ import annotations

import math
import numbers
import operator

import torch

from .autocast import compute_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# "triton" is the Triton routes, chosen per call; "fused" and "split" force one; "torch" is the
# plain-PyTorch fallback (fastlora/routes.py).
BACKENDS = ("auto", "triton", "fused", "split", "torch")


def is_finite_number(value) -> bool:
    """True for a real number (numpy scalars too; not a bool) that a float holds as a finite
    value; an int too large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def finite_number(value, name: str, caller: str) -> float:
    """``value`` as a finite float (``is_finite_number``), else a ValueError naming it."""
    if not is_finite_number(value):
        raise ValueError(f"{caller}: {name} must be a finite number, got {value!r}")
    return float(value)


def positive_int(value, name: str, caller: str) -> int:
    """``value`` as an int >= 1: any integral number (numpy integers too), not a bool."""
    try:
        n = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}")
    return n


def probability(value, name: str, caller: str) -> float:
    """``value`` as a float in [0, 1): a dropout probability."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{caller}: {name} must be in [0, 1), got {value!r}")
    return float(value)


def check_backend(backend, caller: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """The LoRA scaling s: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


_LARGEST = {dtype: torch.finfo(dtype).max for dtype in FLOAT_DTYPES}


def check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                    backend, magnitude=None) -> tuple[float, float]:
    """Every mistake a caller of lora_linear can make; returns (scaling, dropout_p) as floats.
    (On every call: the common case takes the cheap branches.)"""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _LARGEST:
            raise TypeError(f"lora_linear: {name} must be float16, bfloat16, float32 or float64, "
                            f"got {t.dtype}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"lora_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    # Under autocast x, weight and bias are cast to one dtype first, as nn.Linear does: compare
    # the dtypes they will have.
    x_dtype = compute_dtype(x)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype) or x_dtype != x.dtype:
        if compute_dtype(weight) != x_dtype:
            raise TypeError(f"lora_linear: x and weight must share a dtype, got x {x.dtype} and "
                            f"weight {weight.dtype}")
        if bias is not None and compute_dtype(bias) != x_dtype:
            raise TypeError(f"lora_linear: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension [..., in_features], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D [out_features, in_features], "
                         f"got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if in_f == 0 or out_f == 0:
        raise ValueError(f"lora_linear: weight must have non-zero in and out features, got shape "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x's last dimension must equal weight's in_features {in_f}, "
                         f"got x of shape {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_linear: lora_A must be [r, in_features] = [r >= 1, {in_f}], got shape "
                         f"{tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[0] != out_f or lora_B.shape[1] != r:
        raise ValueError(f"lora_linear: lora_B must be [out_features, r] = [{out_f}, {r}], got shape "
                         f"{tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"lora_linear: bias must be [out_features] = [{out_f}], got shape "
                         f"{tuple(bias.shape)}")
    device = x.device
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {device}; "
                             f"all tensors must be on one device")
    if not (type(scaling) is float and math.isfinite(scaling)):
        scaling = finite_number(scaling, "scaling", "lora_linear")
    if abs(scaling) > _LARGEST[x_dtype]:
        raise ValueError(f"lora_linear: scaling must fit the compute dtype {x_dtype} (|scaling| <= "
                         f"{_LARGEST[x_dtype]:g}), got {scaling!r}")
    if not (type(dropout_p) is float and 0.0 <= dropout_p < 1.0):
        dropout_p = probability(dropout_p, "dropout_p", "lora_linear")
    if backend not in BACKENDS:
        check_backend(backend, "lora_linear")
    if magnitude is not None:
        check_magnitude(magnitude, weight, r, "lora_linear")
    return scaling, dropout_p


def check_magnitude(magnitude, weight, r: int, caller: str) -> None:
    """DoRA's rules: the magnitude a float tensor [out_features] on the weight's device, the rank at
    most min(in_features, out_features), the weight frozen (no weight gradient is computed)."""
    out_f, in_f = weight.shape
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"{caller}: magnitude must be a torch.Tensor or None, got {type(magnitude).__name__}")
    if magnitude.dtype not in _LARGEST:
        raise TypeError(f"{caller}: magnitude must be float16, bfloat16, float32 or float64, got "
                        f"{magnitude.dtype}")
    if magnitude.dim() != 1 or magnitude.shape[0] != out_f:
        raise ValueError(f"{caller}: magnitude must be [out_features] = [{out_f}], got shape "
                         f"{tuple(magnitude.shape)}")
    if magnitude.device != weight.device:
        raise ValueError(f"{caller}: magnitude is on {magnitude.device} but the weight is on "
                         f"{weight.device}; all tensors must be on one device")
    if r > min(in_f, out_f):
        raise ValueError(f"{caller}: DoRA needs r <= min(in_features, out_features) = {min(in_f, out_f)}, "
                         f"got r={r}: B A cannot have a larger rank, so the extra rank only costs")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{caller}: DoRA computes no gradient for the weight, which requires one "
                         f"(got weight.requires_grad=True); freeze it (PEFT does), or use plain LoRA")
