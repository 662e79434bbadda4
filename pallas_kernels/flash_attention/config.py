"""Tuning knobs of the flash-attention kernels: frozen dataclasses, a heuristic and tuned tables."""

from __future__ import annotations

import dataclasses

from pallas_kernels import _device


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch parameters of the Pallas-Triton forward and backward kernels.

    `block_q`/`block_k` tile the forward (and the dq kernel, which has the same loop); the dkv
    kernel keeps `block_k_dkv` keys resident and streams `block_q_dkv` queries. All are powers
    of two >= 16 (Triton's dot needs M, N, K >= 16).
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("block_") and (value < 16 or value & (value - 1)):
                raise ValueError(f"{field.name}={value} must be a power of two >= 16")

    def clipped(self, q_len: int, kv_len: int) -> TritonConfig:
        """Shrinks blocks that exceed the (power-of-two rounded) sequence lengths."""
        tq = max(16, 1 << max(q_len - 1, 0).bit_length())
        tk = max(16, 1 << max(kv_len - 1, 0).bit_length())
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, tq),
            block_k=min(self.block_k, tk),
            block_q_dq=min(self.block_q_dq, tq),
            block_k_dq=min(self.block_k_dq, tk),
            block_q_dkv=min(self.block_q_dkv, tq),
            block_k_dkv=min(self.block_k_dkv, tk),
        )


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the Mosaic-GPU (Hopper: TMA + wgmma, warp-specialised) forward kernel.

    Each CTA runs two compute warpgroups of `block_q` rows each and one TMA warpgroup that
    streams `block_k` keys through a `num_stages`-deep shared-memory ring.
    """

    block_q: int = 64
    block_k: int = 128
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_k % 64:
            raise ValueError(
                f"block_q={self.block_q}, block_k={self.block_k} must be multiples of 64"
            )
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")


# Tuned on the H100 with `python -m experiments.bench_kernels attention` (see
# experiments/results/bench_attention_h100.md). Keyed by (device kind, head_dim).
TRITON_TABLE: dict[tuple[str, int], TritonConfig] = {
    ("NVIDIA H100 80GB HBM3", 64): TritonConfig(
        block_q=128,
        block_k=64,
        num_warps=4,
        num_stages=3,
        block_q_dq=64,
        block_k_dq=64,
        block_q_dkv=64,
        block_k_dkv=64,
        num_warps_bwd=4,
        num_stages_bwd=2,
    ),
    ("NVIDIA H100 80GB HBM3", 128): TritonConfig(
        block_q=128,
        block_k=64,
        num_warps=8,
        num_stages=3,
        block_q_dq=64,
        block_k_dq=64,
        block_q_dkv=64,
        block_k_dkv=64,
        num_warps_bwd=4,
        num_stages_bwd=2,
    ),
}

# Keyed by (device kind, head_dim, long), long = kv_len >= 1024: at hd64 a 2x128-row CTA wins
# on long sequences (jax's own mgpu kernel: 303 vs 264 TFLOP/s at B16 T1024) but loses on short
# ones (135 vs 179 at B32 T512), where fewer CTAs fill the 132 SMs.
MOSAIC_TABLE: dict[tuple[str, int, bool], MosaicConfig] = {
    ("NVIDIA H100 80GB HBM3", 64, False): MosaicConfig(block_q=64, block_k=128, num_stages=2),
    ("NVIDIA H100 80GB HBM3", 64, True): MosaicConfig(block_q=128, block_k=128, num_stages=3),
    ("NVIDIA H100 80GB HBM3", 128, False): MosaicConfig(block_q=64, block_k=128, num_stages=2),
    ("NVIDIA H100 80GB HBM3", 128, True): MosaicConfig(block_q=64, block_k=128, num_stages=2),
}


def heuristic_config(head_dim: int, q_len: int, kv_len: int, *, interpret: bool) -> TritonConfig:
    """The Triton config for a shape: the tuned table entry for this device, else a default.

    In interpret mode (CPU) small blocks keep the emulated grid cheap.
    """
    if interpret:
        return TritonConfig(32, 32, 4, 1, 32, 32, 32, 32, 4, 1).clipped(q_len, kv_len)
    padded = max(64, 1 << max(head_dim - 1, 0).bit_length())
    config = TRITON_TABLE.get((_device.device_kind(), padded))
    if config is None:
        config = TritonConfig(
            block_q=128 if padded <= 128 else 64,
            block_k=64,
            num_warps=4 if padded <= 64 else 8,
            num_stages=2,
        )
    return config.clipped(q_len, kv_len)


def heuristic_mosaic_config(head_dim: int, kv_len: int) -> MosaicConfig:
    """The Mosaic-GPU config for a shape from the tuned table, else a safe default."""
    return MOSAIC_TABLE.get((_device.device_kind(), head_dim, kv_len >= 1024), MosaicConfig())
