"""The Triton routes (backend "fused", "split" and "triton", which picks one per pass).

Both are built from the same pieces (fastlora.kernels) and compute what fastlora/autograd.py
derives; they differ only in who runs the big GEMMs:

    fused  forward   xa = drop(x) A^T in the GEMM's K loop (or a pass over x first, under dropout
                     or where measured faster); y = x W^T + b + s xa B^T in one launch
           backward  (dY B, dB) in one pass over dY; dx = dY W + s D o ((dY B) A) in one launch
                     (the same GEMM, W read as stored); dA in one pass over x
    split  forward   xa in one pass over x; y0 = b + s xa B^T (cuBLAS, rank r); y0 += x W^T
                     (cuBLAS, accumulating onto y0 in its epilogue)
           backward  (dY B, dB) in one pass over dY; (dx0 = s D o ((dY B) A), dA) in one pass
                     over x; dx0 += dY W (cuBLAS)

No [M, N] temporary beyond y and dx; the dropout mask is regenerated from its seed in every
kernel (never stored); every reduction is deterministic.
"""
from __future__ import annotations

from . import route_table
from .routes import Dropout, Grads, Needs, acc_dtype
from .torch_route import addmm_scaled


def _seed_p(dropout: Dropout | None):
    return None if dropout is None else (dropout.seed, dropout.p)


class _KernelRoute:
    """What the Triton routes share: the kernels module, and xa kept in the accumulator dtype."""

    name = ""

    def __init__(self, kernels):
        self.k = kernels

    @staticmethod
    def xa_dtype(dtype):
        return acc_dtype(dtype)


class FusedRoute(_KernelRoute):
    name = "fused"

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, *, gemm=None):
        k = self.k
        M, K = x.shape
        cfg = k.GemmConfig(**gemm) if gemm else k.gemm_config(M, weight.shape[0], K, lora_A.shape[0],
                                                                x.dtype, x.device)
        if dropout is None and cfg.xa_in_loop:
            return k.lora_gemm(x, weight, lora_B, bias, scaling, u=lora_A, config=cfg)
        # under dropout, regenerating the mask in every output tile would cost a Philox draw per
        # x element per tile: one pass over x instead
        xa = k.xa_pass(x, lora_A, dropout=_seed_p(dropout))
        y, _ = k.lora_gemm(x, weight, lora_B, bias, scaling, xa=xa, config=cfg)
        return y, xa

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs, *,
                 gemm=None) -> Grads:
        k = self.k
        drop = _seed_p(dropout)
        dyb, db = k.dy_pass(dy, xa, lora_B, scaling, need_dyb=needs.x or needs.lora_A,
                            need_db=needs.lora_B)
        dx = da = None
        if needs.x:
            cfg = k.GemmConfig(**gemm) if gemm else None
            dx, _ = k.lora_gemm(dy, weight, lora_A, None, scaling, grad_input=True, xa=dyb,
                                dropout=drop, config=cfg)
        if needs.lora_A:
            _, da = k.x_pass(x, dyb, lora_A, scaling, dropout=drop, need_dx=False, need_da=True)
        return Grads(dx, da, db)


class SplitRoute(_KernelRoute):
    name = "split"

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, **_):
        xa = self.k.xa_pass(x, lora_A, dropout=_seed_p(dropout))
        y = addmm_scaled(bias, xa.to(x.dtype), lora_B.to(x.dtype).T, scaling)
        return y.addmm_(x, weight.T), xa

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs,
                 **_) -> Grads:
        k = self.k
        dyb, db = k.dy_pass(dy, xa, lora_B, scaling, need_dyb=needs.x or needs.lora_A,
                            need_db=needs.lora_B)
        dx = da = None
        if needs.x or needs.lora_A:
            dx, da = k.x_pass(x, dyb, lora_A, scaling, dropout=_seed_p(dropout), need_dx=needs.x,
                              need_da=needs.lora_A)
        if needs.x:
            dx = dx.addmm_(dy, weight)
        return Grads(dx, da, db)


class ChosenRoute:
    """backend="triton": fused or split for each pass, from the route table (route_table.py)."""

    name = "triton"

    def __init__(self, kernels):
        self.fused = FusedRoute(kernels)
        self.split = SplitRoute(kernels)

    @staticmethod
    def xa_dtype(dtype):
        return acc_dtype(dtype)

    def _pick(self, pass_, x, weight, lora_A, dropout):
        M, K = x.shape
        choice = route_table.choose(pass_, x.device, x.dtype, M, weight.shape[0], K,
                                    lora_A.shape[0], dropout is not None)
        return (self.fused if choice.route == "fused" else self.split), choice.gemm

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout):
        route, gemm = self._pick("fwd", x, weight, lora_A, dropout)
        return route.forward(x, weight, bias, lora_A, lora_B, scaling, dropout, gemm=gemm)

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs) -> Grads:
        route, gemm = self._pick("bwd", x, weight, lora_A, dropout)
        return route.backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs, gemm=gemm)
