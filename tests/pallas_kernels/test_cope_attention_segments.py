"""Fused CoPE attention (Pallas) on packed rows (segment_ids): a packed row against each segment
alone and against the model's reference, forward and every gradient (q, k, v, pos_emb, gate_k)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cope import functional as F
from pallas_kernels._segments import pad_segments, tile_ranges
from pallas_kernels.cope_attention import cope_attention, cope_attention_fwd
from pallas_kernels.cope_attention.config import BackwardConfig
from pallas_kernels.cope_attention.pallas_triton_bwd import backward_with_saturation

# Relative-norm tolerances by input dtype: (forward, gradients), as test_cope_attention.py.
TOL = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (1e-2, 2e-2)}
# Segments of odd lengths, one of length 1 and one over two 16-key tiles: tiles are skipped,
# inside one segment, or split by a boundary, and the long segment saturates (npos 9).
PACKED = (5, 23, 1, 40)
BLOCKS = {"block_q": 16, "block_k": 16, "backward_config": BackwardConfig(16, 16)}
NAMES = ("out", "dq", "dk", "dv", "dpos_emb", "dgate_k")
# The exact gradient jumps where a position crosses an integer, and float32 positions are a few
# ulps of the gate total off: inputs with an allowed position closer than this are drawn again.
MIN_GAP = 2e-5


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(x).all(), "non-finite kernel output"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _position_gap(q, gate_keys, seg, lengths, *, causal: bool, npos: int) -> float:
    """Smallest float64 distance of an unclamped position (a suffix sum of gates, <= npos - 1)
    to an integer >= 1, over the allowed pairs."""
    q, gate_keys = np.asarray(q, np.float64), np.asarray(gate_keys, np.float64)
    b, t, h, d = q.shape
    keys = np.repeat(gate_keys, h // gate_keys.shape[2], axis=2)
    mask = np.asarray(F.attention_mask(t, t, causal=causal, lengths=lengths, segment_ids=seg))
    logits = np.einsum("bthd,bshd->bhts", q, keys) / d**0.5
    gates = np.where(mask, 1 / (1 + np.exp(-logits)), 0.0)
    suffix = np.flip(np.cumsum(np.flip(gates, -1), -1), -1)
    nearest = np.round(suffix)
    near = mask & (nearest >= 1) & (nearest <= npos - 1)
    return float(np.min(np.where(near, np.abs(suffix - nearest), np.inf), initial=np.inf))


def _inputs(
    batch, q_len, heads, kv_heads, head_dim, npos, dtype, *, seg, lengths, causal, gate_keys
):
    """(seed, q, k, v, pos_emb, gate keys or None, output cotangent): fresh normal values, drawn
    again while a position is within MIN_GAP of an integer."""
    for _ in range(20):
        seed = int(np.random.default_rng().integers(2**31))
        keys = jax.random.split(jax.random.key(seed), 6)
        q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
        k, v, gk = (
            jax.random.normal(key, (batch, q_len, kv_heads, head_dim), dtype) for key in keys[1:4]
        )
        gk = gk if gate_keys else None
        gap = _position_gap(q, k if gk is None else gk, seg, lengths, causal=causal, npos=npos)
        if gap >= MIN_GAP:
            e = jax.random.normal(keys[4], (npos, head_dim), dtype)
            return seed, q, k, v, e, gk, jax.random.normal(keys[5], q.shape, dtype)
    pytest.fail(f"no inputs with every position {MIN_GAP} away from an integer")


def _segment_ids(seg_lengths) -> np.ndarray:
    """[1, sum(seg_lengths)] int32: ids 0, 1, ... in runs of the given lengths."""
    return np.repeat(np.arange(len(seg_lengths)), seg_lengths)[None].astype(np.int32)


def _unpack(x, seg_lengths):
    """[1, T, ...] packed row -> [len(seg_lengths), max length, ...], zero-padded."""
    starts, width = np.cumsum((0, *seg_lengths)), max(seg_lengths)
    parts = [x[0, a:b] for a, b in zip(starts[:-1], starts[1:])]
    return jnp.stack([jnp.pad(p, [(0, width - len(p))] + [(0, 0)] * (x.ndim - 2)) for p in parts])


def _pack(x, seg_lengths):
    """The inverse of `_unpack`."""
    return jnp.concatenate([x[i, :n] for i, n in enumerate(seg_lengths)])[None]


def _out_and_grads(fn):
    """jit of (q, k, v, e, gk, do) -> (out, dq, dk, dv, d pos_emb, d gate_k) of fn(q, k, v,
    e, gk); d gate_k is None when gk is."""

    @jax.jit
    def run(q, k, v, e, gk, do):
        out, vjp = jax.vjp(fn, q, k, v, e, gk)
        return (out, *vjp(do))

    return run


@pytest.mark.parametrize(
    "dtype, kv_heads, causal, nodiv, npos, gate_keys",
    [(jnp.float32, 2, True, False, 9, True), (jnp.bfloat16, 1, False, True, 5, False)],
)
def test_packed_row_equals_each_segment_alone_and_the_reference(
    dtype, kv_heads, causal, nodiv, npos, gate_keys
):
    """Each segment alone is one row of a batch (its padding masked by `lengths`), in one kernel
    call; the reference is `cope.functional.cope_attention` in fp32."""
    seg = _segment_ids(PACKED)
    seed, q, k, v, e, gk, do = _inputs(
        1,
        sum(PACKED),
        4,
        kv_heads,
        32,
        npos,
        dtype,
        seg=seg,
        lengths=None,
        causal=causal,
        gate_keys=gate_keys,
    )
    kw = dict(causal=causal, nodiv=nodiv)

    def kernel(q, k, v, e, gk, **extra):
        return cope_attention(q, k, v, e, gate_k=gk, **kw, **extra, **BLOCKS)

    packed = _out_and_grads(functools.partial(kernel, segment_ids=seg))(q, k, v, e, gk, do)
    lengths = jnp.asarray(PACKED, jnp.int32)
    rows = [_unpack(x, PACKED) for x in (q, k, v)]
    alone = _out_and_grads(functools.partial(kernel, lengths=lengths))(
        *rows, e, None if gk is None else _unpack(gk, PACKED), _unpack(do, PACKED)
    )
    alone = [
        x if name == "dpos_emb" or x is None else _pack(x, PACKED) for name, x in zip(NAMES, alone)
    ]

    def reference(q, k, v, e, gk):
        return F.cope_attention(q, k, v, e, gate_k=gk, segment_ids=seg, **kw, impl="xla")

    f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, e, gk, do)]
    ref = _out_and_grads(reference)(*f32)
    tol_fwd, tol_bwd = TOL[dtype]
    for name, x, y, r in zip(NAMES, packed, alone, ref, strict=True):
        if gk is None and name == "dgate_k":
            assert x is None and y is None and r is None
            continue
        tol = tol_fwd if name == "out" else tol_bwd
        assert _rel(x, y) < tol, f"{name} vs alone {_rel(x, y):.2e} seed={seed}"
        assert _rel(x, r) < tol, f"{name} vs reference {_rel(x, r):.2e} seed={seed}"


def test_padding_unsorted_ids_saturation_and_nan_in_another_segment():
    """fp32, causal, GQA 4 -> 2, gate keys. Row 0 ends in padding (lengths); row 1's ids neither
    increase nor form one run per id (id 3 twice): the mask must still be exact. Then NaN and
    inf in segment 1 of row 0 (a key, a value, a gate key) and in the padding leave the other
    segments' outputs and gradients as they were (segment 1's rows left out of the loss)."""
    seg = np.concatenate([_segment_ids(PACKED), np.repeat([3, 1, 3, 0], [10, 20, 9, 30])[None]])
    seg = seg.astype(np.int32)
    lengths = jnp.asarray([60, 69], jnp.int32)
    seed, q, k, v, e, gk, do = _inputs(
        2,
        sum(PACKED),
        4,
        2,
        32,
        9,
        jnp.float32,
        seg=seg,
        lengths=lengths,
        causal=True,
        gate_keys=True,
    )
    kw = dict(causal=True, lengths=lengths, segment_ids=seg)

    def kernel(q, k, v, e, gk):
        return cope_attention(q, k, v, e, gate_k=gk, **kw, **BLOCKS)

    def reference(q, k, v, e, gk):
        return F.cope_attention(q, k, v, e, gate_k=gk, **kw, impl="xla")

    ours = _out_and_grads(kernel)
    got, want = ours(q, k, v, e, gk, do), _out_and_grads(reference)(q, k, v, e, gk, do)
    tol_fwd, tol_bwd = TOL[jnp.float32]
    for name, x, r in zip(NAMES, got, want):
        err = _rel(x, r)
        assert err < (tol_fwd if name == "out" else tol_bwd), f"{name} {err:.2e} seed={seed}"
    # The seam hands segment_ids to this kernel (default blocks).
    seam = F.cope_attention(q, k, v, e, gate_k=gk, **kw, impl="cope_flash")
    assert _rel(seam, want[0]) < tol_fwd

    # Saturated tiles ran, some of them not inside one segment (the masked saturated path).
    common = dict(causal=True, scale=None, nodiv=False, interpret=True)
    _, lse, total = cope_attention_fwd(q, k, v, e, gk, lengths, seg, config=None, **common)
    residuals = (got[0], lse, total, do, seg)
    config = BackwardConfig(16, 16)
    _, n_sat = backward_with_saturation(
        q, k, v, e, gk, lengths, *residuals, config=config, **common
    )
    q_seg, kv_seg = pad_segments(jnp.asarray(seg), 80, 80)
    tiles = np.asarray(tile_ranges(q_seg, kv_seg, block_q=16, block_k=16, by_keys=False))
    first, single_lo = tiles[:, None, :, 0], tiles[:, None, :, 1]  # [B, 1, T_pad / 16]
    n_sat = np.asarray(n_sat)  # [B, H, T_pad / 16]: saturated tiles [first, first + n_sat)
    assert (n_sat > 0).any() and (np.minimum(n_sat, single_lo - first) > 0).any(), n_sat

    one = np.asarray(seg[0] == 1)  # [T]
    do_other = do.at[0].set(jnp.where(one[:, None, None], 0.0, do[0]))
    bad = [
        k.at[0, 10].set(jnp.nan).at[0, 60:].set(jnp.inf),
        v.at[0, 12, 0, 3].set(jnp.nan).at[0, 60:].set(jnp.nan),
        gk.at[0, 20, 1].set(jnp.inf).at[0, 60:].set(-jnp.inf),
    ]
    clean = ours(q, k, v, e, gk, do_other)
    dirty = ours(q, bad[0], bad[1], e, bad[2], do_other)
    assert np.isnan(np.asarray(dirty[0])[0, 12:28]).all()  # segment 1's rows that see them
    # d pos_emb sums over every row, segment 1's too (NaN there, as in the reference).
    for name, x, r in zip(NAMES, dirty, clean):
        if name == "dpos_emb":
            continue
        x, r = np.asarray(x), np.asarray(r)
        # Rows of the other segments (keys: before the padding), and all of row 1.
        keep = ~one if name in ("out", "dq") else ~one & (np.arange(one.size) < 60)
        x, r = np.concatenate([x[0, keep], x[1]]), np.concatenate([r[0, keep], r[1]])
        assert np.isfinite(x).all(), f"{name} seed={seed}"
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-6, err_msg=f"{name} seed={seed}")


def test_segment_ids_validation():
    q = jnp.zeros((1, 8, 4, 32))
    e = jnp.zeros((5, 32))
    with pytest.raises(ValueError, match="segment_ids must be"):
        cope_attention(q, q, q, e, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be"):
        kv = jnp.zeros((1, 9, 4, 32))
        cope_attention(q, kv, kv, e, segment_ids=[[0] * 8])
    with pytest.raises(ValueError, match="integer"):
        cope_attention(q, q, q, e, segment_ids=jnp.zeros((1, 8)))
