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

from pallas_kernels.decode_attention.combine import DecodePartials, unified_window
from pallas_kernels.decode_attention.config import DecodeConfig, split_layout

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _col(x: jax.Array) -> jax.Array:
    """A per-row value as a column ([rows] -> [rows, 1]); a scalar (one row) stays a scalar."""
    return x if x.ndim == 0 else x[:, None]


def _decode_kernel(
    q_ref,
    k_ref,
    v_ref,
    lengths_ref,
    phi_ref,
    *refs,
    has_bias: bool,
    scale_log2: float,
    block_k: int,
    split_len: int,
    unified: bool,
    recompute: bool,
    final: bool,
    window: tuple[float, float],
    precision,
):
    """One (batch, kv_head, split) program over the split's valid keys.

    Group path (tensor cores): q_ref: [rows, head_dim] (`rows` >= 16 loaded, only the group's
    real heads stored), phi_ref, l_ref, m_ref, shift_ref: [group], o_ref: [group, head_dim].
    Vector path (MHA, CUDA cores): q_ref, o_ref: [head_dim], the others scalars.
    k_ref, v_ref: [max_len, head_dim]; lengths_ref: []. With `has_bias`, refs starts with
    bias_ref: [group, max_len] (vector: [max_len]) float32 logits added to scale·q·k.
    """
    bias_ref, (o_ref, l_ref, m_ref, shift_ref) = (refs[0] if has_bias else None), refs[-4:]
    vector = q_ref.ndim == 1
    head_dim = q_ref.shape[-1]
    start = pl.program_id(2) * split_len
    valid_end = jnp.minimum(lengths_ref[...], start + split_len)
    num_blocks = lax.div(jnp.maximum(valid_end - start, 0) + (block_k - 1), block_k)
    offsets = jnp.arange(block_k, dtype=jnp.int32)

    if vector:
        rows = 1
        q = q_ref[...].astype(jnp.float32) * scale_log2  # [head_dim]
        phi2 = phi_ref[...] * LOG2E  # []
    else:
        group = o_ref.shape[0]
        rows = max(16, pl.next_power_of_2(group))  # the tensor-core M dimension
        row_ok = jnp.arange(rows) < group  # [rows]
        q = pltriton.load(q_ref.at[pl.ds(0, rows), :], mask=row_ok[:, None], other=0.0)
        phi2 = pltriton.load(phi_ref.at[pl.ds(0, rows)], mask=row_ok, other=0.0) * LOG2E

    def load(ref, i):
        first = start + i * block_k
        valid = first + offsets < valid_end  # [block_k]
        x = pltriton.load(ref.at[pl.ds(first, block_k), :], mask=valid[:, None], other=0.0)
        return x, valid  # [block_k, head_dim], [block_k]

    def bias(i):  # the bias block in log2 units, like `logits`
        first = start + i * block_k
        valid = first + offsets < valid_end  # [block_k]
        if vector:
            b = pltriton.load(bias_ref.at[pl.ds(first, block_k)], mask=valid, other=0.0)
        else:
            mask = row_ok[:, None] & valid[None, :]
            b = pltriton.load(
                bias_ref.at[pl.ds(0, rows), pl.ds(first, block_k)], mask=mask, other=0.0
            )
        return b * LOG2E

    def logits(i):  # [rows, block_k] (group) or [block_k] (vector), log2 units
        # Keys past the length are never loaded (they read as 0) and get -inf. A non-finite
        # logit of a valid key (from q, k or bias) becomes NaN: exp2 would weigh -inf 0.
        k, valid = load(k_ref, i)
        if vector:
            s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1)
            if has_bias:
                s = s + bias(i)
            return jnp.where(valid, jnp.where(jnp.isfinite(s), s, jnp.nan), -jnp.inf)
        s = pltriton.dot(q, k, trans_b=True, precision=precision) * scale_log2
        if has_bias:
            s = s + bias(i)
        return jnp.where(valid[None, :], jnp.where(jnp.isfinite(s), s, jnp.nan), -jnp.inf)

    def pv(i, p):  # [rows, head_dim] (group) or [head_dim] (vector)
        v, _ = load(v_ref, i)
        if vector:
            return jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)
        return pltriton.dot(p.astype(v.dtype), v, precision=precision)

    acc0 = jnp.zeros((head_dim,) if vector else (rows, head_dim), jnp.float32)
    tile0 = jnp.zeros((block_k,) if vector else (rows, block_k), jnp.float32)
    row0 = jnp.float32(0.0) if vector else jnp.zeros((rows,), jnp.float32)

    def online_loop():
        def body(i, carry):
            acc, m, l = carry
            s = logits(i)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - _col(m_new))
            return acc * _col(alpha) + pv(i, p), m_new, l * alpha + jnp.sum(p, axis=-1)

        return lax.fori_loop(0, num_blocks, body, (acc0, row0 - jnp.inf, row0))

    def unified_loop():
        # No running max and no rescaling: e^{s-φ} is summed as is. The max is only needed for
        # the range check, so it is kept elementwise (no reduction inside the loop).
        def body(i, carry):
            acc, m_tile, l_tile = carry
            s = logits(i)
            p = jnp.exp2(s - _col(phi2))
            return acc + pv(i, p), jnp.maximum(m_tile, s), l_tile + p

        acc, m_tile, l_tile = lax.fori_loop(0, num_blocks, body, (acc0, tile0 - jnp.inf, tile0))
        return acc, jnp.max(m_tile, axis=-1), jnp.sum(l_tile, axis=-1)

    if not unified:
        acc, m, l = online_loop()
        shift = m
    else:
        acc, m, l = unified_loop()
        shift = phi2 + row0
        if recompute:
            # FlashDecoding++ recomputation, per split: a split whose max leaves the exact window
            # around φ (or whose sums overflowed) redoes its keys with the online softmax and
            # reports its own max as its exponent shift. Rows are replaced only where flagged.
            lo, hi = window
            shifted = (m - phi2) * LN2
            total = jnp.sum(acc, axis=-1) + l
            exact = (shifted > lo) & (shifted < hi) & (jnp.abs(total) < jnp.inf)  # False on NaN
            bad = (m > -jnp.inf) & ~exact
            any_bad = bad if vector else jnp.max(bad.astype(jnp.int32)) > 0

            def redo():
                acc_o, m_o, l_o = online_loop()
                return (
                    jnp.where(_col(bad), acc_o, acc),
                    jnp.where(bad, l_o, l),
                    jnp.where(bad, m_o, shift),
                )

            acc, l, shift = lax.cond(any_bad, redo, lambda: (acc, l, shift))
        shift = jnp.where(m == -jnp.inf, -jnp.inf, shift)  # an empty split must weigh nothing

    if final:  # one split: normalise here, no combine step
        empty = l == 0.0  # no valid key; a NaN l is a NaN row
        acc = jnp.where(_col(empty), 0.0, acc / _col(jnp.where(empty, 1.0, l)))
        # A non-finite value leaves inf or NaN in its columns only: the whole row is NaN.
        finite = jnp.min(jnp.where(jnp.isfinite(acc), 1, 0), axis=-1) > 0
        acc = jnp.where(_col(finite), acc, jnp.nan)
    if vector:
        o_ref[...] = acc.astype(o_ref.dtype)
        l_ref[...] = l
        m_ref[...] = m * LN2
        shift_ref[...] = shift * LN2
    else:
        pltriton.store(o_ref.at[pl.ds(0, rows), :], acc.astype(o_ref.dtype), mask=row_ok[:, None])
        pltriton.store(l_ref.at[pl.ds(0, rows)], l, mask=row_ok)
        pltriton.store(m_ref.at[pl.ds(0, rows)], m * LN2, mask=row_ok)
        pltriton.store(shift_ref.at[pl.ds(0, rows)], shift * LN2, mask=row_ok)


