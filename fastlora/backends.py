"""The two implementations behind fastlora's operator (ops.py): Triton kernels and plain PyTorch.

Both take 2-D ``x`` [M, K], ``weight`` [N, K], ``lora_A`` [R, K], ``lora_B`` [N, R] and the same
dropout description (a seed tensor and p), and compute the same quantities:

    forward:     y = x W^T + b + s xa B^T,   xa = drop(x) A^T            -> (y, xa)
    grad_input:  dx = dy W + s drop'((dy B) A),  dyb = dy B               -> (dx, dyb)
    grad_A:      dA = s dyb^T drop(x)                                     -> float32/64 [R, K]
    grad_B:      dB = s dy^T xa                                           -> float32/64 [N, R]

where drop'(.) multiplies by the same mask and 1/(1-p). The low-rank products run in x's dtype
(adapters cast to it, as torch.autocast does) with float32 accumulation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Dropout:
    """A dropout mask that is never stored between the passes: regenerated from ``seed`` (int64
    tensor [1]). One Dropout is made per pass; ``cache`` lets the PyTorch backend draw its mask once
    per pass (the backward needs it for dx and for dA) and dies with the pass."""
    seed: torch.Tensor
    p: float
    cache: dict = field(default_factory=dict, compare=False, repr=False)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_product(dy: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """dyb = dY B [M, R], in dY's dtype: both backends' grad_rank (the kernels give it as dX's
    side output; this is for when dX is not needed)."""
    return dy @ lora_B.to(dy.dtype)


def _draw_keep(seed: int, p: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Keep each element with probability 1 - p, from ``seed``. On the CPU from numpy's PCG64, 32
    bits an element (two from each 64-bit draw): the draw is most of a dropout step there, and this
    is ~3x faster than torch's CPU ``rand`` and ~4x faster than its ``bernoulli_`` (2048x1024:
    4.6 ms, 15 ms, 16 ms). On other devices torch's generator for the device."""
    if device.type == "cpu":
        n = math.prod(shape)
        bits = np.random.PCG64(seed % 2**64).random_raw((n + 1) // 2).view(np.uint32)[:n]
        return torch.from_numpy(bits.reshape(shape) >= np.uint32(min(round(p * 2**32), 2**32 - 1)))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


class TorchBackend:
    """Plain PyTorch: a few fused BLAS calls (addmm) and no [M, N] temporaries beyond y itself."""

    name = "torch"

    @staticmethod
    def xa_dtype(dtype: torch.dtype) -> torch.dtype:
        """dtype of the side output xa for an x of ``dtype`` (the registered op's fake needs it)."""
        return dtype

    @staticmethod
    def keep_mask(dropout: Dropout, shape, device) -> torch.Tensor:
        """The boolean keep-mask for a 2-D x of ``shape``, from ``dropout.seed``; drawn once per
        pass (``dropout.cache``) since the backward needs it twice."""
        key = (tuple(shape), str(device))
        if key not in dropout.cache:
            dropout.cache[key] = _draw_keep(int(dropout.seed.item()), dropout.p, tuple(shape),
                                            torch.device(device))
        return dropout.cache[key]

    def _drop(self, x: torch.Tensor, dropout: Dropout | None) -> torch.Tensor:
        """drop(x) = x * keep / (1 - p), each element rounded once, as the reference computes it.
        The 1/(1-p) factor is applied apart from the 0/1 mask: rounded into a 16-bit mask it would
        bias every kept value (1/0.75 is 1.33301 in float16)."""
        if dropout is None:
            return x
        return (x * self.keep_mask(dropout, x.shape, x.device)).div_(1.0 - dropout.p)

    # The low-rank term is written first and the big GEMM accumulates onto it (addmm_ with beta=1):
    # BLAS then reads the output once inside a compute-bound GEMM instead of a memory-bound rank-r
    # update re-reading and re-writing all of y or dx (2-core CPU, M=2048, 1024x1024, r=16, four
    # interleaved A/B runs: the full step 1.13-1.21x base against 1.16-1.27x the other way round).

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout):
        xa = self._drop(x, dropout) @ lora_A.to(x.dtype).T
        y = torch.addmm(bias if bias is not None else x.new_zeros(()), xa, lora_B.to(x.dtype).T,
                        beta=1 if bias is not None else 0, alpha=scaling)
        return y.addmm_(x, weight.T), xa

    def grad_input(self, dy, weight, lora_A, lora_B, scaling, dropout):
        dyb = rank_product(dy, lora_B)
        scale = scaling if dropout is None else scaling / (1.0 - dropout.p)
        dx = torch.addmm(dy.new_zeros(()), dyb, lora_A.to(dy.dtype), beta=0, alpha=scale)
        if dropout is not None:
            dx.mul_(self.keep_mask(dropout, dx.shape, dx.device))
        return dx.addmm_(dy, weight), dyb

    grad_rank = staticmethod(rank_product)

    # grad_A and grad_B scale inside the GEMM (addmm's alpha, applied before its one rounding to
    # x's dtype), as the kernels do; scaling the rounded 16-bit product and rounding it again to the
    # adapters' dtype cost up to an ulp more, past PyTorch's own error.
    def grad_A(self, x, dyb, scaling, dropout):
        if dropout is not None:  # x * keep is exact; 1/(1-p) joins the scaling
            x, scaling = x * self.keep_mask(dropout, x.shape, x.device), scaling / (1.0 - dropout.p)
        da = torch.addmm(x.new_zeros(()), dyb.T.to(x.dtype), x, beta=0, alpha=scaling)
        return da.to(acc_dtype(x.dtype))

    def grad_B(self, dy, xa, scaling):
        # (xa^T dy)^T: BLAS streams dy row-major this way round (1.5x faster on CPU than dy^T xa)
        db = torch.addmm(dy.new_zeros(()), xa.to(dy.dtype).T, dy, beta=0, alpha=scaling).T
        return db.to(acc_dtype(dy.dtype))


