"""CoPE split-KV decode attention for one new token (saturation-assumed pass, exact redo)."""

from pallas_kernels.cope_decode_attention.api import (
    DEFAULT_PHI,
    SOFTMAX_MODES,
    cope_decode_attention,
    why_unsupported,
)
from pallas_kernels.cope_decode_attention.combine import (
    merge_recomputed,
    split_carries,
    splits_to_recompute,
)
from pallas_kernels.cope_decode_attention.config import heuristic_config
from pallas_kernels.cope_decode_attention.pallas_triton import CopePartials, cope_decode_partials
from pallas_kernels.cope_decode_attention.reference import (
    cope_decode_attention_reference,
    cope_decode_gates,
    cope_decode_logits,
    position_logits,
    split_gate_totals_reference,
)

__all__ = [
    "DEFAULT_PHI",
    "SOFTMAX_MODES",
    "CopePartials",
    "cope_decode_attention",
    "cope_decode_attention_reference",
    "cope_decode_gates",
    "cope_decode_logits",
    "cope_decode_partials",
    "heuristic_config",
    "merge_recomputed",
    "position_logits",
    "split_carries",
    "split_gate_totals_reference",
    "splits_to_recompute",
    "why_unsupported",
]
