"""CoPE split-KV decode attention in Pallas-Triton: Flash-Decoding (Dao et al. 2023) with CoPE
positions (Golovneva et al. 2024) and FlashDecoding++'s unified max (Hong et al., MLSys 2024)."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.decode_attention.combine import DecodePartials, unified_window
from pallas_kernels.decode_attention.config import DecodeConfig, split_layout

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class CopePartials(NamedTuple):
    """First-pass outputs: `DecodePartials` of every split (the non-last splits computed as if
    saturated) and `gate_totals` [batch, kv_heads, splits, group], Σ g over each split's keys."""

    partials: DecodePartials
    gate_totals: jax.Array


def _cope_decode_kernel(
    q_ref,
    k_ref,
    v_ref,
    *refs,
    gate_keys: bool,
    first_pass: bool,
    scale_log2: float,
    pos_scale_log2: float,
    block_k: int,
    split_len: int,
    unified: bool,
    final: bool,
    window: tuple[float, float],
    precision,
):
    """One (batch, kv_head, split) program over the split's valid keys.

    Key j's position is the gate mass from j to the row's last key, so a split needs the gates
    of every split to its right. The first pass computes each split not holding the row's last
    key as if saturated (carry >= npos - 1: every key sees z[npos - 1], a per-head constant)
    and reports its gate total; the split holding the last key starts from carry 0 and is
    exact. The second pass recomputes, from their true carries, the splits where the
    assumption failed. Blocks run from the split's right end leftwards while some head is
    unsaturated (positions: carry plus an in-tile suffix sum; z gathered at floor and floor + 1),
    then the rest of the split as plain decode with the constant z[npos - 1].

    q_ref: [group, head_dim] (`rows` >= 16 loaded for the tensor cores, only the group's heads
    stored); k_ref, v_ref (and gk_ref with `gate_keys`): [max_len, head_dim]; lengths_ref: [];
    phi_ref: [group]; z_ref: [group, npos] float32 position logits q·e[n]. Second pass only:
    carry_ref: [group], the gate mass right of the split; redo_ref: [] (0: leave the split
    empty, it needs no recompute). Outputs o_ref: [group, head_dim]; l_ref, m_ref, shift_ref:
    [group]; first pass also total_ref: [group].
    """
    refs = list(refs)
    gk_ref = refs.pop(0) if gate_keys else None
    lengths_ref, phi_ref, z_ref = refs[:3]
    if first_pass:
        o_ref, l_ref, m_ref, shift_ref, total_ref = refs[3:]
    else:
        carry_ref, redo_ref, o_ref, l_ref, m_ref, shift_ref = refs[3:]
    group, head_dim = o_ref.shape
    npos = z_ref.shape[-1]
    top = float(npos - 1)
    rows = max(16, pl.next_power_of_2(group))  # the tensor-core M dimension
    row_ok = jnp.arange(rows) < group  # [rows]
    length = lengths_ref[...]
    start = pl.program_id(2) * split_len
    valid_end = jnp.minimum(length, start + split_len)
    num_blocks = lax.div(jnp.maximum(valid_end - start, 0) + (block_k - 1), block_k)
    offsets = jnp.arange(block_k, dtype=jnp.int32)

    row0 = jnp.zeros((rows,), jnp.float32)
    q = pltriton.load(q_ref.at[pl.ds(0, rows), :], mask=row_ok[:, None], other=0.0)
    phi2 = pltriton.load(phi_ref.at[pl.ds(0, rows)], mask=row_ok, other=0.0) * LOG2E
    z_top = pltriton.load(z_ref.at[pl.ds(0, rows), jnp.int32(npos - 1)], mask=row_ok, other=0.0)
    saturated_term = (z_top * pos_scale_log2)[:, None]  # [rows, 1], log2 units
    if first_pass:
        holds_last_key = (length > start) & (length <= start + split_len)
        carry0 = jnp.where(holds_last_key, row0, row0 + top)
    else:
        carry0 = pltriton.load(carry_ref.at[pl.ds(0, rows)], mask=row_ok, other=top)
        num_blocks = jnp.where(redo_ref[...] != 0, num_blocks, 0)
    # suffix[r, j] = Σ_{m >= j} g[r, m] within a tile, as g @ upper.
    upper = (offsets[:, None] >= offsets[None, :]).astype(jnp.float32)  # [block_k, block_k]
    row_index = jnp.broadcast_to(jnp.arange(rows)[:, None], (rows, block_k))
    gather_ok = jnp.broadcast_to(row_ok[:, None], (rows, block_k))

    def load(ref, i):
        first = start + i * block_k
        valid = first + offsets < valid_end  # [block_k]
        x = pltriton.load(ref.at[pl.ds(first, block_k), :], mask=valid[:, None], other=0.0)
        return x, valid  # [block_k, head_dim], [block_k]

    def dot_keys(ref, i):  # q·key for the block: [rows, block_k] float32, and the valid keys
        x, valid = load(ref, i)
        return pltriton.dot(q, x, trans_b=True, precision=precision), valid

    def block_logits(i, carry, exact: bool, need_gates: bool):
        """Logits [rows, block_k] (log2 units, -inf past the length), gates, new carry."""
        qk, valid = dot_keys(k_ref, i)
        gates = None
        if exact or need_gates:
            gate_logits = qk if gk_ref is None else dot_keys(gk_ref, i)[0]
            gates = 1.0 / (1.0 + jnp.exp2(-gate_logits * scale_log2))
            gates = jnp.where(valid[None, :], gates, 0.0)
        if exact:
            suffix = pltriton.dot(gates, upper, precision=lax.Precision.HIGHEST)
            positions = jnp.minimum(carry[:, None] + suffix, top)  # [rows, block_k]
            # A NaN gate (a non-finite gate key) must not become a wild gather index; its NaN
            # still reaches the logit through `frac`.
            lower = jnp.floor(jnp.where(positions >= 0.0, positions, 0.0))
            frac = positions - lower
            index = lower.astype(jnp.int32)
            z_lower = pltriton.load(z_ref.at[row_index, index], mask=gather_ok, other=0.0)
            upper_index = jnp.minimum(index + 1, npos - 1)
            z_upper = pltriton.load(z_ref.at[row_index, upper_index], mask=gather_ok, other=0.0)
            z_upper = jnp.where(frac > 0.0, z_upper, z_lower)  # z[floor + 1] weighs 0 there
            position_term = (z_lower + frac * (z_upper - z_lower)) * pos_scale_log2
            carry = carry + jnp.sum(gates, axis=1)
        else:
            position_term = saturated_term
        # Keys past the length are never loaded (they read as 0) and get -inf. A non-finite
        # logit of a valid key becomes NaN: exp2 would weigh -inf 0.
        s = qk * scale_log2 + position_term
        s = jnp.where(valid[None, :], jnp.where(jnp.isfinite(s), s, jnp.nan), -jnp.inf)
        return s, gates, carry

    def pv(i, p):  # [rows, head_dim]
        v, _ = load(v_ref, i)
        return pltriton.dot(p.astype(v.dtype), v, precision=precision)

    acc0 = jnp.zeros((rows, head_dim), jnp.float32)
    tile0 = jnp.zeros((rows, block_k), jnp.float32)

    def update(state, s, i, online: bool):
        if online:
            acc, m, l = state
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            return acc * alpha[:, None] + pv(i, p), m_new, l * alpha + jnp.sum(p, axis=-1)
        # Unified max: e^{s-φ} summed as is; the max is kept elementwise for the range check.
        acc, m_tile, l_tile = state
        p = jnp.exp2(s - phi2[:, None])
        return acc + pv(i, p), jnp.maximum(m_tile, s), l_tile + p

    def run(online: bool):
        """All the split's blocks: (acc, max, sum, gate total) in log2 units."""
        state = (acc0, row0 - jnp.inf, row0) if online else (acc0, tile0 - jnp.inf, tile0)

        def unsaturated(carry):
            return jnp.min(jnp.where(row_ok, carry, top)) < top

        def exact_body(c):  # right to left: positions need the gates to the right
            t, carry, state = c
            i = num_blocks - 1 - t
            s, _, carry = block_logits(i, carry, exact=True, need_gates=False)
            return t + 1, carry, update(state, s, i, online)

        exact_blocks, carry, state = lax.while_loop(
            lambda c: (c[0] < num_blocks) & unsaturated(c[1]),
            exact_body,
            (jnp.int32(0), carry0, state),
        )

        def saturated_body(i, c):  # what is left of the split sees z[npos - 1]
            state, gate_tile = c
            s, gates, _ = block_logits(i, None, exact=False, need_gates=first_pass)
            if first_pass:
                gate_tile = gate_tile + gates
            return update(state, s, i, online), gate_tile

        state, gate_tile = lax.fori_loop(
            0, num_blocks - exact_blocks, saturated_body, (state, tile0)
        )
        total = (carry - carry0) + jnp.sum(gate_tile, axis=1)
        acc, m, l = state
        if not online:
            m, l = jnp.max(m, axis=-1), jnp.sum(l, axis=-1)
        return acc, m, l, total

    if not unified:
        acc, m, l, total = run(online=True)
        shift = m
    else:
        acc, m, l, total = run(online=False)
        shift = phi2
        # FlashDecoding++ recomputation, per split: heads whose max leaves the exact window
        # around φ (or whose sums overflowed) redo the split with the online softmax and report
        # their own max as the exponent shift.
        lo, hi = window
        shifted = (m - phi2) * LN2
        total_ok = jnp.abs(jnp.sum(acc, axis=-1) + l) < jnp.inf
        exact = (shifted > lo) & (shifted < hi) & total_ok  # False on NaN
        bad = row_ok & (m > -jnp.inf) & ~exact

        def redo():
            acc_o, m_o, l_o, _ = run(online=True)
            return (
                jnp.where(bad[:, None], acc_o, acc),
                jnp.where(bad, l_o, l),
                jnp.where(bad, m_o, shift),
            )

        any_bad = jnp.max(bad.astype(jnp.int32)) > 0
        acc, l, shift = lax.cond(any_bad, redo, lambda: (acc, l, shift))
        shift = jnp.where(m == -jnp.inf, -jnp.inf, shift)  # an empty split must weigh nothing

    if final:  # one split: normalise here, no combine step
        empty = l == 0.0  # no valid key; a NaN l is a NaN row
        acc = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, l)[:, None])
        # A non-finite value or gate leaves inf or NaN in some columns or in the gate total
        # (a NaN gate left of saturation touches no logit): the whole row is NaN.
        finite = jnp.min(jnp.where(jnp.isfinite(acc), 1, 0), axis=-1) > 0
        acc = jnp.where((finite & jnp.isfinite(total))[:, None], acc, jnp.nan)
    pltriton.store(o_ref.at[pl.ds(0, rows), :], acc.astype(o_ref.dtype), mask=row_ok[:, None])
    pltriton.store(l_ref.at[pl.ds(0, rows)], l, mask=row_ok)
    pltriton.store(m_ref.at[pl.ds(0, rows)], m * LN2, mask=row_ok)
    pltriton.store(shift_ref.at[pl.ds(0, rows)], shift * LN2, mask=row_ok)
    if first_pass:
        pltriton.store(total_ref.at[pl.ds(0, rows)], total, mask=row_ok)


