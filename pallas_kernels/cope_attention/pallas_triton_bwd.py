"""Fused CoPE flash-attention backward (Golovneva et al. 2024, arXiv 2405.18719) in Pallas-Triton.

FlashAttention-2's backward (Dao 2023) with contextual positions. With ds = P∘(dP - δ) the
gradient of the final logits and ds' = ds·scale (nodiv: ds) that of the position term:
  dz_i[n] = Σ_j ds'_ij·w_n(p_ij)          (a per-row histogram, linear-interpolation weights)
  dp_ij  = ds'_ij·(z_i[⌊p⌋+1] - z_i[⌊p⌋])  (0 at integer or clamped positions)
  dg_im  = Σ_{j<=m} dp_ij                  (a prefix sum along keys), then through the sigmoid.
Positions saturate at npos - 1 far left of the diagonal; there dp = 0 and dg = 0 (the prefix sum
of zeros), so those tiles are plain flash tiles whose only position gradient is
dz_i[npos-1] += Σ_j ds'_ij.

Three kernels, all on the same (block_q x block_k) tiles:
  band kernel, grid (query blocks, B, H), one program per query block and head:
    1. Band search, diagonal toward key 0, gates only: the per-row suffix carry finds the
       leading key tiles saturated for every row (`n_sat`) and the gate total of the rest (the
       "band"). Skipped when some row's saved gate total is below npos - 1 (none saturates).
    2. Band tiles, left to right: positions = band total - gate prefix; gathers of z at ⌊p⌋ and
       ⌊p⌋+1; dq; dz into the program's own rows of a [B, H, T, N + 1] buffer; the dp prefix
       carried per row; dk, dv, d gate_k of these tiles added to float32 accumulators under one
       spin lock per (kv head, key tile), which the query blocks and GQA heads share.
  dq kernel, grid (query blocks, B, H): the saturated tiles [0, n_sat) as flash dq tiles with
    the constant position logit z_i[npos-1], plus Σ_j ds'_ij for dz_i[npos-1].
  dk/dv kernel, grid (key blocks, B, K): the saturated tiles of each key block (read from
    `n_sat`), plus the band accumulators.

Packed rows (`segment_ids`): gates and pairs of other segments are masked, so positions restart
in each segment; each kernel visits only the tiles that share a segment with its block
(`pallas_kernels._segments`), the band search stops at the block's first such tile, and
saturated tiles not inside one segment keep the segment mask.
Non-finite inputs: masked pairs never reach a gradient (products over them read zeros in place of
non-finite values and are cut with `where`; gather indices from NaN positions are sanitised).

The split keeps the band kernel's registers (gathers, scans, many tile temporaries) away from
the flash-like kernels that do most of the work once positions saturate. Per-element atomics
are avoided: in Pallas-Triton each is an acq_rel atomic, compiled to a GPU-wide fence and an L1
flush per element (`BackwardConfig.band_atomics` keeps that path).

The histogram is telescoped so that no (row, bin) is hit twice by one scatter: positions fall
monotonically along a row, so keys with one ⌊p⌋ form a run; each run end adds the inclusive
prefix sums of the weights to its bins and subtracts them from the next run's bins (four
read-modify-writes per tile, a barrier before each). The next key's ⌊p⌋ comes from a matmul
with a 0/1 shift matrix in float16, exact for npos <= 2048.

HBM written besides the gradients: z = q·e [B, H, T, N] and its column npos - 1, δ [B, H, T],
dz [B, H, T, N + 1] float32, dq float32 [B, T, H, D], float32 dk, dv (and d gate_k)
accumulators [B, S, K, D], n_sat [B, H, T / block_q], locks [B, K, S / block_k].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._segments import fori_ranges, pad_segments, tile_ranges
from pallas_kernels.cope_attention.config import BackwardConfig, heuristic_backward_config
from pallas_kernels.cope_attention.pallas_triton_fwd import position_logits

MAX_NPOS = 2048  # ⌊p⌋ <= npos - 1 must be an exact float16 integer (the shift matmul)


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False):
    """fp32-accumulated matmul; fp32 inputs stay fp32 (no tf32)."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _sigmoid(x: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def _cdiv(a, b: int):
    """Ceil-division of a non-negative traced int by a static int."""
    return lax.div(a + (b - 1), b)


def _q_block_map(causal: bool, num_q_blocks: int):
    """Grid index -> query block; causal launches the heaviest (last) blocks first."""
    if causal:
        return lambda i: num_q_blocks - 1 - i
    return lambda i: i


def _key_bounds(q_block, length, *, block_q: int, block_k: int, causal: bool, offset: int):
    """Key tiles [0, hi) seen by a query block, and the prefix [0, full) that needs no mask."""
    hi = _cdiv(length, block_k)
    full = lax.div(length, block_k)
    if causal:
        last_row = (q_block + 1) * block_q - 1
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(last_row + offset + 1, 0), block_k))
        full = jnp.minimum(full, lax.div(jnp.maximum(q_block * block_q + offset + 1, 0), block_k))
    return jnp.minimum(full, hi), hi


