"""Pure-jnp float32 specification of split-KV decode attention (Flash-Decoding, FlashDecoding++)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.combine import DecodePartials


def _grouped(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, scale: float, bias=None):
    """Scaled logits [B, K, G, S] (+ bias [B, H, S]) and values [B, K, S, D] in float32."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, head_dim)
    s = (
        jnp.einsum(
            "bkgd,bskd->bkgs", qg, k_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        * scale
    )
    if bias is not None:
        s = s + bias.astype(jnp.float32).reshape(s.shape)
    return s, jnp.swapaxes(v_cache.astype(jnp.float32), 1, 2)


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
      [batch, heads, head_dim] in q.dtype; rows with lengths == 0 are zeros.
    """
    batch, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    s, v = _grouped(q, k_cache, v_cache, scale, bias)
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkgs,bksd->bkgd", p, v, precision=jax.lax.Precision.HIGHEST)
    o = jnp.where((l > 0)[..., None], o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
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
    p = jnp.exp(s - shift[..., None])
    o = jnp.einsum("bkngl,bknld->bkngd", p, v, precision=jax.lax.Precision.HIGHEST)
    shift = m if softmax == "online" else jnp.where(m > -jnp.inf, shift, -jnp.inf)
    return DecodePartials(o=o, l=jnp.sum(p, axis=-1), m=m, shift=shift)
