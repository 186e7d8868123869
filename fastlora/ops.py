"""fastlora.lora_linear: argument checks, backend choice, the forward and backward, and the two
routes to them (an autograd.Function in eager mode, registered operators under torch.compile).

The data path is one: ``lora_linear`` checks its arguments, resolves the backend, draws the dropout
seed and calls ``_forward``; its gradient is ``_backward``, the hand-written backward. Two thin
wrappers route to them:

- under torch.compile, the operator ``torch.ops.fastlora.lora_linear``, registered with
  ``torch.library.custom_op``: a fake (shape) implementation, an autocast rule and, as its autograd
  formula, the operator ``torch.ops.fastlora.lora_linear_backward``, so the compiler keeps both
  passes opaque;
- in eager mode, a plain ``torch.autograd.Function`` calling the same two functions, with the same
  autocast rule applied in Python. The operator's dispatch and generated autograd wrapper cost
  ~0.3 ms of host time per training call on the CPU beyond F.linear's, the Function about half
  that; for layers that take a millisecond or less (small batches, most GPU calls) that matters.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backends import Dropout, acc_dtype, get_backend, triton_backend

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Device types whose autocast the operator follows, and their dispatch keys.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = True, backend: str = "auto") -> torch.Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused.

    Args:
        x: [..., in_features], float16/bfloat16/float32/float64.
        weight: [out_features, in_features], x's dtype (the frozen base; gets a gradient only if it
            requires one).
        bias: [out_features] in x's dtype, or None.
        lora_A: [r, in_features]; lora_B: [out_features, r]. Any float dtype (float32 adapters over
            a 16-bit base are common); the products run in x's dtype and their gradients come back
            in the adapters' own dtype.
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA), finite.
        dropout_p: dropout on the LoRA branch's input, in [0, 1); applied only when ``training``.
        backend: "auto" (Triton for CUDA tensors when triton imports, else PyTorch), "triton" or
            "torch".

    Under ``torch.autocast`` it behaves as ``nn.Linear``: x, weight, bias and the adapters are cast
    to the autocast dtype (float64 tensors are left alone), so x and weight may then differ in dtype.
    """
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    name = _resolve_backend(backend, x, lora_A.shape[0])
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # the kernels take any row stride, but need unit stride along K
    # The seed is drawn here, from torch's generator, not inside the operator: torch.compile then
    # traces the draw, and activation checkpointing's RNG replay gives the recompute the same mask.
    seed = _draw_seed(x.device) if p > 0 else None
    args = (x2, weight, bias, lora_A, lora_B, float(scaling), p, seed, name)
    if torch.compiler.is_compiling():
        y, _ = torch.ops.fastlora.lora_linear(*args)
    else:
        y = _eager(*args)
    # As F.linear: a 2-D x gives y itself, not a view of it (FSDP2 warns about view outputs, since
    # an in-place op on one would bypass its backward hook).
    return y if x.dim() == 2 else y.reshape(*lead, weight.shape[0])


@dataclass(frozen=True)
class _Options:
    scaling: float
    dropout_p: float
    backend: str


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's generator for ``device`` (so torch.manual_seed reproduces it),
    kept on the device: drawing it does not synchronise."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _dropout(seed: Tensor | None, p: float) -> Dropout | None:
    if p > 0 and seed is None:
        raise ValueError("fastlora::lora_linear: dropout_p > 0 needs a seed tensor")
    return Dropout(seed, p) if p > 0 else None


# ------------------------------------------------------------------------------------------------
# the two passes: one implementation each

def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scaling: float, dropout_p: float, seed: Optional[Tensor],
             backend: str) -> tuple[Tensor, Tensor]:
    """(y, xa) for 2-D x [M, K]: y = x W^T + b + s xa B^T with xa = drop(x) A^T, the side output
    that the backward reuses. ``backend`` is "torch" or "triton" (resolved by the caller)."""
    impl = get_backend(backend)
    if x.shape[0] == 0:  # nothing to launch
        return _empty_outputs(x, lora_B, impl.xa_dtype(x.dtype))
    return impl.forward(x, weight, bias, lora_A, lora_B, scaling, _dropout(seed, dropout_p))