class TritonBackend:
    """fastlora's fused kernels (kernels/lora_linear.py)."""

    name = "triton"

    def __init__(self, kernels):
        self.k = kernels

    @staticmethod
    def xa_dtype(dtype: torch.dtype) -> torch.dtype:
        """The kernels keep xa in their accumulator dtype."""
        return acc_dtype(dtype)

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout):
        if dropout is None:
            return self.k.lora_gemm(x, weight, lora_A, lora_B, bias, scaling)
        # Regenerating the mask in every output tile would cost one Philox draw per x element per
        # tile, so with dropout xa = drop(x) A^T is one pass over x, and the GEMM reads it.
        xa = self.k.lora_skinny(x.T, lora_A.T, 1.0, dropout=(dropout.seed, dropout.p, True))
        return self.k.lora_gemm(x, weight, lora_A, lora_B, bias, scaling, xa=xa, xa_in_loop=False)

    def grad_input(self, dy, weight, lora_A, lora_B, scaling, dropout):
        # dX = dY W + s (dY B) A is the forward's problem with W^T, B^T, A^T in the roles of W, A, B
        drop = (dropout.seed, dropout.p) if dropout is not None else None
        return self.k.lora_gemm(dy, weight.T, lora_B.T, lora_A.T, None, scaling, dropout_out=drop)

    grad_rank = staticmethod(rank_product)

    def grad_A(self, x, dyb, scaling, dropout):
        drop = (dropout.seed, dropout.p, False) if dropout is not None else None
        return self.k.lora_skinny(x, dyb, scaling, dropout=drop).T

    def grad_B(self, dy, xa, scaling):
        return self.k.lora_skinny(dy, xa, scaling)


@functools.lru_cache(maxsize=None)
def triton_backend() -> TritonBackend | None:
    """The Triton backend, or None when triton cannot be imported."""
    try:
        from . import kernels
    except ImportError:
        return None
    return TritonBackend(kernels)


TORCH = TorchBackend()


def get_backend(name: str) -> TorchBackend | TritonBackend:
    """The backend called ``name`` ("torch" or "triton"), already validated by the caller."""
    if name == "torch":
        return TORCH
    impl = triton_backend() if name == "triton" else None
    if impl is None:
        raise ValueError(f"fastlora: backend must be 'torch' or an importable 'triton', got {name!r}")
    return impl
