"""Pure attention and position-encoding functions: softmax attention, CoPE, RoPE, relative PE.

Every function here is jit-able, differentiable and dtype-preserving (bf16 in, bf16 out); logits,
softmax, gates and their cumulative sums are computed in float32.

Layout (as `jax.nn.dot_product_attention`), with the dimension letters of the README:
  q    [B, T, H, D]   queries
  k, v [B, S, K, D]   keys and values, H % K == 0 (grouped-query attention, G = H // K)
  out  [B, T, H, D]
When `causal=True` and T < S, query i sits at key position i + (S - T): the last query is aligned
with the last key (the decode / chunked-prefill convention). `lengths [B]` is the number of valid
keys of each sequence; keys at index >= lengths[b] are masked out. A query row with no allowed key
(only possible when lengths[b] == 0) returns zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# ---------------------------------------------------------------------------------------------
# Input checks and masks
# ---------------------------------------------------------------------------------------------


def check_qkv(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
) -> None:
    """Raises a one-line ValueError naming the argument whose type, shape or dtype is wrong."""
    for name, x in (("q", q), ("k", k), ("v", v), ("lengths", lengths), ("bias", bias)):
        if x is not None and not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_len, heads, head_dim], got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k must be [batch, kv_len, kv_heads, head_dim], got shape {k.shape}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must have no empty dimension")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape}, got {v.shape}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {k.shape} must share batch and head_dim with q {q.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if lengths is not None:
        if lengths.shape != (q.shape[0],):
            raise ValueError(f"lengths must be [batch]={q.shape[0]}, got shape {lengths.shape}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be an integer array, got {lengths.dtype}")
    if bias is not None:
        b, t, h, _ = q.shape
        if not (
            bias.ndim == 4
            and bias.shape[0] in (1, b)
            and bias.shape[1] in (1, h)
            and bias.shape[2:] == (t, k.shape[1])
        ):
            raise ValueError(
                f"bias must be [batch or 1, heads or 1, q_len, kv_len] = "
                f"[{b} or 1, {h} or 1, {t}, {k.shape[1]}], got shape {bias.shape}"
            )
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be a floating array, got {bias.dtype}")


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask of allowed (query, key) pairs, [B or 1, 1, T, S]; True = attend.

    With `causal`, query i sits at key position i + q_offset (default S - T, the last query at
    the last key; a [B] array places each row's queries, as when appending to a cache).
    `segment_ids` [B, T] (self-attention, T == S: packed sequences) allows only pairs of one
    segment.
    """
    mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    if causal:
        offset = kv_len - q_len if q_offset is None else q_offset
        offset = jnp.reshape(jnp.asarray(offset, jnp.int32), (-1, 1, 1, 1))  # [B or 1, 1, 1, 1]
        q_pos = jnp.arange(q_len)[:, None] + offset  # [B or 1, 1, T, 1]
        mask = mask & (jnp.arange(kv_len)[None, :] <= q_pos)
    if lengths is not None:
        mask = mask & (jnp.arange(kv_len)[None, :] < lengths[:, None])[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def _acc(dtype) -> jnp.dtype:
    """Accumulation dtype: float32, or float64 when the inputs are float64 (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def _group(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, T, K, G, D]: query heads grouped by the kv head they share."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _ungroup(x: jax.Array) -> jax.Array:
    """[B, K, G, T, ...] -> [B, H, T, ...]."""
    b, kv, g = x.shape[:3]
    return x.reshape(b, kv * g, *x.shape[3:])


def _dot_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q·k for every head: [B, T, H, D] x [B, S, K, D] -> [B, H, T, S] in float32.

    A query or key holding NaN or inf gives NaN logits in its row or column. The product reads
    zeros in its place, so a pair masked later gets an exact zero gradient (never 0·NaN).
    """
    b, t, h, _ = q.shape
    kv_heads = k.shape[2]
    q_ok = jnp.all(jnp.isfinite(q), axis=-1).reshape(b, t, kv_heads, h // kv_heads)
    k_ok = jnp.all(jnp.isfinite(k), axis=-1)  # [B, S, K]
    # [B, K, G, T, 1] & [B, K, 1, 1, S]
    ok = q_ok.transpose(0, 2, 3, 1)[..., None] & k_ok.transpose(0, 2, 1)[:, :, None, None, :]
    qg = _group(jnp.where(jnp.isfinite(q), q, 0), kv_heads)
    k = jnp.where(jnp.isfinite(k), k, 0)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=_acc(q.dtype))
    return _ungroup(jnp.where(ok, logits, jnp.nan))


def _softmax_values(logits: jax.Array, mask: jax.Array, v: jax.Array) -> jax.Array:
    """Masked softmax over keys then the weighted sum of values.

    logits [B, H, T, S] float32, mask broadcastable to it, v [B, S, K, D] -> [B, T, H, D] float32.
    Masked pairs never reach the output or a gradient, whatever they hold: they are cut with
    `where`, never multiplied by zero (0·NaN is NaN). An allowed pair whose logit or value is
    not finite makes its row NaN. Rows with no allowed key give zeros.
    """
    b, h, t, s = logits.shape
    kv_heads = v.shape[2]
    v_finite = jnp.isfinite(v)
    v_ok = jnp.transpose(jnp.all(v_finite, axis=-1), (0, 2, 1))  # [B, K, S]
    v_ok = jnp.repeat(v_ok, h // kv_heads, axis=1)[:, :, None, :]  # [B, H, 1, S]
    logits = jnp.where(jnp.isfinite(logits) & v_ok, logits, jnp.nan)
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)  # NaN in a row with a non-finite pair
    probs = jnp.where(mask, weights / jnp.where(denom == 0, 1.0, denom), 0.0)
    probs = probs.reshape(b, kv_heads, h // kv_heads, t, s).astype(v.dtype)
    values = jnp.where(v_finite, v, 0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values, preferred_element_type=_acc(v.dtype))
    return out.reshape(b, t, h, v.shape[3])


# ---------------------------------------------------------------------------------------------
# CoPE: contextual position encoding (Golovneva et al. 2024, arXiv 2405.18719)
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class CoPE:
    """The CoPE argument of an attention call: the layer's table and how positions are used.

    table [N, D] (z_i[n] = q_i·e[n], shared by the layer's heads); gate_k [B, S, K, D] optional
    separate gate keys (the official `--cope-sep-key`); nodiv adds the position term after
    scaling (the paper's Appendix B).
    """

    table: jax.Array
    gate_k: jax.Array | None = None
    nodiv: bool = struct.field(pytree_node=False, default=False)


def check_cope(q: jax.Array, k: jax.Array, cope: CoPE) -> None:
    """Raises a one-line ValueError naming the CoPE argument whose shape is wrong."""
    table = cope.table
    if not (hasattr(table, "shape") and hasattr(table, "dtype")):
        raise ValueError(f"pos_emb must be an array, got {type(table).__name__}")
    if table.ndim != 2 or table.shape[1] != q.shape[-1] or table.shape[0] < 1:
        raise ValueError(
            f"pos_emb must be [npos >= 1, head_dim={q.shape[-1]}], got shape {table.shape}"
        )
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(f"pos_emb must be a floating array, got {table.dtype}")
    if cope.gate_k is not None and cope.gate_k.shape != k.shape:
        raise ValueError(f"gate_k must have the shape of k {k.shape}, got {cope.gate_k.shape}")


def cope_positions(gates: jax.Array, npos: int) -> jax.Array:
    """Contextual positions p_ij = Σ_{m=j..i} g_im, clamped to npos-1.

    gates [..., T, S] (already zero on masked pairs) -> positions [..., T, S] float32. The sum runs
    from key j up to the last key of the row, so p_ii = g_ii when future keys are masked.
    """
    gates = gates.astype(_acc(gates.dtype))
    suffix_sums = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)
    return jnp.minimum(suffix_sums, npos - 1)


def interpolate_position_logits(pos_logits: jax.Array, positions: jax.Array) -> jax.Array:
    """Linear interpolation of integer-position logits at fractional positions.

    pos_logits [..., T, N] (z_i[n] = q_i·e[n]), positions [..., T, S] in [0, N-1]
    -> [..., T, S] with z_i(p) = (p - floor p)·z_i[ceil p] + (1 - p + floor p)·z_i[floor p].
    Gradients flow to `positions` through the interpolation weight only, as in the official code
    (zero at integer positions, where ceil == floor). One gather of (z[n], z[n+1]) pairs serves
    both ends, which halves the gather work and its scatter-add gradient.
    """
    lower = jnp.floor(positions)
    frac = positions - lower
    index = jax.lax.stop_gradient(lower).astype(jnp.int32)[..., None]  # [..., T, S, 1]
    next_logits = jnp.concatenate([pos_logits[..., 1:], pos_logits[..., -1:]], axis=-1)
    pairs = jnp.stack([pos_logits, next_logits], axis=-1)  # [..., T, N, 2]
    picked = jnp.take_along_axis(pairs, index, axis=-2)  # [..., T, S, 2]
    z_lower = picked[..., 0]
    z_upper = jnp.where(frac > 0, picked[..., 1], z_lower)  # ceil == floor at integers
    return z_lower + frac * (z_upper - z_lower)


def cope_logits(
    q: jax.Array,
    k: jax.Array,
    cope: CoPE,
    mask: jax.Array,
    *,
    scale: float,
    bias: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pre-softmax CoPE logits [B, H, T, S] float32 (masked entries left unmasked), and the
    gates and positions [B, H, T, S] they came from.

    Default (the official module): (q·k + z(p) [+ bias]) · scale. With `nodiv` (Appendix B):
    (q·k [+ bias]) · scale + z(p). Gates are sigmoid(scale · q·gate_k), zeroed where `mask` is
    False, so masked keys and padding never count.
    """
    content = _dot_logits(q, k)
    gate_logits = content if cope.gate_k is None else _dot_logits(q, cope.gate_k)
    gates = jnp.where(mask, jax.nn.sigmoid(gate_logits * scale), 0.0)
    positions = cope_positions(gates, cope.table.shape[0])
    # [B, T, H, D] x [N, D] -> [B, H, T, N]
    z = jnp.einsum(
        "bthd,nd->bhtn", q, cope.table.astype(q.dtype), preferred_element_type=_acc(q.dtype)
    )
    position_term = interpolate_position_logits(z, positions)
    if bias is not None:
        content = content + bias.astype(content.dtype)
    if cope.nodiv:
        logits = content * scale + position_term
    else:
        logits = (content + position_term) * scale
    return logits, {"gates": gates, "positions": positions}


# ---------------------------------------------------------------------------------------------
# The reference attention and its public entry points
# ---------------------------------------------------------------------------------------------


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    cope: CoPE | None = None,
    intermediates: bool = False,
):
    """The XLA reference every attention backend is tested against (plain and CoPE).

    Arguments as `cope.backends.attend` (inputs already validated). Returns [B, T, H, D] in q's
    dtype, or with `intermediates` (out, dict) where the dict holds float32 [B, H, T, S]
    `logits` (scaled, the softmax input, -inf where masked), `probs`, and for CoPE `gates` and
    `positions` (what `calibrate` and the analysis tools read).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attention_mask(
        q.shape[1],
        k.shape[1],
        causal=causal,
        lengths=lengths,
        q_offset=q_offset,
        segment_ids=segment_ids,
    )
    parts = {}
    if cope is None:
        logits = _dot_logits(q, k)
        if bias is not None:
            logits = logits + bias.astype(logits.dtype)
        logits = logits * scale
    else:
        logits, parts = cope_logits(q, k, cope, mask, scale=scale, bias=bias)
    out = _softmax_values(logits, mask, v).astype(q.dtype)
    if not intermediates:
        return out
    masked = jnp.where(mask, logits, -jnp.inf)
    probs = jnp.where(mask, jax.nn.softmax(masked, axis=-1), 0.0)
    return out, {"logits": masked, "probs": probs, **parts}


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention `softmax(scale·(q·k + bias)) v` with causal/padding masks and GQA.

    Args:
      q: [B, T, H, D] queries.
      k, v: [B, S, K, D] keys and values; H must be a multiple of K.
      causal: mask keys after each query (last query aligned with the last key when T < S).
      lengths: optional [B] int, the number of valid keys per sequence.
      scale: logit scale, default 1/sqrt(D).
      bias: optional [B or 1, H or 1, T, S] logits added to q·k *before* scaling (the units of
        q·k, as the relative-position term q·r[i-j]).
      segment_ids: optional [B, T] int (T == S): packed sequences, attention only within one.
      impl: "xla" (this reference), "pallas" (a kernel, or a one-line error saying why none
        serves the call), "auto" or a backend name; see `cope.backends.attend`.

    Returns:
      [B, T, H, D] in q's dtype.
    """
    from cope.backends import attend  # the seam; it imports this module

    return attend(
        q,
        k,
        v,
        causal=causal,
        lengths=lengths,
        scale=scale,
        bias=bias,
        segment_ids=segment_ids,
        impl=impl,
    )


def cope_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_emb: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    nodiv: bool = False,
    gate_k: jax.Array | None = None,
    bias: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """CoPE attention as Meta's official `ContextPosSelfAttn` (facebookresearch/RAM, projects/cope).

    g_ij = sigmoid(q_i·k_j·scale) on allowed pairs (0 elsewhere); p_ij = Σ_{m=j..i} g_im clamped
    to npos-1; z_i[n] = q_i·e[n]; logits (q_i·k_j + z_i(p_ij))·scale with z interpolated linearly
    between floor and ceil of p_ij; softmax over allowed keys.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D] (GQA: H % K == 0).
      pos_emb: [N, D] position table e, shared by all heads of the layer (N = npos).
      causal, lengths: as `attention`.
      scale: default 1/sqrt(D); used for the gates and the logits.
      nodiv: add the position term after scaling (the paper's Appendix B code, `--cope-nodiv`).
      gate_k: optional [B, S, K, D] separate gate keys (the official `--cope-sep-key`).
      bias: optional logits in q·k units added before scaling (the `cope+rel` relative term).
      segment_ids: optional [B, T] (T == S): packed sequences; gates never count keys of
        another segment, so positions restart in each.
      impl: as `attention` ("pallas": the fused CoPE kernel).

    Returns:
      [B, T, H, D] in q's dtype.
    """
    from cope.backends import attend  # the seam; it imports this module

    cope = CoPE(table=pos_emb, gate_k=gate_k, nodiv=nodiv)
    return attend(
        q,
        k,
        v,
        causal=causal,
        lengths=lengths,
        scale=scale,
        bias=bias,
        cope=cope,
        segment_ids=segment_ids,
        impl=impl,
    )


# ---------------------------------------------------------------------------------------------
# RoPE and relative positions
# ---------------------------------------------------------------------------------------------


def rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half (GPT-NeoX/Llama) convention.

    x [B, T, H, D] (D even), positions [B, T] or [T] (int or float) -> [B, T, H, D] in x's dtype.
    rope(q, i)·rope(k, j) depends on i - j only.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"rope needs a floating x (it would truncate the rotation), got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"rope needs x [batch, seq, heads, head_dim], got shape {x.shape}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    positions = jnp.asarray(positions, _acc(x.dtype))
    if positions.ndim == 1:
        positions = positions[None]
    if positions.shape[-1] != x.shape[1]:
        raise ValueError(
            f"positions must be [batch, {x.shape[1]}] or [{x.shape[1]}], "
            f"got shape {positions.shape}"
        )
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=positions.dtype) / d)  # [D/2]
    angles = positions[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(positions.dtype), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def relative_logits(
    q: jax.Array, rel_emb: jax.Array, kv_len: int, *, q_offset: int | jax.Array | None = None
) -> jax.Array:
    """Relative-position logits q_i·r[i-j] [B, H, T, S] float32, in q·k units (unscaled).

    rel_emb [R, D] is one table (the official code shares it by all layers and heads). Distances
    are capped at R-1, reusing the last embedding beyond it (the official `--rel-pos-extend`, the
    paper's "Relative-capped"); negative distances (future keys, masked in a causal model) use
    r[0]. Query i sits at key position i + q_offset (default S - T, as the causal mask); q_offset
    may be a [B] array (ragged decoding).

    With a static offset the T×S matrix is built by a row shift of q·r (pads and reshapes, no
    gather), whose gradient is cheap; a traced offset falls back to a gather.
    """
    if rel_emb.ndim != 2 or rel_emb.shape[0] < 1 or rel_emb.shape[1] != q.shape[-1]:
        raise ValueError(
            f"rel_emb must be [R >= 1, head_dim={q.shape[-1]}], got shape {rel_emb.shape}"
        )
    if kv_len < 1:
        raise ValueError(f"kv_len must be >= 1, got {kv_len}")
    t = q.shape[1]
    # [B, T, H, D] x [R, D] -> [B, H, T, R]
    z = jnp.einsum(
        "bthd,rd->bhtr", q, rel_emb.astype(q.dtype), preferred_element_type=_acc(q.dtype)
    )
    if q_offset is None or isinstance(q_offset, int):
        offset = kv_len - t if q_offset is None else q_offset
        return _shifted_relative_logits(z, kv_len, offset)
    offset = jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1, 1, 1))  # [B or 1, 1, 1]
    distance = jnp.arange(t)[None, :, None] + offset - jnp.arange(kv_len)[None, None, :]
    distance = jnp.clip(distance, 0, rel_emb.shape[0] - 1)  # [B or 1, T, S]
    index = jnp.broadcast_to(distance[:, None], (q.shape[0], z.shape[1], t, kv_len))
    return jnp.take_along_axis(z, index, axis=-1)


def _shifted_relative_logits(z: jax.Array, kv_len: int, offset: int) -> jax.Array:
    """out[..., i, j] = z[..., i, clip(i + offset - j, 0, R-1)] without a gather.

    z [..., T, R] -> [..., T, S]. Column c of `by_distance` holds distance offset + T - 1 - c
    (clipped), so out[i, j] = by_distance[i, T - 1 - i + j]: a shift of row i by T - 1 - i, done
    by flattening rows of width W + 1 and re-reading them with width W.
    """
    *lead, t, r = z.shape
    low, high = offset - kv_len + 1, offset + t - 1  # smallest and largest distance needed
    parts = []
    if low < 0:  # negative distances (future keys) use r[0]
        parts.append(jnp.broadcast_to(z[..., :1], (*lead, t, min(-low, high - low + 1))))
    if high >= 0 and low <= r - 1:
        parts.append(z[..., max(low, 0) : min(high, r - 1) + 1])
    if high > r - 1:  # distances beyond the table reuse r[R-1]
        parts.append(
            jnp.broadcast_to(z[..., r - 1 :], (*lead, t, min(high - r + 1, high - low + 1)))
        )
    by_distance = jnp.flip(jnp.concatenate(parts, axis=-1), axis=-1)  # [..., T, T + S - 1]
    width = by_distance.shape[-1]
    padded = jnp.pad(by_distance, [(0, 0)] * (len(lead) + 1) + [(0, 1)])
    flat = padded.reshape(*lead, t * (width + 1))[..., t - 1 : t - 1 + t * width]
    return flat.reshape(*lead, t, width)[..., :kv_len]
