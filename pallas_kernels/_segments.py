"""Packed rows (segment ids) in the attention kernels: which tiles share a segment, and loops
over the key (or query) blocks that do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def pad_segments(segment_ids: jax.Array, q_pad: int, kv_pad: int) -> tuple[jax.Array, jax.Array]:
    """[B, T] segment ids -> (q_seg [B, q_pad], kv_seg [B, kv_pad]) int32. Padding repeats the
    last id, which keeps each block's id range (padded keys are masked by length, padded query
    rows sliced off)."""
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[1]
    return tuple(jnp.pad(seg, ((0, 0), (0, n - t)), mode="edge") for n in (q_pad, kv_pad))


def segment_tiles(q_seg: jax.Array, kv_seg: jax.Array, *, block_q: int, block_k: int):
    """Which tiles of packed rows hold pairs of one segment, from each block's min and max id.

    q_seg [B, T_pad] and kv_seg [B, S_pad] int32 -> (shared, single), both
    [B, T_pad / block_q, S_pad / block_k] bool. `shared` is False only where the id ranges
    [min, max] of the query block and the key block are disjoint: such a tile has no pair of
    one segment and is skipped, whatever the ids. `single` marks tiles whose query and key
    blocks hold one and the same id, so the segments mask none of their pairs. With contiguous
    runs of non-decreasing ids (what packing makes) `shared` is exactly "some pair is of one
    segment"; other layouts only skip fewer tiles, since the in-tile mask is always exact.
    """
    batch = q_seg.shape[0]
    q_blocks = q_seg.reshape(batch, -1, block_q)
    kv_blocks = kv_seg.reshape(batch, -1, block_k)
    q_min, q_max = q_blocks.min(-1)[:, :, None], q_blocks.max(-1)[:, :, None]  # [B, nq, 1]
    kv_min, kv_max = kv_blocks.min(-1)[:, None], kv_blocks.max(-1)[:, None]  # [B, 1, nk]
    shared = (kv_max >= q_min) & (kv_min <= q_max)
    single = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
    return shared, single


def ranges_of(shared: jax.Array, single: jax.Array) -> jax.Array:
    """[..., n] bool tile flags of one block against the n blocks of the other axis ->
    [..., 4] int32 (lo, single_lo, single_hi, hi): tiles outside [lo, hi) share no segment,
    tiles in [single_lo, single_hi) are `single` (the first run of them); lo <= single_lo <=
    single_hi <= hi, and all four are 0 when no tile is shared."""
    n = shared.shape[-1]
    index = jnp.arange(n)
    any_shared = shared.any(-1)
    lo = jnp.where(any_shared, jnp.argmax(shared, -1), 0)
    hi = jnp.where(any_shared, n - jnp.argmax(shared[..., ::-1], -1), 0)
    single_lo = jnp.where(single.any(-1), jnp.argmax(single, -1), hi)
    # Tiles before single_lo count as 1, so the cumulative product ends at the run's end.
    run = jnp.cumprod(single | (index < single_lo[..., None]), axis=-1)
    single_hi = jnp.maximum(jnp.sum(run, -1), single_lo)
    return jnp.stack([lo, single_lo, single_hi, hi], axis=-1).astype(jnp.int32)


def tile_ranges(
    q_seg: jax.Array, kv_seg: jax.Array, *, block_q: int, block_k: int, by_keys: bool
) -> jax.Array:
    """`ranges_of` the tiles of packed rows: [B, T_pad / block_q, 4] int32 ranges of key blocks
    per query block, or with `by_keys` [B, S_pad / block_k, 4] ranges of query blocks per key
    block."""
    shared, single = segment_tiles(q_seg, kv_seg, block_q=block_q, block_k=block_k)
    if by_keys:
        shared, single = jnp.swapaxes(shared, 1, 2), jnp.swapaxes(single, 1, 2)
    return ranges_of(shared, single)


def fori_ranges(ranges, body, carry):
    """`body(block, carry)` over the blocks of one or two [start, stop) ranges, in order. Two
    ranges share one loop, so the (masked) body is traced and compiled once."""
    if len(ranges) == 1:
        ((start, stop),) = ranges
        return lax.fori_loop(start, stop, body, carry)
    (start0, stop0), (start1, stop1) = ranges
    n0 = stop0 - start0

    def step(n, carry):
        return body(jnp.where(n < n0, start0 + n, start1 - n0 + n), carry)

    return lax.fori_loop(0, n0 + stop1 - start1, step, carry)
