"""fastlora.lora_linear: argument checks, backend choice and the autograd Function."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .backends import TORCH, Dropout, TorchBackend, TritonBackend, triton_backend

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    impl = _choose_backend(backend, x, lora_A.shape[0])
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # the kernels take any row stride, but need unit stride along K
    opts = _Options(float(scaling), p, impl)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, lora_A, lora_B)):
        y = _LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, opts)
    else:
        y = _forward(x2, weight, bias, lora_A, lora_B, opts)[0]
    return y.reshape(*lead, weight.shape[0])


@dataclass(frozen=True)
class _Options:
    scaling: float
    dropout_p: float
    backend: TorchBackend | TritonBackend


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's generator for ``device`` (so torch.manual_seed reproduces it),
    kept on the device: drawing it does not synchronise."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _forward(x, weight, bias, lora_A, lora_B, opts):
    dropout = Dropout(_draw_seed(x.device), opts.dropout_p) if opts.dropout_p > 0 else None
    if x.shape[0] == 0:  # nothing to launch
        n, r = lora_B.shape
        return x.new_empty((0, n)), x.new_empty((0, r)), dropout
    y, xa = opts.backend.forward(x, weight, bias, lora_A, lora_B, opts.scaling, dropout)
    return y, xa, dropout


class _LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * xa B^T with xa = drop(x) A^T, and its hand-written backward.

    With dY = dL/dy, D the dropout mask scaled by 1/(1-p) (all ones without dropout), and
    xa = (D * x) A^T saved from the forward:

        dx    = dY W + s * D * ((dY B) A)      (the forward's GEMM + low-rank epilogue, roles swapped)
        dA    = s * (dY B)^T (D * x)           (reduction over rows: deterministic, no atomics)
        dB    = s * dY^T xa
        dbias = sum over rows of dY
        dW    = dY^T x                          (only if the base weight requires grad)

    D is regenerated from the seed saved with it, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, opts: _Options):
        y, xa, dropout = _forward(x, weight, bias, lora_A, lora_B, opts)
        seed = dropout.seed if dropout is not None else None
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
        ctx.opts = opts
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        opts: _Options = ctx.opts
        impl, s = opts.backend, opts.scaling
        dropout = Dropout(seed, opts.dropout_p) if seed is not None else None
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        dy = dy.to(x.dtype)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = dw = dbias = da = db = dyb = None
        if x.shape[0] == 0:
            dx = torch.zeros_like(x) if need_x else None
        elif need_x:
            dx, dyb = impl.grad_input(dy, weight, lora_A, lora_B, s, dropout)
        if x.shape[0] and need_a:
            if dyb is None:
                dyb = impl.grad_rank(dy, lora_B)
            da = impl.grad_A(x, dyb, s, dropout).to(lora_A.dtype).contiguous()
        elif need_a:
            da = torch.zeros_like(lora_A)
        if need_b:
            db = impl.grad_B(dy, xa, s) if x.shape[0] else torch.zeros_like(lora_B)
            db = db.to(lora_B.dtype).contiguous()
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)
            dbias = dbias.to(x.dtype)
        if need_w:
            dw = (dy.T @ x).to(weight.dtype)
        # x, weight, bias, lora_A, lora_B, opts
        return dx, dw, dbias, da, db, None


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
    if weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: x and weight must share a dtype, got x {x.dtype} and "
                        f"weight {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
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


def _choose_backend(backend: str, x: torch.Tensor, r: int) -> TorchBackend | TritonBackend:
    if backend == "torch":
        return TORCH
    impl = triton_backend()
    if backend == "auto":
        if x.is_cuda and impl is not None and r <= impl.k.MAX_RANK:
            return impl
        return TORCH
    if impl is None:
        raise RuntimeError("lora_linear: backend='triton' needs the triton package, which could not "
                           "be imported; install triton or use backend='torch'")
    if x.device.type == "cpu" and not impl.k.INTERPRETED:
        hint = ("TRITON_INTERPRET=1 is set but was not when fastlora.kernels was first imported"
                if os.environ.get("TRITON_INTERPRET") == "1" else "set TRITON_INTERPRET=1 before "
                "importing fastlora to run the kernels on the CPU through Triton's interpreter")
        raise RuntimeError(f"lora_linear: backend='triton' got CPU tensors; the kernels need CUDA "
                           f"tensors ({hint}), or use backend='torch'")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"lora_linear: backend='triton' supports CUDA tensors, got {x.device}")
    if r > impl.k.MAX_RANK:
        raise ValueError(f"lora_linear: backend='triton' supports r <= {impl.k.MAX_RANK}, got r={r}; "
                         f"use backend='torch' or 'auto'")
    return impl