def _mask(rows, cols, length, *, causal: bool, offset: int):
    """[rows, cols] validity: key inside `length` and (causal) not after the query."""
    valid = cols[None, :] < length
    if causal:
        valid = valid & (cols[None, :] <= rows[:, None] + offset)
    return valid


def _finite_or_zero(x: jax.Array) -> jax.Array:
    """x with its NaN and inf entries zeroed (operands of products over masked pairs)."""
    return jnp.where(jnp.isfinite(x), x, 0)


def _segment_specs(tiles_map, q_seg_map, kv_seg_map, *, q_rows: int, kv_rows: int):
    """BlockSpecs of the packed-row inputs: tiles [B, n, 4], q_seg [B, T_pad], kv_seg [B, S_pad]."""
    return [
        pl.BlockSpec((None, None, 4), tiles_map),
        pl.BlockSpec((None, q_rows), q_seg_map),
        pl.BlockSpec((None, kv_rows), kv_seg_map),
    ]


def _band_kernel(
    *refs,
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
    segments: bool,
    band_atomics: bool,
    num_threads: int,
    compiled: bool,
):
    # Inputs: length_ref [] int32; q_ref, do_ref: [block_q, D]; k_ref, v_ref, gk_ref (only with
    # separate gate keys): [S_pad, D]; lse_ref, delta_ref, gate_total_ref: [block_q] fp32;
    # z_ref: [block_q, N] fp32; then the zero-initialised outputs they alias (not read here).
    # Outputs: dq_ref [block_q, D] fp32; dz_ref [block_q, W] fp32 (W = N + 1, plus block_k
    # spare columns N + 1 + j for masked-off lanes in interpret mode); n_sat_ref [] int32;
    # lock_ref [S_pad / block_k] fp32 (a spin lock, 0 or 1, per key tile of this kv head);
    # dk_ref, dv_ref, dgk_ref (separate gate keys): [S_pad, D] fp32 band-tile accumulators.
    length_ref, q_ref, k_ref, v_ref, *refs = refs
    gk_ref = refs.pop(0) if separate_gate_k else None
    do_ref, lse_ref, delta_ref, gate_total_ref, z_ref, *refs = refs
    # Packed rows: tiles_ref [4] int32 (`tile_ranges`), q_seg_ref [block_q], kv_seg_ref [S_pad].
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    num_acc = 3 if separate_gate_k else 2
    outs = refs[(3 if segments else 0) + 2 + num_acc :]  # past the aliased zero inputs
    dq_ref, dz_ref, n_sat_ref, lock_ref, dk_ref, dv_ref = outs[:6]
    dgk_ref = outs[6] if separate_gate_k else None
    q_block = _q_block_map(causal, num_q_blocks)(pl.program_id(0))
    length = length_ref[...]
    q = q_ref[...]  # [block_q, D]
    q_safe = _finite_or_zero(q)  # operand of the key gradients: masked pairs read zeros
    do = do_ref[...]  # [block_q, D]
    lse = lse_ref[...]  # [block_q]
    delta = delta_ref[...]  # [block_q]
    gate_total = gate_total_ref[...]  # [block_q]
    max_pos = float(npos - 1)
    pos_scale = 1.0 if nodiv else scale
    local = jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
    rows = q_block * block_q + local  # [block_q]
    real = rows < q_len
    key_local = jnp.arange(block_k, dtype=jnp.int32)  # [block_k]
    gather_rows = jnp.broadcast_to(local[:, None], (block_q, block_k))  # [block_q, block_k]
    spare_cols = jnp.broadcast_to(npos + 1 + key_local[None, :], (block_q, block_k))
    last_col = jnp.broadcast_to(key_local[None, :] == block_k - 1, (block_q, block_k))
    # [block_k, block_k] shift[m, j] = [m == j + 1]: x @ shift moves column j + 1 to column j.
    shift = (key_local[:, None] == key_local[None, :] + 1).astype(jnp.float16)
    full, hi = _key_bounds(
        q_block, length, block_q=block_q, block_k=block_k, causal=causal, offset=offset
    )
    bottom = jnp.int32(0)  # the first key tile with a visible pair
    if segments:
        hi = jnp.minimum(hi, tiles_ref[3])
        bottom = jnp.minimum(tiles_ref[0], hi)

    def dz_add(bins, values, at):
        """dz[row, bins] += values where `at`; (row, bin) pairs are distinct within one call.

        A plain read-modify-write: this program owns its rows. The barrier orders it after the
        previous call, whose lanes may have touched the same bins from other threads.
        """
        cols = jnp.where(at, bins, spare_cols)
        if band_atomics:  # interpret mode has no masked atomics: zeros go to the spare columns
            values = jnp.where(at, values, 0.0)
            pltriton.atomic_add(dz_ref, (gather_rows, cols), values, mask=at if compiled else None)
            return
        if compiled:
            pltriton.debug_barrier()
        view = dz_ref.at[gather_rows, cols]
        old = pltriton.load(view, mask=at, other=0.0)
        pltriton.store(view, old + values, mask=at)

    def locked_add(kv_block, updates):
        """acc[key tile] += tile for (acc, tile) in `updates`, under the tile's spin lock.

        One lock per (kv head, key tile) serialises the query blocks and the heads of a GQA
        group that write the same tile (per-element atomics only with `band_atomics`).
        """
        keys = pl.ds(kv_block * block_k, block_k)
        if band_atomics:
            for acc_ref, tile in updates:
                pltriton.atomic_add(acc_ref, (keys, slice(None)), tile)
            return
        # A 1-element float slice: interpret mode cannot discharge scalar atomics in loops, and
        # Pallas-Triton lowers integer atomics on tensors as float ones.
        lock = (pl.ds(kv_block, 1),)
        one = jnp.ones((1,), jnp.float32)

        def grab(*_):
            return jnp.max(pltriton.atomic_max(lock_ref, lock, one))  # old value: 0 = acquired

        held = grab()
        if compiled:  # interpret mode runs programs one at a time: the lock is always free
            lax.while_loop(lambda held: held != 0, grab, held)
        for acc_ref, tile in updates:
            view = acc_ref.at[keys, :]
            pltriton.store(view, pltriton.load(view, volatile=True) + tile)
        if compiled:
            # Publish every thread's stores before the release: one acq_rel atomic (adding 0 to
            # the lock) per thread fences that thread's writes GPU-wide; the barrier then
            # orders them all before the releasing thread's atomic.
            fence_lanes = jnp.full((num_threads,), kv_block, jnp.int32)
            pltriton.atomic_add(lock_ref, (fence_lanes,), jnp.zeros((num_threads,), jnp.float32))
            pltriton.debug_barrier()
        pltriton.atomic_add(lock_ref, lock, -one)

    def gates(kv_block, s):
        """Sigmoid gates of one tile (0 on masked pairs), and the tile's gate keys."""
        keys = pl.ds(kv_block * block_k, block_k)
        gk = _finite_or_zero(gk_ref[keys, :]) if separate_gate_k else None  # [block_k, D]
        logits = s if gk is None else _dot(q, gk, trans_b=True)
        cols = kv_block * block_k + key_local
        valid = _mask(rows, cols, length, causal=causal, offset=offset)
        if segments:
            valid = valid & (q_seg_ref[...][:, None] == kv_seg_ref[keys][None, :])
        return jnp.where(valid, _sigmoid(logits * scale), 0.0), valid, gk

    # 1. Band search: carry = Σ_{m >= (kv_block + 1)·block_k} g. Tile kv_block is saturated
    # when every real row already has carry >= npos - 1 and the tile needs no mask.
    def search_cond(state):
        kv_block, carry = state
        carry_min = jnp.min(jnp.where(real, carry, jnp.inf))
        saturated = (kv_block < full) & (carry_min >= max_pos)
        return (kv_block >= bottom) & jnp.logical_not(saturated)

    def search_body(state):
        kv_block, carry = state
        k = _finite_or_zero(k_ref[pl.ds(kv_block * block_k, block_k), :])  # [block_k, D]
        s = None if separate_gate_k else _dot(q, k, trans_b=True)
        g, _, _ = gates(kv_block, s)
        return kv_block - 1, carry + jnp.sum(g, axis=1)

    unsaturable = jnp.min(jnp.where(real, gate_total, jnp.inf)) < max_pos
    search_start = jnp.where(unsaturable, bottom - 1, hi - 1)
    last_saturated, band_total = lax.while_loop(
        search_cond, search_body, (search_start, jnp.zeros((block_q,), jnp.float32))
    )
    n_sat = last_saturated + 1  # saturated tiles [bottom, n_sat), band tiles [n_sat, hi)
    band_total = jnp.where(unsaturable, gate_total, band_total)

    # 2. Band tiles, left to right from the first unsaturated one. Statements are ordered so
    # that tile-sized temporaries die early (the kernel is register-bound).
    def band_body(kv_block, state):
        dq, band, dp_carry = state
        keys = pl.ds(kv_block * block_k, block_k)
        # Non-finite keys and values read as zeros: a masked pair then gives exact zeros, and
        # an allowed one already made its row's lse NaN.
        k = _finite_or_zero(k_ref[keys, :])  # [block_k, D]
        v = _finite_or_zero(v_ref[keys, :])  # [block_k, D]
        s = _dot(q, k, trans_b=True)  # [block_q, block_k] raw q·k
        g, valid, gk = gates(kv_block, s)
        pos = jnp.clip(band[:, None] - (jnp.cumsum(g, axis=1) - g), 0.0, max_pos)
        pos = jnp.where(pos == pos, pos, 0.0)  # a NaN row (NaN lse) gathers in bounds
        lower = jnp.floor(pos)
        frac = pos - lower
        index = lower.astype(jnp.int32)
        z_lower = z_ref[gather_rows, index]  # [block_q, block_k]
        z_step = z_ref[gather_rows, jnp.minimum(index + 1, npos - 1)] - z_lower
        z_pos = z_lower + frac * z_step
        logits = (s + z_pos) * scale if not nodiv else s * scale + z_pos
        p = jnp.where(valid, jnp.exp(logits - lse[:, None]), 0.0)
        # delta and z are NaN on a NaN row: its masked pairs are cut, not multiplied by 0.
        ds = jnp.where(valid, p * (_dot(do, v, trans_b=True) - delta[:, None]), 0.0)
        dv_tile = _dot(p.astype(do.dtype), do, trans_a=True)  # [block_k, D]
        ds_pos = ds * pos_scale

        # Gate gradient: a prefix sum of dp along the keys, through the sigmoid.
        dpos = jnp.where(valid & (frac > 0.0), ds_pos * z_step, 0.0)
        dg = dp_carry[:, None] + jnp.cumsum(dpos, axis=1)
        dgate_logits = jnp.where(valid, dg * g * (1.0 - g) * scale, 0.0)
        dlogits = ds * scale
        if separate_gate_k:
            dq = dq + _dot(dlogits.astype(k.dtype), k) + _dot(dgate_logits.astype(gk.dtype), gk)
            dk_tile = _dot(dlogits.astype(q.dtype), q_safe, trans_a=True)
            dgk_tile = _dot(dgate_logits.astype(q.dtype), q_safe, trans_a=True)
            locked_add(kv_block, ((dk_ref, dk_tile), (dv_ref, dv_tile), (dgk_ref, dgk_tile)))
        else:
            dboth = dlogits + dgate_logits
            dq = dq + _dot(dboth.astype(k.dtype), k)
            dk_tile = _dot(dboth.astype(q.dtype), q_safe, trans_a=True)
            locked_add(kv_block, ((dk_ref, dk_tile), (dv_ref, dv_tile)))

        # dz: each run end j adds the run's prefix sums at ⌊p_j⌋ (and ⌊p_j⌋ + 1) and subtracts
        # them at the next run's bins, so each update hits every (row, bin) at most once.
        lower_next = _dot(lower.astype(jnp.float16), shift)  # [block_q, block_k] ⌊p_{j+1}⌋
        changes = lower_next != lower
        ends = changes | last_col
        nexts = changes & jnp.logical_not(last_col)
        index_next = lower_next.astype(jnp.int32)
        low_sums = jnp.cumsum(ds_pos * (1.0 - frac), axis=1)
        high_sums = jnp.cumsum(ds_pos * frac, axis=1)
        dz_add(index, low_sums, ends)
        dz_add(index + 1, high_sums, ends)
        dz_add(index_next, -low_sums, nexts)
        dz_add(index_next + 1, -high_sums, nexts)
        return dq, band - jnp.sum(g, axis=1), dp_carry + jnp.sum(dpos, axis=1)

    head_dim = q_ref.shape[-1]
    zeros = jnp.zeros((block_q,), jnp.float32)
    dq = jnp.zeros((block_q, head_dim), jnp.float32)
    dq, _, _ = lax.fori_loop(n_sat, hi, band_body, (dq, band_total, zeros))
    dq_ref[...] = dq
    n_sat_ref[...] = n_sat - bottom  # how many tiles are saturated


