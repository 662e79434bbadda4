"""Fused CoPE flash-attention forward (Golovneva et al. 2024, arXiv 2405.18719) in Pallas-Triton.

CoPE positions are suffix sums of gates along the keys, p_ij = Σ_{m=j..i} g_im, so each program
(one query block of one head) walks key tiles from its last visible key toward key 0 with a
per-row float32 carry of the gates already passed (the stick-breaking-attention walk of Tan et
al. 2024); the online softmax of FlashAttention-2 does not care about the visiting order.
Inside a tile the suffix sum is carry + row total - inclusive prefix + g (Triton lowers only the
forward cumsum). The position logit z_i(p) interpolates z_i[n] = q_i·e[n] between floor(p) and
floor(p) + 1; z arrives precomputed ([B, H, T, N+1] float32, one XLA matmul) and is read with
array-indexed ref loads (pointer gathers).

Saturation: once every live row of the block has carry >= npos - 1, every key further left sits
at the clamped position npos - 1, whose logit z_i[npos - 1] is a per-row constant. Those tiles
run as plain flash tiles (no gates, no gathers, no masks) plus that constant. Rows whose gates
stay near 0 never saturate and keep the exact gated path to key 0.

Packed rows (`segment_ids`): a query sees only keys of its own segment, so gates of other
segments are 0 and positions restart in each segment. The walk covers only the key tiles that
share a segment with the block (`pallas_kernels._segments`); saturated tiles that are not inside
one segment keep the segment mask.

Non-finite inputs: masked pairs never matter (cut with `where`, non-finite values zeroed before
the products over masked pairs, gather indices from non-finite positions sanitised); a NaN or inf
at an allowed pair makes the whole row NaN, as in `cope.functional`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._segments import fori_ranges, pad_segments, tile_ranges
from pallas_kernels.cope_attention.config import ForwardConfig, heuristic_config

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """fp32-accumulated matmul; fp32 inputs stay fp32 (no tf32)."""
    dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _sigmoid(x: jax.Array) -> jax.Array:
    # Pallas-Triton has no lowering for lax.logistic.
    return 1.0 / (1.0 + jnp.exp(-x))


def _cdiv(a, b: int):
    """Ceil-division of a non-negative traced int by a static int."""
    return lax.div(a + (b - 1), b)


def _finite_rows(x: jax.Array) -> jax.Array:
    """[rows, D] -> [rows] bool: the row holds no NaN or inf."""
    return jnp.min(jnp.where(jnp.isfinite(x), 1, 0), axis=1) > 0


def _q_block_map(causal: bool, num_q_blocks: int):
    """Grid index -> query block; causal launches the heaviest (last) blocks first."""
    if causal:
        return lambda i: num_q_blocks - 1 - i
    return lambda i: i


def _forward_kernel(
    length_ref,
    q_ref,
    k_ref,
    gk_ref,
    v_ref,
    z_ref,
    *refs,
    segments: bool,
    scale: float,
    causal: bool,
    nodiv: bool,
    npos: int,
    offset: int,
    q_len: int,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    separate_gate_k: bool,
    exact_gate_total: bool,
):
    # length_ref: [] int32; q_ref: [block_q, D]; k_ref, gk_ref, v_ref: [S_pad, D];
    # z_ref: [block_q, N + 1] fp32; refs: with `segments` tiles_ref [4] int32 (`tile_ranges`),
    # q_seg_ref [block_q] int32, kv_seg_ref [S_pad] int32; then o_ref [block_q, D],
    # lse_ref, gate_total_ref [block_q] fp32
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    o_ref, lse_ref, gate_total_ref = refs[-3:]
    q_block = _q_block_map(causal, num_q_blocks)(pl.program_id(0))
    length = length_ref[...]
    q = q_ref[...]  # [block_q, D]
    local = jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
    rows = q_block * block_q + local  # [block_q]
    gather_rows = jnp.broadcast_to(local[:, None], (block_q, block_k))  # [block_q, block_k]
    qk_scale = scale * LOG2E  # logits are kept in the log2 domain
    pos_scale = LOG2E if nodiv else scale * LOG2E
    max_pos = float(npos - 1)
    q_seg = q_seg_ref[...] if segments else None  # [block_q]

    key_end = length  # keys [0, key_end) are visible to some row of this block
    live = (rows < q_len) & (length > 0)  # rows that see at least one key
    if causal:
        key_end = jnp.minimum(key_end, jnp.maximum(q_block * block_q + block_q + offset, 0))
        live = live & (rows + offset >= 0)
    num_blocks = _cdiv(key_end, block_k)
    first_block = jnp.int32(0)  # the walk stops at this key tile
    if segments:  # only tiles sharing a segment with the block
        seg_lo, single_lo, single_hi, seg_hi = (tiles_ref[n] for n in range(4))
        num_blocks = jnp.minimum(num_blocks, seg_hi)
        first_block = jnp.minimum(seg_lo, num_blocks)
    # [block_q] log2-domain logit of the clamped position npos - 1.
    saturated_logit = z_ref[:, npos - 1] * pos_scale

    def segment_mask(kv_block):
        kv_seg = kv_seg_ref[pl.ds(kv_block * block_k, block_k)]  # [block_k]
        return q_seg[:, None] == kv_seg[None, :]

    def gate_logits(s, kv_block):
        if not separate_gate_k:
            return s
        gk = gk_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        return _dot(q, gk, trans_b=True)

    def softmax_step(s2, v, acc, m_prev, l_prev, valid=None):
        # exp2 would weigh a -inf logit (from an infinite q, k or z) 0; NaN and +inf logits
        # already end as NaN rows, so a -inf one must too.
        s2 = jnp.where(s2 > -jnp.inf, s2, jnp.nan)
        m_next = jnp.maximum(m_prev, jnp.max(s2, axis=1))  # [block_q]
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s2 - m_next[:, None])  # [block_q, block_k]
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    def masked_values(kv_block, s2, valid):
        """The tile's values with non-finite rows zeroed (p = 0 times NaN would still be NaN),
        and the logits with an allowed pair reading such a value NaN."""
        v = v_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        v_ok = _finite_rows(v)  # [block_k]
        v = jnp.where(v_ok[:, None], v, 0)
        return v, jnp.where(valid, jnp.where(v_ok[None, :], s2, jnp.nan), MASK_VALUE)

    def gated_cond(state):
        # Rows without keys start at +inf, so they never hold the walk back. The test lives
        # here rather than as a flag in the loop state: Triton crashes on scalar flags there.
        kv_block, carry = state[0], state[-1]
        least = jnp.min(carry)
        return (kv_block >= first_block) & ~((least >= max_pos) & (least > 0.0))

    def gated_body(state):
        kv_block, acc, m, l, carry = state
        cols = kv_block * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [block_k]
        valid = cols[None, :] < length  # [block_q, block_k]
        if causal:
            valid = valid & (cols[None, :] <= rows[:, None] + offset)
        if segments:
            valid = valid & segment_mask(kv_block)
        k = k_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        s = _dot(q, k, trans_b=True)  # [block_q, block_k] raw q·k
        g = jnp.where(valid, _sigmoid(gate_logits(s, kv_block) * scale), 0.0)
        tile_total = jnp.sum(g, axis=1)  # [block_q]
        suffix = (carry + tile_total)[:, None] - jnp.cumsum(g, axis=1) + g
        pos = jnp.clip(suffix, 0.0, max_pos)  # [block_q, block_k]
        # A NaN gate of the row (an allowed non-finite gate key) leaves a NaN position: the
        # gather reads position 0 instead and the logit becomes NaN.
        pos_ok = pos == pos
        pos = jnp.where(pos_ok, pos, 0.0)
        lower = jnp.floor(pos)
        frac = pos - lower
        index = lower.astype(jnp.int32)
        z_lower = z_ref[gather_rows, index]  # [block_q, block_k]
        z_upper = z_ref[gather_rows, index + 1]  # column N is a finite pad, weight 0 there
        z_pos = jnp.where(pos_ok, z_lower + frac * (z_upper - z_lower), jnp.nan)
        v, s2 = masked_values(kv_block, s * qk_scale + z_pos * pos_scale, valid)
        acc, m, l = softmax_step(s2, v, acc, m, l, valid)
        return kv_block - 1, acc, m, l, carry + tile_total

    def saturated_body(kv_block, state, *, masked: bool):
        # Every live row is saturated and, having seen a key to the right, sees all of these
        # (of its own segment: `masked` tiles are not inside one segment).
        acc, m, l, carry = state
        k = k_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        s = _dot(q, k, trans_b=True)  # [block_q, block_k]
        s2 = s * qk_scale + saturated_logit[:, None]
        valid = segment_mask(kv_block) if masked else None
        if masked:
            v, s2 = masked_values(kv_block, s2, valid)
        else:
            v = v_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        acc, m, l = softmax_step(s2, v, acc, m, l, valid)
        if exact_gate_total:
            g = _sigmoid(gate_logits(s, kv_block) * scale)
            carry = carry + jnp.sum(g if valid is None else jnp.where(valid, g, 0.0), axis=1)
        return acc, m, l, carry

    head_dim = q_ref.shape[-1]
    state = (
        num_blocks - 1,
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.where(live, 0.0, jnp.inf),  # [block_q] gates of the keys passed so far
    )
    next_block, acc, m, l, carry = lax.while_loop(gated_cond, gated_body, state)
    state = (acc, m, l, carry)
    stop = next_block + 1  # saturated tiles [first_block, stop)
    if segments:
        a = jnp.clip(single_lo, first_block, stop)
        b = jnp.clip(single_hi, a, stop)
        state = fori_ranges(((a, b),), functools.partial(saturated_body, masked=False), state)
        masked_body = functools.partial(saturated_body, masked=True)
        state = fori_ranges(((first_block, a), (b, stop)), masked_body, state)
    else:
        state = lax.fori_loop(0, stop, functools.partial(saturated_body, masked=False), state)
    acc, m, l, carry = state

    empty = (l == 0.0) | ~live  # no visible key (a NaN l is a NaN row, not an empty one)
    l_safe = jnp.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    # A non-finite value at an allowed key of an unmasked tile leaves inf or NaN in its
    # columns only; the whole row becomes NaN, as in the masked tiles.
    ok = _finite_rows(out)  # [block_q]
    out = jnp.where(ok[:, None], out, jnp.nan)
    o_ref[...] = jnp.where(empty[:, None], 0.0, out).astype(o_ref.dtype)
    lse = jnp.where(ok, (m + jnp.log2(l_safe)) / LOG2E, jnp.nan)
    lse_ref[...] = jnp.where(empty, jnp.inf, lse)
    gate_total_ref[...] = jnp.where(live, carry, 0.0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad(x: jax.Array, axis_sizes: dict[int, int]) -> jax.Array:
    """Zero-pads the given axes up to the given sizes."""
    widths = [(0, axis_sizes.get(a, n) - n) for a, n in enumerate(x.shape)]
    if all(w == (0, 0) for w in widths):
        return x
    return jnp.pad(x, widths)


def position_logits(q: jax.Array, pos_emb: jax.Array) -> jax.Array:
    """z[b, h, i, n] = q_i·e[n] in float32: [B, T, H, D] x [N, D] -> [B, H, T, N].

    As `cope.functional` computes it: pos_emb cast to q's dtype, fp32 accumulation.
    """
    return jnp.einsum(
        "bthd,nd->bhtn",
        q,
        pos_emb.astype(q.dtype),
        precision=lax.Precision.HIGHEST,  # no tf32 for fp32 inputs
        preferred_element_type=jnp.float32,
    )


def cope_attention_fwd(
    q,
    k,
    v,
    pos_emb,
    gate_k,
    lengths,
    segment_ids=None,
    *,
    causal: bool,
    scale: float | None,
    nodiv: bool,
    config: ForwardConfig | None,
    interpret: bool,
    exact_gate_total: bool = True,
    debug: bool = False,
):
    """CoPE attention forward with the residuals of the backward.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D]; pos_emb: [N, D]; gate_k: [B, S, K, D] or None
        (gates use k); lengths: [B] int or None (all S keys valid); segment_ids: [B, T] int
        or None (T == S: packed rows, gates and attention within a segment only). Unpadded.
      causal, scale (None: 1/sqrt(D)), nodiv: as `cope.functional.cope_attention`.
      config: tiles (None: `heuristic_config`); interpret: Pallas interpret mode.
      exact_gate_total: sum the gates of saturated tiles too. Without it (forward only) a
        block stops summing once all its rows reach npos - 1: a row's total is then exact if
        below npos - 1 and some value >= npos - 1 otherwise, so min(gate_total, npos - 1)
        is exact either way.

    Returns:
      out [B, T, H, D] (q.dtype); lse [B, H, T] fp32, natural log of the softmax denominator
      (+inf for a row with no visible key); gate_total [B, H, T] fp32, Σ_j g_ij over the visible
      keys, unclamped.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    npos = pos_emb.shape[0]
    group = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    if config is None:
        config = heuristic_config(head_dim, q_len, kv_len, interpret=interpret)
    block_q, block_k = config.block_q, config.block_k
    q_pad = _round_up(q_len, block_q)
    kv_pad = _round_up(kv_len, block_k)
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)

    z = position_logits(q, pos_emb)  # [B, H, T, N]
    # One finite pad column: the upper interpolation end at p = npos - 1 (weight 0).
    z = _pad(z, {2: q_pad, 3: npos + 1})  # [B, H, T_pad, N + 1]
    qp = _pad(q, {1: q_pad, 3: d_pad})
    kp = _pad(k, {1: kv_pad, 3: d_pad})
    vp = _pad(v, {1: kv_pad, 3: d_pad})
    gkp = kp if gate_k is None else _pad(gate_k, {1: kv_pad, 3: d_pad})

    num_q_blocks = q_pad // block_q
    kernel = functools.partial(
        _forward_kernel,
        scale=float(scale),
        causal=bool(causal),
        nodiv=bool(nodiv),
        npos=npos,
        offset=kv_len - q_len,
        q_len=q_len,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
        separate_gate_k=gate_k is not None,
        exact_gate_total=exact_gate_total,
        segments=segment_ids is not None,
    )
    qb = _q_block_map(bool(causal), num_q_blocks)
    q_spec = pl.BlockSpec((None, block_q, None, d_pad), lambda i, b, h: (b, qb(i), h, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, d_pad), lambda i, b, h: (b, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, qb(i)))
    in_specs = [
        pl.BlockSpec((None,), lambda i, b, h: (b,)),  # lengths
        q_spec,  # q
        kv_spec,  # k
        kv_spec,  # gate keys
        kv_spec,  # v
        pl.BlockSpec((None, None, block_q, npos + 1), lambda i, b, h: (b, h, qb(i), 0)),  # z
    ]
    inputs = [lengths, qp, kp, gkp, vp, z]
    if segment_ids is not None:
        q_seg, kv_seg = pad_segments(segment_ids, q_pad, kv_pad)
        tiles = tile_ranges(q_seg, kv_seg, block_q=block_q, block_k=block_k, by_keys=False)
        inputs += [tiles, q_seg, kv_seg]
        in_specs += [
            pl.BlockSpec((None, None, 4), lambda i, b, h: (b, qb(i), 0)),
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, qb(i))),
            pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
        ]
    out, lse, gate_total = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct(qp.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        debug=debug,
        name="cope_attention_fwd",
    )(*inputs)
    return (
        out[:, :q_len, :, :head_dim],
        lse[:, :, :q_len],
        gate_total[:, :, :q_len],
    )