def cope_decode_partials(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    gate_k_cache: jax.Array | None,
    lengths: jax.Array,
    phi: jax.Array,
    z: jax.Array,
    carries: jax.Array | None = None,
    recompute: jax.Array | None = None,
    *,
    scale: float,
    pos_scale: float,
    softmax: str,
    config: DecodeConfig,
    final: bool | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> CopePartials | DecodePartials:
    """Runs one pass of the CoPE split-KV kernel.

    q: [batch, kv_heads, group, head_dim]; k_cache, v_cache, gate_k_cache (None: gates from
    k_cache): [batch, max_len, kv_heads, head_dim]; lengths: [batch] int32 in [0, max_len];
    phi: [kv_heads, group] float32; z: [batch, kv_heads, group, npos] float32 position logits
    q·e[n]. Logits are scale·q·k + pos_scale·z(p) (natural-log units).

    First pass (`carries` None): returns `CopePartials`; splits not holding the row's last key
    are computed as if saturated. Second pass: `carries` [batch, kv_heads, splits, group] float32
    and `recompute` [batch, kv_heads, splits] bool; recomputes the flagged splits exactly from
    their carries and returns `DecodePartials` (unflagged splits come back empty). `final`
    (default: a single split, first pass): the kernel normalises and `o` is the output in
    q.dtype.
    """
    batch, kv_heads, group, head_dim = q.shape
    max_len = k_cache.shape[1]
    npos = z.shape[-1]
    split_len, splits = split_layout(max_len, config.num_splits, config.block_k)
    first_pass = carries is None
    final = (splits == 1 and first_pass) if final is None else final
    if final and (splits != 1 or not first_pass):
        raise ValueError(f"final=True needs a single split and the first pass, got {splits}")
    if not config.use_dot:
        raise ValueError("CoPE decode attention needs config.use_dot=True (tensor-core tiles)")
    kernel = functools.partial(
        _cope_decode_kernel,
        gate_keys=gate_k_cache is not None,
        first_pass=first_pass,
        scale_log2=scale * LOG2E,
        pos_scale_log2=pos_scale * LOG2E,
        block_k=config.block_k,
        split_len=split_len,
        unified=softmax == "unified_max",
        final=final,
        window=unified_window(max_len),
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    kv_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0))
    in_specs = [pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0))]
    in_specs += [kv_spec] * (3 if gate_k_cache is not None else 2)  # k, v (, gate keys)
    in_specs += [
        pl.BlockSpec((None,), lambda b, h, s: (b,)),  # lengths
        pl.BlockSpec((None, group), lambda b, h, s: (h, 0)),  # phi
        pl.BlockSpec((None, None, group, npos), lambda b, h, s: (b, h, 0, 0)),  # z
    ]
    inputs = [q, k_cache, v_cache] + ([gate_k_cache] if gate_k_cache is not None else [])
    inputs += [lengths, phi, z]
    if not first_pass:
        in_specs += [row_spec, pl.BlockSpec((None, None, None), lambda b, h, s: (b, h, s))]
        inputs += [carries, recompute.astype(jnp.int32)]
    o_spec = pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0))
    row_shape = jax.ShapeDtypeStruct((batch, kv_heads, splits, group), jnp.float32)
    o_shape = jax.ShapeDtypeStruct(
        (batch, kv_heads, splits, group, head_dim), q.dtype if final else jnp.float32
    )
    rows_out = 4 if first_pass else 3  # l, m, shift (, gate totals)
    outs = pl.pallas_call(
        kernel,
        out_shape=[o_shape] + [row_shape] * rows_out,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=[o_spec] + [row_spec] * rows_out,
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        debug=debug,
        name=f"cope_decode_attention_{softmax}_{'first' if first_pass else 'exact'}",
    )(*inputs)
    partials = DecodePartials(*outs[:4])
    return CopePartials(partials, outs[4]) if first_pass else partials
