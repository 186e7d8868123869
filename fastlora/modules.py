"""LoRALinear: a frozen linear layer plus a trainable low-rank update, computed by lora_linear."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from . import dora
from .arguments import check_backend, finite_number, lora_scaling, positive_int, probability
from .functional import lora_linear


class LoRALinear(nn.Module):
    """y = x W^T + b + s * (dropout(x) A^T) B^T, with W and b frozen and A, B trainable.

    Parameters are named as nn.Linear's (``weight``, ``bias``), so a base checkpoint loads
    unchanged, plus ``lora_A`` [r, in_features] and ``lora_B`` [out_features, r] as in PEFT.
    ``init_lora_weights``: True (PEFT's default: A Kaiming-uniform, B zero, so a fresh layer equals
    its base), "gaussian" (A ~ N(0, (1/r)^2), B zero, as PEFT) or False (both random, for tests).

    ``use_dora=True``: DoRA (PEFT's ``use_dora``), a trainable magnitude ``lora_magnitude_vector``
    [out_features] m rescaling each output feature of W + s B A to length m (fastlora.lora_linear's
    ``magnitude``; docs/dora.md). It starts as ||W + s B A||_row, so a fresh layer equals its LoRA
    layer, and is set again by ``reset_lora_parameters``. DoRA needs r <= min(in_features,
    out_features).

    ``merge()`` folds ``s B A`` into ``weight`` so that the forward is the plain GEMM; ``unmerge()``
    restores the weight bit-exactly from a copy kept while merged (one extra weight-sized tensor).
    Merging is invisible to checkpoints: the state dict of a merged layer holds the weight from
    before the merge (so it loads into an unmerged layer without counting the adapter twice), and
    loading into a merged layer loads into the unmerged one and merges again. For a checkpoint with
    the adapter folded in, use ``fastlora.merge_and_unload``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, backend: str = "auto",
                 device=None, dtype=None, use_dora: bool = False):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora, init_lora_weights, backend,
                    use_dora)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True,
                    backend: str = "auto", use_dora: bool = False) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias Parameters are shared (not copied) and frozen.

        An nn.Linear subclass whose forward is not nn.Linear's is refused: the LoRALinear computes
        F.linear, so its forward would be dropped silently."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        if has_own_forward(linear):
            raise TypeError(f"LoRALinear.from_linear: linear is a {type(linear).__qualname__}, whose "
                            f"forward is not nn.Linear's; a LoRALinear computes F.linear and would "
                            f"drop it")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, init_lora_weights,
                     backend, use_dora)
        return layer

    def _setup(self, weight, bias, r, alpha, dropout, use_rslora, init_lora_weights, backend, use_dora):
        r, alpha, dropout = check_lora_options(r, alpha, dropout, use_rslora, init_lora_weights, backend,
                                               "LoRALinear")
        if not isinstance(use_dora, bool):
            raise ValueError(f"LoRALinear: use_dora must be True or False, got {use_dora!r}")
        if use_dora and r > min(weight.shape):
            raise ValueError(f"LoRALinear: DoRA needs r <= min(in_features, out_features) = "
                             f"{min(weight.shape)}, got r={r}: B A cannot have a larger rank")
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.dropout = dropout
        self.backend = backend
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **kw))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        # The weight as it was before merge(), while merged: a non-persistent buffer, so that
        # .to(device/dtype) moves it with the weight and it never reaches a checkpoint.
        self.register_buffer("_weight_before_merge", None, persistent=False)
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        init_lora_parameters(self.lora_A, self.lora_B, init_lora_weights)
        if self.use_dora:  # m = ||W + s B A||_row: the layer starts as its LoRA layer (g = 1)
            _, g = dora.merged_scale(self.weight, self.lora_A, self.lora_B, self.scaling,
                                     torch.ones_like(self.lora_magnitude_vector))
            self.lora_magnitude_vector.copy_(1.0 / g)

    @property
    def merged(self) -> bool:
        return self._buffers["_weight_before_merge"] is not None  # (read on every forward)

    @torch.no_grad()
    def _merged_weight(self) -> torch.Tensor:
        """W + s B A (DoRA: m o (W + s B A) / ||W + s B A||_row), computed in float32 (float64 for
        float64 tensors) and cast to W's dtype."""
        if self.use_dora:
            w, g = dora.merged_scale(self.weight, self.lora_A, self.lora_B, self.scaling,
                                     self.lora_magnitude_vector)
            w = w.mul_(g[:, None]).to(self.weight.dtype)
            if not torch.isfinite(w).all():
                raise ValueError(f"LoRALinear.merge: m o (W + s B A) / ||W + s B A||_row is not finite "
                                 f"in {self.weight.dtype} (a zero row norm, or an overflow); the "
                                 f"weight was left unchanged")
            return w
        acc = torch.float64 if torch.float64 in (self.weight.dtype, self.lora_A.dtype,
                                                 self.lora_B.dtype) else torch.float32
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)
        w = torch.add(self.weight.to(acc), delta, alpha=self.scaling).to(self.weight.dtype)
        if not torch.isfinite(w).all():
            raise ValueError(f"LoRALinear.merge: W + s B A is not finite in {self.weight.dtype} "
                             f"(scaling={self.scaling:g}, max |B A| = {delta.abs().max().item():g}); "
                             f"the weight was left unchanged")
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight``; the forward becomes F.linear. No-op when merged."""
        if self.merged:
            return
        w = self._merged_weight()
        self._weight_before_merge = self.weight.detach().clone()
        self.weight.copy_(w)  # in place: whoever shares the Parameter sees the merged weight

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight from before merge(), bit-exactly. No-op when not merged."""
        if not self.merged:
            return
        self.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w = self._weight_before_merge
            destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        touched = any(prefix + name in state_dict
                      for name in ("weight", "lora_A", "lora_B", "lora_magnitude_vector"))
        if not (self.merged and touched):
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        try:
            self.merge()
        except ValueError as err:
            raise ValueError(f"load_state_dict: LoRALinear {prefix.rstrip('.') or '<root>'!r} was "
                             f"merged; its new tensors were loaded but cannot be merged, so it is "
                             f"left unmerged: {err}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters  # read directly: nn.Module's attribute lookup costs host time per call
        if self.merged:
            return F.linear(x, p["weight"], p["bias"])
        return lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], self.scaling,
                           dropout_p=self.dropout, training=self.training, backend=self.backend,
                           magnitude=p["lora_magnitude_vector"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, backend={self.backend!r}"
                + (", use_dora=True" if self.use_dora else "") + (", merged=True" if self.merged else ""))


