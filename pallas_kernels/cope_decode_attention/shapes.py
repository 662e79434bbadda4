"""Named CoPE decode-attention shape sets shared by the tests and the benchmark."""

from __future__ import annotations

import dataclasses

from pallas_kernels.decode_attention import shapes as decode_shapes


@dataclasses.dataclass(frozen=True)
class CopeDecodeShape(decode_shapes.DecodeShape):
    """One CoPE decode step: a `DecodeShape` plus N, the rows of the position table."""

    npos: int = 64

    @property
    def name(self) -> str:
        return f"{super().name} N{self.npos}"


def _with_npos(shapes, npos: int) -> tuple[CopeDecodeShape, ...]:
    return tuple(CopeDecodeShape(**dataclasses.asdict(s), npos=npos) for s in shapes)


# The plain decode kernel's benchmark shapes with the paper's npos = 64.
BENCH_SHAPES = _with_npos(decode_shapes.BENCH_SHAPES, 64)

# Tiny shapes for the CPU smoke run of the benchmark.
QUICK_SHAPES = _with_npos(decode_shapes.QUICK_SHAPES, 64)

# Small shapes for interpret-mode tests: length-1 and odd caches, MHA and GQA 8→2, every npos.
TEST_SHAPES = (
    CopeDecodeShape(2, 1, 4, 4, 32, npos=2),
    CopeDecodeShape(3, 7, 4, 2, 32, npos=64),
    CopeDecodeShape(3, 150, 8, 2, 32, npos=513),
    CopeDecodeShape(2, 150, 2, 2, 16, npos=2),
)
