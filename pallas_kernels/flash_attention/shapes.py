"""Named shape sets of flash attention, shared by the tests and the benchmark."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """q [B, T, H, D], k/v [B, S, K, D]."""

    batch: int
    q_len: int
    heads: int
    head_dim: int
    kv_len: int | None = None
    kv_heads: int | None = None

    @property
    def s(self) -> int:
        return self.q_len if self.kv_len is None else self.kv_len

    @property
    def k(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def name(self) -> str:
        kv = "" if self.kv_len is None else f" S{self.kv_len}"
        gqa = "" if self.kv_heads is None else f" K{self.kv_heads}"
        return f"B{self.batch} T{self.q_len}{kv} H{self.heads}{gqa} D{self.head_dim}"

    def flops(self, causal: bool) -> float:
        """Forward FLOPs, 4·B·H·T·S·D, halved for causal (the FA papers' convention)."""
        f = 4.0 * self.batch * self.heads * self.q_len * self.s * self.head_dim
        return f / 2 if causal else f


# The benchmark set: (shape, causal, pass).
BENCH = [
    (AttentionShape(4, 4096, 16, 128), True, "fwd"),
    (AttentionShape(4, 4096, 16, 128), False, "fwd"),
    (AttentionShape(16, 1024, 16, 64), True, "fwd"),
    (AttentionShape(16, 1024, 16, 64), False, "fwd"),
    (AttentionShape(1, 16384, 16, 128), True, "fwd"),
    (AttentionShape(32, 512, 8, 64), False, "fwd"),
    (AttentionShape(4, 4096, 16, 128), True, "fwd+bwd"),
]

# Tiny shapes for a CPU smoke run of the benchmark (`--quick`).
BENCH_QUICK = [
    (AttentionShape(1, 128, 2, 64), True, "fwd"),
    (AttentionShape(1, 128, 2, 64), False, "fwd"),
    (AttentionShape(1, 128, 2, 64), True, "fwd+bwd"),
]

# Sequence lengths every test runs over (odd, one, exact and one past a block).
TEST_LENGTHS = (1, 17, 128, 129, 300)

# Larger shapes, compiled on the GPU only.
GPU_TEST = [
    AttentionShape(2, 1024, 8, 128, kv_heads=2),
    AttentionShape(2, 1000, 4, 64),
    AttentionShape(1, 512, 4, 128, kv_len=1536, kv_heads=1),
]
