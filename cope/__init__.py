"""CoPE and friends: position encodings, attention and a Flax NNX Transformer."""

from cope.functional import (
    attention,
    attention_mask,
    cope_attention,
    cope_positions,
    interpolate_position_logits,
    relative_logits,
    rope,
)

__all__ = [
    "attention",
    "attention_mask",
    "cope_attention",
    "cope_positions",
    "interpolate_position_logits",
    "relative_logits",
    "rope",
]
