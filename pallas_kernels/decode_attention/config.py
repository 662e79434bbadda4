"""Tuning knobs and the default heuristic for the split-KV decode attention kernel."""

from __future__ import annotations

import dataclasses

from pallas_kernels import _device

H100_SM_COUNT = 132


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tuning knobs for the Pallas-Triton split-KV decode kernel.

    Attributes:
      block_k: keys per inner-loop step (power of two, >= 16).
      num_splits: KV splits per (batch, kv_head); each split is one program of the grid.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K/V loads.
      use_dot: tensor-core `dot` with the query group padded to 16 rows; `False` uses CUDA-core
        multiply-reduce and is only valid when there is one query head per kv head (MHA).
    """

    block_k: int = 128
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 16, got {self.block_k}")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")


def sm_count() -> int:
    """Streaming multiprocessors of the target device (132, an H100's, when unknown)."""
    return _device.core_count(H100_SM_COUNT) if _device.is_gpu() else H100_SM_COUNT


def heuristic_config(
    batch: int,
    max_len: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    *,
    itemsize: int = 2,
    num_splits: int | None = None,
) -> DecodeConfig:
    """Default config for one decode step, fitted to the in-run tuning of the H100 benchmark.

    block_k = 64 keys for head_dim >= 128, else 128, shrunk until the pipelined K and V tiles
    (num_stages · 2 · block_k · head_dim · itemsize) fit in 200 KB of shared memory. Splits:
    with at least 64 (batch, kv_head) pairs, 2 splits (1 for caches under 4096 keys, where one
    split lets the kernel normalise in place with no combine step); with fewer pairs, enough
    splits for about two programs per SM (B1 with 8 kv heads: 32), capped at 64 and at two key
    blocks per split.
    """
    block_k = 64 if head_dim >= 128 else 128
    block_k = max(16, min(block_k, 1 << max(4, (max_len - 1).bit_length())))
    num_stages = 3
    while num_stages * 2 * block_k * head_dim * itemsize > 200 * 1024 and block_k > 32:
        block_k //= 2
    while num_stages * 2 * block_k * head_dim * itemsize > 200 * 1024 and num_stages > 1:
        num_stages -= 1
    if num_splits is None:
        pairs = batch * kv_heads
        if pairs >= 64:
            num_splits = 2 if max_len >= 4096 else 1
        else:
            wanted = -(-2 * sm_count() // pairs)
            num_splits = min(64, 1 << (wanted.bit_length() - 1))
        num_splits = max(1, min(num_splits, -(-max_len // (2 * block_k))))
    return DecodeConfig(
        block_k=block_k, num_splits=num_splits, num_warps=4, num_stages=num_stages, use_dot=True
    )


def split_layout(max_len: int, num_splits: int, block_k: int) -> tuple[int, int]:
    """(split_len, splits): keys per split (a multiple of block_k) and the splits really used."""
    split_len = -(-max(1, -(-max_len // num_splits)) // block_k) * block_k
    return split_len, -(-max_len // split_len)
