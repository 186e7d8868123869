"""lora_linear as registered operators, the form torch.compile sees.

``torch.ops.fastlora.lora_linear`` (forward; DoRA when given a magnitude) and
``torch.ops.fastlora.lora_linear_backward`` (its autograd formula) wrap fastlora/autograd.py's
``forward`` and ``backward`` with ``torch.library.custom_op``, each with a fake (shape)
implementation, so the compiler keeps both passes opaque; an autocast rule per device gives them
nn.Linear's autocast behaviour. The route is resolved inside the operators, where shapes are
concrete.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import autograd
from .autocast import AUTOCAST_KEYS, autocast_cast
from .routes import get_route, resolve


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                   lora_B: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                   backend: str, magnitude: Optional[Tensor] = None) -> tuple[Tensor, Tensor, List[Tensor]]:
    """(y, xa, DoRA's kept tensors): autograd.forward."""
    return autograd.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend,
                            magnitude)


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, magnitude=None):
    route = get_route(resolve(backend, x, lora_A.shape[0]))
    return autograd.empty_outputs(x, lora_B, route.xa_dtype(x.dtype), magnitude, dropout_p)


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                            xa: Tensor, seed: Optional[Tensor], scaling: float, dropout_p: float,
                            backend: str, needs: List[bool], magnitude: Optional[Tensor],
                            bias: Optional[Tensor], kept: List[Tensor]) -> List[Tensor]:
    """autograd.backward."""
    return autograd.backward(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, backend,
                             needs, magnitude, bias, kept)


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, backend, needs, magnitude, bias,
      kept):
    like = (x, weight, x.new_empty((weight.shape[0],)), lora_A, lora_B, magnitude)
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    autograd.save_for_backward(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1], *output[2])


lora_linear_op.register_autograd(
    lambda ctx, dy, _dxa, _dkept: autograd.gradients(ctx, dy, torch.ops.fastlora.lora_linear_backward),
    setup_context=_setup_context)


def _autocast_rule(device_type: str):
    """The operator's autocast kernel: nn.Linear's casts, then the operator below autocast."""
    def kernel(keyset, *args):
        with torch.autocast(device_type, enabled=False):
            return torch.ops.fastlora.lora_linear.default(*autocast_cast(device_type, args[:5]),
                                                          *args[5:])
    return kernel


_LIB = torch.library.Library("fastlora", "FRAGMENT")  # holds the autocast rules for the module's life
for _device_type, _key in AUTOCAST_KEYS.items():
    _LIB.impl("lora_linear", _autocast_rule(_device_type), _key, with_keyset=True)


def run_compiled(*args) -> Tensor:
    """y for the ten operator arguments, through the registered operator."""
    y, _, _ = torch.ops.fastlora.lora_linear(*args)
    return y
