"""The plain-PyTorch route (backend="torch"): the CPU fallback, and a route on any device.

A few BLAS calls (addmm with the scaling as its alpha, so that each product is rounded once) and
no [M, N] temporaries beyond y and dx. The low-rank term is written first and the big GEMM
accumulates onto it (addmm_ with beta=1): BLAS then reads the output once inside a compute-bound
GEMM instead of a memory-bound rank-r update re-reading and re-writing all of y or dx
(benchmarks/NOTES.md has the measurement). fastlora/autograd.py derives what is computed.

Problems of at most ``AUTOGRAD_FROM`` multiply-adds (M K N) are bound by host time, not by the
products: there eager calls run ``autograd_forward``, the same forward ops recorded by PyTorch's
autograd, whose C++ nodes compute the same backward without the Python of a hand-written one (the
crossover, measured by benchmarks/cpu_host.py: benchmarks/NOTES.md).
"""
from __future__ import annotations

import math

import torch

from .routes import Dropout, Grads, Needs, acc_dtype


def _draw_keep(seed: int, p: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Keep each element with probability 1 - p, from ``seed``. On the CPU from numpy's PCG64, 32
    bits an element (two from each 64-bit draw), faster than torch's CPU ``rand`` (README's CPU
    section has the measurement); on other devices torch's generator for the device."""
    if device.type == "cpu":
        import numpy as np  # only the CPU's dropout draws with it

        n = math.prod(shape)
        bits = np.random.PCG64(seed % 2**64).random_raw((n + 1) // 2).view(np.uint32)[:n]
        return torch.from_numpy(bits.reshape(shape) >= np.uint32(min(round(p * 2**32), 2**32 - 1)))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (a no-op ``.to`` costs host time on every call)."""
    return t if t.dtype == dtype else t.to(dtype)


def addmm_scaled(base: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, alpha: float, *,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """base + alpha * (a @ b) as a new tensor (base may be None: zero; ``scratch``, any tensor of
    a's dtype and device, then stands in as addmm's ignored input). With alpha == 0 BLAS skips the
    product, which would hide the NaN and Inf that alpha * (a @ b) holds where a or b does: the
    product is then computed and scaled, as the reference computes it."""
    if alpha == 0:
        out = (a @ b).mul_(0.0)
        return out if base is None else out.add_(base)
    if base is None:  # beta=0: the input is ignored, NaN in it included
        return torch.addmm(a.new_empty(()) if scratch is None else scratch, a, b, beta=0, alpha=alpha)
    return torch.addmm(base, a, b, alpha=alpha)


# M * K * N up to which eager calls take ``autograd_forward`` (the crossover measured on the CPU).
AUTOGRAD_FROM = 2**26


class TorchRoute:
    """Plain PyTorch; see the module docstring."""

    name = "torch"

    @staticmethod
    def host_bound(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """True when a call on x [M, K] is small enough for ``autograd_forward``."""
        return x.shape[0] * weight.shape[0] * weight.shape[1] <= AUTOGRAD_FROM

    def autograd_forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout):
        """y from the forward's own ops, for PyTorch's autograd to differentiate (the dropout mask
        is drawn once and kept by autograd, with drop(x): small problems only)."""
        xa = torch.nn.functional.linear(self._drop(x, dropout), as_dtype(lora_A, x.dtype))
        y = addmm_scaled(bias, xa, as_dtype(lora_B, x.dtype).T, scaling)
        return torch.addmm(y, x, weight.T)  # out of place: autograd's in-place bookkeeping costs more

    @staticmethod
    def xa_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    @staticmethod
    def keep_mask(dropout: Dropout, shape, device) -> torch.Tensor:
        """The boolean keep-mask for a 2-D x of ``shape``, from ``dropout.seed``; drawn once per
        pass (``dropout.cache``), since the backward needs it twice. On the meta device, a meta
        tensor (shapes only)."""
        device = torch.device(device)
        if device.type == "meta":
            return torch.empty(tuple(shape), dtype=torch.bool, device=device)
        key = (tuple(shape), str(device))
        if key not in dropout.cache:
            dropout.cache[key] = _draw_keep(int(dropout.seed.item()), dropout.p, tuple(shape), device)
        return dropout.cache[key]

    def _drop(self, x: torch.Tensor, dropout: Dropout | None) -> torch.Tensor:
        """drop(x) = x * keep / (1 - p), each element rounded once, as the reference computes it.
        The 1/(1-p) factor is applied apart from the 0/1 mask: rounded into a 16-bit mask it would
        bias every kept value (1/0.75 is 1.33301 in float16)."""
        if dropout is None:
            return x
        return (x * self.keep_mask(dropout, x.shape, x.device)).div_(1.0 - dropout.p)

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout):
        xa = self._drop(x, dropout) @ as_dtype(lora_A, x.dtype).T
        y = addmm_scaled(bias, xa, as_dtype(lora_B, x.dtype).T, scaling)
        return y.addmm_(x, weight.T), xa

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs) -> Grads:
        dx = da = db = None
        scratch = dy.new_empty(())  # addmm's ignored input, for the three products below
        if needs.x or needs.lora_A:
            dyb = dy @ as_dtype(lora_B, dy.dtype)
        keep = (self.keep_mask(dropout, x.shape, x.device)
                if dropout is not None and (needs.x or needs.lora_A) else None)
        scale = scaling if dropout is None else scaling / (1.0 - dropout.p)
        if needs.x:
            dx = addmm_scaled(None, dyb, as_dtype(lora_A, dy.dtype), scale, scratch=scratch)
            if keep is not None:
                dx.mul_(keep)
            dx = dx.addmm_(dy, weight)
        # dA and dB scale inside the GEMM (addmm's alpha, applied before its one rounding to x's
        # dtype), as the kernels do; scaling the rounded 16-bit product and rounding it again to
        # the adapters' dtype costs up to an ulp more, past PyTorch's own error.
        if needs.lora_A:
            xd = x if keep is None else x * keep  # x * keep is exact; 1/(1-p) joins the scaling
            da = as_dtype(addmm_scaled(None, dyb.T, xd, scale, scratch=scratch), acc_dtype(x.dtype))
        if needs.lora_B:
            # (xa^T dy)^T: BLAS streams dy row-major this way round
            db = as_dtype(addmm_scaled(None, as_dtype(xa, dy.dtype).T, dy, scaling,
                                       scratch=scratch).T, acc_dtype(dy.dtype))
        return Grads(dx, da, db)
