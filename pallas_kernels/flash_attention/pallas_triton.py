"""FlashAttention-2 forward and backward (Dao, 2023, arXiv 2307.08691) as Pallas-Triton kernels.

Layout BTHD, GQA by indexing kv head `h // G`, causal masking aligned to the last key, ragged
`lengths`, packed rows (`segment_ids`: a query sees only keys of its own segment). Sequences
arrive padded to whole blocks (see `api.py`); padded keys are masked through `lengths <= S`,
padded query rows are computed and sliced off by the caller.
Each KV (or Q) loop is split: blocks that need no mask run a lean body, only the few blocks
crossing the diagonal, the length boundary or a segment boundary pay for the mask, and tiles
whose query and key blocks share no segment are skipped (`pallas_kernels._segments`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._segments import fori_ranges, tile_ranges
from pallas_kernels.flash_attention.config import TritonConfig

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False):
    """fp32-accumulated matmul; fp32 inputs stay fp32 (no tf32)."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _cdiv(a, b: int):
    """Ceil-division of a non-negative traced int by a static int."""
    return lax.div(a + (b - 1), b)


def _q_block_bounds(q_block, length, *, block_q: int, block_k: int, causal: bool, offset: int):
    """KV-block range [0, hi) seen by a query block, and the prefix [0, full) needing no mask."""
    hi = _cdiv(length, block_k)
    full = lax.div(length, block_k)
    if causal:
        last_row = (q_block + 1) * block_q - 1
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(last_row + offset + 1, 0), block_k))
        full = jnp.minimum(full, lax.div(jnp.maximum(q_block * block_q + offset + 1, 0), block_k))
    full = jnp.minimum(full, hi)
    return full, hi


def _q_block_map(causal: bool, num_q_blocks: int):
    """Grid index -> query block. Causal launches the heaviest (last) query blocks first, which
    shortens the tail of the launch."""
    if causal:
        return lambda i: num_q_blocks - 1 - i
    return lambda i: i


def _q_block_id(causal: bool, num_q_blocks: int):
    return _q_block_map(causal, num_q_blocks)(pl.program_id(0))


def _finite_rows(x: jax.Array) -> jax.Array:
    """[rows, D] -> [rows] bool: the row holds no NaN or inf."""
    return jnp.min(jnp.where(jnp.isfinite(x), 1, 0), axis=1) > 0


def _finite_or_zero(x: jax.Array) -> jax.Array:
    """x with its NaN and inf entries zeroed (operands of products over masked pairs)."""
    return jnp.where(jnp.isfinite(x), x, 0)


def _mask(rows, cols, length, *, causal: bool, offset: int, q_seg=None, kv_seg=None):
    """[rows, cols] validity: key inside `length`, (causal) not after the query and (packed
    rows, given the [rows] and [cols] segment ids) of the query's segment."""
    valid = cols[None, :] < length
    if causal:
        valid = valid & (cols[None, :] <= rows[:, None] + offset)
    if q_seg is not None:
        valid = valid & (q_seg[:, None] == kv_seg[None, :])
    return valid


def _kv_loops(q_block, length, tiles_ref, *, block_q, block_k, causal, offset):
    """The KV blocks a query block visits, as (unmasked, masked) tuples of [start, stop)
    ranges: together they cover every tile holding an allowed pair; the unmasked ones only
    tiles whose pairs all are."""
    full, hi = _q_block_bounds(
        q_block, length, block_q=block_q, block_k=block_k, causal=causal, offset=offset
    )
    if tiles_ref is None:
        return ((0, full),), ((full, hi),)
    seg_lo, single_lo, single_hi, seg_hi = (tiles_ref[n] for n in range(4))
    hi = jnp.minimum(hi, seg_hi)
    lo = jnp.minimum(seg_lo, hi)
    a = jnp.clip(single_lo, lo, hi)
    b = jnp.clip(jnp.minimum(single_hi, full), a, hi)
    return ((a, b),), ((lo, a), (b, hi))


def _kv_segments(q_seg_ref, kv_seg_ref, block_k: int):
    """kv_block -> the segment arguments of `_mask` for a query block's tile ({} unpacked)."""
    if q_seg_ref is None:
        return lambda kv_block: {}
    q_seg = q_seg_ref[...]  # [block_q]
    return lambda kv_block: {
        "q_seg": q_seg,
        "kv_seg": kv_seg_ref[pl.ds(kv_block * block_k, block_k)],  # [block_k]
    }


