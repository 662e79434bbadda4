"""Tuning knobs of the fused CoPE attention kernels: frozen dataclasses and a heuristic."""

from __future__ import annotations

import dataclasses


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(x - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiles and launch parameters of the Pallas-Triton CoPE forward.

    One program owns `block_q` query rows and walks `block_k`-key tiles from its last visible
    key toward key 0. Both are powers of two >= 16 (Triton's dot needs M, N, K >= 16).
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(
                f"num_warps={self.num_warps}, num_stages={self.num_stages} must be >= 1"
            )

    def clipped(self, q_len: int, kv_len: int) -> ForwardConfig:
        """Shrinks blocks that exceed the (power-of-two rounded) sequence lengths."""
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, _pow2_at_least(q_len)),
            block_k=min(self.block_k, _pow2_at_least(kv_len)),
        )


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Tiles and launch parameters of the Pallas-Triton CoPE backward.

    The three backward kernels tile (query rows x keys) with the same `block_q` x `block_k`
    tiles: the band kernel records, per query block, how many leading key tiles are saturated,
    and the two flash-like kernels (dq, dk/dv of those tiles) read that count. Powers of two
    >= 16 (Triton's dot needs M, N, K >= 16). `num_warps`/`num_stages` launch the flash-like
    kernels, `*_band` the band kernel (gates, positions, gathers; far more registers).
    `band_atomics` makes the band kernel accumulate with per-element atomic adds instead of
    spin-locked (dk, dv) and barrier-ordered (dz) read-modify-writes: correct, but each such
    atomic is an acq_rel one with a GPU-wide fence and an L1 flush.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_band: int = 4
    num_stages_band: int = 2
    band_atomics: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        for name in ("num_warps", "num_stages", "num_warps_band", "num_stages_band"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def clipped(self, q_len: int, kv_len: int) -> BackwardConfig:
        """Shrinks blocks that exceed the (power-of-two rounded) sequence lengths."""
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, _pow2_at_least(q_len)),
            block_k=min(self.block_k, _pow2_at_least(kv_len)),
        )


def heuristic_backward_config(
    head_dim: int, q_len: int, kv_len: int, *, interpret: bool
) -> BackwardConfig:
    """The backward config for a shape (32-wide tiles in interpret mode, as the forward)."""
    if interpret:
        return BackwardConfig(32, 32, 4, 1, 4, 1).clipped(q_len, kv_len)
    warps = 4 if _pow2_at_least(head_dim, 64) <= 64 else 8
    return BackwardConfig(64, 64, warps, 2, warps, 2).clipped(q_len, kv_len)


def heuristic_config(head_dim: int, q_len: int, kv_len: int, *, interpret: bool) -> ForwardConfig:
    """The forward config for a shape.

    In interpret mode (CPU) 32-wide tiles keep the emulated grid cheap while still giving
    several key tiles per row block (the saturation switch gets exercised at test sizes).
    """
    if interpret:
        return ForwardConfig(32, 32, 4, 1).clipped(q_len, kv_len)
    padded = _pow2_at_least(head_dim, 64)
    return ForwardConfig(
        block_q=64,
        block_k=64,
        num_warps=4 if padded <= 64 else 8,
        num_stages=2,
    ).clipped(q_len, kv_len)
