"""nn.Linear's autocast rule, which lora_linear follows in eager mode and under torch.compile.

Under ``torch.autocast`` every floating tensor on the autocast device except float64 is cast to the
autocast dtype in force (CUDA users pick float16 or bfloat16 per region, so the rule reads the
dtype at call time). The casts run above autograd: gradients flow back through them into the
parameters' own dtype.
"""
from __future__ import annotations

import torch

# Device types whose autocast lora_linear follows, and their dispatch keys.
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_on(device_type: str) -> bool:
    """True when autocast is enabled now for ``device_type`` (and lora_linear follows it there)."""
    return device_type in AUTOCAST_KEYS and torch.is_autocast_enabled(device_type)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` has inside lora_linear: the autocast dtype when autocast is on for its device
    and would cast it (every float dtype but float64), else its own."""
    if t.dtype != torch.float64 and autocast_on(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def autocast_cast(device_type: str, tensors) -> list:
    """``tensors`` (some None) as autocast would hand them to nn.Linear on ``device_type``."""
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None or t.device.type != device_type or t.dtype == torch.float64
            else t.to(dtype) for t in tensors]
