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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

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
    o_ref,
    lse_ref,
    gate_total_ref,
    *,
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
    # length_ref: [] int32; q_ref, o_ref: [block_q, D]; k_ref, gk_ref, v_ref: [S_pad, D];
    # z_ref: [block_q, N + 1] fp32; lse_ref, gate_total_ref: [block_q] fp32
    q_block = _q_block_map(causal, num_q_blocks)(pl.program_id(0))
    length = length_ref[...]
    q = q_ref[...]  # [block_q, D]
    local = jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
    rows = q_block * block_q + local  # [block_q]
    gather_rows = jnp.broadcast_to(local[:, None], (block_q, block_k))  # [block_q, block_k]
    qk_scale = scale * LOG2E  # logits are kept in the log2 domain
    pos_scale = LOG2E if nodiv else scale * LOG2E
    max_pos = float(npos - 1)

    key_end = length  # keys [0, key_end) are visible to some row of this block
    live = (rows < q_len) & (length > 0)  # rows that see at least one key
    if causal:
        key_end = jnp.minimum(key_end, jnp.maximum(q_block * block_q + block_q + offset, 0))
        live = live & (rows + offset >= 0)
    num_blocks = _cdiv(key_end, block_k)
    # [block_q] log2-domain logit of the clamped position npos - 1.
    saturated_logit = z_ref[:, npos - 1] * pos_scale

    def gate_logits(s, kv_block):
        if not separate_gate_k:
            return s
        gk = gk_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        return _dot(q, gk, trans_b=True)

    def softmax_step(s2, kv_block, acc, m_prev, l_prev, valid=None):
        m_next = jnp.maximum(m_prev, jnp.max(s2, axis=1))  # [block_q]
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s2 - m_next[:, None])  # [block_q, block_k]
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    def gated_cond(state):
        # Rows without keys start at +inf, so they never hold the walk back. The test lives
        # here rather than as a flag in the loop state: Triton crashes on scalar flags there.
        kv_block, carry = state[0], state[-1]
        least = jnp.min(carry)
        return (kv_block >= 0) & ~((least >= max_pos) & (least > 0.0))

    def gated_body(state):
        kv_block, acc, m, l, carry = state
        cols = kv_block * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [block_k]
        valid = cols[None, :] < length  # [block_q, block_k]
        if causal:
            valid = valid & (cols[None, :] <= rows[:, None] + offset)
        k = k_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        s = _dot(q, k, trans_b=True)  # [block_q, block_k] raw q·k
        g = jnp.where(valid, _sigmoid(gate_logits(s, kv_block) * scale), 0.0)
        tile_total = jnp.sum(g, axis=1)  # [block_q]
        suffix = (carry + tile_total)[:, None] - jnp.cumsum(g, axis=1) + g
        pos = jnp.clip(suffix, 0.0, max_pos)  # [block_q, block_k]
        lower = jnp.floor(pos)
        frac = pos - lower
        index = lower.astype(jnp.int32)
        z_lower = z_ref[gather_rows, index]  # [block_q, block_k]
        z_upper = z_ref[gather_rows, index + 1]  # column N is a finite pad, weight 0 there
        z_pos = z_lower + frac * (z_upper - z_lower)
        s2 = jnp.where(valid, s * qk_scale + z_pos * pos_scale, MASK_VALUE)
        acc, m, l = softmax_step(s2, kv_block, acc, m, l, valid)
        return kv_block - 1, acc, m, l, carry + tile_total

    def saturated_body(kv_block, state):
        # Every live row is saturated and, having seen a key to the right, sees all of these.
        acc, m, l, carry = state
        k = k_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        s = _dot(q, k, trans_b=True)  # [block_q, block_k]
        acc, m, l = softmax_step(s * qk_scale + saturated_logit[:, None], kv_block, acc, m, l)
        if exact_gate_total:
            carry = carry + jnp.sum(_sigmoid(gate_logits(s, kv_block) * scale), axis=1)
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
    acc, m, l, carry = lax.fori_loop(0, next_block + 1, saturated_body, (acc, m, l, carry))

    empty = (l == 0.0) | ~live
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, (m + jnp.log2(l_safe)) / LOG2E)
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
        (gates use k); lengths: [B] int or None (all S keys valid). Unpadded.
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
    )(lengths, qp, kp, gkp, vp, z)
    return (
        out[:, :q_len, :, :head_dim],
        lse[:, :, :q_len],
        gate_total[:, :, :q_len],
    )
