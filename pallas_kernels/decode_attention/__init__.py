"""Split-KV decode attention (Flash-Decoding; FlashDecoding++ unified max) for one new token."""

from pallas_kernels.decode_attention.api import DEFAULT_PHI, SOFTMAX_MODES, decode_attention
from pallas_kernels.decode_attention.combine import (
    DecodePartials,
    combine_online,
    combine_unified,
    unified_fallback_flags,
    unified_window,
    unified_with_fallback,
)
from pallas_kernels.decode_attention.config import DecodeConfig, heuristic_config, split_layout
from pallas_kernels.decode_attention.pallas_triton import decode_partials
from pallas_kernels.decode_attention.reference import (
    decode_attention_reference,
    decode_partials_reference,
)

__all__ = [
    "DEFAULT_PHI",
    "SOFTMAX_MODES",
    "DecodeConfig",
    "DecodePartials",
    "combine_online",
    "combine_unified",
    "decode_attention",
    "decode_attention_reference",
    "decode_partials",
    "decode_partials_reference",
    "heuristic_config",
    "split_layout",
    "unified_fallback_flags",
    "unified_window",
    "unified_with_fallback",
]
