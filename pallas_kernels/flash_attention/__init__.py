"""Flash attention (FlashAttention-2 in Pallas-Triton, FA3-style Mosaic GPU forward on Hopper)."""

from pallas_kernels.flash_attention.api import flash_attention, flash_attention_with_lse
from pallas_kernels.flash_attention.config import MosaicConfig, TritonConfig, heuristic_config
from pallas_kernels.flash_attention.reference import attention_reference, flash_attention_reference

__all__ = [
    "MosaicConfig",
    "TritonConfig",
    "attention_reference",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_with_lse",
    "heuristic_config",
]