def _backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
              seed: Optional[Tensor], scaling: float, dropout_p: float, backend: str,
              needs: List[bool]) -> List[Tensor]:
    """The hand-written backward of y = x W^T + b + s * xa B^T with xa = drop(x) A^T.

    With dY = dL/dy, D the dropout mask scaled by 1/(1-p) (all ones without dropout), and
    xa = (D * x) A^T saved from the forward:

        dx    = dY W + s * D * ((dY B) A)      (the forward's GEMM + low-rank epilogue, roles swapped)
        dA    = s * (dY B)^T (D * x)           (reduction over rows: deterministic, no atomics)
        dB    = s * dY^T xa
        dbias = sum over rows of dY
        dW    = dY^T x                          (only if the base weight requires grad)

    D is regenerated from the seed saved with it, never stored. ``needs`` flags (x, weight, bias,
    lora_A, lora_B); the result holds the gradients of the flagged ones, in that order.
    """
    impl = get_backend(backend)
    s = scaling
    dropout = _dropout(seed, dropout_p)
    need_x, need_w, need_bias, need_a, need_b = needs
    dy = dy.to(x.dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    empty = x.shape[0] == 0  # nothing to launch: the gradients are zeros
    dx = dw = dbias = da = db = dyb = None
    if need_x:
        dx, dyb = (x.new_zeros(x.shape), None) if empty else impl.grad_input(dy, weight, lora_A,
                                                                             lora_B, s, dropout)
    if need_a:
        if empty:
            da = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
        else:
            if dyb is None:
                dyb = impl.grad_rank(dy, lora_B)
            da = impl.grad_A(x, dyb, s, dropout).to(lora_A.dtype).contiguous()
    if need_b:
        db = (torch.zeros_like(lora_B, memory_format=torch.contiguous_format) if empty
              else impl.grad_B(dy, xa, s).to(lora_B.dtype).contiguous())
    if need_bias:
        dbias = dy.sum(0, dtype=acc_dtype(dy.dtype))
        dbias = dbias.to(x.dtype)
    if need_w:
        dw = (dy.T @ x).to(weight.dtype)
    return [g for g in (dx, dw, dbias, da, db) if g is not None]


def _empty_outputs(x, lora_B, xa_dtype):
    n, r = lora_B.shape
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], r), dtype=xa_dtype)


def _save(ctx, inputs, xa: Tensor) -> None:
    """What the backward needs from a forward on ``inputs`` (the operator's arguments)."""
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.opts = _Options(scaling, dropout_p, backend)


def _gradients(ctx, dy: Tensor, backward) -> tuple:
    """The gradients of the operator's nine arguments, from ``backward`` (``_backward`` or the
    operator that wraps it) on what ``_save`` kept."""
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    opts: _Options = ctx.opts
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(backward(dy, x, weight, lora_A, lora_B, xa, seed, opts.scaling, opts.dropout_p,
                          opts.backend, needs))
    dx, dw, dbias, da, db = (next(grads) if need else None for need in needs)
    # x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend
    return dx, dw, dbias, da, db, None, None, None, None


def _autocast_cast(device_type: str, tensors) -> list:
    """nn.Linear's autocast behaviour for (x, weight, bias, lora_A, lora_B): floating tensors on
    ``device_type`` except float64 cast to the autocast dtype in force now
    (torch.library.register_autocast fixes one dtype at registration; CUDA users pick float16 or
    bfloat16 per region). The casts run above autograd, so gradients flow back through them into
    the parameters' own dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None or t.device.type != device_type or t.dtype == torch.float64
            else t.to(dtype) for t in tensors]


# ------------------------------------------------------------------------------------------------
# eager mode: a plain autograd.Function

class _LoRALinearFunction(torch.autograd.Function):
    """y with the hand-written backward. Old-style (ctx in forward): a setup_context-style Function
    would also take torch.func's grad/vjp (the operator route never did), but it returns xa as a
    second output and cost ~15% more host time per call (64x64x64 training step: 4.5x F.linear
    against 3.8-4.0x)."""

    @staticmethod
    def forward(ctx, *inputs):
        y, xa = _forward(*inputs)
        _save(ctx, inputs, xa)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _gradients(ctx, dy, _backward)


def _eager(*args) -> Tensor:
    """y for the operator's arguments, through the Function, with the operator's autocast rule."""
    device_type = args[0].device.type
    if device_type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _LoRALinearFunction.apply(*_autocast_cast(device_type, args[:5]), *args[5:])
    return _LoRALinearFunction.apply(*args)


# ------------------------------------------------------------------------------------------------
# under torch.compile: the registered operators (custom_op infers their schemas from the annotations)

@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    backend: str) -> tuple[Tensor, Tensor]:
    """(y, xa): ``_forward``."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return _empty_outputs(x, lora_B, get_backend(backend).xa_dtype(x.dtype))


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             xa: Tensor, seed: Optional[Tensor], scaling: float, dropout_p: float,
                             backend: str, needs: List[bool]) -> List[Tensor]:
    """``_backward``."""
    return _backward(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, backend, needs)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, backend, needs):
    n = weight.shape[0]
    like = (x, weight, x.new_empty((n,)), lora_A, lora_B)
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1])


