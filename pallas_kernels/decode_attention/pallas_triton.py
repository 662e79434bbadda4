"""Split-KV decode attention in Pallas-Triton: Flash-Decoding (Dao et al. 2023) online softmax
and FlashDecoding++ (Hong et al., MLSys 2024) asynchronous softmax with a unified max φ."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.decode_attention.combine import DecodePartials
from pallas_kernels.decode_attention.config import DecodeConfig, split_layout

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _split_bounds(lengths_ref, split_len: int, block_k: int):
    """(start, valid_end, num_blocks) of this program's split; keys >= valid_end are masked."""
    start = pl.program_id(2) * split_len
    valid_end = jnp.minimum(lengths_ref[...], start + split_len)
    num_blocks = lax.div(jnp.maximum(valid_end - start, 0) + (block_k - 1), block_k)
    return start, valid_end, num_blocks


def _load_block(ref, first, valid_end, block_k: int):
    """Keys/values [block_k, head_dim] from row `first`; rows >= valid_end read as zeros."""
    valid = first + jnp.arange(block_k, dtype=jnp.int32) < valid_end  # [block_k]
    x = pltriton.load(ref.at[pl.ds(first, block_k), :], mask=valid[:, None], other=0.0)
    return x, valid


def _group_kernel(q_ref, k_ref, v_ref, lengths_ref, phi_ref, o_ref, l_ref, m_ref, *,
                  scale_log2: float, block_k: int, split_len: int, unified: bool, precision):
    """One (batch, kv_head, split) program; the query group rides the tensor-core M dim.

    q_ref: [rows, head_dim]; k_ref, v_ref: [max_len, head_dim]; lengths_ref: [];
    phi_ref: [rows]; o_ref: [rows, head_dim]; l_ref, m_ref: [rows].
    """
    rows, head_dim = q_ref.shape
    start, valid_end, num_blocks = _split_bounds(lengths_ref, split_len, block_k)
    q = q_ref[...]  # [rows, head_dim]

    def logits(i):
        k, valid = _load_block(k_ref, start + i * block_k, valid_end, block_k)
        s = pltriton.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [rows, block_k]
        return jnp.where(valid[None, :], s, -jnp.inf)

    def pv(i, p):
        v, _ = _load_block(v_ref, start + i * block_k, valid_end, block_k)
        return pltriton.dot(p.astype(v.dtype), v, precision=precision)  # [rows, head_dim]

    acc = jnp.zeros((rows, head_dim), jnp.float32)
    if unified:
        # No running max: e^{s-φ} is summed as is; the max is tracked elementwise (no reduction
        # in the loop) only for the range check of the combine.
        phi2 = phi_ref[...] * LOG2E  # [rows]

        def body(i, carry):
            acc, m_tile, l_tile = carry  # [rows, head_dim], [rows, block_k], [rows, block_k]
            s = logits(i)
            p = jnp.exp2(s - phi2[:, None])
            return acc + pv(i, p), jnp.maximum(m_tile, s), l_tile + p

        tile = jnp.zeros((rows, block_k), jnp.float32)
        acc, m_tile, l_tile = lax.fori_loop(0, num_blocks, body, (acc, tile - jnp.inf, tile))
        m, l = jnp.max(m_tile, axis=1), jnp.sum(l_tile, axis=1)
    else:
        def body(i, carry):
            acc, m, l = carry  # [rows, head_dim], [rows], [rows]
            s = logits(i)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            return acc * alpha[:, None] + pv(i, p), m_new, l * alpha + jnp.sum(p, axis=1)

        vec = jnp.zeros((rows,), jnp.float32)
        acc, m, l = lax.fori_loop(0, num_blocks, body, (acc, vec - jnp.inf, vec))
    o_ref[...] = acc
    l_ref[...] = l
    m_ref[...] = m * LN2


