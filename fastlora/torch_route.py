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

DoRA (fastlora/autograd.py): the forward applies g to y in one elementwise pass before the bias
(``scale_columns``); the backward is LoRA's for dY' = g o dY, with g taken on the small side where
it can (dY' B = dY (g o B), dY'^T xa = g o (dY^T xa)) and dY' formed only for the dX product; the
magnitude's sum is one reduction over an accumulator-dtype [M, N] temporary (the plain route's
simplicity over memory; the Triton routes keep no such temporary).
"""
from __future__ import annotations

import math

import torch

from .routes import Dropout, Grads, Needs, acc_dtype, triton_kernels


def draws_kernels_mask(device: torch.device) -> bool:
    """Whether the torch route's dropout mask on ``device`` is the one the Triton kernels
    regenerate (CUDA with triton installed), so that its passes and theirs can serve one step."""
    return device.type == "cuda" and triton_kernels() is not None


def _draw_keep(seed: torch.Tensor, p: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Keep each element with probability 1 - p, from ``seed`` (int64 tensor [1] on ``device``).
    On the CPU from numpy's PCG64, 32 bits an element (two from each 64-bit draw), faster than
    torch's CPU ``rand`` (README's CPU section has the measurement). On CUDA the Triton kernels'
    Philox mask, drawn on the GPU from the seed where it lies: no host synchronisation, and the
    mask every Triton route regenerates, so the passes of one step may mix the families (the
    route table's choice, fastlora/triton_routes.py). Elsewhere (and on CUDA without triton)
    torch's generator for the device, seeded from the seed's value: a synchronisation a pass."""
    if draws_kernels_mask(device) and len(shape) == 2:
        return triton_kernels().dropout_mask(seed, shape, p)
    if device.type == "cpu":
        import numpy as np  # only the CPU's dropout draws with it

        n = math.prod(shape)
        bits = np.random.PCG64(int(seed.item()) % 2**64).random_raw((n + 1) // 2).view(np.uint32)[:n]
        return torch.from_numpy(bits.reshape(shape) >= np.uint32(min(round(p * 2**32), 2**32 - 1)))
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()))
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


