"""Named shape sets of fused CoPE attention, shared by the tests and the benchmark."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CopeShape:
    """q [B, T, H, D], k/v/gate_k [B, S, K, D], pos_emb [N, D]."""

    batch: int
    q_len: int
    heads: int
    head_dim: int
    npos: int
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
        return f"B{self.batch} T{self.q_len}{kv} H{self.heads}{gqa} D{self.head_dim} N{self.npos}"

    def flops(self, causal: bool) -> float:
        """Forward matmul FLOPs of plain attention, 4·B·H·T·S·D, halved for causal (the FA
        papers' convention; the gate and position terms are not counted)."""
        f = 4.0 * self.batch * self.heads * self.q_len * self.s * self.head_dim
        return f / 2 if causal else f


# The benchmark set: H12 D64 npos 64 at 16k tokens per call, the counting task's shape and
# GPT-2 small (all causal).
BENCH = [
    *(CopeShape(16384 // t, t, 12, 64, 64) for t in (512, 1024, 4096, 8192, 16384)),
    CopeShape(64, 511, 4, 64, 513),
    CopeShape(8, 1024, 12, 64, 64),
]

# Tiny shapes for a CPU smoke run of the benchmark (`--quick`).
BENCH_QUICK = [CopeShape(1, 128, 2, 64, 64), CopeShape(2, 64, 2, 32, 17)]

# Query lengths the tests run over (one, odd, exact and one past a block, several blocks).
TEST_LENGTHS = (1, 17, 64, 129, 300)

# Position-table sizes the tests run over (the counting config uses 513, GPT-2 small 64).
TEST_NPOS = (2, 17, 64, 513)

# Larger shapes, compiled on the GPU only.
GPU_TEST = [
    CopeShape(2, 1024, 8, 64, 64, kv_heads=2),
    CopeShape(4, 511, 4, 64, 513),
    CopeShape(1, 512, 4, 128, 64, kv_len=1536, kv_heads=1),
]
