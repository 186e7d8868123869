"""fastlora's Triton device code (installed as ``fastlora.kernels``). Imports triton.

Launchers (what fastlora's routes call): ``lora_gemm`` (the fused GEMM, forward and dX),
``xa_pass``, ``dy_pass``, ``x_pass`` (the memory-bound rank-r passes), ``dropout_mask``;
``dequantize_4bit`` (a 4-bit frozen weight to a dense one, fastlora/linear4bit.py); ``lora_gemm``
also takes W in 4 bits (``Packed4bit``).
"""
from .common import INTERPRETED
from .configs import (MAX_RANK, DeviceInfo, GemmConfig, PassConfig, device_info, gemm_config,
                      rank_block, reduce_config, xa_config)
from .dequant import Packed4bit, dequantize_4bit
from .gemm import lora_gemm
from .passes import dropout_mask, dy_pass, x_pass, xa_pass

__all__ = ["INTERPRETED", "MAX_RANK", "DeviceInfo", "GemmConfig", "PassConfig", "device_info",
           "gemm_config", "rank_block", "reduce_config", "xa_config", "lora_gemm", "xa_pass",
           "dy_pass", "x_pass", "dropout_mask", "dequantize_4bit", "Packed4bit"]
