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

DoRA (Liu et al., 2024; PEFT's ``use_dora``), given a trained magnitude m [N]. Each output feature
of the adapted weight is rescaled to length m_n:

    W' = g o (W + s B A),   g = m / n,   n = ||W + s B A||_row  [N]

where n is a constant of the backward (the paper's section 4.3, PEFT's ``weight_norm.detach()``):
no gradient reaches A or B through it. fastlora/dora.py computes n without forming W + s B A.
PEFT's forward (``DoraLinearVariant`` + ``DoraLinearLayer``) adds (g - 1) o base + g o s xa B^T to
the base layer's output x W^T + b, where ``base`` is x W^T when no dropout runs (dropout p = 0 or
eval mode) but drop(x) W^T, the base product recomputed on the dropped input, when it runs. With

    v = drop(x) W^T + s xa B^T    [M, N]

that is

    no dropout:  y = g o v + b                        (v = x W^T + s xa B^T)
    dropout:     y = g o v + b + (x - drop(x)) W^T    = x W^T + b + (g - 1) o (drop(x) W^T) + g o (s xa B^T)

Differentiate, with dY' = g o dY (v's gradient):

    dx = dY' W + s * (dY' B) A                                   (no dropout)
    dx = dY W + D o ((dY' - dY) W + s * (dY' B) A)               (dropout)
    dA = s * (dY' B)^T drop(x),   dB = s * dY'^T xa,   db = sum over rows of dY
    dm = (sum over rows of dY o v) / n

So DoRA's backward is LoRA's on dY' (the routes read dY' where they read dY), plus dm. Without
dropout v = (y - b) / g, so dm = (sum over rows of dY o (y - b)) / m from y, which the backward
keeps (DoRA's only [M, N] tensor beyond LoRA's, the layer's own output; an entry m_n = 0 then gives
0 / 0 = NaN, where y - b carries no trace of v). Under dropout v itself is kept (PEFT keeps its
equal, drop(x) W^T) and the two big products each way are PEFT's too; that path is composed here
from the routes' calls without dropout on drop(x), whose mask the route's family draws:

    forward   v, xa = route(drop(x)),  y = (x - drop(x)) W^T + g o v + b
    backward  dx_d, dA, dB, dm = route's DoRA backward on drop(x) with dY,  dx = t + D o (dx_d - t), t = dY W

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

from . import dora, route_table
from .autocast import autocast_cast, autocast_on
from .routes import DoraGrad, Dropout, Needs, acc_dtype, get_route, resolve
from .torch_route import draws_kernels_mask


def _dropout(seed: Optional[Tensor], p: float) -> Optional[Dropout]:
    if p > 0 and seed is None:
        raise ValueError("fastlora: dropout_p > 0 needs a seed tensor")
    return Dropout(seed, p) if p > 0 else None


def empty_outputs(x: Tensor, lora_B: Tensor, xa_dtype: torch.dtype, magnitude: Optional[Tensor] = None,
                  dropout_p: float = 0.0) -> tuple[Tensor, Tensor, List[Tensor]]:
    """Uninitialised (y, xa, DoRA's kept tensors) of the right shapes and dtypes for x (also the
    operator's fake): for DoRA the norm n [N] and, under dropout, v [M, N]."""
    n, r = lora_B.shape
    y, xa = x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], r), dtype=xa_dtype)
    if magnitude is None:
        return y, xa, []
    kept = [x.new_empty((n,), dtype=acc_dtype(x.dtype))]
    return y, xa, kept + ([x.new_empty((x.shape[0], n))] if dropout_p > 0 else [])


def dora_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """g = m / n [N] in n's dtype (the accumulator's)."""
    return magnitude.to(norm.dtype) / norm


