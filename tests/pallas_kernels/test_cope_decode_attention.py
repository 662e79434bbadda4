"""Tests for CoPE split-KV decode attention: kernel (interpret and compiled) vs a float64
evaluation of `cope.functional.cope_attention`'s last valid row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import cope.functional as F
from pallas_kernels import cope_decode_attention
from pallas_kernels.cope_decode_attention import (
    cope_decode_attention_reference,
    cope_decode_logits,
    cope_decode_partials,
    heuristic_config,
    merge_recomputed,
    position_logits,
    split_carries,
    split_gate_totals_reference,
    splits_to_recompute,
    why_unsupported,
)
from pallas_kernels.cope_decode_attention.shapes import (
    BENCH_SHAPES,
    TEST_SHAPES,
    CopeDecodeShape,
)
from pallas_kernels.decode_attention import DecodeConfig, DecodePartials, split_layout

# ‖out - ref‖ / ‖ref‖ against the float64 reference, by input dtype.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}
MODES = ("online", "unified_max")
GATE_REGIMES = ("random", "near_0", "near_1", "mixed")


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh inputs every run


def _inputs(shape: CopeDecodeShape, dtype, rng, *, lengths=None, gates="random", q_scale=1.0):
    """q, k_cache, v_cache, pos_emb, lengths. `gates` steers the content gates sigmoid(scale·q·k):
    a shared direction u is added to the keys (and, scaled, to the queries) so that q·k is far
    below 0 ("near_0": no split saturates), far above ("near_1"), or either per key and head
    ("mixed")."""
    b, s, h, kv, d = shape.batch, shape.max_len, shape.heads, shape.kv_heads, shape.head_dim
    q = rng.standard_normal((b, h, d))
    k = rng.standard_normal((b, s, kv, d))
    if gates != "random":
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        if gates == "mixed":
            key_sign = rng.choice([-1.0, 1.0], size=(b, s, kv, 1))
            head_sign = rng.choice([-1.0, 1.0], size=(b, h, 1))
            k = k + 6.0 * key_sign * u
            q = 0.3 * q + 2.0 * head_sign * u
        else:
            sign = -1.0 if gates == "near_0" else 1.0
            k = k + 8.0 * u
            q = 0.3 * q + sign * 8.0 * u
    q = jnp.asarray(q * q_scale, dtype)
    k = jnp.asarray(k, dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), dtype)
    pos_emb = jnp.asarray(rng.standard_normal((shape.npos, d)), jnp.float32)
    if lengths is None:  # ragged: the full cache, length 1, and random lengths
        lengths = rng.integers(1, s + 1, size=b)
        lengths[0] = s
        if b > 2:
            lengths[1] = 1
    return q, k, v, pos_emb, jnp.asarray(lengths, jnp.int32)


def _f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def reference_f64(q, k, v, pos_emb, lengths, *, gate_k=None, scale=None, nodiv=False):
    """The CoPE definition in float64 numpy on the rounded inputs, for the query at position
    lengths[b] - 1 over keys 0..lengths[b] - 1; pos_emb rounded to q's dtype as the model does.
    Keys past the length are never read; a non-finite valid input makes the row NaN.
    `test_numpy_reference_is_cope_attention` ties it to `cope.functional.cope_attention`."""
    q64, k64, v64 = _f64(q), _f64(k), _f64(v)
    gk64 = k64 if gate_k is None else _f64(gate_k)
    table = _f64(jnp.asarray(pos_emb).astype(q.dtype))
    batch, heads, head_dim = q64.shape
    group = heads // k64.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    top = table.shape[0] - 1
    out = np.zeros_like(q64)
    for b in range(batch):
        n = min(int(lengths[b]), k64.shape[1])
        for h in range(heads if n > 0 else 0):
            qh, kv = q64[b, h], h // group
            gates = 1.0 / (1.0 + np.exp(-(gk64[b, :n, kv] @ qh) * scale))
            if not np.isfinite(gates).all():  # a non-finite gate key: the row is NaN
                out[b, h] = np.nan
                continue
            positions = np.minimum(np.cumsum(gates[::-1])[::-1], top)
            z = table @ qh  # [N]
            lower = np.floor(positions).astype(int)
            z_lower, z_upper = z[lower], z[np.minimum(lower + 1, top)]
            position_term = z_lower + (positions - lower) * (z_upper - z_lower)
            content = k64[b, :n, kv] @ qh
            s = content * scale + position_term if nodiv else (content + position_term) * scale
            w = np.exp(s - s.max())
            out[b, h] = w @ v64[b, :n, kv] / w.sum()
            if not np.isfinite(out[b, h]).all():  # a non-finite valid value: all NaN
                out[b, h] = np.nan
    return out


def position_tolerance(q, pos_emb, lengths, *, scale=None, nodiv=False) -> float:
    """Float32 error allowance of the position term: positions of size P are rounded to ~2^-24·P
    (gates round near 1, their sums round), which moves a logit by that times the slope
    |z[n+1] - z[n]| of z = q·e (times scale unless nodiv). The float32 definition itself is
    only that close to the float64 one."""
    table = _f64(jnp.asarray(pos_emb).astype(q.dtype))
    z = np.einsum("bhd,nd->bhn", _f64(q), table)
    slope = np.abs(np.diff(z, axis=-1)).max() if z.shape[-1] > 1 else 0.0
    top = min(z.shape[-1] - 1, int(np.max(lengths)))
    pos_scale = 1.0 if nodiv else (q.shape[-1] ** -0.5 if scale is None else scale)
    return 2.0**-24 * top * slope * pos_scale


def _assert_close(out, ref, dtype, tol=None, positions=0.0):
    """Relative error within the dtype's tolerance (or `tol`) plus the position allowance."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert not np.isnan(out).any(), "NaN in output"
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    bound = (TOLERANCE[dtype] if tol is None else tol) + positions
    assert err <= bound, f"relative error {err:.3e} > {bound:.3e}"


