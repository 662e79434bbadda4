"""The tile bookkeeping of packed rows (`pallas_kernels._segments`) against every pair."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels._segments import fori_ranges, ranges_of, segment_tiles


def test_segment_tiles_against_every_pair():
    """Per-block min/max pruning: a tile holding a pair of one segment is never skipped; with
    sorted runs the kept tiles are exactly those, in one band per block; `single` tiles hold
    one id; `ranges_of` brackets them."""
    rng = np.random.default_rng()
    sorted_runs = np.repeat(np.arange(12), rng.integers(1, 20, 12))[:96]
    sorted_runs = np.pad(sorted_runs, (0, 96 - len(sorted_runs)), mode="edge")
    seg = np.stack([sorted_runs, rng.integers(0, 4, 96), np.full(96, 7)]).astype(np.int32)
    for block_q, block_k in ((8, 16), (16, 8)):
        tiles = segment_tiles(jnp.asarray(seg), jnp.asarray(seg), block_q=block_q, block_k=block_k)
        shared, single = (np.asarray(x) for x in tiles)
        qs = seg.reshape(3, -1, block_q)[:, :, None, :, None]
        ks = seg.reshape(3, -1, block_k)[:, None, :, None, :]
        pairs = (qs == ks).any((-1, -2))  # [B, nq, nk]: some pair of one segment
        every = (qs == ks).all((-1, -2))
        assert not (pairs & ~shared).any()
        np.testing.assert_array_equal(shared[0], pairs[0])
        np.testing.assert_array_equal(single, every)
        for flags, one in ((shared, single), (shared.swapaxes(1, 2), single.swapaxes(1, 2))):
            lo, single_lo, single_hi, hi = np.moveaxis(np.asarray(ranges_of(flags, one)), -1, 0)
            assert (lo <= single_lo).all() and (single_lo <= single_hi).all()
            assert (single_hi <= hi).all()
            index = np.arange(flags.shape[-1])
            inside = (index >= lo[..., None]) & (index < hi[..., None])
            assert not (flags & ~inside).any()
            assert (flags[0] == inside[0]).all()  # sorted runs: one band
            run = (index >= single_lo[..., None]) & (index < single_hi[..., None])
            assert not (run & ~one).any() and (run.any(-1) == one.any(-1)).all()


def test_fori_ranges_visits_both_ranges_in_order():
    seen = fori_ranges(((2, 5), (7, 9)), lambda n, acc: acc * 10 + n, jnp.int32(0))
    assert int(seen) == 23478
    assert int(fori_ranges(((3, 3), (4, 6)), lambda n, acc: acc * 10 + n, jnp.int32(0))) == 45
    assert int(fori_ranges(((1, 4),), lambda n, acc: acc * 10 + n, jnp.int32(0))) == 123
