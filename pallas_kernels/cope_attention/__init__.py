"""Fused CoPE flash attention (contextual positions from gate suffix sums) in Pallas-Triton."""

from pallas_kernels.cope_attention.api import cope_attention, why_unsupported
from pallas_kernels.cope_attention.config import ForwardConfig, heuristic_config
from pallas_kernels.cope_attention.pallas_triton_fwd import cope_attention_fwd, position_logits

__all__ = [
    "ForwardConfig",
    "cope_attention",
    "cope_attention_fwd",
    "heuristic_config",
    "position_logits",
    "why_unsupported",
]
