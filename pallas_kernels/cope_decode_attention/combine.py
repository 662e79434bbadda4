"""CoPE split-KV combine steps: right-hand gate carries, the saturation check, the merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.combine import DecodePartials


def split_carries(gate_totals: jax.Array) -> jax.Array:
    """Gate mass to the right of each split: carry_j = Σ_{i > j} total_i, float32.

    gate_totals: [batch, kv_heads, splits, group], Σ g over each split's valid keys (0 for
    splits past the row's length). The carry is the position of a split's last key before its
    own gates are added; the split holding the row's last key has carry 0.
    """
    totals = gate_totals.astype(jnp.float32)
    inclusive = jnp.flip(jnp.cumsum(jnp.flip(totals, axis=2), axis=2), axis=2)
    # Shifted by one split rather than inclusive - totals: no cancellation.
    return jnp.concatenate([inclusive[:, :, 1:], jnp.zeros_like(totals[:, :, :1])], axis=2)


def splits_to_recompute(
    carries: jax.Array, lengths: jax.Array, *, npos: int, split_len: int
) -> jax.Array:
    """Splits whose first-pass partials assumed saturation wrongly: [batch, kv_heads, splits].

    The first pass computes every split that does not hold its row's last key as if each of its
    keys sat at position npos - 1; that is exact when the split's carry is >= npos - 1 for every
    head of the group (positions only grow leftwards). A split is recomputed when it has a key
    right of it (it is not the row's last split, which the first pass computes exactly from
    carry 0) and some head's carry is below npos - 1.
    """
    splits = carries.shape[2]
    later_keys = (jnp.arange(splits) + 1) * split_len < lengths[:, None]  # [B, splits]
    unsaturated = jnp.any(carries < npos - 1, axis=-1)  # [B, K, splits]
    return later_keys[:, None, :] & unsaturated


def merge_recomputed(
    first: DecodePartials, exact: DecodePartials, recompute: jax.Array
) -> DecodePartials:
    """First-pass partials with the recomputed splits (`recompute`: [B, K, splits]) replaced."""
    pick = lambda a, b: jnp.where(recompute.reshape(recompute.shape + (1,) * (a.ndim - 3)), b, a)
    return DecodePartials(*(pick(a, b) for a, b in zip(first, exact)))
