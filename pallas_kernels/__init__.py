"""Pallas GPU kernels (flash attention, split-KV decoding), each with its pure-jnp reference."""

from pallas_kernels.cope_attention import cope_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

__all__ = ["cope_attention", "decode_attention", "flash_attention"]
