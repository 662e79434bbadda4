"""Pallas GPU kernels (flash attention, split-KV and CoPE decoding), each with its jnp reference."""

from pallas_kernels.cope_decode_attention import cope_decode_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

__all__ = ["cope_decode_attention", "decode_attention", "flash_attention"]
