"""fastlora.lora_linear: the public function. It checks its arguments, draws the dropout seed and
hands the call to the eager autograd.Function or, under torch.compile, to the registered operator
(fastlora/autograd.py has the computation and its derivation)."""
from __future__ import annotations

import torch

from . import operators
from .arguments import check_lora_args
from .autograd import run_eager


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = True, backend: str = "auto",
                magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused; with ``magnitude``, DoRA.

    Args:
        x: [..., in_features], float16/bfloat16/float32/float64.
        weight: [out_features, in_features], x's dtype (the frozen base; gets a gradient only if it
            requires one).
        bias: [out_features] in x's dtype, or None.
        lora_A: [r, in_features]; lora_B: [out_features, r]. Any float dtype (float32 adapters over
            a 16-bit base are common); the products run in x's dtype and their gradients come back
            in the adapters' own dtype.
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA), finite and within x's dtype's range.
        dropout_p: dropout on the LoRA branch's input, in [0, 1); applied only when ``training``.
        backend: "auto" (the Triton routes for CUDA tensors when triton is installed, else PyTorch),
            "triton" (the Triton routes, chosen per call from measured data), "fused" or "split"
            (one Triton route), or "torch" (plain PyTorch). fastlora/routes.py describes them.
        magnitude: DoRA's trained magnitude m [out_features] (any float dtype, on x's device; its
            gradient comes back in its dtype), or None for plain LoRA. Then, as PEFT's
            ``use_dora=True``: y = g o (x W^T + s (x A^T) B^T) + b with g = m / ||W + s B A||_row, the
            norm a constant of the backward; under dropout the base product is recomputed on the
            dropped input as PEFT does (fastlora/autograd.py derives both; docs/dora.md). The
            weight must not require grad, and r must not exceed min(in_features, out_features).

    Under ``torch.autocast`` it behaves as ``nn.Linear``: x, weight, bias and the adapters are cast
    to the autocast dtype (float64 tensors are left alone), so x and weight may then differ in dtype.
    """
    scaling, dropout_p = check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend,
                                         magnitude)
    p = dropout_p if training else 0.0
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # the routes take any row stride, but need unit stride along K
    # The seed is drawn here, from torch's generator, not inside the operator: torch.compile then
    # traces the draw, and activation checkpointing's RNG replay gives the recompute the same mask.
    seed = draw_seed(x.device) if p > 0 else None
    args = (x2, weight, bias, lora_A, lora_B, scaling, p, seed, backend, magnitude)
    y = operators.run_compiled(*args) if torch.compiler.is_compiling() else run_eager(*args)
    # As F.linear: a 2-D x gives y itself, not a view of it (FSDP2 warns about view outputs, since
    # an in-place op on one would bypass its backward hook).
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's generator for ``device`` (so torch.manual_seed reproduces it),
    kept on the device: drawing it does not synchronise. On the meta device, a meta tensor."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