def check_lora_options(r, alpha, dropout, use_rslora, init_lora_weights, backend,
                       caller: str) -> tuple[int, float, float]:
    """(r, alpha, dropout) of a LoRA layer, each checked (a ValueError naming ``caller``); alpha is
    kept as given when it is a plain int or float."""
    r = positive_int(r, "r", caller)
    # numpy scalars become Python numbers; a plain int or float is kept as given
    alpha = alpha if type(alpha) in (int, float) else finite_number(alpha, "alpha", caller)
    finite_number(alpha, "alpha", caller)
    if not isinstance(use_rslora, bool):  # a truthy "no" must not switch rsLoRA on
        raise ValueError(f"{caller}: use_rslora must be True or False, got {use_rslora!r}")
    dropout = probability(dropout, "dropout", caller)
    check_backend(backend, caller)
    init_ok = init_lora_weights is True or init_lora_weights is False or init_lora_weights == "gaussian"
    if not init_ok:
        raise ValueError(f"{caller}: init_lora_weights must be True, False or 'gaussian', "
                         f"got {init_lora_weights!r}")
    return r, alpha, dropout


@torch.no_grad()
def init_lora_parameters(lora_A: nn.Parameter, lora_B: nn.Parameter, init_lora_weights: bool | str) -> None:
    """PEFT's initialisations: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, (1/r)^2), B
    zero) or False (both random, for tests)."""
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
    else:
        nn.init.zeros_(lora_B)


def has_own_forward(linear: nn.Linear) -> bool:
    """True when ``linear``'s class overrides nn.Linear.forward (a LoRALinear in its place, which
    computes F.linear, would change the output)."""
    return type(linear).forward is not nn.Linear.forward


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.4f}"


def count_parameters(module: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts of a module (shared parameters counted once)."""
    params = list(module.parameters())
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params))
