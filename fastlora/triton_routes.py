"""The Triton routes (backend "fused", "split" and "triton", which picks one per pass, the torch
route included where measured faster).

Both are built from the same pieces (fastlora.kernels) and compute what fastlora/autograd.py
derives; they differ only in who runs the big GEMMs:

    fused  forward   xa = drop(x) A^T in the GEMM's K loop (or a pass over x first, under dropout
                     or where measured faster); y = x W^T + b + s xa B^T in one launch
           backward  dx = dY W + s D o ((dY B) A) in one launch (the same GEMM, W read as
                     stored), dY B either in its K loop from the same dY tiles (the config's
                     xa_in_loop; LoRA) or from the pass over dY; dB (and dY B otherwise) in one
                     pass over dY; dA in one pass over x
    split  forward   xa in one pass over x; y0 = b + s xa B^T (cuBLAS, rank r); y0 += x W^T
                     (cuBLAS, accumulating onto y0 in its epilogue)
           backward  (dY B, dB) in one pass over dY; (dx0 = s D o ((dY B) A), dA) in one pass
                     over x; dx0 += dY W (cuBLAS)

No [M, N] temporary beyond y and dx (DoRA's dY', below); the dropout mask is regenerated from its seed in every
kernel (never stored); every reduction is deterministic.

DoRA (fastlora/autograd.py) without dropout, g = m / ||W + s B A||_row:

    fused  forward   g o (...) in the GEMM's epilogue, before the bias
    split  forward   cuBLAS y = x W^T + s xa B^T (no bias), then one elementwise pass y = g o y + b:
                     cuBLAS applies no per-column scale and no Triton pass touches y here
    both   backward  the dY pass gives dY' B = dY (g o B) and dB = g o (s dY^T xa) from its one read
                     of dY (dY' = g o dY), writes dY' for the dX product (cuBLAS cannot scale its
                     operand; the fused GEMM reads the same tensor) and reduces sum over rows of
                     dY o (y - b) for dm; then LoRA's dX and x pass on dY'
    both   norm      W A^T (and ||W_n||^2 when not cached) from one Triton pass over W
                     (``weight_pass``), the rest [r, r]- and [N, r]-sized (fastlora/dora.py)
"""
from __future__ import annotations

from . import route_table
from .routes import Dropout, Grads, Needs, acc_dtype
from .torch_route import TorchRoute, addmm_scaled, as_dtype, draws_kernels_mask, scale_columns


def _seed_p(dropout: Dropout | None):
    return None if dropout is None else (dropout.seed, dropout.p)


class _KernelRoute:
    """What the Triton routes share: the kernels module, xa kept in the accumulator dtype, and
    DoRA's norm pre-pass, dropout mask and dY pass."""

    name = ""

    def __init__(self, kernels):
        self.k = kernels

    @staticmethod
    def xa_dtype(dtype):
        return acc_dtype(dtype)

    def weight_product(self, weight, lora_A, need_sq):
        return self.k.weight_pass(weight, lora_A, need_sq=need_sq)

    def keep_mask(self, dropout: Dropout, shape, device):
        """The mask the kernels regenerate from the seed (one per pass, as the torch route's)."""
        key = (tuple(shape), str(device))
        if key not in dropout.cache:
            dropout.cache[key] = self.k.dropout_mask(dropout.seed, tuple(shape), dropout.p)
        return dropout.cache[key]

    def dy_pass(self, dy, xa, lora_B, scaling, needs: Needs, dora):
        """(dY' B, dB, dY', dm sum): LoRA's dY pass (dY' = dY, no sum) or DoRA's."""
        need_dyb = needs.x or needs.lora_A
        if dora is None:
            dyb, db = self.k.dy_pass(dy, xa, lora_B, scaling, need_dyb=need_dyb, need_db=needs.lora_B,
                                     db_dtype=lora_B.dtype)
            return dyb, db, dy, None
        return self.k.dora_dy_pass(dy, xa, lora_B, scaling, dora.scale, dora.out, dora.shift,
                                   need_dyb=need_dyb, need_db=needs.lora_B, need_scaled=needs.x,
                                   need_dm=needs.magnitude)