def _vector_kernel(q_ref, k_ref, v_ref, lengths_ref, phi_ref, o_ref, l_ref, m_ref, *,
                   scale_log2: float, block_k: int, split_len: int, unified: bool, precision):
    """One (batch, head, split) program for MHA: CUDA-core multiply-reduce, no tensor cores.

    q_ref: [head_dim]; k_ref, v_ref: [max_len, head_dim]; lengths_ref, phi_ref: [];
    o_ref: [head_dim]; l_ref, m_ref: [].
    """
    del precision
    (head_dim,) = q_ref.shape
    start, valid_end, num_blocks = _split_bounds(lengths_ref, split_len, block_k)
    q = q_ref[...].astype(jnp.float32) * scale_log2  # [head_dim]

    def logits(i):
        k, valid = _load_block(k_ref, start + i * block_k, valid_end, block_k)
        s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1)  # [block_k]
        return jnp.where(valid, s, -jnp.inf)

    def pv(i, p):
        v, _ = _load_block(v_ref, start + i * block_k, valid_end, block_k)
        return jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)  # [head_dim]

    acc = jnp.zeros((head_dim,), jnp.float32)
    if unified:
        phi2 = phi_ref[...] * LOG2E

        def body(i, carry):
            acc, m_tile, l_tile = carry  # [head_dim], [block_k], [block_k]
            s = logits(i)
            p = jnp.exp2(s - phi2)
            return acc + pv(i, p), jnp.maximum(m_tile, s), l_tile + p

        tile = jnp.zeros((block_k,), jnp.float32)
        acc, m_tile, l_tile = lax.fori_loop(0, num_blocks, body, (acc, tile - jnp.inf, tile))
        m, l = jnp.max(m_tile), jnp.sum(l_tile)
    else:
        def body(i, carry):
            acc, m, l = carry  # [head_dim], [], []
            s = logits(i)
            m_new = jnp.maximum(m, jnp.max(s))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new)
            return acc * alpha + pv(i, p), m_new, l * alpha + jnp.sum(p)

        acc, m, l = lax.fori_loop(0, num_blocks, body,
                                  (acc, jnp.float32(-jnp.inf), jnp.float32(0.0)))
    o_ref[...] = acc
    l_ref[...] = l
    m_ref[...] = m * LN2


def decode_partials(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                    phi: jax.Array, *, scale: float, softmax: str, config: DecodeConfig,
                    interpret: bool = False, debug: bool = False) -> DecodePartials:
    """Runs the split-KV kernel; returns float32 `DecodePartials` (see combine.py).

    q: [batch, kv_heads, group, head_dim]; k_cache, v_cache: [batch, max_len, kv_heads,
    head_dim]; lengths: [batch] int32 in [0, max_len]; phi: [kv_heads, group] float32.
    """
    batch, kv_heads, group, head_dim = q.shape
    max_len = k_cache.shape[1]
    split_len, splits = split_layout(max_len, config.num_splits, config.block_k)
    vector = not config.use_dot
    if vector and group != 1:
        raise ValueError(f"config.use_dot=False needs one query head per kv head, got {group}")
    rows = 1 if vector else max(16, pl.next_power_of_2(group))
    if rows != group:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
        phi = jnp.pad(phi, ((0, 0), (0, rows - group)))
    row_block = None if vector else rows
    kernel = functools.partial(
        _vector_kernel if vector else _group_kernel,
        scale_log2=scale * LOG2E, block_k=config.block_k, split_len=split_len,
        unified=softmax == "unified_max",
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    kv_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    in_specs = [
        pl.BlockSpec((None, None, row_block, head_dim), lambda b, h, s: (b, h, 0, 0)),  # q
        kv_spec,  # k_cache
        kv_spec,  # v_cache
        pl.BlockSpec((None,), lambda b, h, s: (b,)),  # lengths
        pl.BlockSpec((None, row_block), lambda b, h, s: (h, 0)),  # phi
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, row_block, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
        pl.BlockSpec((None, None, None, row_block), lambda b, h, s: (b, h, s, 0)),  # l
        pl.BlockSpec((None, None, None, row_block), lambda b, h, s: (b, h, s, 0)),  # m
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
    ]
    o, l, m = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        interpret=interpret,
        debug=debug,
        name=f"decode_attention_{softmax}",
    )(q, k_cache, v_cache, lengths, phi)
    return DecodePartials(o=o[:, :, :, :group], l=l[..., :group], m=m[..., :group])