def decode_partials(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    phi: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale: float,
    softmax: str,
    config: DecodeConfig,
    recompute: bool = True,
    final: bool | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> DecodePartials:
    """Runs the split-KV kernel; returns float32 `DecodePartials` (see combine.py).

    q: [batch, kv_heads, group, head_dim]; k_cache, v_cache: [batch, max_len, kv_heads,
    head_dim]; lengths: [batch] int32 in [0, max_len]; phi: [kv_heads, group] float32; bias:
    optional [batch, kv_heads, group, max_len] float32 logits added to scale·q·k.
    `recompute` (unified max only): redo out-of-window splits with the online softmax inside
    the kernel. `final` (default: when there is a single split): the kernel normalises and `o`
    is the final output in q.dtype.
    """
    batch, kv_heads, group, head_dim = q.shape
    max_len = k_cache.shape[1]
    split_len, splits = split_layout(max_len, config.num_splits, config.block_k)
    vector = not config.use_dot
    if vector and group != 1:
        raise ValueError(f"config.use_dot=False needs one query head per kv head, got {group}")
    final = splits == 1 if final is None else final
    if final and splits != 1:
        raise ValueError(f"final=True needs a single split, got {splits}")
    g = None if vector else group
    kernel = functools.partial(
        _decode_kernel,
        has_bias=bias is not None,
        scale_log2=scale * LOG2E,
        block_k=config.block_k,
        split_len=split_len,
        unified=softmax == "unified_max",
        recompute=recompute,
        final=final,
        window=unified_window(max_len),
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    kv_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None, None, None, g), lambda b, h, s: (b, h, s, 0))
    in_specs = [
        pl.BlockSpec((None, None, g, head_dim), lambda b, h, s: (b, h, 0, 0)),  # q
        kv_spec,  # k_cache
        kv_spec,  # v_cache
        pl.BlockSpec((None,), lambda b, h, s: (b,)),  # lengths
        pl.BlockSpec((None, g), lambda b, h, s: (h, 0)),  # phi
    ]
    inputs = [q, k_cache, v_cache, lengths, phi]
    if bias is not None:
        in_specs.append(pl.BlockSpec((None, None, g, max_len), lambda b, h, s: (b, h, 0, 0)))
        inputs.append(bias.astype(jnp.float32))
    out_specs = [
        pl.BlockSpec((None, None, None, g, head_dim), lambda b, h, s: (b, h, s, 0, 0)),  # o
        row_spec,
        row_spec,
        row_spec,  # l, m, shift
    ]
    row_shape = jax.ShapeDtypeStruct((batch, kv_heads, splits, group), jnp.float32)
    out_shape = [
        jax.ShapeDtypeStruct(
            (batch, kv_heads, splits, group, head_dim), q.dtype if final else jnp.float32
        ),
        row_shape,
        row_shape,
        row_shape,
    ]
    o, l, m, shift = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        debug=debug,
        name=f"decode_attention_{softmax}",
    )(*inputs)
    return DecodePartials(o=o, l=l, m=m, shift=shift)
