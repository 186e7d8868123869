"""fastlora: a fused LoRA linear layer for PyTorch.

    y = x W^T + b + s * (dropout(x) A^T) B^T

and DoRA (``magnitude=`` / ``use_dora=True``: each output feature of W + s B A rescaled to a trained
length; docs/dora.md). Triton kernels on CUDA (one pass over x and W forward, a hand-written
backward), plain PyTorch elsewhere; W may be held in 4 bits (QLoRA, bitsandbytes' NF4/FP4 format:
``quantize_4bit``, ``LoRALinear4bit``). ``import fastlora`` does not need triton or bitsandbytes;
the adapter files need
safetensors and ``from_peft`` needs peft (from a checkout: ``pip install -e ".[peft]"``), imported
when called.
"""
from .modules import LoRALinear, ParameterCount, count_parameters
from .functional import lora_linear
from .linear4bit import Linear4bit, LoRALinear4bit, quantize_4bit
from .model import (apply_lora, lora_state_dict, mark_only_lora_as_trainable, merge,
                    merge_and_unload, unmerge)
from .adapters import load_adapter, save_adapter
from .peft_interop import from_peft
from . import dora, reference

__version__ = "0.1.0"

__all__ = ["lora_linear", "LoRALinear", "count_parameters", "ParameterCount",
           "apply_lora", "mark_only_lora_as_trainable", "lora_state_dict",
           "merge", "unmerge", "merge_and_unload", "save_adapter", "load_adapter", "from_peft",
           "dora", "quantize_4bit", "Linear4bit", "LoRALinear4bit", "reference", "__version__"]