_lora_linear_op.register_autograd(lambda ctx, dy, _dxa: _gradients(
    ctx, dy, torch.ops.fastlora.lora_linear_backward), setup_context=_setup_context)


def _autocast_rule(device_type: str):
    """The autocast kernel of the operator: ``_autocast_cast``, then the operator below autocast."""
    def kernel(keyset, *args):
        with torch.autocast(device_type, enabled=False):
            return torch.ops.fastlora.lora_linear.default(*_autocast_cast(device_type, args[:5]),
                                                          *args[5:])
    return kernel


_LIB = torch.library.Library("fastlora", "FRAGMENT")  # holds the autocast rules for the module's life
for _device_type, _key in _AUTOCAST_KEYS.items():
    _LIB.impl("lora_linear", _autocast_rule(_device_type), _key, with_keyset=True)


def _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend) -> None:
    """Every mistake a caller can make, caught before any kernel launches."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"lora_linear: {name} must be float16, bfloat16, float32 or float64, "
                            f"got {t.dtype}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"lora_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    # Under autocast the operator casts x, weight and bias to one dtype first, as nn.Linear does:
    # compare the dtypes they will have.
    x_dtype, w_dtype = _compute_dtype(x), _compute_dtype(weight)
    if w_dtype != x_dtype:
        raise TypeError(f"lora_linear: x and weight must share a dtype, got x {x.dtype} and "
                        f"weight {weight.dtype}")
    if bias is not None and _compute_dtype(bias) != x_dtype:
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
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_linear: lora_B must be [out_features, r] = [{out_f}, {r}], got shape "
                         f"{tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"lora_linear: bias must be [out_features] = [{out_f}], got shape "
                         f"{tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}; "
                             f"all tensors must be on one device")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"lora_linear: scaling must be a finite number, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend not in BACKENDS:
        raise ValueError(f"lora_linear: backend must be one of {BACKENDS}, got {backend!r}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` has inside the operator: the autocast dtype when autocast is on for its
    device and would cast it (every float dtype but float64), else its own."""
    device_type = t.device.type
    if (device_type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type)
            and t.dtype != torch.float64):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _resolve_backend(backend: str, x: torch.Tensor, r: int) -> str:
    """The name of the backend that runs (x, rank r): "torch" or "triton". Raises ValueError when
    the named one cannot run here. torch.compile folds the answer to a constant."""
    if backend == "torch":
        return "torch"
    max_rank = _triton_max_rank()
    if backend == "auto":
        return "triton" if x.is_cuda and r <= max_rank else "torch"
    if max_rank == 0:
        raise ValueError("lora_linear: backend='triton' needs the triton package, which could not "
                         "be imported; install triton or use backend='torch'")
    if x.device.type == "cpu" and not _triton_interpreted():
        hint = ("TRITON_INTERPRET=1 is set but was not when fastlora.kernels was first imported"
                if os.environ.get("TRITON_INTERPRET") == "1" else "set TRITON_INTERPRET=1 before "
                "importing fastlora to run the kernels on the CPU through Triton's interpreter")
        raise ValueError(f"lora_linear: backend='triton' needs CUDA tensors, got x on cpu ({hint}); "
                         f"or use backend='torch'")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"lora_linear: backend='triton' needs CUDA tensors, got x on {x.device}")
    if r > max_rank:
        raise ValueError(f"lora_linear: backend='triton' supports r <= {max_rank}, got r={r}; "
                         f"use backend='torch' or 'auto'")
    return "triton"


# Both are fixed for the life of the process; torch.compile is told so, and does not trace the
# import of triton behind them.
@torch.compiler.assume_constant_result
def _triton_max_rank() -> int:
    """The Triton backend's largest rank, or 0 when triton cannot be imported."""
    impl = triton_backend()
    return 0 if impl is None else impl.k.MAX_RANK


@torch.compiler.assume_constant_result
def _triton_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    impl = triton_backend()
    return impl is not None and impl.k.INTERPRETED