def _saturated_query_kernel(
    sat_end_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    z_sat_ref,
    dq_band_ref,
    *refs,
    segments: bool,
    scale: float,
    pos_scale: float,
    block_k: int,
):
    # sat_end_ref: [] int32 (the saturated tiles end there); q_ref, do_ref: [block_q, D];
    # k_ref, v_ref: [S_pad, D]; lse_ref, delta_ref, z_sat_ref (the scaled position logit at
    # npos - 1): [block_q] fp32; dq_band_ref (the band kernel's dq): [block_q, D] fp32; refs:
    # with `segments` tiles_ref [4] int32 (`tile_ranges`), q_seg_ref [block_q] int32,
    # kv_seg_ref [S_pad] int32; then dq_ref [block_q, D] fp32, dz_sat_ref [block_q] fp32.
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    dq_ref, dz_sat_ref = refs[-2:]
    q = q_ref[...]  # [block_q, D]
    do = do_ref[...]  # [block_q, D]
    lse = lse_ref[...]  # [block_q]
    delta = delta_ref[...]  # [block_q]
    z_sat = z_sat_ref[...]  # [block_q]

    # No causal or length mask: every row of a saturated tile sees a key to its right. Tiles
    # not inside one segment (`masked`) keep the segment mask.
    def body(kv_block, state, *, masked: bool):
        dq, ds_sum = state
        keys = pl.ds(kv_block * block_k, block_k)
        k = k_ref[keys, :]  # [block_k, D]
        v = v_ref[keys, :]  # [block_k, D]
        if masked:
            k, v = _finite_or_zero(k), _finite_or_zero(v)
        s = _dot(q, k, trans_b=True) * scale + z_sat[:, None]
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        if masked:
            valid = q_seg_ref[...][:, None] == kv_seg_ref[keys][None, :]
            ds = jnp.where(valid, ds, 0.0)
        dq = dq + _dot(ds.astype(k.dtype), k)
        return dq, ds_sum + jnp.sum(ds, axis=1)

    zeros = jnp.zeros((q.shape[0],), jnp.float32)
    state = (jnp.zeros(q.shape, jnp.float32), zeros)
    end = sat_end_ref[...]
    if segments:  # saturated tiles [bottom, end): from the first tile sharing a segment
        bottom = jnp.minimum(tiles_ref[0], end)
        a = jnp.clip(tiles_ref[1], bottom, end)
        b = jnp.clip(tiles_ref[2], a, end)
        state = fori_ranges(((a, b),), functools.partial(body, masked=False), state)
        state = fori_ranges(((bottom, a), (b, end)), functools.partial(body, masked=True), state)
    else:
        state = lax.fori_loop(0, end, functools.partial(body, masked=False), state)
    dq, ds_sum = state
    dq_ref[...] = dq * scale + dq_band_ref[...]
    dz_sat_ref[...] = ds_sum * pos_scale


