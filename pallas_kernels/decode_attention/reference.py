"""Pure-jnp float32 specification of split-KV decode attention (Flash-Decoding, FlashDecoding++)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.combine import DecodePartials


def _grouped(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, scale: float, bias=None):
    """Scaled logits [B, K, G, S] (+ bias [B, H, S]) and values [B, K, S, D] in float32.

    A NaN or inf in q, in a key or value, in the bias or in a logit makes that logit NaN; the
    values come back with NaN and inf zeroed, so a masked key's value never meets 0·NaN.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    k, v = k_cache.astype(jnp.float32), v_cache.astype(jnp.float32)
    q_ok = jnp.all(jnp.isfinite(qg), axis=-1)[..., None]  # [B, K, G, 1]
    kv_ok = jnp.all(jnp.isfinite(k) & jnp.isfinite(v), axis=-1)  # [B, S, K]
    kv_ok = jnp.swapaxes(kv_ok, 1, 2)[:, :, None, :]  # [B, K, 1, S]
    qg, k, v = (jnp.where(jnp.isfinite(x), x, 0.0) for x in (qg, k, v))
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, precision=jax.lax.Precision.HIGHEST) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32).reshape(s.shape)
    s = jnp.where(q_ok & kv_ok & jnp.isfinite(s), s, jnp.nan)
    return s, jnp.swapaxes(v, 1, 2)


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention of one new query token over the first `lengths[b]` cached keys.

    Args:
      q: [batch, heads, head_dim], the new token's queries.
      k_cache, v_cache: [batch, max_len, kv_heads, head_dim]; heads % kv_heads == 0 (GQA: query
        head h reads kv head h // (heads // kv_heads)).
      lengths: [batch] int32, valid cached keys per row; keys at positions >= lengths[b] are
        ignored.
      scale: logit scale, default 1/sqrt(head_dim).
      bias: optional [batch, heads, max_len] float logits added to scale·q·k (e.g. the relative
        position term of the new token against every cached key).

    Returns:
      [batch, heads, head_dim] in q.dtype; rows with lengths == 0 are zeros. A NaN or inf in q,
      in a valid key or value, or in the bias of a valid key makes the row NaN; keys past
      lengths[b] never matter, whatever they hold.
    """
    batch, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    s, v = _grouped(q, k_cache, v_cache, scale, bias)
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
    valid = valid[:, None, None, :]  # [B, 1, 1, S]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1)  # 0 with no valid key, NaN with a non-finite one
    o = jnp.einsum("bkgs,bksd->bkgd", p, v, precision=jax.lax.Precision.HIGHEST)
    o = jnp.where((l == 0)[..., None], 0.0, o / jnp.where(l == 0, 1.0, l)[..., None])
    return o.reshape(batch, heads, head_dim).astype(q.dtype)


def decode_partials_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    phi: jax.Array,
    *,
    scale: float,
    softmax: str,
    split_len: int,
) -> DecodePartials:
    """The per-split partials the kernel returns (see `DecodePartials`), in float32.

    Split j covers keys [j·split_len, (j+1)·split_len). `phi`: [kv_heads, group] float32, the
    unified max (natural-log units) used when softmax == "unified_max"; no split is recomputed
    here, so shift = φ for every unified split.
    """
    batch, max_len = k_cache.shape[:2]
    splits = -(-max_len // split_len)
    s, v = _grouped(q, k_cache, v_cache, scale)  # [B, K, G, S], [B, K, S, D]
    pad = splits * split_len - max_len
    s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, pad)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    valid = jnp.arange(splits * split_len)[None, :] < lengths[:, None]  # [B, S']
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    kv_heads, group = s.shape[1], s.shape[2]
    s = s.reshape(batch, kv_heads, group, splits, split_len).swapaxes(2, 3)  # [B, K, n, G, L]
    v = v.reshape(batch, kv_heads, splits, split_len, v.shape[-1])  # [B, K, n, L, D]
    m = jnp.max(s, axis=-1)  # [B, K, n, G]
    if softmax == "online":
        shift = jnp.where(jnp.isfinite(m), m, 0.0)
    elif softmax == "unified_max":
        shift = jnp.broadcast_to(phi[None, :, None, :], m.shape)
    else:
        raise ValueError(f"softmax must be 'online' or 'unified_max', got {softmax!r}")
    valid = valid.reshape(batch, 1, splits, 1, split_len)  # [B, 1, n, 1, L]
    p = jnp.where(valid, jnp.exp(s - shift[..., None]), 0.0)
    o = jnp.einsum("bkngl,bknld->bkngd", p, v, precision=jax.lax.Precision.HIGHEST)
    shift = m if softmax == "online" else jnp.where(m == -jnp.inf, -jnp.inf, shift)
    return DecodePartials(o=o, l=jnp.sum(p, axis=-1), m=m, shift=shift)
