"""Named decode-attention shape sets shared by the tests and the benchmark."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """One decode step: B sequences, S cached keys, H query heads, K kv heads, D head dim."""

    batch: int
    max_len: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def name(self) -> str:
        return f"B{self.batch} S{self.max_len} {self.heads}/{self.kv_heads} D{self.head_dim}"

    def kv_bytes(self, itemsize: int = 2) -> int:
        """Bytes of K and V read once when every row has length S."""
        return 2 * self.batch * self.max_len * self.kv_heads * self.head_dim * itemsize


# The H100 benchmark shapes (bf16).
BENCH_SHAPES = (
    DecodeShape(8, 32768, 32, 32, 128),
    DecodeShape(8, 32768, 32, 8, 128),
    DecodeShape(1, 131072, 32, 8, 128),
    DecodeShape(64, 4096, 32, 32, 128),
    DecodeShape(32, 2048, 16, 16, 64),
)

# Tiny shapes for the CPU smoke run of the benchmark.
QUICK_SHAPES = (
    DecodeShape(2, 256, 4, 4, 32),
    DecodeShape(2, 256, 8, 2, 32),
)

# Small shapes for interpret-mode tests: length-1 and odd caches, MHA and GQA 8→2.
TEST_SHAPES = (
    DecodeShape(2, 1, 4, 4, 32),
    DecodeShape(2, 7, 4, 2, 32),
    DecodeShape(3, 300, 8, 2, 32),
    DecodeShape(2, 300, 2, 2, 64),
)
