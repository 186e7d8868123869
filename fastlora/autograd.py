"""lora_linear's forward and hand-written backward, and the eager autograd.Function.

The derivation (the one place it is written; routes and kernels point here). For 2-D x [M, K],
W [N, K] frozen, A [r, K], B [N, r], scaling s, and D the dropout mask of x scaled by 1/(1-p)
(all ones without dropout; drop(x) = D o x):

    y     = x W^T + b + s * xa B^T,         xa = drop(x) A^T   [M, r], kept for the backward

With dY = dL/dy, differentiate each term of y:

    d(x W^T)      -> dx += dY W,            dW = dY^T x      (only if W requires grad)
    d(b)          -> db = sum over rows of dY
    d(s xa B^T)   -> dxa = s dY B,          dB = s dY^T xa
    d(xa)         -> dx += D o (dxa A),     dA = dxa^T drop(x) = s (dY B)^T drop(x)

so, with dyb = dY B [M, r] (computed once, used twice):

    dx = dY W + s * D o (dyb A)
    dA = s * dyb^T drop(x)
    dB = s * dY^T xa

D is regenerated from the seed saved with it (never stored). The routes (fastlora/routes.py)
compute dx, dA and dB; dbias and dW are the same for every route and computed here.

Two wrappers route to ``forward`` and ``backward``: in eager mode the ``LoRALinearFunction``
below, under torch.compile the registered operators of fastlora/operators.py. Both resolve the
route from the backend the caller named (the resolution is a function of the device and the
rank, so forward and backward agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .autocast import autocast_cast, autocast_on
from .routes import Dropout, Needs, acc_dtype, get_route, resolve


def _dropout(seed: Optional[Tensor], p: float) -> Optional[Dropout]:
    if p > 0 and seed is None:
        raise ValueError("fastlora: dropout_p > 0 needs a seed tensor")
    return Dropout(seed, p) if p > 0 else None


def empty_outputs(x: Tensor, lora_B: Tensor, xa_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Uninitialised (y, xa) of the right shapes and dtypes for x (also the operator's fake)."""
    n, r = lora_B.shape
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], r), dtype=xa_dtype)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            scaling: float, dropout_p: float, seed: Optional[Tensor],
            backend: str) -> tuple[Tensor, Tensor]:
    """(y, xa) for 2-D x [M, K] with unit stride along K (see the module docstring)."""
    route = get_route(resolve(backend, x, lora_A.shape[0]))
    if x.shape[0] == 0:  # nothing to launch
        return empty_outputs(x, lora_B, route.xa_dtype(x.dtype))
    return route.forward(x, weight, bias, lora_A, lora_B, scaling, _dropout(seed, dropout_p))


def backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
             seed: Optional[Tensor], scaling: float, dropout_p: float, backend: str,
             needs: List[bool]) -> List[Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B) flagged in ``needs``, in that order
    (see the module docstring); each in its input's dtype."""
    need_x, need_w, need_bias, need_a, need_b = needs
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = dw = dbias = da = db = None
    if x.shape[0] == 0:  # nothing to launch: the gradients are zeros
        dx = x.new_zeros(x.shape) if need_x else None
        da = torch.zeros_like(lora_A, memory_format=torch.contiguous_format) if need_a else None
        db = torch.zeros_like(lora_B, memory_format=torch.contiguous_format) if need_b else None
    elif need_x or need_a or need_b:
        route = get_route(resolve(backend, x, lora_A.shape[0]))
        dx, da, db = route.backward(dy, x, weight, lora_A, lora_B, xa, scaling,
                                    _dropout(seed, dropout_p), Needs(need_x, need_a, need_b))
        da = _as_param(da, lora_A) if need_a else None
        db = _as_param(db, lora_B) if need_b else None
    if need_bias:
        dbias = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(x.dtype)
    if need_w:
        dw = (dy.T @ x).to(weight.dtype)
    return [g for g in (dx, dw, dbias, da, db) if g is not None]


def _as_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` in ``param``'s dtype and contiguous (what autograd accumulates best)."""
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    return grad if grad.is_contiguous() else grad.contiguous()


@dataclass(frozen=True)
class Options:
    """The per-call options a backward needs besides the saved tensors."""
    scaling: float
    dropout_p: float
    backend: str


def save_for_backward(ctx, inputs, xa: Tensor) -> None:
    """What the backward needs from a forward on ``inputs`` (the nine operator arguments)."""
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.opts = Options(scaling, dropout_p, backend)


def gradients(ctx, dy: Tensor, backward_fn) -> tuple:
    """The gradients of the nine operator arguments, from ``backward_fn`` (``backward`` or the
    operator that wraps it) on what ``save_for_backward`` kept."""
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    opts: Options = ctx.opts
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(backward_fn(dy, x, weight, lora_A, lora_B, xa, seed, opts.scaling, opts.dropout_p,
                             opts.backend, needs))
    dx, dw, dbias, da, db = (next(grads) if need else None for need in needs)
    # x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend
    return dx, dw, dbias, da, db, None, None, None, None


class LoRALinearFunction(torch.autograd.Function):
    """y with the hand-written backward, in eager mode. Old-style (ctx in forward): a
    setup_context-style Function would also take torch.func's transforms but returns xa as a
    second output, which costs host time on every call (benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, *inputs):
        y, xa = forward(*inputs)
        save_for_backward(ctx, inputs, xa)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return gradients(ctx, dy, backward)


def run_eager(*args) -> Tensor:
    """y for the nine operator arguments under nn.Linear's autocast rule: through the Function,
    or, for a torch-route problem bound by host time, through the forward's own ops, which
    PyTorch's autograd differentiates (fastlora/torch_route.py)."""
    device_type = args[0].device.type
    if autocast_on(device_type):
        with torch.autocast(device_type, enabled=False):
            return _run(*autocast_cast(device_type, args[:5]), *args[5:])
    return _run(*args)


def _run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend) -> Tensor:
    # the route, resolved once for both passes (resolve takes a resolved name back unchanged)
    name = resolve(backend, x, lora_A.shape[0])
    if name == "torch" and x.shape[0] > 0:
        route = get_route(name)
        if route.host_bound(x, weight):
            return route.autograd_forward(x, weight, bias, lora_A, lora_B, scaling,
                                          _dropout(seed, dropout_p))
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, name)
