"""Tuning defaults for CoPE split-KV decode attention (the plain decode kernel's knobs)."""

from __future__ import annotations

import dataclasses

from pallas_kernels.decode_attention.config import DecodeConfig, split_layout
from pallas_kernels.decode_attention.config import heuristic_config as decode_heuristic_config

# The in-tile suffix sum of the gates is a [block_k, block_k] float32 triangular matmul whose
# operand lives in registers; 64 keys keeps it at 32 registers a thread with 4 warps.
MAX_BLOCK_K = 64
SHARED_MEMORY_BYTES = 200 * 1024

__all__ = ["DecodeConfig", "heuristic_config", "split_layout"]


def heuristic_config(
    batch: int,
    max_len: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    *,
    itemsize: int = 2,
    gate_keys: bool = False,
    num_splits: int | None = None,
) -> DecodeConfig:
    """Default config: the decode kernel's splits, block_k capped at MAX_BLOCK_K, and pipeline
    stages reduced until the K, V (and gate key) tiles fit in 200 KB of shared memory."""
    base = decode_heuristic_config(
        batch, max_len, kv_heads, group, head_dim, itemsize=itemsize, num_splits=num_splits
    )
    block_k = min(base.block_k, MAX_BLOCK_K)
    tiles = 3 if gate_keys else 2
    num_stages = base.num_stages
    while num_stages > 1 and num_stages * tiles * block_k * head_dim * itemsize > (
        SHARED_MEMORY_BYTES
    ):
        num_stages -= 1
    return dataclasses.replace(base, block_k=block_k, num_stages=num_stages, use_dot=True)