def scale_columns(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = scale o y + bias in place (scale [N] per column, computed in the wider dtype and rounded
    once to y's): DoRA's g applied after a product that could not apply it."""
    if bias is None:
        return y.mul_(scale)
    return torch.addcmul(bias, y, scale, out=y)


def scaled_rows_copy(dy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale o dy (scale [N] per column) as a new tensor in dy's dtype, each element rounded once:
    DoRA's dY'."""
    return torch.mul(dy, scale, out=torch.empty_like(dy, memory_format=torch.contiguous_format))


# M * K * N up to which eager calls take ``autograd_forward`` (the crossover measured on the CPU).
AUTOGRAD_FROM = 2**26


class TorchRoute:
    """Plain PyTorch; see the module docstring."""

    name = "torch"

    @staticmethod
    def host_bound(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """True when a call on x [M, K] is small enough for ``autograd_forward``."""
        return x.shape[0] * weight.shape[0] * weight.shape[1] <= AUTOGRAD_FROM

    def autograd_forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, scale=None):
        """y from the forward's own ops, for PyTorch's autograd to differentiate (the dropout mask
        is drawn once and kept by autograd, with drop(x): small problems only). ``scale``: DoRA's
        g, differentiable in the magnitude (fastlora/autograd.py's formula, dropout included)."""
        xd = self._drop(x, dropout)
        xa = torch.nn.functional.linear(xd, as_dtype(lora_A, x.dtype))
        if scale is None:
            y = addmm_scaled(bias, xa, as_dtype(lora_B, x.dtype).T, scaling)
            return torch.addmm(y, x, weight.T)  # out of place: autograd's in-place bookkeeping costs more
        # DoRA: y = g o v + b (+ (x - drop(x)) W^T under dropout), v = drop(x) W^T + s xa B^T, as
        # g o (drop(x) W^T) + s xa (g o B)^T + b summed in g's (the accumulator) dtype: autograd's
        # backward then reads g on B's side for dY' B, as the hand-written one (small problems, so
        # the [M, N] accumulator-dtype temporaries cost nothing)
        acc = scale.dtype
        low = addmm_scaled(None, xa.to(acc), (lora_B.to(acc) * scale[:, None]).T, scaling)
        y = torch.addcmul(low if bias is None else low.add_(bias), xd @ weight.T, scale).to(x.dtype)
        return y if dropout is None else torch.addmm(y, x - xd, weight.T)

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
            dropout.cache[key] = _draw_keep(dropout.seed, dropout.p, tuple(shape), device)
        return dropout.cache[key]

    def _drop(self, x: torch.Tensor, dropout: Dropout | None) -> torch.Tensor:
        """drop(x) = x * keep / (1 - p), each element rounded once, as the reference computes it.
        The 1/(1-p) factor is applied apart from the 0/1 mask: rounded into a 16-bit mask it would
        bias every kept value (1/0.75 is 1.33301 in float16)."""
        if dropout is None:
            return x
        return (x * self.keep_mask(dropout, x.shape, x.device)).div_(1.0 - dropout.p)

    def weight_product(self, weight, lora_A, need_sq):
        acc = acc_dtype(weight.dtype)
        sq = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_() if need_sq else None
        return as_dtype(weight @ lora_A.T, acc), sq

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, scale=None, **_):
        xa = self._drop(x, dropout) @ as_dtype(lora_A, x.dtype).T
        if scale is not None:  # DoRA: g o (x W^T + s xa B^T) + b, g applied before the bias
            y = addmm_scaled(None, xa, as_dtype(lora_B, x.dtype).T, scaling).addmm_(x, weight.T)
            return scale_columns(y, scale, bias), xa
        y = addmm_scaled(bias, xa, as_dtype(lora_B, x.dtype).T, scaling)
        return y.addmm_(x, weight.T), xa

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs,
                 dora=None, **_) -> Grads:
        dm = None
        lora_B_g, dy_w = lora_B, dy  # DoRA: dY' B = dY (g o B), dY' W with dY' = g o dY
        if dora is not None:
            if needs.magnitude:
                out = dora.out.to(acc_dtype(dy.dtype), copy=True)
                if dora.shift is not None:
                    out.sub_(dora.shift)
                dm = out.mul_(dy).sum(0)
            if not (needs.x or needs.lora_A or needs.lora_B):
                return Grads(None, None, None, dm)
            lora_B_g = lora_B.to(dora.scale.dtype) * dora.scale[:, None]
            dy_w = scaled_rows_copy(dy, dora.scale) if needs.x else None
        dx = da = db = None
        scratch = dy.new_empty(())  # addmm's ignored input, for the three products below
        if needs.x or needs.lora_A:
            b_hi = as_dtype(lora_B_g, dy.dtype)
            dyb = dy @ b_hi
            if dora is not None and b_hi.dtype != lora_B_g.dtype:
                # g o B is in no input's dtype: what rounding it to dy's lost enters as a second
                # product (the kernels' hi + lo), so that dY' B is as exact as LoRA's dY B
                dyb = torch.addmm(dyb, dy, (lora_B_g - b_hi.to(lora_B_g.dtype)).to(dy.dtype))
        keep = (self.keep_mask(dropout, x.shape, x.device)
                if dropout is not None and (needs.x or needs.lora_A) else None)
        scale = scaling if dropout is None else scaling / (1.0 - dropout.p)
        if needs.x:
            dx = addmm_scaled(None, dyb, as_dtype(lora_A, dy.dtype), scale, scratch=scratch)
            if keep is not None:
                dx.mul_(keep)
            dx = dx.addmm_(dy_w, weight)
        # dA and dB scale inside the GEMM (addmm's alpha, applied before its one rounding to x's
        # dtype), as the kernels do; scaling the rounded 16-bit product and rounding it again to
        # the adapters' dtype costs up to an ulp more, past PyTorch's own error.
        if needs.lora_A:
            xd = x if keep is None else x * keep  # x * keep is exact; 1/(1-p) joins the scaling
            da = addmm_scaled(None, dyb.T, xd, scale, scratch=scratch)
        if needs.lora_B:
            # (xa^T dy)^T: BLAS streams dy row-major this way round
            db = addmm_scaled(None, as_dtype(xa, dy.dtype).T, dy, scaling, scratch=scratch).T
            if dora is not None:  # dY'^T xa = g o (dY^T xa): g on the small side, unrounded
                db = db * dora.scale[:, None]
        return Grads(dx, da, db, dm)