def dropped(route, x: Tensor, dropout: Dropout) -> Tensor:
    """drop(x) = D o x with the route family's mask, the 1/(1-p) rounded once after the 0/1 mask."""
    return (x * route.keep_mask(dropout, x.shape, x.device)).div_(1.0 - dropout.p)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str,
            magnitude: Optional[Tensor] = None) -> tuple[Tensor, Tensor, List[Tensor]]:
    """(y, xa, kept) for 2-D x [M, K] with unit stride along K (see the module docstring); kept is
    [] for LoRA, DoRA's [n] without dropout and [n, v] with it."""
    route = get_route(resolve(backend, x, lora_A.shape[0]))
    drop = _dropout(seed, dropout_p)
    if x.shape[0] == 0:  # nothing to launch (an idle MoE expert); DoRA's kept norm is an output
        # of the operator all the same: zeros, not uninitialised memory (the backward of M = 0
        # reads none of it)
        y, xa, kept = empty_outputs(x, lora_B, route.xa_dtype(x.dtype), magnitude, dropout_p)
        return y, xa, [t.zero_() for t in kept]
    if magnitude is None:
        y, xa = route.forward(x, weight, bias, lora_A, lora_B, scaling, drop)
        return y, xa, []
    norm = dora.weight_norm(route, weight, lora_A, lora_B, scaling)
    g = dora_scale(magnitude, norm)
    if drop is None:
        y, xa = route.forward(x, weight, bias, lora_A, lora_B, scaling, None, g)
        return y, xa, [norm]
    xd = dropped(route, x, drop)
    v, xa = route.forward(xd, weight, None, lora_A, lora_B, scaling, None)
    y = (x - xd) @ weight.T
    y.addcmul_(v, g)
    if bias is not None:
        y.add_(bias)
    return y, xa, [norm, v]


def backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
             seed: Optional[Tensor], scaling: float, dropout_p: float, backend: str,
             needs: List[bool], magnitude: Optional[Tensor] = None, bias: Optional[Tensor] = None,
             kept: List[Tensor] = ()) -> List[Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B, magnitude) flagged in ``needs``, in that
    order (see the module docstring); each in its input's dtype. DoRA's ``kept`` is what
    ``forward`` returned, with y (the output) appended when it kept no v."""
    need_x, need_w, need_bias, need_a, need_b, need_m = needs
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = dw = dbias = da = db = dm = None
    if x.shape[0] == 0:  # nothing to launch: the gradients are zeros
        dx = x.new_zeros(x.shape) if need_x else None
        da = torch.zeros_like(lora_A, memory_format=torch.contiguous_format) if need_a else None
        db = torch.zeros_like(lora_B, memory_format=torch.contiguous_format) if need_b else None
        dm = torch.zeros_like(magnitude, memory_format=torch.contiguous_format) if need_m else None
    elif need_x or need_a or need_b or need_m:
        route = get_route(resolve(backend, x, lora_A.shape[0]))
        drop = _dropout(seed, dropout_p)
        if magnitude is None:
            dx, da, db, _ = route.backward(dy, x, weight, lora_A, lora_B, xa, scaling, drop,
                                           Needs(need_x, need_a, need_b))
        else:
            dx, da, db, dm = _dora_backward(route, dy, x, weight, lora_A, lora_B, xa, scaling, drop,
                                            Needs(need_x, need_a, need_b, need_m), magnitude, bias, kept)
        da = _as_param(da, lora_A) if need_a else None
        db = _as_param(db, lora_B) if need_b else None
        dm = _as_param(dm, magnitude) if need_m else None
    if need_bias:
        dbias = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(x.dtype)
    if need_w:
        dw = (dy.T @ x).to(weight.dtype)
    return [g for g in (dx, dw, dbias, da, db, dm) if g is not None]


def _dora_backward(route, dy, x, weight, lora_A, lora_B, xa, scaling, drop, needs: Needs, magnitude,
                   bias, kept):
    """(dx, dA, dB, dm) of DoRA (the module docstring)."""
    norm, out = kept
    g = dora_scale(magnitude, norm)
    if drop is None:
        dx, da, db, dm = route.backward(dy, x, weight, lora_A, lora_B, xa, scaling, None, needs,
                                        DoraGrad(g, out, bias))
        return dx, da, db, (dm / magnitude.to(dm.dtype) if dm is not None else None)
    keep = route.keep_mask(drop, x.shape, x.device) if needs.x or needs.lora_A else None
    xd = (x * keep).div_(1.0 - drop.p) if needs.lora_A else x  # dA reads drop(x); nothing else does
    dxd, da, db, dm = route.backward(dy, xd, weight, lora_A, lora_B, xa, scaling, None, needs,
                                     DoraGrad(g, out, None))
    dx = None
    if needs.x:  # t + D o (dx_d - t), summed in the accumulator dtype and rounded once
        t = dy @ weight
        diff = dxd.to(acc_dtype(x.dtype)) - t
        dx = diff.mul_(keep).div_(1.0 - drop.p).add_(t).to(x.dtype)
    return dx, da, db, (dm / norm if dm is not None else None)


def _as_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` in ``param``'s dtype and contiguous (what autograd accumulates best): one copy
    when either differs (the torch route's dB comes transposed, DoRA's dB in the accumulator dtype,
    any gradient in x's dtype for float32 adapters), none otherwise."""
    if grad.dtype == param.dtype and grad.is_contiguous():
        return grad
    return torch.empty(grad.shape, dtype=param.dtype, device=grad.device).copy_(grad)


