"""The plain-PyTorch LoRA linear layer: the test oracle, written as the equation reads.

    y = x W^T + b + s * (dropout(x) A^T) B^T

and DoRA as PEFT computes it (``dora_linear_reference``).

Autograd differentiates it; nothing here is fused or clever. ``upcast=True`` computes everything
in float64 (the reference the kernels are measured against). Without it, the low-rank products run
in x's dtype with the adapters cast to it, which is what fastlora's kernels and ``torch.autocast``
do, so its error is "PyTorch's own error in that dtype".
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .arguments import lora_scaling


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                          dropout_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                          upcast: bool = False) -> torch.Tensor:
    """y = x W^T + b + s * (x_d A^T) B^T, with x_d = x * mask / (1 - p) when a keep-mask is given.

    ``dropout_mask`` is a boolean tensor of x's shape (True = keep). With ``upcast`` the result is
    float64; otherwise it has x's dtype.
    """
    dtype = torch.float64 if upcast else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    y = x @ weight.T
    if bias is not None:
        y = y + bias.to(dtype)
    x_d = x
    if dropout_mask is not None:
        x_d = x * dropout_mask.to(dtype) / (1.0 - dropout_p)
    return y + scaling * ((x_d @ lora_A.T) @ lora_B.T)


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                          magnitude: torch.Tensor, dropout_mask: torch.Tensor | None = None,
                          dropout_p: float = 0.0, upcast: bool = False) -> torch.Tensor:
    """DoRA as PEFT's DoraLinearLayer computes it, in one dtype (float64 with ``upcast``):

        y = x W^T + b + (g - 1) o (x_d W^T) + g o (s (x_d A^T) B^T),   g = m / ||W + s B A||_row

    with x_d = x * mask / (1 - p) (x without a mask) and the norm detached: no gradient through it.
    """
    dtype = torch.float64 if upcast else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    lora_A, lora_B, magnitude = lora_A.to(dtype), lora_B.to(dtype), magnitude.to(dtype)
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    g = magnitude / norm
    x_d = x if dropout_mask is None else x * dropout_mask.to(dtype) / (1.0 - dropout_p)
    y = x @ weight.T
    if bias is not None:
        y = y + bias.to(dtype)
    return y + (g - 1) * (x_d @ weight.T) + g * (scaling * ((x_d @ lora_A.T) @ lora_B.T))


class LoRALinearReference(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, in plain PyTorch.

    The same parameters and initialisation as ``fastlora.LoRALinear`` (and PEFT): weight and bias
    frozen, A Kaiming-uniform, B zero, scaling alpha/r (alpha/sqrt(r) with ``use_rslora``).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **kw)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (nn.functional.linear(x, self.weight, self.bias)
                + self.scaling * nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A),
                                                      self.lora_B))
