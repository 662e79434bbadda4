"""KV cache for autoregressive decoding: per-layer keys, values (and CoPE gate keys), lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cope.model import ModelConfig


def _write(buffer: jax.Array, new: jax.Array, rows: jax.Array, offset: jax.Array) -> jax.Array:
    """buffer [B, S, K, D] with new [B, T, K, D] written at row b's index offset[b] (rows is
    arange(B)); writes past S are dropped."""
    t = new.shape[1]
    new = new.astype(buffer.dtype)
    if t == 1:  # a decode step
        return buffer.at[rows, offset].set(new[:, 0], mode="drop")
    cols = offset[:, None] + jnp.arange(t)[None, :]  # [B, T]
    return buffer.at[rows[:, None], cols].set(new, mode="drop")


@struct.dataclass
class LayerCache:
    """One layer's view of a KVCache during one model call, as `cope.model.Attention` reads and
    extends it: the buffers, the valid entries before the call (`lengths`) and after it."""

    k: jax.Array  # [B, max_len, K, D]
    v: jax.Array  # [B, max_len, K, D]
    gate_k: jax.Array | None  # [B, max_len, K, D] or None
    lengths: jax.Array  # [B] int32, valid entries before this call
    new_lengths: jax.Array  # [B] int32, valid entries after it
    rows: jax.Array  # [B] arange, the scatter's row index
    fresh: bool = struct.field(pytree_node=False, default=False)

    def append(self, k, v, gate_k) -> LayerCache:
        """The cache with the call's new entries k, v, gate_k [B, T, K, D] written at index
        lengths[b] of each row (the first new_lengths - lengths of them count as valid)."""
        return self.replace(
            k=_write(self.k, k, self.rows, self.lengths),
            v=_write(self.v, v, self.rows, self.lengths),
            gate_k=None if gate_k is None else _write(self.gate_k, gate_k, self.rows, self.lengths),
            lengths=self.new_lengths,
            fresh=False,
        )


@struct.dataclass
class KVCache:
    """Per-layer key/value caches and the number of valid entries of each row.

    Keys are stored as `Attention.project` returns them, i.e. already rotated when RoPE is on.
    CoPE models keep keys (not positions): every new query recomputes its gates and contextual
    positions against all cached keys, so `gate_k` holds the separate gate keys of
    `cope_sep_key` models and is None otherwise. Entries at index >= lengths[b] are garbage
    (padding) and are never attended. `fresh` (static) marks an empty cache that the model
    fills with a prefill; every cache it returns is not fresh.
    """

    k: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    v: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    gate_k: tuple[jax.Array, ...] | None  # per layer [batch, max_len, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32, valid entries per row
    fresh: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls, model_cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty (fresh) cache for `model_cfg`; dtype defaults to the compute dtype."""
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
            fresh=True,
        )

    def layers(self, grow: jax.Array | int) -> list[LayerCache]:
        """Per-layer views for a model call that adds `grow` ([B] or an int) valid entries."""
        rows = jnp.arange(self.batch)
        new_lengths = self.lengths + grow
        gate_k = self.gate_k or (None,) * self.num_layers
        return [
            LayerCache(k, v, g, self.lengths, new_lengths, rows, fresh=self.fresh)
            for k, v, g in zip(self.k, self.v, gate_k, strict=True)
        ]

    def with_layers(self, layers: list[LayerCache]) -> KVCache:
        """The cache after every layer appended its entries (all grow by the same lengths)."""
        return KVCache(
            k=tuple(layer.k for layer in layers),
            v=tuple(layer.v for layer in layers),
            gate_k=None if self.gate_k is None else tuple(layer.gate_k for layer in layers),
            lengths=layers[0].lengths,
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
