"""fastlora's Triton device code (installed as ``fastlora.kernels``). Imports triton."""
from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

from .configs import MAX_RANK, GemmConfig, SkinnyConfig, gemm_config, skinny_config
from .lora_linear import _lora_gemm_kernel, dropout_mask, lora_gemm, lora_skinny

# True when TRITON_INTERPRET=1 was set as these kernels were defined: they then run on CPU tensors.
INTERPRETED = isinstance(_lora_gemm_kernel, _InterpretedFunction)

__all__ = ["INTERPRETED", "MAX_RANK", "GemmConfig", "SkinnyConfig", "gemm_config", "skinny_config",
           "dropout_mask", "lora_gemm", "lora_skinny"]
