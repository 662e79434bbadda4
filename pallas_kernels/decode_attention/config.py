"""Tuning knobs and the default heuristic for the split-KV decode attention kernel."""

from __future__ import annotations

import dataclasses

import jax

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
    """Streaming multiprocessors of the default device (132, an H100's, when unknown)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return H100_SM_COUNT
    return int(getattr(device, "core_count", H100_SM_COUNT) or H100_SM_COUNT)


def choose_num_splits(batch: int, kv_heads: int, max_len: int, block_k: int, sms: int,
                      programs_per_sm: int = 2, max_splits: int = 64) -> int:
    """Fewest splits that fill the GPU with whole waves of programs.

    Each (batch, kv_head) pair is one program per split. We want at least one wave of
    `sms * programs_per_sm` programs and, beyond that, the last wave as full as possible
    (efficiency = waves / ceil(waves)), without splits shorter than two key blocks.
    """
    pairs = batch * kv_heads
    slots = sms * programs_per_sm
    longest = max(1, min(max_splits, -(-max_len // (2 * block_k))))
    best, best_eff = 1, -1.0
    for splits in range(1, longest + 1):
        waves = pairs * splits / slots
        eff = waves / -(-waves // 1) if waves >= 1 else waves
        if eff > best_eff + 0.02:  # prefer fewer splits (a cheaper combine) unless clearly better
            best, best_eff = splits, eff
    return best


def heuristic_config(batch: int, max_len: int, kv_heads: int, group: int, head_dim: int,
                     *, num_splits: int | None = None, sms: int | None = None) -> DecodeConfig:
    """Default config for one decode step: block_k from the cache length, splits from the GPU."""
    block_k = 128 if head_dim <= 128 else 64
    block_k = max(16, min(block_k, 1 << max(4, (max_len - 1).bit_length())))
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_len, block_k,
                                       sm_count() if sms is None else sms)
    return DecodeConfig(block_k=block_k, num_splits=num_splits, num_warps=4, num_stages=3,
                        use_dot=True)


def split_layout(max_len: int, num_splits: int, block_k: int) -> tuple[int, int]:
    """(split_len, splits): keys per split (a multiple of block_k) and the splits really used."""
    split_len = -(-max(1, -(-max_len // num_splits)) // block_k) * block_k
    return split_len, -(-max_len // split_len)
