"""CoPE and friends: position encodings, attention and a Flax NNX Transformer."""

from cope.backends import attend, serving_backend
from cope.functional import (
    CoPE,
    attention,
    attention_mask,
    cope_attention,
    cope_positions,
    interpolate_position_logits,
    relative_logits,
    rope,
)

__all__ = [
    "CoPE",
    "attend",
    "serving_backend",
    "attention",
    "attention_mask",
    "cope_attention",
    "cope_positions",
    "interpolate_position_logits",
    "relative_logits",
    "rope",
]
