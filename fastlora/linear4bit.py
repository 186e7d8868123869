"""4-bit frozen bases (QLoRA): fastlora's ``Linear4bit``, ``quantize_4bit`` and ``LoRALinear4bit``.

``LoRALinear4bit`` is a LoRA layer over a 4-bit base, fastlora's ``Linear4bit`` or bitsandbytes'
``Linear4bit`` (read by attribute, fastlora/quant4bit.py). It computes

    y = x W^T + b + s * (dropout(x) A^T) B^T,     W = dequantize(4-bit W) in the compute dtype

by one of two routes (``route_4bit``):

- "fused4bit": the fused GEMM reads W's tiles in 4 bits and dequantizes them in its K loop, for
  the forward and for dX (kernels/gemm.py's 4-bit form, through triton_routes.FusedRoute); the
  autograd graph holds the 4-bit weight only. backend="fused", and "triton"/"auto" up to
  FUSED_4BIT_MAX_M rows.
- otherwise W is dequantized once (``dense_weight``: a Triton kernel on CUDA, plain PyTorch
  elsewhere, equal bit for bit) and ``fastlora.lora_linear`` runs on it with the backend asked
  for. The dense W is not kept for the backward: while lora_linear runs, saved-tensor hooks replace
  it in the autograd graph by how to make it again (dequantize once more in the backward, as
  bitsandbytes' own matmul does), so a training step holds one layer's dense W at a time. Other
  saved tensors go to whatever hooks were already installed (activation checkpointing's).

The compute dtype is bitsandbytes' rule: the base's ``compute_dtype`` when set (x is cast to it and
the output back to x's dtype), else x's dtype; under autocast, the autocast dtype (as nn.Linear).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .arguments import check_lora_args, lora_scaling
from .autocast import autocast_cast, autocast_on
from .functional import draw_seed, lora_linear
from .modules import check_lora_options, init_lora_parameters
from .quant4bit import (NestedAbsmax, Weight4bit, check_quant_type, describe, is_bnb_4bit,
                        quantize)
from .autograd import backward as lora_backward
from .routes import Dropout, get_route, resolve, triton_kernels

# ------------------------------------------------------------------------------------------------
# the dense weight, and keeping it out of the autograd graph


def dense_weight(w4: Weight4bit, dtype: torch.dtype, backend: str = "auto") -> Tensor:
    """W [N, K] in ``dtype``: the Triton kernel where ``backend`` runs Triton kernels (CUDA tensors,
    or CPU tensors under the interpreter for the Triton backends), else plain PyTorch."""
    kernels = None if backend == "torch" else triton_kernels()
    device = w4.device.type
    if kernels is None or torch.compiler.is_compiling() or not (
            device == "cuda" or (device == "cpu" and kernels.INTERPRETED and backend != "auto")):
        return w4.dequantize(dtype)
    n = w4.nested
    nested = None if n is None else (n.scale.contiguous(), n.code.contiguous(), n.offset.contiguous(),
                                     n.blocksize)
    return kernels.dequantize_4bit(w4.packed.contiguous(), w4.absmax.contiguous(), w4.code.contiguous(),
                                   w4.shape, w4.blocksize, dtype, nested=nested)


class _Redequantize:
    """What the autograd graph keeps in place of a view of the dense weight."""
    __slots__ = ("w4", "dtype", "backend", "geometry")

    def __init__(self, w4, dtype, backend, view: Tensor):
        self.w4, self.dtype, self.backend = w4, dtype, backend
        self.geometry = (view.size(), view.stride(), view.storage_offset())

    def make(self) -> Tensor:
        return dense_weight(self.w4, self.dtype, self.backend).as_strided(*self.geometry)


_OUTER = object()  # marks a tensor handed to the hooks that were installed before ours


def _keep_as_4bit(dense: Tensor, w4: Weight4bit, dtype: torch.dtype, backend: str):
    """Saved-tensor hooks under which autograd saves ``dense`` (or a view of it) as a recipe to
    dequantize it again; other tensors go to the enclosing hooks (checkpointing's), if any."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    outer = top(False) if top is not None else None
    storage = dense.untyped_storage().data_ptr()

    def pack(t):
        if t.device == dense.device and t.untyped_storage().data_ptr() == storage:
            return _Redequantize(w4, dtype, backend, t)
        return (_OUTER, outer[0](t)) if outer is not None else t

    def unpack(p):
        if isinstance(p, _Redequantize):
            return p.make()
        if isinstance(p, tuple) and len(p) == 2 and p[0] is _OUTER:
            return outer[1](p[1])
        return p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _compute_dtype(x: Tensor, compute_dtype: Optional[torch.dtype]) -> tuple[torch.dtype, bool]:
    """(the dtype the layer computes in, whether the output goes back to x's dtype)."""
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        raise TypeError(f"a 4-bit linear layer takes a floating-point tensor x, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype != torch.float64 and autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type), False
    return compute_dtype or x.dtype, True


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


# Rows up to which backend "triton" (and "auto" on CUDA) reads W in 4 bits inside the fused GEMM
# (decode: W read once, in 4 bits); above it W is dequantized once and the 16-bit routes run, since
# the fused form dequantizes every W tile once per row block. A guess, not measured on a GPU yet:
# a route-table entry should replace it.
FUSED_4BIT_MAX_M = 64


def route_4bit(backend: str, x: Tensor, r: int) -> str:
    """The route over a 4-bit W for x: "fused4bit" (the fused GEMM reading W in 4 bits), or the one
    ``lora_linear`` runs on the dequantized W ("torch", "triton", "split"); a ValueError when
    ``backend`` cannot run here."""
    name = resolve(backend, x, r)
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if rows > 0 and (name == "fused" or (name == "triton" and rows <= FUSED_4BIT_MAX_M)):
        return "fused4bit"
    return name


def packed_4bit(w4: Weight4bit):
    """``w4`` as the kernels take it (fastlora.kernels.Packed4bit)."""
    n = w4.nested
    nested = (None, None, None, 1) if n is None else (n.scale.contiguous(), n.code.contiguous(),
                                                      n.offset.contiguous(), n.blocksize)
    return triton_kernels().Packed4bit(w4.packed.reshape(-1).contiguous(), w4.absmax.contiguous(),
                                       w4.code.contiguous(), *nested[:3], w4.shape, w4.blocksize, nested[3])


class LoRA4bitFunction(torch.autograd.Function):
    """y for a 2-D x with W read in 4 bits by the fused GEMM, forward and dX (FusedRoute's passes,
    fastlora/autograd.py derives them); the graph keeps x, the adapters, xa, the seed and the 4-bit
    weight, never a dense one."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scaling, dropout_p, seed, packed):
        cfg = triton_kernels().gemm_config(x.shape[0], packed.shape[0], x.shape[1], lora_A.shape[0],
                                           x.dtype, x.device, four_bit=True)
        dropout = Dropout(seed, dropout_p) if dropout_p > 0 else None
        y, xa = get_route("fused").forward(x, packed, bias, lora_A, lora_B, scaling, dropout,
                                           gemm=dataclasses.asdict(cfg))
        ctx.save_for_backward(x, lora_A, lora_B, xa, seed)
        ctx.packed, ctx.scaling, ctx.dropout_p = packed, scaling, dropout_p
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        """fastlora/autograd.py's backward on the fused route, the 4-bit weight in W's place (its
        dX GEMM reads it as it reads the forward's)."""
        x, lora_A, lora_B, xa, seed = ctx.saved_tensors
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        grads = iter(lora_backward(dy, x, ctx.packed, lora_A, lora_B, xa, seed, ctx.scaling, ctx.dropout_p,
                                   "fused", [need_x, False, need_bias, need_a, need_b, False]))
        dx, dbias, da, db = (next(grads) if need else None for need in (need_x, need_bias, need_a, need_b))
        # x, bias, lora_A, lora_B, scaling, dropout_p, seed, packed
        return dx, dbias, da, db, None, None, None, None


def _fused_4bit(x, w4, bias, lora_A, lora_B, scaling, dropout_p, training):
    """lora_linear's contract (arguments checked, autocast as nn.Linear, any leading dimensions)
    for the fused route over a 4-bit W; x and bias already in the compute dtype."""
    device_type = x.device.type
    cast = autocast_on(device_type) and x.dtype != torch.float64
    if cast:
        x, bias, lora_A, lora_B = autocast_cast(device_type, (x, bias, lora_A, lora_B))
    proxy = x.new_zeros(()).expand(w4.shape)  # W's shape, dtype and device, no memory
    scaling, dropout_p = check_lora_args(x, proxy, bias, lora_A, lora_B, scaling, dropout_p, "fused")
    p = dropout_p if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    seed = draw_seed(x.device) if p > 0 else None
    with torch.autocast(device_type, enabled=False) if cast else contextlib.nullcontext():
        y = LoRA4bitFunction.apply(x2, bias, lora_A, lora_B, scaling, p, seed, packed_4bit(w4))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w4.shape[0])


def lora_linear_4bit(x: Tensor, w4: Weight4bit, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float = 0.0, training: bool = True,
                     backend: str = "auto", compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``fastlora.lora_linear`` with the frozen W given in 4 bits (see the module docstring for the
    two routes)."""
    dtype, cast_back = _compute_dtype(x, compute_dtype)
    if not torch.compiler.is_compiling() and route_4bit(backend, x, lora_A.shape[0]) == "fused4bit":
        y = _fused_4bit(_as(x, dtype) if cast_back else x, w4, _as(bias, dtype) if cast_back else bias,
                        lora_A, lora_B, scaling, dropout_p, training)
        return _as(y, x.dtype) if cast_back else y
    dense = dense_weight(w4, dtype, backend)
    args = (_as(x, dtype) if cast_back else x, dense, _as(bias, dtype) if cast_back else bias, lora_A,
            lora_B, scaling)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        with _keep_as_4bit(dense, w4, dtype, backend):
            y = lora_linear(*args, dropout_p=dropout_p, training=training, backend=backend)
    else:
        y = lora_linear(*args, dropout_p=dropout_p, training=training, backend=backend)
    return _as(y, x.dtype) if cast_back else y


def linear_4bit(x: Tensor, w4: Weight4bit, bias: Optional[Tensor], backend: str = "auto",
                compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y = x W^T + b with W given in 4 bits (the base alone; the same dtype rule and graph)."""
    dtype, cast_back = _compute_dtype(x, compute_dtype)
    dense = dense_weight(w4, dtype, backend)
    args = (_as(x, dtype), dense, _as(bias, dtype)) if cast_back else (x, dense, bias)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        with _keep_as_4bit(dense, w4, dtype, backend):
            y = F.linear(*args)
    else:
        y = F.linear(*args)
    return _as(y, x.dtype) if cast_back else y


# ------------------------------------------------------------------------------------------------
# fastlora's frozen 4-bit linear layer


class _KeepsFormatDtypes(nn.Module):
    """A module whose buffers hold a 4-bit format: ``.to(dtype)``, ``.half()`` ... move them, never
    cast them (a cast would change the weight); parameters (the bias) follow as usual."""

    def _apply(self, fn, recurse=True):
        before = {name: t for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, t in before.items():
            after = self._buffers[name]
            if after is not None and after.dtype != t.dtype:
                self._buffers[name] = t.to(after.device)
        return self


# bitsandbytes' state-dict names for the quant state, after "<prefix>weight."
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Linear4bit(_KeepsFormatDtypes):
    """A frozen linear layer whose weight is held in bitsandbytes' 4-bit format: y = x W^T + b with
    W dequantized on the fly (``fastlora.quantize_4bit`` makes one from an nn.Linear).

    ``weight`` is the packed uint8 codes; the quant state lives beside it. The state dict is
    bitsandbytes' (``weight``, ``bias``, ``weight.absmax``, ``weight.quant_map``, the nested absmax's
    ``weight.nested_absmax`` / ``weight.nested_quant_map`` and the ``weight.quant_state.bitsandbytes__nf4``
    blob), so a checkpoint of one loads into the other. ``compute_dtype``: as bitsandbytes'
    Linear4bit (x is cast to it, the output back); None computes in x's dtype.
    """

    def __init__(self, weight: Weight4bit, bias: Optional[Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(weight, Weight4bit):
            raise TypeError(f"Linear4bit: weight must be a fastlora Weight4bit, got {type(weight).__name__}")
        if compute_dtype is not None and compute_dtype not in (torch.float16, torch.bfloat16,
                                                               torch.float32, torch.float64):
            raise ValueError(f"Linear4bit: compute_dtype must be a float dtype or None, got {compute_dtype!r}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.backend = backend
        self._layout = (weight.shape, weight.dtype, weight.blocksize, weight.quant_type,
                        None if weight.nested is None else weight.nested.blocksize)
        self.register_buffer("weight", weight.packed)
        for name, t in (("absmax", weight.absmax), ("quant_map", weight.code)):
            self.register_buffer(name, t, persistent=False)
        n = weight.nested
        for name, t in (("nested_absmax", None if n is None else n.scale),
                        ("nested_quant_map", None if n is None else n.code),
                        ("nested_offset", None if n is None else n.offset)):
            self.register_buffer(name, t, persistent=False)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"Linear4bit: bias must be [out_features] = [{self.out_features}], "
                                 f"got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def weight4bit(self) -> Weight4bit:
        """The weight's 4-bit description, sharing this module's tensors."""
        shape, dtype, blocksize, quant_type, nested_blocksize = self._layout
        b = self._buffers
        nested = None if nested_blocksize is None else NestedAbsmax(
            b["nested_absmax"], b["nested_quant_map"], b["nested_offset"], nested_blocksize)
        return Weight4bit(b["weight"], b["absmax"], shape, dtype, blocksize, quant_type, b["quant_map"],
                          nested)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight [out_features, in_features] in ``dtype`` (default: the dtype it was
        quantized from)."""
        w4 = self.weight4bit()
        return dense_weight(w4, dtype or w4.dtype, self.backend)

    def forward(self, x: Tensor) -> Tensor:
        return linear_4bit(x, self.weight4bit(), self.bias, self.backend, self.compute_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        shape, dtype, blocksize, quant_type, nested_blocksize = self._layout
        b = self._buffers
        state = {"absmax": b["absmax"], "quant_map": b["quant_map"]}
        info = {"quant_type": quant_type, "blocksize": blocksize,
                "dtype": str(dtype).replace("torch.", ""), "shape": list(shape)}
        if nested_blocksize is not None:
            state.update(nested_absmax=b["nested_absmax"], nested_quant_map=b["nested_quant_map"])
            info.update(nested_blocksize=nested_blocksize, nested_dtype="float32",
                        nested_offset=b["nested_offset"].item())
        for name, t in state.items():
            destination[f"{prefix}weight.{name}"] = t if keep_vars else t.detach()
        blob = torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8)
        destination[f"{prefix}weight.quant_state.bitsandbytes__{quant_type}"] = blob

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        shape, dtype, blocksize, quant_type, nested_blocksize = self._layout
        ours = {k: state_dict[k] for k in list(state_dict) if k.startswith(prefix + "weight.")}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not ours and prefix + "weight" not in state_dict:
            return  # nothing of the weight here (missing keys reported by the default loader)
        blob_key = f"{prefix}weight.quant_state.bitsandbytes__{quant_type}"
        needed = [f"{prefix}weight.{n}" for n in _STATE_KEYS[:2 if nested_blocksize is None else 4]]
        missing = [k for k in needed + [blob_key] if k not in ours]
        if missing:  # (a 4-bit weight of another quant type or nesting, or none)
            missing_keys.extend(missing)
            return
        info = json.loads(bytes(ours[blob_key].cpu().tolist()).decode("utf-8"))
        want = {"quant_type": quant_type, "blocksize": blocksize, "dtype": str(dtype).replace("torch.", ""),
                "shape": list(shape)}
        got = {k: info.get(k) for k in want}
        if got != want or info.get("nested_blocksize") != nested_blocksize:
            error_msgs.append(f"Linear4bit {prefix.rstrip('.') or '<root>'}: the state dict's 4-bit "
                              f"weight is {got} (nested blocksize {info.get('nested_blocksize')}), this "
                              f"layer's {want} (nested blocksize {nested_blocksize})")
            return
        b = self._buffers
        with torch.no_grad():
            b["absmax"].copy_(ours[needed[0]].reshape(b["absmax"].shape))
            b["quant_map"].copy_(ours[needed[1]].reshape(16))
            if nested_blocksize is not None:
                b["nested_absmax"].copy_(ours[needed[2]].reshape(b["nested_absmax"].shape))
                b["nested_quant_map"].copy_(ours[needed[3]].reshape(256))
                b["nested_offset"].fill_(float(info["nested_offset"]))
        extra = set(ours) - set(needed) - {blob_key}
        if strict:
            unexpected_keys.extend(sorted(extra))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {describe(self.weight4bit())}"
                + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else ""))


def quantize_4bit(linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> Linear4bit:
    """A frozen ``Linear4bit`` holding ``linear``'s weight in bitsandbytes' 4-bit format (the bytes
    bitsandbytes' ``quantize_4bit`` writes on the CPU) and a copy of its bias.

    ``quant_type``: "nf4" (QLoRA's NormalFloat) or "fp4"; ``blocksize``: elements sharing an absmax
    (64, 128, 256, ...; it must divide in_features); ``double_quant``: store absmax in 8 bits too
    (QLoRA's double quantization); ``compute_dtype``: see Linear4bit. The weight must be float16,
    bfloat16 or float32 (the dtype ``dequantize()`` returns by default)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_4bit: linear must be an nn.Linear, got {type(linear).__name__}")
    if is_bnb_4bit(linear):
        raise TypeError("quantize_4bit: linear is already a bitsandbytes 4-bit layer; wrap it in "
                        "fastlora.LoRALinear4bit (or use apply_lora) as it is")
    check_quant_type(quant_type, "quantize_4bit")
    w4 = quantize(linear.weight.detach(), quant_type, blocksize, double_quant)
    return Linear4bit(w4, None if linear.bias is None else linear.bias.detach().clone(), compute_dtype)


# ------------------------------------------------------------------------------------------------
# the LoRA layer


# The adapters' dtype over a 4-bit base: float32, as PEFT's QLoRA layers hold them (so that their
# adapter files load both ways), whatever the compute dtype.
ADAPTER_DTYPE = torch.float32


def is_4bit_linear(module) -> bool:
    """True for a 4-bit base a LoRALinear4bit takes: fastlora's Linear4bit or a quantized
    bitsandbytes Linear4bit."""
    return isinstance(module, Linear4bit) or (isinstance(module, nn.Linear) and is_bnb_4bit(module))


def weight4bit(module: nn.Module) -> Weight4bit:
    """The 4-bit weight of a fastlora or bitsandbytes Linear4bit."""
    return module.weight4bit() if isinstance(module, Linear4bit) else Weight4bit.from_bnb(module.weight)


def _bnb_cpu_layout(module: nn.Module) -> bool:
    return getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)


class LoRALinear4bit(_KeepsFormatDtypes):
    """y = x W^T + b + s * (dropout(x) A^T) B^T with W held in 4 bits by ``base_layer`` (a
    fastlora ``Linear4bit`` or a bitsandbytes ``Linear4bit``, kept as it is and frozen) and A, B
    trainable (see the module docstring for the computation and its memory). The model's state dict
holds the base's tensors under ``<path>.base_layer.`` (in the base's own format) and the bias under
both ``<path>.bias`` and ``<path>.base_layer.bias`` (one Parameter).

    The adapters are float32 (``ADAPTER_DTYPE``, as PEFT makes them over a 4-bit base; their
    products run in the compute dtype), on the weight's device; ``r``, ``alpha``, ``dropout``,
    ``use_rslora``, ``init_lora_weights`` and ``backend`` are LoRALinear's.

    ``merge()`` follows PEFT for 4-bit bases: dequantize, add s B A, requantize in the same layout
    (with its warning: the merged layer differs from the unmerged one by that rounding); the
    base's tensors are changed in place, so the model's state dict then holds the merged weight, as
    PEFT's. ``unmerge()`` restores the 4-bit tensors bit for bit from copies kept while merged
    (half a byte a weight).
    """

    # DoRA over a 4-bit base is not supported (apply_lora and from_peft refuse it): the attributes
    # a LoRALinear's callers read say so
    use_dora = False
    lora_magnitude_vector = None

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, backend: str = "auto"):
        super().__init__()
        if not is_4bit_linear(base_layer):
            raise TypeError(f"LoRALinear4bit: base_layer must be a fastlora Linear4bit or a quantized "
                            f"bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        r, alpha, dropout = check_lora_options(r, alpha, dropout, use_rslora, init_lora_weights,
                                               backend, "LoRALinear4bit")
        w4 = weight4bit(base_layer)  # the format is checked here, once
        self.base_layer = base_layer.requires_grad_(False)
        self.out_features, self.in_features = w4.shape
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.dropout = dropout
        self.backend = backend
        kw = {"device": w4.device, "dtype": ADAPTER_DTYPE}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        init_lora_parameters(self.lora_A, self.lora_B, init_lora_weights)
        # the base's bias, also registered here: it keeps its name (<path>.bias) in the model, so
        # bias training, lora_state_dict and adapter files treat it as a LoRALinear's
        if base_layer.bias is not None:
            self.bias = base_layer.bias
        else:
            self.register_parameter("bias", None)
        self._before_merge: Optional[list[str]] = None  # names of the buffers holding them

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base_layer, "compute_dtype", None)

    @property
    def merged(self) -> bool:
        return self._before_merge is not None

    def weight4bit(self) -> Weight4bit:
        return weight4bit(self.base_layer)

    def forward(self, x: Tensor) -> Tensor:
        w4 = weight4bit(self.base_layer)
        if self.merged:
            return linear_4bit(x, w4, self.bias, self.backend, self.compute_dtype)
        return lora_linear_4bit(x, w4, self.bias, self.lora_A, self.lora_B, self.scaling,
                                dropout_p=self.dropout, training=self.training, backend=self.backend,
                                compute_dtype=self.compute_dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Requantize W + s B A into the base, in place (PEFT's 4-bit merge); no-op when merged."""
        if self.merged:
            return
        if _bnb_cpu_layout(self.base_layer):
            raise ValueError("LoRALinear4bit.merge: bitsandbytes has repacked this base for its CPU "
                             "inference kernel (absmax rounded to bfloat16), a layout fastlora does not "
                             "write; reload the base to merge")
        w4 = weight4bit(self.base_layer)
        acc = torch.float64 if torch.float64 in (self.lora_A.dtype, self.lora_B.dtype) else torch.float32
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)
        merged = torch.add(w4.dequantize(acc), delta, alpha=self.scaling).to(w4.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"LoRALinear4bit.merge: W + s B A is not finite in {w4.dtype} (scaling="
                             f"{self.scaling:g}, max |B A| = {delta.abs().max().item():g}); the weight "
                             f"was left unchanged")
        new = quantize(merged, w4.quant_type, w4.blocksize, double_quant=w4.nested is not None)
        if not w4.same_layout(new):
            raise ValueError(f"LoRALinear4bit.merge: the base's layout ({describe(w4)}) is not one "
                             f"fastlora writes ({describe(new)}); nothing was merged")
        warnings.warn("LoRALinear4bit.merge: merging into a 4-bit weight requantizes W + s B A, so the "
                      "merged layer's outputs differ from the unmerged one's by that rounding (as PEFT "
                      "warns); unmerge() restores the 4-bit weight exactly", UserWarning, stacklevel=2)
        names = []
        for name, t in w4.tensors().items():
            self.register_buffer(f"_before_merge_{name}", t.clone(), persistent=False)
            names.append(name)
        w4.copy_(new)
        self._before_merge = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base's 4-bit tensors from before merge(), bit for bit; no-op when not merged."""
        if not self.merged:
            return
        current = weight4bit(self.base_layer).tensors()
        for name in self._before_merge:
            saved = self._buffers.pop(f"_before_merge_{name}")
            current[name].copy_(saved)
        self._before_merge = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"use_rslora={self.use_rslora}, backend={self.backend!r}"
                + (", merged=True" if self.merged else ""))
