"""Reference multi-head attention (pure jnp, fp32 math): the spec the flash kernels must match."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention in fp32, returning the output and the log-sum-exp residual.

    Args:
      q: [B, T, H, D] queries.
      k: [B, S, K, D] keys, with `H % K == 0`; query head `h` reads kv head `h // (H // K)`.
      v: [B, S, K, D] values.
      causal: query `i` sees key `j` only when `j <= i + (S - T)`, i.e. the last query is
        aligned with the last key when `T < S`.
      lengths: optional [B] int, number of valid keys per sequence; keys `j >= lengths[b]`
        are masked (padding).
      scale: logit scale, `1/sqrt(D)` by default.
      segment_ids: optional [B, T] int (self-attention, T == S): packed sequences; query `i`
        sees key `j` only when `segment_ids[b, i] == segment_ids[b, j]`.

    Returns:
      out: [B, T, H, D] in `q.dtype`. Rows that see no key at all are 0. A NaN or inf in q, k
        or v at an allowed pair makes the whole row NaN; masked keys never matter, whatever
        they hold (they are cut with `where`: 0·NaN would still be NaN).
      lse: [B, H, T] fp32 natural-log sum of exp of the scaled logits (-inf for empty rows,
        NaN for NaN rows).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    qf = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, group, head_dim)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    q_ok = jnp.all(jnp.isfinite(qf), axis=-1).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, T, 1]
    kv_ok = jnp.all(jnp.isfinite(kf) & jnp.isfinite(vf), axis=-1)  # [B, S, K]
    kv_ok = kv_ok.transpose(0, 2, 1)[:, :, None, None, :]  # [B, K, 1, 1, S]
    qf, kf, vf = (jnp.where(jnp.isfinite(x), x, 0.0) for x in (qf, kf, vf))
    # [B, K, G, T, S]
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, kf, precision="highest") * scale
    logits = jnp.where(q_ok & kv_ok & jnp.isfinite(logits), logits, jnp.nan)
    valid = jnp.ones((batch, 1, 1, q_len, kv_len), dtype=bool)
    cols = jnp.arange(kv_len)
    if lengths is not None:
        valid &= (cols[None, :] < lengths[:, None])[:, None, None, None, :]
    if causal:
        rows = jnp.arange(q_len) + (kv_len - q_len)
        valid &= (cols[None, :] <= rows[:, None])[None, None, None]
    if segment_ids is not None:
        valid &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
    logits = jnp.where(valid, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
    finite = jnp.isfinite(lse)
    probs = jnp.where(valid, jnp.exp(logits - jnp.where(finite, lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, vf, precision="highest")
    out = out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    return out, lse.reshape(batch, heads, q_len)


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """`attention_reference` without the residual: the same contract as `flash_attention`."""
    return attention_reference(
        q, k, v, causal=causal, lengths=lengths, scale=scale, segment_ids=segment_ids
    )[0]
