"""Tests for split-KV decode attention: kernel (interpret and compiled) vs a float64 reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (
    DecodeConfig,
    DecodePartials,
    combine_online,
    combine_unified,
    decode_attention,
    decode_attention_reference,
    decode_partials,
    decode_partials_reference,
    heuristic_config,
    split_layout,
    unified_fallback_flags,
    unified_window,
    unified_with_fallback,
)
from pallas_kernels.decode_attention.shapes import BENCH_SHAPES, TEST_SHAPES, DecodeShape

# ‖out - ref‖ / ‖ref‖ against the float64 reference, by input dtype.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}
MODES = ("online", "unified_max")


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh inputs every run


def _inputs(shape: DecodeShape, dtype, rng, *, lengths=None, q_scale: float = 1.0):
    b, s, h, k, d = shape.batch, shape.max_len, shape.heads, shape.kv_heads, shape.head_dim
    q = jnp.asarray(rng.standard_normal((b, h, d)) * q_scale, dtype)
    k_cache = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
    v_cache = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
    if lengths is None:  # ragged: the full cache, length 1, and random lengths
        lengths = rng.integers(1, s + 1, size=b)
        lengths[0] = s
        if b > 2:
            lengths[1] = 1
    return q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32)


def reference_f64(q, k_cache, v_cache, lengths, scale=None, bias=None) -> np.ndarray:
    """Float64 numpy softmax attention of the rounded inputs (+ bias [B, H, S] on the scaled
    logits); lengths == 0 rows are zeros."""
    q64, k64, v64 = (
        np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k_cache, v_cache)
    )
    batch, heads, head_dim = q64.shape
    group = heads // k64.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    out = np.zeros_like(q64)
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            continue
        for h in range(heads):
            s = k64[b, :n, h // group] @ q64[b, h] * scale  # [n]
            if bias is not None:
                s = s + np.asarray(bias, np.float64)[b, h, :n]
            p = np.exp(s - s.max())
            out[b, h] = p @ v64[b, :n, h // group] / p.sum()
    return out


def _assert_close(out, ref, dtype, tol=None):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert not np.isnan(out).any(), "NaN in output"
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= (TOLERANCE[dtype] if tol is None else tol), f"relative error {err:.3e}"


def _small_config(shape: DecodeShape, splits: int = 3, use_dot: bool = True) -> DecodeConfig:
    return DecodeConfig(
        block_k=16, num_splits=min(splits, -(-shape.max_len // 16)), use_dot=use_dot
    )


@pytest.mark.parametrize("softmax", MODES)
@pytest.mark.parametrize("shape", TEST_SHAPES, ids=lambda s: s.name)
def test_matches_float64_reference_fp32(shape, softmax):
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    out = decode_attention(
        q, k, v, lengths, softmax=softmax, config=_small_config(shape), interpret=True
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.float32)


@pytest.mark.parametrize("softmax", MODES)
def test_matches_float64_reference_bf16_gqa(softmax):
    shape = DecodeShape(3, 300, 8, 2, 32)  # GQA 8 -> 2, odd cache length, ragged
    q, k, v, lengths = _inputs(shape, jnp.bfloat16, _rng())
    out = decode_attention(
        q, k, v, lengths, softmax=softmax, config=_small_config(shape, 4), interpret=True
    )
    assert out.dtype == jnp.bfloat16
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.bfloat16)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("softmax", MODES)
def test_vector_path_mha(softmax, splits):
    shape = DecodeShape(2, 77, 3, 3, 32)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    out = decode_attention(
        q,
        k,
        v,
        lengths,
        softmax=softmax,
        interpret=True,
        config=_small_config(shape, splits, use_dot=False),
    )
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.float32)


@pytest.mark.parametrize("fallback", ["kernel", "cond"])
@pytest.mark.parametrize("softmax", MODES)
@pytest.mark.parametrize(
    "shape, use_dot",
    [(DecodeShape(3, 300, 8, 2, 32), True), (DecodeShape(2, 77, 3, 3, 32), False)],
    ids=["gqa", "vector"],
)
def test_bias_matches_float64_reference(shape, use_dot, softmax, fallback):
    """A per-key logit bias (e.g. relative positions of the new token) is added before softmax."""
    rng = _rng()
    q, k, v, lengths = _inputs(shape, jnp.float32, rng)
    bias = jnp.asarray(3 * rng.standard_normal((shape.batch, shape.heads, shape.max_len)))
    out = decode_attention(
        q,
        k,
        v,
        lengths,
        bias=bias,
        softmax=softmax,
        fallback=fallback,
        interpret=True,
        config=_small_config(shape, 3, use_dot=use_dot),
    )
    _assert_close(out, reference_f64(q, k, v, lengths, bias=bias), jnp.float32)
    ref = decode_attention_reference(q, k, v, lengths, bias=bias)
    _assert_close(ref, reference_f64(q, k, v, lengths, bias=bias), jnp.float32)


def test_bad_bias_raises():
    q, k, v, lengths = _good()
    with pytest.raises(ValueError, match=r"bias must be \[batch, heads, max_len\]"):
        decode_attention(q, k, v, lengths, bias=jnp.zeros((2, 4, 7)), interpret=True)
    with pytest.raises(ValueError, match="bias must be a floating"):
        decode_attention(q, k, v, lengths, bias=jnp.zeros((2, 4, 8), jnp.int32), interpret=True)


def test_default_config_and_scale():
    shape = DecodeShape(2, 40, 4, 2, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    out = decode_attention(q, k, v, lengths, scale=0.3, interpret=True)  # heuristic config
    _assert_close(out, reference_f64(q, k, v, lengths, scale=0.3), jnp.float32)


@pytest.mark.parametrize("softmax", MODES)
def test_kernel_partials_match_reference(softmax):
    shape = DecodeShape(2, 100, 4, 2, 32)
    rng = _rng()
    q, k, v, lengths = _inputs(shape, jnp.float32, rng, lengths=[100, 20])
    phi = jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)
    config = DecodeConfig(block_k=16, num_splits=3)
    split_len, splits = split_layout(shape.max_len, config.num_splits, config.block_k)
    qg = q.reshape(2, 2, 2, 32)
    got = decode_partials(
        qg, k, v, lengths, phi, scale=0.2, softmax=softmax, config=config, interpret=True
    )
    want = decode_partials_reference(
        q, k, v, lengths, phi, scale=0.2, softmax=softmax, split_len=split_len
    )
    assert got.o.shape == (2, 2, splits, 2, 32) and got.m.shape == (2, 2, splits, 2)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        scale = np.abs(w[np.isfinite(w)]).max()  # sums cancel: judge against their size
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6 * scale)
    assert np.isneginf(np.asarray(got.m)[1, :, 1:]).all()  # splits past length 20 are empty


def test_kernel_recomputes_out_of_window_splits():
    shape = DecodeShape(2, 100, 4, 2, 32)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng(), lengths=[100, 20])
    phi = jnp.asarray([[0.0, 1e4], [0.0, 0.0]], jnp.float32)  # one head far above its logits
    config = DecodeConfig(block_k=16, num_splits=3)
    got = decode_partials(
        q.reshape(2, 2, 2, 32),
        k,
        v,
        lengths,
        phi,
        scale=0.2,
        softmax="unified_max",
        config=config,
        interpret=True,
    )
    m, shift = np.asarray(got.m), np.asarray(got.shift)
    has_keys = np.isfinite(m)
    # the flagged head reports its own max as shift, the others keep φ
    np.testing.assert_array_equal(
        shift[:, 0, :, 1][has_keys[:, 0, :, 1]], m[:, 0, :, 1][has_keys[:, 0, :, 1]]
    )
    assert (shift[:, 0, :, 0][has_keys[:, 0, :, 0]] == 0).all()
    assert (shift[:, 1][has_keys[:, 1]] == 0).all()
    assert np.isneginf(shift[~has_keys]).all()  # empty splits weigh nothing
    out = combine_online(got).reshape(2, 4, 32)
    _assert_close(out, reference_f64(q, k, v, lengths, scale=0.2), jnp.float32)


@pytest.mark.parametrize(
    "softmax,fallback,splits",
    [
        ("online", "kernel", 3),
        ("unified_max", "kernel", 3),
        ("unified_max", "kernel", 1),
        ("unified_max", "cond", 3),
    ],
)
def test_adversarial_logits_take_the_fallback(softmax, fallback, splits):
    shape = DecodeShape(3, 50, 4, 2, 32)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng(), q_scale=1000.0)
    out = decode_attention(
        q,
        k,
        v,
        lengths,
        softmax=softmax,
        fallback=fallback,
        config=_small_config(shape, splits),
        interpret=True,
    )
    # fp32 rounding of logits of size |s| moves the weights by ~eps·|s|: the reference itself
    # is only that close to the exact value.
    s_max = float(np.abs(reference_logits(q, k)).max())
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.float32, tol=1e-6 * s_max)
    if softmax == "unified_max":
        split_len, _ = split_layout(50, 3, 16)
        phi = jnp.zeros((2, 2), jnp.float32)
        parts = decode_partials_reference(
            q, k, v, lengths, phi, scale=32**-0.5, softmax="unified_max", split_len=split_len
        )
        flags = unified_fallback_flags(parts, phi, 50, combine_unified(parts))
        assert bool(jnp.any(flags))


def reference_logits(q, k):
    q64, k64 = (np.asarray(x, np.float64) for x in (q, k))
    group = q64.shape[1] // k64.shape[2]
    return np.einsum("bhd,bshd->bhs", q64, np.repeat(k64, group, axis=2)) / math.sqrt(q.shape[-1])


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("fallback", ["kernel", "cond"])
@pytest.mark.parametrize("phi", [1e4, -1e4, 75.0])
def test_phi_out_of_window_is_exact(phi, fallback, splits):
    shape = DecodeShape(2, 60, 4, 4, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    out = decode_attention(
        q,
        k,
        v,
        lengths,
        phi=phi,
        config=_small_config(shape, splits),
        fallback=fallback,
        interpret=True,
    )
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.float32)


def test_per_head_phi():
    shape = DecodeShape(2, 60, 4, 2, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    phi = jnp.asarray([0.0, 2.0, -3.0, 1e4], jnp.float32)  # the last head falls back
    out = decode_attention(q, k, v, lengths, phi=phi, config=_small_config(shape), interpret=True)
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.float32)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("softmax", MODES)
def test_zero_length_rows_are_zeros(softmax, splits):
    shape = DecodeShape(3, 40, 4, 2, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng(), lengths=[0, 40, 0])
    out = np.asarray(
        decode_attention(
            q, k, v, lengths, softmax=softmax, config=_small_config(shape, splits), interpret=True
        )
    )
    assert (out[0] == 0).all() and (out[2] == 0).all()
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.float32)


def test_lengths_beyond_cache_are_clipped():
    shape = DecodeShape(2, 30, 2, 2, 16)
    q, k, v, _ = _inputs(shape, jnp.float32, _rng())
    out = decode_attention(
        q, k, v, jnp.asarray([1000, 30], jnp.int32), config=_small_config(shape), interpret=True
    )
    _assert_close(out, reference_f64(q, k, v, [30, 30]), jnp.float32)


def test_under_jit():
    shape = DecodeShape(2, 33, 4, 2, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    fn = jax.jit(lambda *a: decode_attention(*a, config=_small_config(shape), interpret=True))
    _assert_close(fn(q, k, v, lengths), reference_f64(q, k, v, lengths), jnp.float32)


def test_jnp_reference_matches_float64():
    shape = DecodeShape(3, 50, 6, 2, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng(), lengths=[50, 0, 7])
    _assert_close(
        decode_attention_reference(q, k, v, lengths), reference_f64(q, k, v, lengths), jnp.float32
    )


# --- combine and fallback helpers on their own -------------------------------------------------


def _random_partials(rng, splits=5, empty_split=True):
    b, k, g, d = 2, 3, 2, 8
    m = rng.standard_normal((b, k, splits, g)) * 5
    l = rng.uniform(0.5, 3.0, (b, k, splits, g))
    o = rng.standard_normal((b, k, splits, g, d))
    if empty_split:
        m[0, 0, 1] = -np.inf
        l[0, 0, 1] = 0.0
        o[0, 0, 1] = 0.0
    return m, l, o


def test_combine_online_matches_numpy():
    m, l, o = _random_partials(_rng())
    got = combine_online(DecodePartials(*(jnp.asarray(x, jnp.float32) for x in (o, l, m, m))))
    mmax = m.max(axis=2, keepdims=True)
    w = np.exp(m - mmax)
    want = (w[..., None] * o).sum(2) / (w * l).sum(2)[..., None]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_combine_unified_matches_numpy_and_zero_rows():
    _, l, o = _random_partials(_rng())
    l[1, 2] = 0.0  # a row with no keys at all
    o[1, 2] = 0.0
    got = np.asarray(
        combine_unified(
            DecodePartials(
                jnp.asarray(o, jnp.float32),
                jnp.asarray(l, jnp.float32),
                jnp.zeros(l.shape, jnp.float32),
                jnp.zeros(l.shape, jnp.float32),
            )
        )
    )
    want = o.sum(2) / np.where(l.sum(2) > 0, l.sum(2), 1.0)[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[1, 2] == 0).all()


@pytest.mark.parametrize("split_len", [16, 48, 112])
def test_combines_agree_for_any_split(split_len):
    shape = DecodeShape(2, 112, 4, 2, 16)
    q, k, v, lengths = _inputs(shape, jnp.float32, _rng())
    phi = jnp.full((2, 2), 1.5, jnp.float32)
    ref = reference_f64(q, k, v, lengths)
    for softmax, combine in (("online", combine_online), ("unified_max", combine_unified)):
        parts = decode_partials_reference(
            q, k, v, lengths, phi, scale=0.25, softmax=softmax, split_len=split_len
        )
        out = combine(parts).reshape(q.shape)
        _assert_close(out, reference_f64(q, k, v, lengths, scale=0.25), jnp.float32)
    del ref


def test_unified_window():
    lo, hi = unified_window(32768)
    assert -61 < lo < -60 and 77 < hi < 78
    # exp of the window's ends stays representable with n terms, both ends
    n = 32768
    assert np.isfinite(np.float32(n) * np.exp(np.float32(hi)))
    assert np.exp(np.float32(lo)) / (n * np.finfo(np.float32).tiny) >= 2.0**24 * 0.99
    assert unified_window(1)[1] > unified_window(10**6)[1]


def test_fallback_flags_and_row_replacement():
    rng = _rng()
    m, l, o = _random_partials(rng, empty_split=False)
    lo, hi = unified_window(100)
    m[0, 1, :, 0] = hi + 1.0  # overflow risk
    m[1, 0, :, 1] = lo - 1.0  # underflow of the whole row
    m[1, 2, :, 0] = -np.inf  # no keys: never flagged
    o[1, 1, 3, 1, 2] = np.inf  # non-finite output
    parts = DecodePartials(*(jnp.asarray(x, jnp.float32) for x in (o, l, m, 0 * l)))
    phi = jnp.zeros((3, 2), jnp.float32)
    flags = np.asarray(unified_fallback_flags(parts, phi, 100, combine_unified(parts)))
    expected = np.zeros((2, 3, 2), bool)
    expected[0, 1, 0] = expected[1, 0, 1] = expected[1, 1, 1] = True
    np.testing.assert_array_equal(flags, expected)
    marker = jnp.full((2, 3, 2, 8), 7.0)
    out = np.asarray(unified_with_fallback(parts, phi, 100, lambda: marker))
    assert (out[expected] == 7.0).all()
    np.testing.assert_allclose(out[~expected], np.asarray(combine_unified(parts))[~expected])
    # nothing flagged: the fallback is not taken
    m2 = np.clip(m, -5, 5)
    parts2 = DecodePartials(
        jnp.asarray(np.nan_to_num(o, posinf=0.0), jnp.float32),
        parts.l,
        jnp.asarray(m2, jnp.float32),
        parts.shift,
    )
    out2 = unified_with_fallback(parts2, phi, 100, lambda: marker)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(combine_unified(parts2)))


# --- config -------------------------------------------------------------------------------------


def test_split_layout_covers_cache():
    for max_len in (1, 7, 300, 4096, 131072):
        for splits in (1, 3, 16, 64):
            for block_k in (16, 128):
                split_len, n = split_layout(max_len, splits, block_k)
                assert split_len % block_k == 0 and n <= splits
                assert (n - 1) * split_len < max_len <= n * split_len


def test_heuristic_config_fills_gpu():
    for s in BENCH_SHAPES:
        cfg = heuristic_config(s.batch, s.max_len, s.kv_heads, s.heads // s.kv_heads, s.head_dim)
        assert cfg.num_splits >= 1
        assert s.batch * s.kv_heads * cfg.num_splits >= 128
        assert cfg.num_stages * 2 * cfg.block_k * s.head_dim * 2 <= 200 * 1024
    fp32 = heuristic_config(4, 1000, 4, 4, 128, itemsize=4)
    assert fp32.num_stages * 2 * fp32.block_k * 128 * 4 <= 200 * 1024


# --- bad inputs ---------------------------------------------------------------------------------


def _good():
    return (
        jnp.zeros((2, 4, 16)),
        jnp.zeros((2, 8, 2, 16)),
        jnp.zeros((2, 8, 2, 16)),
        jnp.ones((2,), jnp.int32),
    )


@pytest.mark.parametrize(
    "which,bad,match",
    [
        (0, jnp.zeros((2, 16)), "q must be"),
        (1, jnp.zeros((2, 8, 16)), "k_cache must be"),
        (2, jnp.zeros((2, 9, 2, 16)), "v_cache shape"),
        (1, jnp.zeros((3, 8, 2, 16)), "k_cache shape"),
        (0, jnp.zeros((2, 3, 16)), "multiple of k_cache kv_heads"),
        (0, jnp.zeros((2, 4, 16), jnp.float16), "q dtype"),
        (0, jnp.zeros((2, 4, 16), jnp.bfloat16), "dtypes must agree"),
        (3, jnp.ones((3,), jnp.int32), "lengths must be"),
        (3, jnp.ones((2,), jnp.float32), "lengths dtype"),
    ],
)
def test_bad_inputs_raise(which, bad, match):
    args = list(_good())
    args[which] = bad
    with pytest.raises(ValueError, match=match):
        decode_attention(*args, interpret=True)


def test_bad_options_raise():
    args = _good()
    with pytest.raises(ValueError, match="softmax"):
        decode_attention(*args, softmax="fast", interpret=True)
    with pytest.raises(ValueError, match="phi"):
        decode_attention(*args, phi=jnp.zeros((3,)), interpret=True)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(*args, num_splits=0, interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(
            jnp.zeros((2, 4, 24)),
            jnp.zeros((2, 8, 2, 24)),
            jnp.zeros((2, 8, 2, 24)),
            args[3],
            interpret=True,
        )
    with pytest.raises(ValueError, match="fallback"):
        decode_attention(*args, fallback="host", interpret=True)
    with pytest.raises(ValueError, match="use_dot"):
        decode_attention(*args, config=DecodeConfig(use_dot=False), interpret=True)


# --- compiled kernels on the GPU ----------------------------------------------------------------

GPU_SHAPES = (
    DecodeShape(2, 1, 8, 8, 128),
    DecodeShape(3, 7, 32, 8, 128),
    DecodeShape(4, 4133, 32, 8, 128),
    DecodeShape(2, 2048, 16, 16, 64),
    DecodeShape(2, 3000, 8, 2, 128),
)


@pytest.mark.gpu
@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("softmax", MODES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.name)
def test_gpu_matches_float64_reference(shape, softmax, use_dot):
    if not use_dot and shape.heads != shape.kv_heads:
        pytest.skip("the vector path is MHA only")
    q, k, v, lengths = _inputs(shape, jnp.bfloat16, _rng())
    config = heuristic_config(
        shape.batch, shape.max_len, shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim
    )
    config = DecodeConfig(block_k=config.block_k, num_splits=config.num_splits, use_dot=use_dot)
    out = decode_attention(q, k, v, lengths, softmax=softmax, config=config, interpret=False)
    _assert_close(out, reference_f64(q, k, v, lengths), jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("softmax", MODES)
def test_gpu_adversarial_and_zero_rows(softmax, dtype):
    shape = DecodeShape(4, 1000, 16, 4, 128)
    q, k, v, lengths = _inputs(shape, dtype, _rng(), lengths=[1000, 0, 513, 1], q_scale=1000.0)
    out = decode_attention(q, k, v, lengths, softmax=softmax, interpret=False)
    assert (np.asarray(out[1], np.float32) == 0).all()
    s_max = float(
        np.abs(reference_logits(np.asarray(q, np.float32), np.asarray(k, np.float32))).max()
    )
    tol = 1e-6 * s_max if dtype == jnp.float32 else TOLERANCE[dtype]
    _assert_close(out, reference_f64(q, k, v, lengths), dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("softmax", MODES)
def test_gpu_bias_matches_float64_reference(softmax, use_dot):
    shape = DecodeShape(3, 3000, 8, 8 if not use_dot else 2, 128)
    rng = _rng()
    q, k, v, lengths = _inputs(shape, jnp.bfloat16, rng)
    bias = jnp.asarray(3 * rng.standard_normal((shape.batch, shape.heads, shape.max_len)))
    config = heuristic_config(
        shape.batch, shape.max_len, shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim
    )
    config = DecodeConfig(block_k=config.block_k, num_splits=config.num_splits, use_dot=use_dot)
    out = decode_attention(
        q, k, v, lengths, bias=bias, softmax=softmax, config=config, interpret=False
    )
    _assert_close(out, reference_f64(q, k, v, lengths, bias=bias), jnp.bfloat16)
