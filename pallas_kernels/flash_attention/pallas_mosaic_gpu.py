"""FlashAttention-3 style forward (Shah et al., 2024, arXiv 2407.08608) on Mosaic GPU: placeholder."""

from __future__ import annotations


def supports(q_shape, k_shape, causal, lengths, config) -> bool:
    return False


def forward(q, k, v, *, scale, causal, config):
    raise NotImplementedError("the Mosaic GPU forward is not written yet")
