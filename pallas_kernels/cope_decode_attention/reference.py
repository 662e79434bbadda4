"""Pure-jnp float32 specification of CoPE (arXiv 2405.18719) decode attention over a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _grouped_dot(q: jax.Array, cache: jax.Array) -> jax.Array:
    """q·key for every head and cached key: [B, H, D] x [B, S, K, D] -> [B, K, G, S] float32."""
    batch, heads, head_dim = q.shape
    kv_heads = cache.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    return jnp.einsum("bkgd,bskd->bkgs", qg, cache.astype(jnp.float32), precision=HIGHEST)


def position_logits(q: jax.Array, pos_emb: jax.Array) -> jax.Array:
    """z[n] = q·e[n] for every head, [B, H, D] x [N, D] -> [B, H, N] float32 (the table is
    rounded to q's dtype first, as in the model)."""
    table = pos_emb.astype(q.dtype).astype(jnp.float32)
    return jnp.einsum("bhd,nd->bhn", q.astype(jnp.float32), table, precision=HIGHEST)


def cope_decode_gates(
    q: jax.Array, gate_keys: jax.Array, lengths: jax.Array, *, scale: float
) -> jax.Array:
    """Gates g_j = sigmoid(scale·q·gate_key_j) on valid keys, 0 past lengths: [B, K, G, S]."""
    valid = jnp.arange(gate_keys.shape[1])[None, :] < lengths[:, None]  # [B, S]
    gates = jax.nn.sigmoid(_grouped_dot(q, gate_keys) * scale)
    return jnp.where(valid[:, None, None, :], gates, 0.0)


def cope_decode_logits(
    q: jax.Array,
    k_cache: jax.Array,
    pos_emb: jax.Array,
    lengths: jax.Array,
    *,
    gate_k_cache: jax.Array | None = None,
    scale: float | None = None,
    nodiv: bool = False,
) -> jax.Array:
    """Pre-softmax CoPE logits of the query at position lengths[b] - 1: [B, H, S] float32.

    p_j = min(Σ_{m=j..L-1} g_m, N-1) for the L = lengths[b] valid keys; z[n] = q·e[n];
    z(p) linear between z[floor p] and z[floor p + 1]; logits (q·k_j + z(p_j))·scale, or
    q·k_j·scale + z(p_j) with `nodiv`. Keys at positions >= lengths[b] are -inf. These are the
    logits the unified max φ is calibrated on (natural-log units).
    """
    batch, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    npos = pos_emb.shape[0]
    content = _grouped_dot(q, k_cache)  # [B, K, G, S]
    gate_keys = k_cache if gate_k_cache is None else gate_k_cache
    gates = cope_decode_gates(q, gate_keys, lengths, scale=scale)
    positions = jnp.minimum(jnp.flip(jnp.cumsum(jnp.flip(gates, -1), -1), -1), npos - 1)
    z = position_logits(q, pos_emb).reshape(*content.shape[:3], npos)  # [B, K, G, N]
    lower = jnp.floor(jnp.where(positions >= 0, positions, 0.0))  # a NaN gate: any index
    frac = positions - lower
    index = lower.astype(jnp.int32)
    z_lower = jnp.take_along_axis(z, index, axis=-1)
    z_upper = jnp.take_along_axis(z, jnp.minimum(index + 1, npos - 1), axis=-1)
    z_upper = jnp.where(frac > 0, z_upper, z_lower)  # z[floor + 1] weighs 0 at integers
    position_term = z_lower + frac * (z_upper - z_lower)
    logits = content * scale + position_term if nodiv else (content + position_term) * scale
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
    logits = jnp.where(jnp.isfinite(logits), logits, jnp.nan)
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    return logits.reshape(batch, heads, -1)


def cope_decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos_emb: jax.Array,
    lengths: jax.Array,
    *,
    gate_k_cache: jax.Array | None = None,
    scale: float | None = None,
    nodiv: bool = False,
) -> jax.Array:
    """CoPE attention of one new query token over the first lengths[b] cached keys.

    The last valid row of `cope.functional.cope_attention` for each sequence: the query sits at
    position lengths[b] - 1 and attends keys 0..lengths[b] - 1 (see `cope_decode_logits`).

    Args:
      q: [batch, heads, head_dim], the new token's queries.
      k_cache, v_cache: [batch, max_len, kv_heads, head_dim] (GQA: query head h reads kv head
        h // (heads // kv_heads)).
      pos_emb: [npos, head_dim] position table e, shared by the layer's heads.
      lengths: [batch] int32, valid cached keys per row (the new token's own key included).
      gate_k_cache: optional [batch, max_len, kv_heads, head_dim] separate gate keys.
      scale: logit and gate scale, default 1/sqrt(head_dim).
      nodiv: add the position term after scaling.

    Returns:
      [batch, heads, head_dim] in q.dtype; rows with lengths == 0 are zeros. A NaN or inf in
      q, in a valid key, gate key or value, or in the table entries a logit reads makes the row
      NaN; keys past lengths[b] never matter, whatever they hold.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    logits = cope_decode_logits(
        q, k_cache, pos_emb, lengths, gate_k_cache=gate_k_cache, scale=scale, nodiv=nodiv
    ).reshape(batch, kv_heads, heads // kv_heads, -1)
    v = v_cache.astype(jnp.float32)
    valid = (jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None])[:, :, None]  # [B, S, 1]
    v_ok = jnp.all(jnp.isfinite(v), axis=-1) | ~valid  # [B, S, K]
    logits = jnp.where(jnp.swapaxes(v_ok, 1, 2)[:, :, None, :], logits, jnp.nan)
    v = jnp.where(jnp.isfinite(v), v, 0.0)  # masked values never meet 0·NaN
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    l = jnp.sum(p, axis=-1)  # NaN in a row with a non-finite valid key
    o = jnp.einsum("bkgs,bskd->bkgd", p, v, precision=HIGHEST)
    o = jnp.where((l == 0)[..., None], 0.0, o / jnp.where(l == 0, 1.0, l)[..., None])
    return o.reshape(batch, heads, head_dim).astype(q.dtype)


def split_gate_totals_reference(
    q: jax.Array, gate_keys: jax.Array, lengths: jax.Array, *, scale: float, split_len: int
) -> jax.Array:
    """Σ g_j over each split's valid keys, [B, K, splits, G] float32 (split j covers keys
    [j·split_len, (j+1)·split_len))."""
    gates = cope_decode_gates(q, gate_keys, lengths, scale=scale)  # [B, K, G, S]
    max_len = gates.shape[-1]
    splits = -(-max_len // split_len)
    gates = jnp.pad(gates, ((0, 0), (0, 0), (0, 0), (0, splits * split_len - max_len)))
    totals = gates.reshape(*gates.shape[:3], splits, split_len).sum(-1)  # [B, K, G, n]
    return jnp.swapaxes(totals, 2, 3)