def _segment_inputs(segments, *, block_q: int, block_k: int, by_keys: bool):
    """The packed-row kernel inputs: [] without segments, else (tiles [B, n, 4] int32 per
    query block, or per key block with `by_keys`, q_seg [B, T_pad], kv_seg [B, S_pad])."""
    if segments is None:
        return []
    q_seg, kv_seg = segments
    return [
        tile_ranges(q_seg, kv_seg, block_q=block_q, block_k=block_k, by_keys=by_keys),
        q_seg,
        kv_seg,
    ]


def _forward_kernel(
    length_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    segments: bool,
    scale: float,
    causal: bool,
    offset: int,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
):
    # length_ref: [] int32; q_ref: [block_q, D]; k_ref, v_ref: [S_pad, D]; refs: with
    # `segments` tiles_ref [4] int32 (`tile_ranges`), q_seg_ref [block_q] int32, kv_seg_ref
    # [S_pad] int32; then o_ref [block_q, D], lse_ref [block_q] fp32
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    o_ref, lse_ref = refs[-2:]
    q_block = _q_block_id(causal, num_q_blocks)
    length = length_ref[...]
    head_dim = q_ref.shape[-1]
    q = q_ref[...]  # [block_q, D]
    qk_scale = scale * LOG2E
    rows = q_block * block_q + jnp.arange(block_q)  # [block_q]
    segs = _kv_segments(q_seg_ref, kv_seg_ref, block_k)

    def body(kv_block, carry, *, masked: bool):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        v = v_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        s = _dot(q, k, trans_b=True) * qk_scale  # [block_q, block_k], log2 domain
        if masked:
            cols = kv_block * block_k + jnp.arange(block_k)
            valid = _mask(rows, cols, length, causal=causal, offset=offset, **segs(kv_block))
            # A masked key may hold anything: its non-finite values are zeroed (p = 0 times NaN
            # would still be NaN) and an allowed pair reading a zeroed value gets a NaN logit.
            v_ok = _finite_rows(v)  # [block_k]
            v = jnp.where(v_ok[:, None], v, 0)
            s = jnp.where(valid, jnp.where(v_ok[None, :], s, jnp.nan), MASK_VALUE)
        # exp2 would weigh a -inf logit (from an infinite q or k) 0; NaN and +inf logits
        # already end as NaN rows, so a -inf one must too.
        s = jnp.where(s > -jnp.inf, s, jnp.nan)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # [block_q]
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:
            p = jnp.where(valid, p, 0.0)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    loops = _kv_loops(
        q_block, length, tiles_ref, block_q=block_q, block_k=block_k, causal=causal, offset=offset
    )
    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    unmasked, masked = loops
    carry = fori_ranges(unmasked, functools.partial(body, masked=False), carry)
    acc, m, l = fori_ranges(masked, functools.partial(body, masked=True), carry)
    empty = l == 0.0  # no allowed key (a NaN l is a NaN row, not an empty one)
    l_safe = jnp.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    # A non-finite value at an allowed key of an unmasked block leaves inf or NaN in its
    # columns only; the whole row becomes NaN, as in the masked blocks.
    ok = _finite_rows(out)  # [block_q]
    o_ref[...] = jnp.where(ok[:, None], out, jnp.nan).astype(o_ref.dtype)
    lse = jnp.where(ok, (m + jnp.log2(l_safe)) / LOG2E, jnp.nan)
    lse_ref[...] = jnp.where(empty, -jnp.inf, lse)


