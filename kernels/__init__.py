"""fastlora's Triton device code (installed as ``fastlora.kernels``). Imports triton."""
from .configs import MAX_RANK, GemmConfig, SkinnyConfig, gemm_config, rank_block, skinny_config
from .lora_linear import INTERPRETED, dropout_mask, lora_gemm, lora_skinny

__all__ = ["INTERPRETED", "MAX_RANK", "GemmConfig", "SkinnyConfig", "gemm_config", "rank_block",
           "skinny_config", "dropout_mask", "lora_gemm", "lora_skinny"]
