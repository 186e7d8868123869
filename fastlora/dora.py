"""DoRA's weight norm: ||W + s B A|| per output feature, without forming W + s B A.

    ||W_n + s (B A)_n||^2 = ||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T

- ``||W_n||^2`` depends on the frozen weight only: computed once and cached, keyed on the weight's
  version counter, data pointer, shape, strides, dtype and device (an in-place write, a new storage
  or a move makes a new entry). The cache holds the weight weakly: an entry dies with its weight.
- ``W A^T`` [out, r] is one skinny pass over W a step (A changes every step): the route's
  ``weight_product`` (a Triton pass over W on the GPU, which also gives ``||W_n||^2`` on a cache
  miss; a BLAS product on the torch route).
- the Gram ``A A^T`` [r, r] and the rest are [out, r]-sized.

The products run in x's dtype, as lora_linear's (A and B are cast to it first), and everything is
summed in the accumulator dtype (float32, float64 for float64). fastlora/autograd.py derives what
the norm is used for; it is a constant of the backward.

An in-place write through ``weight.data`` is invisible to the version counter (that is what
``.data`` is for): after one, call ``forget_weight_norms()``, or write under ``torch.no_grad()``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from .routes import acc_dtype

# weight -> (key, ||W_n||^2): see the module docstring.
_SQUARED_NORMS = WeakTensorKeyDictionary()


def _key(weight: Tensor) -> tuple:
    return (weight._version, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype,
            weight.device)


def cached_squared_norms(weight: Tensor) -> Tensor | None:
    """``||W_n||^2`` [out] from the cache, or None when it holds none for the weight as it is."""
    if weight.is_inference() or weight.device.type == "meta":  # no version counter / no data
        return None
    hit = _SQUARED_NORMS.get(weight)
    return hit[1] if hit is not None and hit[0] == _key(weight) else None


def remember_squared_norms(weight: Tensor, squared: Tensor) -> None:
    """Cache ``squared`` (= ``||W_n||^2``) for the weight as it is now."""
    if not (weight.is_inference() or weight.device.type == "meta"):
        _SQUARED_NORMS[weight] = (_key(weight), squared)


def forget_weight_norms() -> None:
    """Empty the cache of ``||W_n||^2`` (needed only after writing into a weight through ``.data``)."""
    _SQUARED_NORMS.clear()


def weight_norm(route, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """||W + s B A|| per output feature [out], in the accumulator dtype, detached (see the module
    docstring); ``route`` supplies W A^T (and ||W_n||^2 when the cache has none)."""
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        a = lora_A if lora_A.dtype == weight.dtype else lora_A.to(weight.dtype)
        squared = cached_squared_norms(weight)
        wa, fresh = route.weight_product(weight, a, need_sq=squared is None)
        if squared is None:
            squared = fresh
            remember_squared_norms(weight, squared)
        a = a.to(acc)
        b = lora_B.to(weight.dtype).to(acc)
        gram = a @ a.T                                                     # [r, r]
        cross = (b * wa).sum(1)                                            # B_n . (W A^T)_n
        quad = ((b @ gram) * b).sum(1)                                     # B_n (A A^T) B_n^T
        total = squared + (2.0 * scaling) * cross + (scaling * scaling) * quad
        # rounding can take a (numerically) zero norm below zero
        return total.clamp_min_(0.0).sqrt_()


def merged_scale(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """(W + s B A, m / ||W + s B A||_row) formed directly in float32 (float64 if any input is),
    for merging: W' = g o (W + s B A)."""
    acc = torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype, lora_B.dtype,
                                             magnitude.dtype) else torch.float32
    with torch.no_grad():
        w = torch.addmm(weight.to(acc), lora_B.to(acc), lora_A.to(acc), alpha=scaling)
        return w, magnitude.to(acc) / torch.linalg.vector_norm(w, dim=1)
