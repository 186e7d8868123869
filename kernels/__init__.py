"""fastlora's Triton device code (installed as ``fastlora.kernels``). Imports triton.

Launchers (what fastlora's routes call): ``lora_gemm`` (the fused GEMM, forward and dX; it also
takes W in 4 bits, ``Packed4bit``), ``xa_pass``, ``dy_pass``, ``x_pass`` (the memory-bound rank-r
passes), ``dropout_mask``, DoRA's ``weight_pass`` (the norm's pre-pass over W) and
``dora_dy_pass``, and ``dequantize_4bit`` (a 4-bit frozen weight to a dense one,
fastlora/linear4bit.py). Each launches its kernel through ``launch.launch`` (Triton's launch with
less host time on a repeat).
"""
from .common import INTERPRETED
from .configs import (MAX_RANK, TUNED_RANK, DeviceInfo, GemmConfig, PassConfig, device_info,
                      gemm_candidates, gemm_config, rank_block, reduce_config, xa_config)
from .dequant import Packed4bit, dequantize_4bit
from .gemm import lora_gemm
from .passes import dora_dy_pass, dropout_mask, dy_pass, weight_pass, x_pass, xa_pass

__all__ = ["INTERPRETED", "MAX_RANK", "TUNED_RANK", "DeviceInfo", "GemmConfig", "PassConfig", "device_info",
           "gemm_candidates", "gemm_config", "rank_block", "reduce_config", "xa_config", "lora_gemm", "xa_pass",
           "dy_pass", "x_pass", "dropout_mask", "weight_pass", "dora_dy_pass", "dequantize_4bit",
           "Packed4bit"]