@dataclass(frozen=True)
class Options:
    """The per-call options a backward needs besides the saved tensors."""
    scaling: float
    dropout_p: float
    backend: str


def save_for_backward(ctx, inputs, outputs) -> None:
    """What the backward needs from a forward on ``inputs`` (the ten operator arguments) that gave
    ``outputs`` (y, xa, kept): LoRA's tensors and, for DoRA, the magnitude, the bias, the norm and
    y (no dropout: the output itself, nothing new) or v."""
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, *rest = inputs
    magnitude = rest[0] if rest else None  # (the operator called without its default)
    y, xa, kept = outputs
    if magnitude is None:
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    else:
        out = kept[1] if len(kept) > 1 else y
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed, magnitude, bias, kept[0], out)
    ctx.opts = Options(scaling, dropout_p, backend)


def gradients(ctx, dy: Tensor, backward_fn) -> tuple:
    """The gradients of the ten operator arguments, from ``backward_fn`` (``backward`` or the
    operator that wraps it) on what ``save_for_backward`` kept."""
    x, weight, lora_A, lora_B, xa, seed, *dora_saved = ctx.saved_tensors
    magnitude, bias, kept = None, None, []
    if dora_saved:
        magnitude, bias, *kept = dora_saved
    opts: Options = ctx.opts
    flags = ctx.needs_input_grad
    needs = [*flags[:5], magnitude is not None and flags[9]]
    grads = iter(backward_fn(dy, x, weight, lora_A, lora_B, xa, seed, opts.scaling, opts.dropout_p,
                             opts.backend, needs, magnitude, bias, kept))
    dx, dw, dbias, da, db, dm = (next(grads) if need else None for need in needs)
    # x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, magnitude (as many as given)
    return (dx, dw, dbias, da, db, None, None, None, None, dm)[:len(flags)]


class LoRALinearFunction(torch.autograd.Function):
    """y with the hand-written backward, in eager mode. Old-style (ctx in forward): a
    setup_context-style Function would also take torch.func's transforms but returns xa as a
    second output, which costs host time on every call (benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = forward(*inputs)
        save_for_backward(ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return gradients(ctx, dy, backward)


def run_eager(*args) -> Tensor:
    """y for the ten operator arguments under nn.Linear's autocast rule (DoRA's magnitude is not
    cast: it enters only through g, in the accumulator dtype): through the Function, or, for a
    torch-route problem bound by host time (fastlora/torch_route.py) and for a "triton" LoRA
    training step the route table measured so (fastlora/route_table.py), through the torch
    route's forward ops, which PyTorch's autograd differentiates."""
    device_type = args[0].device.type
    if autocast_on(device_type):
        with torch.autocast(device_type, enabled=False):
            return _run(*autocast_cast(device_type, args[:5]), *args[5:])
    return _run(*args)


def _training(x: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)


def _run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, magnitude=None) -> Tensor:
    # the route, resolved once for both passes (resolve takes a resolved name back unchanged)
    name = resolve(backend, x, lora_A.shape[0])
    if x.shape[0] > 0 and (name == "torch" or name == "triton" and magnitude is None
                           and _training(x, lora_A, lora_B)
                           and (dropout_p == 0 or draws_kernels_mask(x.device))):
        route = get_route("torch")
        # the torch route: by size (its rule); "triton": a LoRA training step where the table
        # measured autograd's path faster than the Function's (host time: no Python backward),
        # under dropout only where the torch route draws the kernels' mask (the Triton family's)
        if (route.host_bound(x, weight) if name == "torch" else
                route_table.autograd_step(x.device, x.dtype, x.shape[0], weight.shape[0], x.shape[1],
                                          lora_A.shape[0], dropout_p > 0)):
            scale = None
            if magnitude is not None:  # g differentiable in m; n a constant (no grad through it)
                scale = dora_scale(magnitude, dora.weight_norm(route, weight, lora_A, lora_B, scaling))
            return route.autograd_forward(x, weight, bias, lora_A, lora_B, scaling,
                                          _dropout(seed, dropout_p), scale)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, name,
                                    magnitude)
