"""KV cache for autoregressive decoding: per-layer keys, values (and CoPE gate keys), lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cope.model import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer key/value caches and the number of valid entries of each row.

    Keys are stored as `Attention.project` returns them, i.e. already rotated when RoPE is on.
    CoPE models keep keys (not positions): every new query recomputes its gates and contextual
    positions against all cached keys, so `gate_k` holds the separate gate keys of
    `cope_sep_key` models and is None otherwise. Entries at index >= lengths[b] are garbage
    (padding) and are never attended.
    """

    k: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    v: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    gate_k: tuple[jax.Array, ...] | None  # per layer [batch, max_len, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32, valid entries per row

    @classmethod
    def create(
        cls, model_cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache (all lengths 0) for `model_cfg`; dtype defaults to the compute dtype."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"KVCache.create: batch must be a positive int, got {batch!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"KVCache.create: max_len must be a positive int, got {max_len!r}")
        dtype = jnp.dtype(model_cfg.dtype if dtype is None else dtype)
        shape = (batch, max_len, model_cfg.kv_heads, model_cfg.head_dim)
        layers = model_cfg.num_layers

        def empty() -> tuple[jax.Array, ...]:
            return tuple(jnp.zeros(shape, dtype) for _ in range(layers))

        sep = model_cfg.spec.cope and model_cfg.cope_sep_key
        return cls(
            k=empty(),
            v=empty(),
            gate_k=empty() if sep else None,
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.k)