class FusedRoute(_KernelRoute):
    name = "fused"

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, scale=None, *, gemm=None):
        k = self.k
        M, K = x.shape
        cfg = k.GemmConfig(**gemm) if gemm else k.gemm_config(M, weight.shape[0], K, lora_A.shape[0],
                                                                x.dtype, x.device)
        if dropout is None and cfg.xa_in_loop:
            return k.lora_gemm(x, weight, lora_B, bias, scaling, u=lora_A, scale=scale, config=cfg)
        # under dropout, regenerating the mask in every output tile would cost a Philox draw per
        # x element per tile: one pass over x instead
        xa = k.xa_pass(x, lora_A, dropout=_seed_p(dropout))
        y, _ = k.lora_gemm(x, weight, lora_B, bias, scaling, xa=xa, scale=scale, config=cfg)
        return y, xa

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs,
                 dora=None, *, gemm=None) -> Grads:
        k = self.k
        drop = _seed_p(dropout)
        dx = da = db = dm = cfg = None
        if needs.x:
            M, N = dy.shape  # (weight [N, K] as stored, or its 4-bit form)
            cfg = k.GemmConfig(**gemm) if gemm else k.gemm_config(
                M, weight.shape[1], N, lora_A.shape[0], dy.dtype, dy.device, grad_input=True,
                dropout=drop is not None, four_bit=isinstance(weight, k.Packed4bit))
        if cfg is not None and cfg.xa_in_loop and dora is None:
            # dY B in the dX GEMM's K loop, from the dY tiles it reads anyway: the dY pass then
            # reduces dB alone, and no per-column-block dY B partials are summed (a launch)
            dx, dyb = k.lora_gemm(dy, weight, lora_A, None, scaling, grad_input=True, u=lora_B,
                                  dropout=drop, config=cfg)
            if needs.lora_B:
                _, db, _, _ = self.dy_pass(dy, xa, lora_B, scaling, Needs(False, False, True), None)
        else:
            dyb, db, dy, dm = self.dy_pass(dy, xa, lora_B, scaling, needs, dora)
            if needs.x:
                dx, _ = k.lora_gemm(dy, weight, lora_A, None, scaling, grad_input=True, xa=dyb,
                                    dropout=drop, config=cfg)
        if needs.lora_A:
            _, da = k.x_pass(x, dyb, lora_A, scaling, dropout=drop, need_dx=False, need_da=True,
                             da_dtype=lora_A.dtype)
        return Grads(dx, da, db, dm)


class SplitRoute(_KernelRoute):
    name = "split"

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, scale=None, **_):
        # xa kept in the accumulator dtype, and in x's for cuBLAS (from the same launch)
        xa, xa_x = self.k.xa_pass(x, lora_A, dropout=_seed_p(dropout), also=x.dtype)
        b_x = as_dtype(lora_B, x.dtype).T
        if scale is not None:  # DoRA: the bias joins after g (see the module docstring)
            y = addmm_scaled(None, xa_x, b_x, scaling).addmm_(x, weight.T)
            return scale_columns(y, scale, bias), xa
        y = addmm_scaled(bias, xa_x, b_x, scaling)
        return y.addmm_(x, weight.T), xa

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs,
                 dora=None, **_) -> Grads:
        k = self.k
        dyb, db, dy, dm = self.dy_pass(dy, xa, lora_B, scaling, needs, dora)
        dx = da = None
        if needs.x or needs.lora_A:
            dx, da = k.x_pass(x, dyb, lora_A, scaling, dropout=_seed_p(dropout), need_dx=needs.x,
                              need_da=needs.lora_A, da_dtype=lora_A.dtype)
        if needs.x:
            dx = dx.addmm_(dy, weight)
        return Grads(dx, da, db, dm)


class ChosenRoute(_KernelRoute):
    """backend="triton": fused, split or the torch route for each pass, from the route table
    (route_table.py). The torch route (cuBLAS for every product: fewer launches, less host time)
    is taken where the table measured it faster, under dropout only where it draws the kernels'
    mask (on CUDA: ``draws_kernels_mask``; the interpreter's CPU tensors get numpy's); its xa is
    kept in the accumulator dtype as the Triton routes keep it."""

    name = "triton"

    def __init__(self, kernels):
        super().__init__(kernels)
        self.routes = {"fused": FusedRoute(kernels), "split": SplitRoute(kernels), "torch": TorchRoute()}

    def _pick(self, pass_, x, weight, lora_A, dropout):
        M, K = x.shape
        choice = route_table.choose(pass_, x.device, x.dtype, M, weight.shape[0], K,
                                    lora_A.shape[0], dropout is not None)
        name = choice.route
        if name == "torch" and dropout is not None and not draws_kernels_mask(x.device):
            name = "split"
        return self.routes[name], choice.gemm

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout, scale=None):
        route, gemm = self._pick("fwd", x, weight, lora_A, dropout)
        y, xa = route.forward(x, weight, bias, lora_A, lora_B, scaling, dropout, scale, gemm=gemm)
        return y, as_dtype(xa, self.xa_dtype(x.dtype))  # (the torch route's is in x's dtype)

    def backward(self, dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs: Needs,
                 dora=None) -> Grads:
        route, gemm = self._pick("bwd", x, weight, lora_A, dropout)
        return route.backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout, needs, dora,
                              gemm=gemm)