def _key_kernel(
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    z_sat_ref,
    sat_end_ref,
    k_ref,
    v_ref,
    dk_acc_ref,
    dv_acc_ref,
    *refs,
    segments: bool,
    scale: float,
    causal: bool,
    offset: int,
    block_q: int,
    block_k: int,
    group: int,
):
    # q_ref, do_ref: [T_pad, G, D]; lse_ref, delta_ref, z_sat_ref: [G, T_pad] fp32 (z_sat: the
    # scaled position logit at npos - 1); sat_end_ref: [G, num_q_blocks] int32 (where each query
    # block's saturated tiles end); k_ref, v_ref: [block_k, D]; dk_acc_ref, dv_acc_ref:
    # [block_k, D] fp32 (band tiles); refs: with `segments` tiles_ref [4] int32 (`tile_ranges`
    # of this key block over the query blocks), q_seg_ref [T_pad] int32, kv_seg_ref [block_k]
    # int32; then dk_ref, dv_ref: [block_k, D].
    tiles_ref, q_seg_ref, kv_seg_ref = refs[:3] if segments else (None, None, None)
    dk_ref, dv_ref = refs[-2:]
    kv_block = pl.program_id(0)
    num_q_blocks = q_ref.shape[0] // block_q
    k = k_ref[...]  # [block_k, D]
    v = v_ref[...]  # [block_k, D]
    # A saturated tile needs no mask, so its first row already sees the tile's last key.
    lo = jnp.int32(0)
    if causal:
        lo = _cdiv(jnp.maximum((kv_block + 1) * block_k - 1 - offset, 0), block_q)

    def body(q_block, carry, *, g, masked: bool = False):
        # Loads stay outside the branch so that the loop can prefetch them. `masked` tiles are
        # not inside one segment: the segment mask, and zeros in place of non-finite operands.
        q_rows = pl.ds(q_block * block_q, block_q)
        q = q_ref[q_rows, g, :]  # [block_q, D]
        do = do_ref[q_rows, g, :]  # [block_q, D]
        lse = lse_ref[g, q_rows]  # [block_q]
        delta = delta_ref[g, q_rows]  # [block_q]
        z_sat = z_sat_ref[g, q_rows]  # [block_q]

        def tile(carry):
            dk, dv = carry
            qt, kt, vt = (_finite_or_zero(x) for x in (q, k, v)) if masked else (q, k, v)
            s = _dot(qt, kt, trans_b=True) * scale + z_sat[:, None]
            p = jnp.exp(s - lse[:, None])  # [block_q, block_k]
            if masked:
                valid = q_seg_ref[q_rows][:, None] == kv_seg_ref[...][None, :]
                p = jnp.where(valid, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (_dot(do, vt, trans_b=True) - delta[:, None])
            if masked:
                ds = jnp.where(valid, ds, 0.0)
            dk = dk + _dot(ds.astype(q.dtype), qt, trans_a=True)
            return dk, dv

        return lax.cond(sat_end_ref[g, q_block] > kv_block, tile, lambda c: c, carry)

    if segments:  # the query blocks sharing a segment with this key block
        seg_lo, single_lo, single_hi, seg_hi = (tiles_ref[n] for n in range(4))
        hi = jnp.maximum(seg_hi, lo)
        lo = jnp.clip(seg_lo, lo, hi)
        a = jnp.clip(single_lo, lo, hi)
        b = jnp.clip(single_hi, a, hi)

    def head(g, carry):
        if not segments:
            return lax.fori_loop(lo, num_q_blocks, functools.partial(body, g=g), carry)
        carry = fori_ranges(((a, b),), functools.partial(body, g=g), carry)
        return fori_ranges(((lo, a), (b, hi)), functools.partial(body, g=g, masked=True), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale + dk_acc_ref[...]).astype(dk_ref.dtype)
    dv_ref[...] = (dv + dv_acc_ref[...]).astype(dv_ref.dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad(x: jax.Array, axis_sizes: dict[int, int], value=0) -> jax.Array:
    """Pads the given axes at the end up to the given sizes."""
    widths = [(0, axis_sizes.get(a, n) - n) for a, n in enumerate(x.shape)]
    if all(w == (0, 0) for w in widths):
        return x
    return jnp.pad(x, widths, constant_values=value)


def _check(q, k, v, pos_emb, gate_k, lengths, out, lse, gate_total, dout, segment_ids) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, T, H, D] and k, v [B, S, K, D]; got {q.shape}, {k.shape}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(f"k {k.shape} does not fit q {q.shape} (batch, head_dim, GQA groups)")
    if gate_k is not None and gate_k.shape != k.shape:
        raise ValueError(f"gate_k must have the shape of k {k.shape}, got {gate_k.shape}")
    if pos_emb.ndim != 2 or pos_emb.shape[1] != head_dim or not 1 <= pos_emb.shape[0]:
        raise ValueError(f"pos_emb must be [npos, head_dim={head_dim}], got {pos_emb.shape}")
    if pos_emb.shape[0] > MAX_NPOS:
        raise ValueError(f"pos_emb has npos={pos_emb.shape[0]} > {MAX_NPOS} rows")
    for name, x in (("out", out), ("dout", dout)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {q.shape}, got {x.shape}")
    for name, x in (("lse", lse), ("gate_total", gate_total)):
        if x.shape != (batch, heads, q_len):
            raise ValueError(f"{name} must be [B, H, T]={(batch, heads, q_len)}, got {x.shape}")
    if lengths is not None and lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B]={batch}, got shape {lengths.shape}")
    if segment_ids is not None and (segment_ids.shape != (batch, q_len) or k.shape[1] != q_len):
        raise ValueError(
            f"segment_ids must be [B, T]={(batch, q_len)} with S == T, got {segment_ids.shape} "
            f"and k {k.shape}"
        )


def cope_attention_bwd(
    q,
    k,
    v,
    pos_emb,
    gate_k,
    lengths,
    out,
    lse,
    gate_total,
    dout,
    segment_ids=None,
    *,
    causal: bool,
    scale: float | None,
    nodiv: bool,
    config: BackwardConfig | None,
    interpret: bool,
):
    """Gradients of CoPE attention from the forward's residuals.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D]; pos_emb: [N, D] (N <= 2048); gate_k: [B, S, K, D]
        or None (gates use k); lengths: [B] int or None (all S keys valid). Unpadded.
      out: [B, T, H, D] the forward output; lse: [B, H, T] fp32 natural-log softmax denominator
        (+inf for rows with no visible key); gate_total: [B, H, T] fp32 unclamped Σ_j g_ij.
      dout: [B, T, H, D] the output cotangent.
      segment_ids: optional [B, T] int (T == S): packed rows, pairs of one segment only.
      causal, scale (None: 1/sqrt(D)), nodiv: as the forward.
      config: tiles (None: `heuristic_backward_config`); interpret: Pallas interpret mode.

    Returns:
      dq, dk, dv (their inputs' dtypes), dpos_emb [N, D] (pos_emb's dtype), dgate_k (gate_k's
      dtype; None when gate_k is None).
    """
    grads, _ = backward_with_saturation(
        q,
        k,
        v,
        pos_emb,
        gate_k,
        lengths,
        out,
        lse,
        gate_total,
        dout,
        segment_ids,
        causal=causal,
        scale=scale,
        nodiv=nodiv,
        config=config,
        interpret=interpret,
    )
    return grads


def backward_with_saturation(
    q,
    k,
    v,
    pos_emb,
    gate_k,
    lengths,
    out,
    lse,
    gate_total,
    dout,
    segment_ids=None,
    *,
    causal: bool,
    scale: float | None,
    nodiv: bool,
    config: BackwardConfig | None,
    interpret: bool,
):
    """`cope_attention_bwd`, plus n_sat [B, H, T_pad / block_q] int32: the number of leading
    key tiles of each query block that ran as saturated (plain flash) tiles (with segment ids,
    leading from the block's first tile that shares a segment)."""
    _check(q, k, v, pos_emb, gate_k, lengths, out, lse, gate_total, dout, segment_ids)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    npos = pos_emb.shape[0]
    group = heads // kv_heads
    scale = float(head_dim**-0.5 if scale is None else scale)
    if config is None:
        config = heuristic_backward_config(head_dim, q_len, kv_len, interpret=interpret)
    block_q, block_k = config.block_q, config.block_k
    q_pad = _round_up(q_len, block_q)
    kv_pad = _round_up(kv_len, block_k)
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    num_q_blocks = q_pad // block_q
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)

    f32 = jnp.float32
    # [B, H, T] softmax-gradient correction rowsum(o·do), and z = q·e [B, H, T, N] computed as
    # the forward computes it (so that exp(s - lse) is the forward's P).
    delta = jnp.sum(out.astype(f32) * dout.astype(f32), axis=-1).transpose(0, 2, 1)
    z = position_logits(q, pos_emb)
    z_sat = z[..., npos - 1] * (1.0 if nodiv else scale)  # [B, H, T]
    row_pad = {2: q_pad}
    delta, z, z_sat, gate_total = (_pad(x, row_pad) for x in (delta, z, z_sat, gate_total))
    lse = _pad(lse.astype(jnp.float32), row_pad, value=jnp.inf)  # padded rows: P = 0
    qp = _pad(q, {1: q_pad, 3: d_pad})
    dop = _pad(dout.astype(q.dtype), {1: q_pad, 3: d_pad})
    kp = _pad(k, {1: kv_pad, 3: d_pad})
    vp = _pad(v, {1: kv_pad, 3: d_pad})
    separate = gate_k is not None
    acc_shape = (batch, kv_pad, kv_heads, d_pad)
    num_acc = 3 if separate else 2  # fp32 dk, dv (and d gate_k) of the band tiles
    num_k_blocks = kv_pad // block_k
    # Masked-off lanes of the dz updates point at spare columns N + 1 + j. Compiled kernels
    # never touch them; interpret mode writes them too, so they must be distinct.
    dz_width = npos + 1 + (block_k if interpret else 0)

    qb = _q_block_map(bool(causal), num_q_blocks)
    q_spec = pl.BlockSpec((None, block_q, None, d_pad), lambda i, b, h: (b, qb(i), h, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, d_pad), lambda i, b, h: (b, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, qb(i)))
    z_spec = pl.BlockSpec((None, None, block_q, npos), lambda i, b, h: (b, h, qb(i), 0))
    dz_spec = pl.BlockSpec((None, None, block_q, dz_width), lambda i, b, h: (b, h, qb(i), 0))
    n_sat_spec = pl.BlockSpec((None, None, None), lambda i, b, h: (b, h, qb(i)))
    lock_spec = pl.BlockSpec((None, None, num_k_blocks), lambda i, b, h: (b, h // group, 0))
    in_specs = [pl.BlockSpec((None,), lambda i, b, h: (b,)), q_spec, kv_spec, kv_spec]
    inputs = [lengths, qp, kp, vp]
    if separate:
        in_specs.append(kv_spec)
        inputs.append(_pad(gate_k, {1: kv_pad, 3: d_pad}))
    in_specs += [q_spec, row_spec, row_spec, row_spec, z_spec]
    inputs += [dop, lse, delta, gate_total, z]
    segments = segment_ids is not None
    seg_specs_q, seg_inputs_q = [], []
    if segments:
        q_seg, kv_seg = pad_segments(segment_ids, q_pad, kv_pad)
        tiles_q = tile_ranges(q_seg, kv_seg, block_q=block_q, block_k=block_k, by_keys=False)
        seg_inputs_q = [tiles_q, q_seg, kv_seg]
        seg_specs_q = _segment_specs(
            lambda i, b, h: (b, qb(i), 0),
            lambda i, b, h: (b, qb(i)),
            lambda i, b, h: (b, 0),
            q_rows=block_q,
            kv_rows=kv_pad,
        )
    in_specs += seg_specs_q
    inputs += seg_inputs_q
    in_specs += [dz_spec, lock_spec] + [kv_spec] * num_acc
    inputs.append(jnp.zeros((batch, heads, q_pad, dz_width), f32))
    inputs.append(jnp.zeros((batch, kv_heads, num_k_blocks), f32))  # locks
    inputs += [jnp.zeros(acc_shape, f32) for _ in range(num_acc)]
    first_zero = len(inputs) - num_acc - 2  # dz, locks, accumulators alias outputs 1, 3, 4...
    dq_band, dz, n_sat, _, dk_acc, dv_acc, *dgk_acc = pl.pallas_call(
        functools.partial(
            _band_kernel,
            scale=scale,
            causal=bool(causal),
            nodiv=bool(nodiv),
            npos=npos,
            offset=kv_len - q_len,
            q_len=q_len,
            block_q=block_q,
            block_k=block_k,
            num_q_blocks=num_q_blocks,
            separate_gate_k=separate,
            segments=segments,
            band_atomics=config.band_atomics,
            num_threads=32 * config.num_warps_band,
            compiled=not interpret,
        ),
        grid=(num_q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=[q_spec, dz_spec, n_sat_spec, lock_spec] + [kv_spec] * num_acc,
        out_shape=[
            jax.ShapeDtypeStruct(qp.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, q_pad, dz_width), f32),
            jax.ShapeDtypeStruct((batch, heads, num_q_blocks), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_k_blocks), f32),
        ]
        + [jax.ShapeDtypeStruct(acc_shape, f32)] * num_acc,
        input_output_aliases={
            first_zero: 1,
            first_zero + 1: 3,
            **{first_zero + 2 + a: 4 + a for a in range(num_acc)},
        },
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps_band, num_stages=config.num_stages_band
        ),
        interpret=interpret,
        name="cope_attention_bwd_band",
    )(*inputs)

    sat_end = n_sat  # [B, H, T_pad / block_q]: the saturated tiles end there
    if segments:  # they start at the block's first tile sharing a segment
        sat_end = jnp.where(n_sat > 0, tiles_q[:, None, :, 0] + n_sat, 0)
    dq, dz_sat = pl.pallas_call(
        functools.partial(
            _saturated_query_kernel,
            segments=segments,
            scale=scale,
            pos_scale=1.0 if nodiv else scale,
            block_k=block_k,
        ),
        grid=(num_q_blocks, batch, heads),
        in_specs=[n_sat_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, row_spec]
        + [q_spec]
        + seg_specs_q,
        out_specs=[q_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct(qp.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, q_pad), f32),
        ],
        input_output_aliases={8: 0},
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="cope_attention_bwd_dq",
    )(sat_end, qp, kp, vp, dop, lse, delta, z_sat, dq_band, *seg_inputs_q)

    q_spec = pl.BlockSpec((None, q_pad, group, d_pad), lambda j, b, h: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None, group, q_pad), lambda j, b, h: (b, h, 0))
    kv_spec = pl.BlockSpec((None, block_k, None, d_pad), lambda j, b, h: (b, j, h, 0))
    seg_specs_k, seg_inputs_k = [], []
    if segments:
        tiles_k = tile_ranges(q_seg, kv_seg, block_q=block_q, block_k=block_k, by_keys=True)
        seg_inputs_k = [tiles_k, q_seg, kv_seg]
        seg_specs_k = _segment_specs(
            lambda j, b, h: (b, j, 0),
            lambda j, b, h: (b, 0),
            lambda j, b, h: (b, j),
            q_rows=q_pad,
            kv_rows=block_k,
        )
    dk, dv = pl.pallas_call(
        functools.partial(
            _key_kernel,
            segments=segments,
            scale=scale,
            causal=bool(causal),
            offset=kv_len - q_len,
            block_q=block_q,
            block_k=block_k,
            group=group,
        ),
        grid=(kv_pad // block_k, batch, kv_heads),
        in_specs=[
            q_spec,  # q
            q_spec,  # dout
            row_spec,  # lse
            row_spec,  # delta
            row_spec,  # z_sat
            pl.BlockSpec((None, group, num_q_blocks), lambda j, b, h: (b, h, 0)),  # sat_end
            kv_spec,  # k
            kv_spec,  # v
            kv_spec,  # dk accumulator
            kv_spec,  # dv accumulator
            *seg_specs_k,
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[
            jax.ShapeDtypeStruct(kp.shape, k.dtype),
            jax.ShapeDtypeStruct(vp.shape, v.dtype),
        ],
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="cope_attention_bwd_dkv",
    )(qp, dop, lse, delta, z_sat, sat_end, kp, vp, dk_acc, dv_acc, *seg_inputs_k)

    # dz [B, H, T, N]: the band histogram plus the saturated tiles' Σ ds' at npos - 1. Its two
    # small matmuls run in fp32 (full precision for fp32 inputs).
    dz = dz[:, :, :q_len, :npos].at[..., npos - 1].add(dz_sat[:, :, :q_len])
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    e = pos_emb.astype(q.dtype).astype(f32)
    q32 = q.astype(f32)
    dq = dq[:, :q_len, :, :head_dim] + jnp.einsum("bhtn,nd->bthd", dz, e, precision=precision)
    dpos_emb = jnp.einsum("bhtn,bthd->nd", dz, q32, precision=precision)
    dgate_k = None
    if separate:
        dgate_k = dgk_acc[0][:, :kv_len, :, :head_dim].astype(gate_k.dtype)
    grads = (
        dq.astype(q.dtype),
        dk[:, :kv_len, :, :head_dim],
        dv[:, :kv_len, :, :head_dim],
        dpos_emb.astype(pos_emb.dtype),
        dgate_k,
    )
    return grads, n_sat