def forward(
    q,
    k,
    v,
    lengths,
    segments=None,
    *,
    scale: float,
    causal: bool,
    offset: int,
    config: TritonConfig,
    interpret: bool,
    debug: bool = False,
):
    """q [B, T_pad, H, D], k/v [B, S_pad, K, D], lengths [B] int32, segments None or the
    segment ids (q_seg [B, T_pad], kv_seg [B, S_pad]) int32 -> out [B, T_pad, H, D],
    lse [B, H, T_pad] fp32 (natural log)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_q, block_k = config.block_q, config.block_k
    num_q_blocks = q_len // block_q
    kernel = functools.partial(
        _forward_kernel,
        segments=segments is not None,
        scale=scale,
        causal=causal,
        offset=offset,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
    )
    qb = _q_block_map(causal, num_q_blocks)
    in_specs = [
        pl.BlockSpec((None,), lambda i, b, h: (b,)),
        pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, qb(i), h, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
    ]
    seg_inputs = _segment_inputs(segments, block_q=block_q, block_k=block_k, by_keys=False)
    if seg_inputs:
        in_specs += [
            pl.BlockSpec((None, None, 4), lambda i, b, h: (b, qb(i), 0)),
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, qb(i))),
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        ]
    out_specs = [
        pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, qb(i), h, 0)),
        pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, qb(i))),
    ]
    return pl.pallas_call(
        kernel,
        grid=(num_q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        debug=debug,
        name="flash_attention_fwd",
    )(lengths, q, k, v, *seg_inputs)


def _dq_kernel(
    length_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    segments: bool,
    scale: float,
    causal: bool,
    offset: int,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
):
    # length_ref: [] int32; q_ref, do_ref: [block_q, D]; k_ref, v_ref: [S_pad, D];
    # lse_ref, delta_ref: [block_q] fp32; refs: the segment refs of `_forward_kernel` (with
    # `segments`), then dq_ref [block_q, D]
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    dq_ref = refs[-1]
    q_block = _q_block_id(causal, num_q_blocks)
    length = length_ref[...]
    q = q_ref[...]  # [block_q, D]
    do = do_ref[...]  # [block_q, D]
    lse2 = lse_ref[...] * LOG2E  # [block_q]
    delta = delta_ref[...]  # [block_q]
    qk_scale = scale * LOG2E
    rows = q_block * block_q + jnp.arange(block_q)
    segs = _kv_segments(q_seg_ref, kv_seg_ref, block_k)

    def body(kv_block, dq, *, masked: bool):
        k = k_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        v = v_ref[pl.ds(kv_block * block_k, block_k), :]  # [block_k, D]
        if masked:  # no 0·NaN from masked keys (an allowed non-finite key made lse NaN)
            k, v = _finite_or_zero(k), _finite_or_zero(v)
        s = _dot(q, k, trans_b=True) * qk_scale  # [block_q, block_k]
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            cols = kv_block * block_k + jnp.arange(block_k)
            valid = _mask(rows, cols, length, causal=causal, offset=offset, **segs(kv_block))
            p = jnp.where(valid, p, 0.0)
        dp = _dot(do, v, trans_b=True)  # [block_q, block_k]
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    loops = _kv_loops(
        q_block, length, tiles_ref, block_q=block_q, block_k=block_k, causal=causal, offset=offset
    )
    dq = jnp.zeros(q.shape, jnp.float32)
    unmasked, masked = loops
    dq = fori_ranges(unmasked, functools.partial(body, masked=False), dq)
    dq = fori_ranges(masked, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    length_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    segments: bool,
    scale: float,
    causal: bool,
    offset: int,
    block_q: int,
    block_k: int,
    group: int,
):
    # length_ref: [] int32; q_ref, do_ref: [T_pad, G, D]; k_ref, v_ref: [block_k, D]; lse_ref,
    # delta_ref: [G, T_pad] fp32; refs: with `segments` tiles_ref [4] int32 (`tile_ranges` of
    # this key block), q_seg_ref [T_pad] int32, kv_seg_ref [block_k] int32; then dk_ref, dv_ref
    # [block_k, D]
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    dk_ref, dv_ref = refs[-2:]
    kv_block = pl.program_id(0)
    length = length_ref[...]
    q_len = q_ref.shape[0]
    num_q_blocks = q_len // block_q
    # A key of this block that no query is allowed to see gets exact zero gradients even if
    # it holds NaN; one that is allowed made its rows' lse NaN, and they stay NaN.
    k = _finite_or_zero(k_ref[...])  # [block_k, D]
    v = _finite_or_zero(v_ref[...])  # [block_k, D]
    qk_scale = scale * LOG2E
    cols = kv_block * block_k + jnp.arange(block_k)  # [block_k]

    # Query blocks [lo, full) cross the diagonal or see padded keys; [full, num_q_blocks) don't.
    lo = jnp.int32(0)
    full = jnp.int32(0)
    if causal:
        lo = lax.div(jnp.maximum(kv_block * block_k - offset, 0), block_q)
        full = _cdiv(jnp.maximum((kv_block + 1) * block_k - 1 - offset, 0), block_q)
    full = jnp.where((kv_block + 1) * block_k <= length, full, num_q_blocks)
    lo = jnp.where(kv_block * block_k < length, lo, num_q_blocks)
    lo = jnp.minimum(lo, num_q_blocks)
    full = jnp.clip(full, lo, num_q_blocks)
    if segments:
        seg_lo, single_lo, single_hi, hi = (tiles_ref[n] for n in range(4))
        kv_seg = kv_seg_ref[...]  # [block_k]
        lo = jnp.minimum(jnp.maximum(lo, seg_lo), hi)
        a = jnp.clip(jnp.maximum(single_lo, full), lo, hi)
        b = jnp.clip(single_hi, a, hi)
        masked, unmasked = ((lo, a), (b, hi)), ((a, b),)
    else:
        masked, unmasked = ((lo, full),), ((full, num_q_blocks),)

    def body(q_block, carry, *, g, masked: bool):
        dk, dv = carry
        q_rows = pl.ds(q_block * block_q, block_q)
        q = q_ref[q_rows, g, :]  # [block_q, D]
        do = do_ref[q_rows, g, :]  # [block_q, D]
        lse2 = lse_ref[g, q_rows] * LOG2E  # [block_q]
        delta = delta_ref[g, q_rows]  # [block_q]
        if masked:  # a NaN query row must not reach the keys it may not see
            q = _finite_or_zero(q)
        s = _dot(q, k, trans_b=True) * qk_scale  # [block_q, block_k]
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            rows = q_block * block_q + jnp.arange(block_q)
            segs = {}
            if segments:
                segs = {"q_seg": q_seg_ref[q_rows], "kv_seg": kv_seg}
            valid = _mask(rows, cols, length, causal=causal, offset=offset, **segs)
            p = jnp.where(valid, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)  # [block_k, D]
        dp = _dot(do, v, trans_b=True)  # [block_q, block_k]
        ds = p * (dp - delta[:, None])
        if masked:  # delta is NaN on a NaN row
            ds = jnp.where(valid, ds, 0.0)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)  # [block_k, D]
        return dk, dv

    def head(g, carry):
        carry = fori_ranges(masked, functools.partial(body, g=g, masked=True), carry)
        return fori_ranges(unmasked, functools.partial(body, g=g, masked=False), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(
    q,
    k,
    v,
    lengths,
    out,
    lse,
    do,
    segments=None,
    *,
    scale: float,
    causal: bool,
    offset: int,
    config: TritonConfig,
    interpret: bool,
    debug: bool = False,
):
    """Gradients (dq, dk, dv) of the padded problem; GQA dk/dv summed over each group.
    `segments` as in `forward`."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # [B, H, T_pad]: rowsum(o * do), the softmax-gradient correction of FlashAttention-2.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    params = pltriton.CompilerParams(
        num_warps=config.num_warps_bwd, num_stages=config.num_stages_bwd
    )

    block_q, block_k = config.block_q_dq, config.block_k_dq
    num_q_blocks = q_len // block_q
    qb = _q_block_map(causal, num_q_blocks)
    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, qb(i), h, 0))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, qb(i)))
    seg_inputs = _segment_inputs(segments, block_q=block_q, block_k=block_k, by_keys=False)
    seg_specs = []
    if seg_inputs:
        seg_specs = [
            pl.BlockSpec((None, None, 4), lambda i, b, h: (b, qb(i), 0)),
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, qb(i))),
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            segments=segments is not None,
            scale=scale,
            causal=causal,
            offset=offset,
            block_q=block_q,
            block_k=block_k,
            num_q_blocks=num_q_blocks,
        ),
        grid=(num_q_blocks, batch, heads),
        in_specs=[
            pl.BlockSpec((None,), lambda i, b, h: (b,)),
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            row_spec,
            row_spec,
            *seg_specs,
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        debug=debug,
        name="flash_attention_dq",
    )(lengths, q, k, v, do, lse, delta, *seg_inputs)

    block_q, block_k = config.block_q_dkv, config.block_k_dkv
    q_spec = pl.BlockSpec((None, q_len, group, head_dim), lambda i, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, group, q_len), lambda i, b, h: (b, h, 0))
    seg_inputs = _segment_inputs(segments, block_q=block_q, block_k=block_k, by_keys=True)
    seg_specs = []
    if seg_inputs:
        seg_specs = [
            pl.BlockSpec((None, None, 4), lambda i, b, h: (b, i, 0)),
            pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, block_k), lambda i, b, h: (b, i)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            segments=segments is not None,
            scale=scale,
            causal=causal,
            offset=offset,
            block_q=block_q,
            block_k=block_k,
            group=group,
        ),
        grid=(kv_len // block_k, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None,), lambda i, b, h: (b,)),
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            row_spec,
            row_spec,
            *seg_specs,
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        debug=debug,
        name="flash_attention_dkv",
    )(lengths, q, k, v, do, lse, delta, *seg_inputs)
    return dq, dk, dv
