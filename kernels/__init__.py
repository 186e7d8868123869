"""fastlora's Triton device code (installed as ``fastlora.kernels``). Imports triton.

Launchers (what fastlora's routes call): ``lora_gemm`` (the fused GEMM, forward and dX),
``xa_pass``, ``dy_pass``, ``x_pass`` (the memory-bound rank-r passes), ``dropout_mask``, and DoRA's
``weight_pass`` (the norm's pre-pass over W) and ``dora_dy_pass``.
"""
from .common import INTERPRETED
from .configs import (MAX_RANK, TUNED_RANK, DeviceInfo, GemmConfig, PassConfig, device_info,
                      gemm_candidates, gemm_config, rank_block, reduce_config, xa_config)
from .gemm import lora_gemm
from .passes import dora_dy_pass, dropout_mask, dy_pass, weight_pass, x_pass, xa_pass

__all__ = ["INTERPRETED", "MAX_RANK", "TUNED_RANK", "DeviceInfo", "GemmConfig", "PassConfig", "device_info",
           "gemm_candidates", "gemm_config", "rank_block", "reduce_config", "xa_config", "lora_gemm", "xa_pass",
           "dy_pass", "x_pass", "dropout_mask", "weight_pass", "dora_dy_pass"]