def _config(shape: CopeDecodeShape, splits: int = 3) -> DecodeConfig:
    return DecodeConfig(block_k=16, num_splits=min(splits, -(-shape.max_len // 16)))


def _recomputed(q, k, v, pos_emb, lengths, config, *, gate_k=None, scale=None):
    """The splits the combine sends to the exact second pass, [B, K, splits] bool."""
    b, h, d = q.shape
    kv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, kv, h // kv, d)
    z = position_logits(q, pos_emb).reshape(b, kv, h // kv, -1)
    first = cope_decode_partials(
        qg,
        k,
        v,
        gate_k,
        lengths,
        jnp.zeros((kv, h // kv), jnp.float32),
        z,
        scale=scale,
        pos_scale=scale,
        softmax="online",
        config=config,
        interpret=True,
    )
    split_len, _ = split_layout(k.shape[1], config.num_splits, config.block_k)
    carries = split_carries(first.gate_totals)
    return np.asarray(
        splits_to_recompute(carries, lengths, npos=pos_emb.shape[0], split_len=split_len)
    )


# --- the kernel against the float64 definition --------------------------------------------------


def _check(out, q, k, v, e, lengths, dtype=jnp.float32, **kwargs):
    ref = reference_f64(q, k, v, e, lengths, **kwargs)
    kwargs.pop("gate_k", None)
    _assert_close(out, ref, dtype, positions=position_tolerance(q, e, lengths, **kwargs))


# Most interpret-mode tests share this shape, its config and the default scale, so that they
# reuse compiled kernels (interpret-mode compiles dominate the suite's time).
BASE = CopeDecodeShape(3, 60, 4, 2, 16, npos=8)


def test_numpy_reference_is_cope_attention():
    """The float64 numpy reference is `cope.functional.cope_attention` in float64 (one query,
    ragged lengths with 0, GQA, gate keys, nodiv, a scale), and so is the jnp reference to
    float32 precision."""
    rng = _rng()
    shape = CopeDecodeShape(3, 50, 6, 2, 16, npos=20)
    q, k, v, e, lengths = _inputs(shape, jnp.float32, rng, lengths=[50, 0, 7])
    gate_k = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    cope64 = jax.jit(F.cope_attention, static_argnames=("causal", "scale", "nodiv"))
    for kwargs in ({}, {"nodiv": True, "scale": 0.3, "gate_k": gate_k}):
        with jax.enable_x64(True):
            got = cope64(
                jnp.asarray(_f64(q))[:, None],
                jnp.asarray(_f64(k)),
                jnp.asarray(_f64(v)),
                jnp.asarray(_f64(e)),
                causal=False,
                lengths=lengths,
                scale=kwargs.get("scale"),
                nodiv=kwargs.get("nodiv", False),
                gate_k=None if "gate_k" not in kwargs else jnp.asarray(_f64(gate_k)),
            )
            got = np.asarray(got)[:, 0]
        want = reference_f64(q, k, v, e, lengths, **kwargs)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        ref = cope_decode_attention_reference(
            q,
            k,
            v,
            e,
            lengths,
            gate_k_cache=kwargs.get("gate_k"),
            scale=kwargs.get("scale"),
            nodiv=kwargs.get("nodiv", False),
        )
        _check(ref, q, k, v, e, lengths, **kwargs)


def test_last_row_of_the_causal_forward():
    """The decoded query at position L-1 gives row L-1 of the full causal CoPE forward."""
    rng = _rng()
    _, k, v, e, lengths = _inputs(BASE, jnp.float32, rng, lengths=[60, 1, 20])
    q_all = jnp.asarray(rng.standard_normal((3, 60, 4, 16)), jnp.float32)  # [B, T=S, H, D]
    rows = np.asarray(lengths) - 1
    q = q_all[np.arange(3), rows]  # [B, H, D]
    out = cope_decode_attention(q, k, v, e, lengths, config=_config(BASE), interpret=True)
    with jax.enable_x64(True):
        full = jax.jit(F.cope_attention)(
            *(jnp.asarray(_f64(x)) for x in (q_all, k, v, e)), lengths=lengths
        )
        want = np.asarray(full)[np.arange(3), rows]
    _assert_close(out, want, jnp.float32, positions=position_tolerance(q, e, lengths))


@pytest.mark.parametrize(
    "shape,softmax", list(zip(TEST_SHAPES, MODES * 2)), ids=lambda x: getattr(x, "name", x)
)
def test_matches_float64_reference_fp32(shape, softmax):
    q, k, v, e, lengths = _inputs(shape, jnp.float32, _rng())
    out = cope_decode_attention(
        q, k, v, e, lengths, softmax=softmax, config=_config(shape), interpret=True
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, q, k, v, e, lengths)


def test_matches_float64_reference_bf16_gqa():
    shape = CopeDecodeShape(3, 150, 8, 2, 32, npos=64)
    q, k, v, e, lengths = _inputs(shape, jnp.bfloat16, _rng())
    out = cope_decode_attention(q, k, v, e, lengths, config=_config(shape, 4), interpret=True)
    assert out.dtype == jnp.bfloat16
    _check(out, q, k, v, e, lengths, jnp.bfloat16)


# One softmax mode per npos, so the regimes of one npos share a compiled kernel.
REGIME_MODE = {2: "unified_max", 64: "online", 513: "unified_max"}


@pytest.mark.parametrize("npos", sorted(REGIME_MODE))
@pytest.mark.parametrize("gates", GATE_REGIMES[1:])
def test_gate_regimes(gates, npos):
    """Exact whether no split saturates (gates near 0), all but the last few do (near 1), or
    some heads and keys do (mixed); the second pass recomputes exactly the unsaturated splits."""
    shape = CopeDecodeShape(3, 150, 4, 2, 16, npos=npos)
    q, k, v, e, lengths = _inputs(shape, jnp.float32, _rng(), gates=gates, lengths=[150, 3, 97])
    config = _config(shape, 5)  # split_len 32
    out = cope_decode_attention(
        q, k, v, e, lengths, softmax=REGIME_MODE[npos], config=config, interpret=True
    )
    _check(out, q, k, v, e, lengths)

    redo = _recomputed(q, k, v, e, lengths, config)  # [B, K, splits]
    later_keys = (np.arange(5)[None, :] + 1) * 32 < np.asarray(lengths)[:, None]  # [B, splits]
    assert not (redo & ~later_keys[:, None, :]).any()  # never the last split or empty ones
    keys_right = np.asarray(lengths)[:, None] - 32 * (np.arange(5)[None, :] + 1)  # [B, splits]
    if gates == "near_0" or npos == 513:  # total gate mass < npos - 1: nothing saturates
        np.testing.assert_array_equal(redo, np.broadcast_to(later_keys[:, None], redo.shape))
    elif gates == "near_1":  # each key right of a split adds ~1 to its carry
        expect = np.broadcast_to((later_keys & (keys_right < npos - 1))[:, None], redo.shape)
        clear = np.broadcast_to((np.abs(keys_right - (npos - 1)) >= 1)[:, None], redo.shape)
        np.testing.assert_array_equal(redo[clear], expect[clear])


def test_every_length():
    """lengths 1..S in one batch: the split holding the last key moves across every split."""
    shape = CopeDecodeShape(40, 40, 2, 1, 16, npos=8)
    q, k, v, e, lengths = _inputs(shape, jnp.float32, _rng(), lengths=np.arange(1, 41))
    out = cope_decode_attention(q, k, v, e, lengths, config=_config(shape), interpret=True)
    _check(out, q, k, v, e, lengths)


def test_gate_k_cache_and_nodiv():
    rng = _rng()
    q, k, v, e, lengths = _inputs(BASE, jnp.float32, rng)
    gate_k = jnp.asarray(rng.standard_normal(k.shape) + 0.5, jnp.float32)
    for kwargs in ({"softmax": "unified_max"}, {"softmax": "online", "nodiv": True, "scale": 0.3}):
        out = cope_decode_attention(
            q, k, v, e, lengths, gate_k_cache=gate_k, config=_config(BASE), interpret=True, **kwargs
        )
        kwargs.pop("softmax")
        _check(out, q, k, v, e, lengths, gate_k=gate_k, **kwargs)


def _logit_size(q, k, e, lengths) -> float:
    logits = cope_decode_logits(*(jnp.asarray(_f64(x), jnp.float32) for x in (q, k, e)), lengths)
    return float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(logits), logits, 0.0))))


@pytest.mark.parametrize("softmax,splits", [("online", 3), ("unified_max", 3), ("unified_max", 1)])
def test_huge_logits_are_exact(softmax, splits):
    """Logits of ±1e4: the unified max leaves its window and falls back, never NaN."""
    q, k, v, e, lengths = _inputs(BASE, jnp.float32, _rng(), q_scale=4000.0)
    s_max = _logit_size(q, k, e, lengths)
    assert s_max > 5e3
    out = cope_decode_attention(
        q, k, v, e, lengths, softmax=softmax, config=_config(BASE, splits), interpret=True
    )
    # fp32 rounding of logits of size |s| moves the weights by ~eps·|s|: the reference itself
    # is only that close to the exact value (the gates are exactly 0 or 1: whole positions).
    _assert_close(out, reference_f64(q, k, v, e, lengths), jnp.float32, tol=1e-6 * s_max)


@pytest.mark.parametrize("phi", [1e4, -1e4, 75.0])
def test_phi_out_of_window_is_exact(phi):
    q, k, v, e, lengths = _inputs(BASE, jnp.float32, _rng())
    out = cope_decode_attention(q, k, v, e, lengths, phi=phi, config=_config(BASE), interpret=True)
    _check(out, q, k, v, e, lengths)


def test_per_head_phi_under_jit():
    q, k, v, e, lengths = _inputs(BASE, jnp.float32, _rng())
    phi = jnp.asarray([0.0, 2.0, -3.0, 1e4], jnp.float32)  # the last head falls back
    fn = jax.jit(
        lambda q, k, v, e, n, phi: cope_decode_attention(
            q, k, v, e, n, phi=phi, config=_config(BASE), interpret=True
        )
    )
    _check(fn(q, k, v, e, lengths, phi), q, k, v, e, lengths)


@pytest.mark.parametrize("splits", [1, 3])
def test_zero_and_overlong_lengths(splits):
    q, k, v, e, _ = _inputs(BASE, jnp.float32, _rng())
    lengths = jnp.asarray([0, 1000, 5], jnp.int32)
    out = cope_decode_attention(q, k, v, e, lengths, config=_config(BASE, splits), interpret=True)
    assert (np.asarray(out[0]) == 0).all()
    _check(out, q, k, v, e, [0, 60, 5])


@pytest.mark.parametrize("splits", [1, 3])
def test_non_finite_inputs(splits):
    """Keys past the length never matter, whatever they hold; a NaN value or gate key at a valid
    key makes its rows NaN, also when the gate sits in a saturated split."""
    rng = _rng()
    q, k, v, e, lengths = _inputs(BASE, jnp.float32, rng, lengths=[60, 30, 45], gates="near_1")
    k, v = np.array(k), np.array(v)
    gate_k = k.copy()  # gates near 1: row 2 saturates within its last 8 keys
    k[1, 30:], v[1, 30:], gate_k[1, 30:] = np.nan, np.inf, np.nan  # past row 1's length
    v[0, 5, 0, 3] = np.nan  # a valid value: row 0, kv head 0
    gate_k[2, 2, 1, 0] = np.nan  # a valid gate key far left of row 2's last key: kv head 1
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, e)]
    gate_k = jnp.asarray(gate_k, jnp.float32)
    out = cope_decode_attention(
        *args, lengths, gate_k_cache=gate_k, config=_config(BASE, splits), interpret=True
    )
    if splits > 1:  # the NaN gate's split (keys 0..31) ran saturated, no recompute
        assert not _recomputed(*args, lengths, _config(BASE), gate_k=gate_k)[2, 1, 0]
    ref = reference_f64(*args, lengths, gate_k=gate_k)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)), np.isnan(ref))
    assert np.isnan(ref[0, :2]).all() and np.isnan(ref[2, 2:]).all()
    assert np.isfinite(ref[0, 2:]).all() and np.isfinite(ref[1]).all()
    jnp_ref = cope_decode_attention_reference(*args, lengths, gate_k_cache=gate_k)
    np.testing.assert_array_equal(np.isnan(np.asarray(jnp_ref)), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(np.asarray(out)[ok], ref[ok], rtol=1e-4, atol=1e-5)


def test_default_config():
    shape = CopeDecodeShape(2, 40, 4, 2, 16, npos=64)
    q, k, v, e, lengths = _inputs(shape, jnp.float32, _rng())
    out = cope_decode_attention(q, k, v, e, lengths, interpret=True)  # heuristic config
    _check(out, q, k, v, e, lengths)


# --- first pass and combine on their own --------------------------------------------------------


def test_first_pass_gate_totals():
    rng = _rng()
    q, k, v, e, lengths = _inputs(BASE, jnp.float32, rng, lengths=[60, 20, 1])
    gate_k = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    config = _config(BASE)
    split_len, splits = split_layout(60, config.num_splits, 16)
    for gk in (None, gate_k):
        first = cope_decode_partials(
            q.reshape(3, 2, 2, 16),
            k,
            v,
            gk,
            lengths,
            jnp.zeros((2, 2), jnp.float32),
            position_logits(q, e).reshape(3, 2, 2, 8),
            scale=0.25,
            pos_scale=0.25,
            softmax="online",
            config=config,
            interpret=True,
        )
        want = split_gate_totals_reference(
            q, k if gk is None else gk, lengths, scale=0.25, split_len=split_len
        )
        assert first.gate_totals.shape == (3, 2, splits, 2)
        np.testing.assert_allclose(first.gate_totals, want, rtol=1e-5, atol=1e-5)
        assert (np.asarray(first.gate_totals)[1:, :, 1:] == 0).all()  # past the length


def test_split_carries_and_recompute_flags():
    rng = _rng()
    totals = rng.uniform(0, 10, (2, 3, 5, 2))
    totals[1, :, 3:] = 0.0  # row 1 has keys in splits 0..2 only
    carries = np.asarray(split_carries(jnp.asarray(totals, jnp.float32)))
    want = np.stack([totals[:, :, j + 1 :].sum(2) for j in range(5)], axis=2)
    np.testing.assert_allclose(carries, want, rtol=1e-6, atol=1e-5)
    lengths = jnp.asarray([80, 45], jnp.int32)  # split_len 16: last splits 4 and 2
    flags = np.asarray(splits_to_recompute(jnp.asarray(carries), lengths, npos=12, split_len=16))
    for b, last in enumerate((4, 2)):
        for kv in range(3):
            for j in range(5):
                expect = j < last and bool((carries[b, kv, j] < 11).any())
                assert flags[b, kv, j] == expect


def test_merge_recomputed():
    rng = _rng()

    def parts():
        return DecodePartials(
            jnp.asarray(rng.standard_normal((2, 3, 4, 2, 8)), jnp.float32),
            *(jnp.asarray(rng.standard_normal((2, 3, 4, 2)), jnp.float32) for _ in range(3)),
        )

    first, exact = parts(), parts()
    redo = rng.random((2, 3, 4)) < 0.5
    merged = merge_recomputed(first, exact, jnp.asarray(redo))
    for f, x, m in zip(first, exact, merged):
        f, x, m = map(np.asarray, (f, x, m))
        np.testing.assert_array_equal(m[redo], x[redo])
        np.testing.assert_array_equal(m[~redo], f[~redo])


def test_heuristic_config_fits():
    for s in BENCH_SHAPES:
        for gate_keys in (False, True):
            cfg = heuristic_config(
                s.batch,
                s.max_len,
                s.kv_heads,
                s.heads // s.kv_heads,
                s.head_dim,
                gate_keys=gate_keys,
            )
            tiles = 3 if gate_keys else 2
            assert cfg.block_k <= 64 and cfg.use_dot
            assert cfg.num_stages * tiles * cfg.block_k * s.head_dim * 2 <= 200 * 1024
            assert s.batch * s.kv_heads * cfg.num_splits >= 128


# --- bad inputs and coverage --------------------------------------------------------------------


def _good():
    return (
        jnp.zeros((2, 4, 16)),
        jnp.zeros((2, 8, 2, 16)),
        jnp.zeros((2, 8, 2, 16)),
        jnp.zeros((5, 16)),
        jnp.ones((2,), jnp.int32),
    )


BAD_INPUTS = [
    (0, jnp.zeros((2, 16)), "q must be"),
    (1, jnp.zeros((2, 8, 16)), "k_cache must be"),
    (2, jnp.zeros((2, 9, 2, 16)), "v_cache shape"),
    (1, jnp.zeros((3, 8, 2, 16)), "k_cache shape"),
    (0, jnp.zeros((2, 3, 16)), "multiple of k_cache kv_heads"),
    (0, jnp.zeros((2, 4, 16), jnp.float16), "q dtype"),
    (0, jnp.zeros((2, 4, 16), jnp.bfloat16), "dtypes must agree"),
    (3, jnp.zeros((5, 8)), "pos_emb must be"),
    (3, jnp.zeros((0, 16)), "pos_emb must be"),
    (3, jnp.zeros((5, 16), jnp.int32), "pos_emb must be a floating"),
]


@pytest.mark.parametrize("which,bad,match", BAD_INPUTS)
def test_bad_inputs_raise_and_are_unsupported(which, bad, match):
    args = list(_good())
    args[which] = bad
    with pytest.raises(ValueError, match=match) as info:
        cope_decode_attention(*args, interpret=True)
    assert "\n" not in str(info.value)
    reason = why_unsupported(*args[:4])
    assert reason == str(info.value)


def test_bad_options_raise():
    args = _good()
    cases = [
        ({"softmax": "fast"}, "softmax"),
        ({"phi": jnp.zeros((3,))}, "phi"),
        ({"num_splits": 0}, "num_splits"),
        ({"config": DecodeConfig(use_dot=False)}, "use_dot"),
        ({"gate_k_cache": jnp.zeros((2, 8, 2, 8))}, "gate_k_cache shape"),
        ({"gate_k_cache": jnp.zeros((2, 8, 2, 16), jnp.bfloat16)}, "dtypes must agree"),
        ({"scale": jnp.float32(0.1)}, "scale"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            cope_decode_attention(*args, interpret=True, **kwargs)
    with pytest.raises(ValueError, match="lengths must be"):
        cope_decode_attention(*args[:4], jnp.ones((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="lengths dtype"):
        cope_decode_attention(*args[:4], jnp.ones((2,)), interpret=True)
    head24 = (jnp.zeros((2, 4, 24)), jnp.zeros((2, 8, 2, 24)), jnp.zeros((2, 8, 2, 24)))
    assert "power of two" in why_unsupported(*head24, jnp.zeros((5, 24)))
    assert why_unsupported(*args[:4]) is None
    assert why_unsupported(*args[:4], gate_k_cache=args[1]) is None


@pytest.mark.parametrize("device_kind", ["NVIDIA H100", "NVIDIA H200"])
def test_lowers_for_hopper(device_kind):
    """Both passes (or the single normalising one) lower to Triton for an abstract Hopper GPU
    (bf16, GQA, gate keys, both softmax modes)."""
    mesh = AbstractMesh(
        (1,),
        ("x",),
        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu"),
    )
    checks = [
        export.DisabledSafetyCheck.custom_call(n)
        for n in ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
    ]
    sds = jax.ShapeDtypeStruct
    # (batch, max_len, Pallas calls): 8 splits need the exact second pass; at 64 (batch, kv
    # head) pairs and 1024 keys the heuristic takes one split, normalised in the kernel.
    for batch, max_len, calls in ((4, 4096, 2), (8, 1024, 1)):
        kv = sds((batch, max_len, 8, 128), jnp.bfloat16)
        q, e, n = (
            sds((batch, 32, 128), jnp.bfloat16),
            sds((64, 128), jnp.float32),
            sds((batch,), jnp.int32),
        )
        for softmax in MODES:
            for gate_keys in (False, True):
                fn = lambda q, k, v, e, n, gk=None, softmax=softmax: cope_decode_attention(
                    q, k, v, e, n, gate_k_cache=gk, softmax=softmax
                )
                with use_abstract_mesh(mesh):
                    exported = export.export(
                        jax.jit(fn), platforms=["cuda"], disabled_checks=checks
                    )(q, kv, kv, e, n, *((kv,) if gate_keys else ()))
                assert exported.mlir_module().count("__gpu$xla.gpu.triton") == calls


# --- compiled kernels on the GPU ----------------------------------------------------------------

GPU_SHAPES = (
    CopeDecodeShape(2, 1, 8, 8, 128, npos=64),
    CopeDecodeShape(3, 7, 32, 8, 128, npos=2),
    CopeDecodeShape(4, 4133, 32, 8, 128, npos=64),
    CopeDecodeShape(2, 2048, 16, 16, 64, npos=513),
    CopeDecodeShape(2, 3000, 8, 2, 128, npos=64),
)


@pytest.mark.gpu
@pytest.mark.parametrize("softmax", MODES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.name)
def test_gpu_matches_float64_reference(shape, softmax):
    q, k, v, e, lengths = _inputs(shape, jnp.bfloat16, _rng())
    out = cope_decode_attention(q, k, v, e, lengths, softmax=softmax, interpret=False)
    _check(out, q, k, v, e, lengths, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("gates", GATE_REGIMES)
@pytest.mark.parametrize("softmax", MODES)
def test_gpu_gate_regimes_and_gate_keys(softmax, gates):
    shape = CopeDecodeShape(3, 3000, 16, 4, 128, npos=64)
    rng = _rng()
    q, k, v, e, lengths = _inputs(shape, jnp.float32, rng, gates=gates, lengths=[3000, 1, 1500])
    out = cope_decode_attention(q, k, v, e, lengths, softmax=softmax, interpret=False)
    _check(out, q, k, v, e, lengths)
    gate_k = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    out = cope_decode_attention(
        q, k, v, e, lengths, gate_k_cache=gate_k, nodiv=True, softmax=softmax, interpret=False
    )
    _check(out, q, k, v, e, lengths, gate_k=gate_k, nodiv=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("softmax", MODES)
def test_gpu_huge_logits_and_zero_rows(softmax, dtype):
    shape = CopeDecodeShape(4, 1000, 16, 4, 128, npos=64)
    q, k, v, e, lengths = _inputs(shape, dtype, _rng(), lengths=[1000, 0, 513, 1], q_scale=3000.0)
    out = cope_decode_attention(q, k, v, e, lengths, softmax=softmax, interpret=False)
    assert (np.asarray(out[1], np.float32) == 0).all()
    s_max = _logit_size(q, k, e, lengths)
    tol = 1e-6 * s_max if dtype == jnp.float32 else TOLERANCE[dtype]
    _assert_close(out, reference_f64(q, k, v, e, lengths), dtype, tol=tol)
