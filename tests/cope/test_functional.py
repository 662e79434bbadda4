"""cope.functional against float64 numpy references written from the definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cope import functional as F

# ---------------------------------------------------------------------------------------------
# float64 numpy references, loop over (batch, head, query) for clarity
# ---------------------------------------------------------------------------------------------


def allowed(b, i, j, t, s, causal, lengths):
    ok = True
    if causal:
        ok = j <= i + (s - t)
    if lengths is not None:
        ok = ok and j < lengths[b]
    return ok


def np_attention(q, k, v, *, causal, lengths=None, scale=None, bias=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    bsz, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = np.zeros((bsz, t, h, d))
    for b in range(bsz):
        for hh in range(h):
            kh = hh // (h // kvh)
            for i in range(t):
                idx = [j for j in range(s) if allowed(b, i, j, t, s, causal, lengths)]
                if not idx:
                    continue
                logits = np.array([q[b, i, hh] @ k[b, j, kh] for j in idx])
                if bias is not None:
                    logits = logits + np.asarray(bias, np.float64)[b, hh, i, idx]
                logits = logits * scale
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, i, hh] = p @ v[b, idx, kh]
    return out


def np_cope(q, k, v, e, *, causal, lengths=None, nodiv=False, gate_k=None, bias=None):
    """CoPE from the paper's definition: gates, inclusive suffix sums, clamp, interpolation."""
    q, k, v, e = (np.asarray(x, np.float64) for x in (q, k, v, e))
    gk = k if gate_k is None else np.asarray(gate_k, np.float64)
    bsz, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    npos = e.shape[0]
    out = np.zeros((bsz, t, h, d))
    for b in range(bsz):
        for hh in range(h):
            kh = hh // (h // kvh)
            for i in range(t):
                idx = [j for j in range(s) if allowed(b, i, j, t, s, causal, lengths)]
                if not idx:
                    continue
                gates = {
                    j: 1 / (1 + np.exp(-(q[b, i, hh] @ gk[b, j, kh]) / np.sqrt(d))) for j in idx
                }
                logits = []
                for j in idx:
                    p = min(sum(g for m, g in gates.items() if m >= j), npos - 1)
                    lo, hi = int(np.floor(p)), int(np.ceil(p))
                    w = p - lo
                    z = w * (q[b, i, hh] @ e[hi]) + (1 - w) * (q[b, i, hh] @ e[lo])
                    content = q[b, i, hh] @ k[b, j, kh]
                    if bias is not None:
                        content += np.asarray(bias, np.float64)[b, hh, i, j]
                    logits.append(content / np.sqrt(d) + z if nodiv else (content + z) / np.sqrt(d))
                logits = np.array(logits)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, i, hh] = p @ v[b, idx, kh]
    return out


def randn(key, shape, dtype=jnp.float32, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def fresh_keys(n):
    return jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), n)


CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, ragged)
    (2, 7, 7, 4, 4, 8, True, False),
    (2, 5, 9, 4, 2, 8, True, True),  # q_len < kv_len, GQA 4->2, ragged lengths
    (1, 1, 13, 8, 2, 16, True, False),  # one decode query
    (2, 6, 11, 4, 1, 8, False, True),  # not causal, GQA 4->1, ragged
]


def make_inputs(case, dtype=jnp.float32):
    b, t, s, h, kvh, d, causal, ragged = case
    ks = fresh_keys(5)
    q = randn(ks[0], (b, t, h, d), dtype)
    k = randn(ks[1], (b, s, kvh, d), dtype)
    v = randn(ks[2], (b, s, kvh, d), dtype)
    lengths = None
    if ragged:
        lengths = jax.random.randint(ks[3], (b,), s - 3, s + 1).astype(jnp.int32)
    return q, k, v, lengths, causal


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_float64_reference(case):
    q, k, v, lengths, causal = make_inputs(case)
    out = F.attention(q, k, v, causal=causal, lengths=lengths)
    ref = np_attention(
        q, k, v, causal=causal, lengths=None if lengths is None else np.asarray(lengths)
    )
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_attention_bias_and_scale():
    q, k, v, lengths, causal = make_inputs(CASES[1])
    bias = randn(fresh_keys(1)[0], (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    out = F.attention(q, k, v, causal=True, lengths=lengths, bias=bias, scale=0.3)
    ref = np_attention(q, k, v, causal=True, lengths=np.asarray(lengths), bias=bias, scale=0.3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_attention_zero_length_rows_are_zero():
    q, k, v, _, _ = make_inputs(CASES[0])
    out = F.attention(q, k, v, lengths=jnp.array([0, 3], jnp.int32))
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.abs(np.asarray(out[1])).sum() > 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("nodiv", [False, True])
def test_cope_matches_float64_reference(case, nodiv):
    q, k, v, lengths, causal = make_inputs(case)
    npos = 5  # small enough that long rows hit the clamp
    e = randn(fresh_keys(1)[0], (npos, q.shape[-1]))
    out = F.cope_attention(q, k, v, e, causal=causal, lengths=lengths, nodiv=nodiv)
    ref = np_cope(
        q,
        k,
        v,
        e,
        causal=causal,
        nodiv=nodiv,
        lengths=None if lengths is None else np.asarray(lengths),
    )
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)


def test_cope_separate_gate_keys_and_relative_bias():
    q, k, v, lengths, causal = make_inputs(CASES[1])
    ks = fresh_keys(3)
    e = randn(ks[0], (20, q.shape[-1]))
    gate_k = randn(ks[1], k.shape)
    bias = randn(ks[2], (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    out = F.cope_attention(q, k, v, e, lengths=lengths, gate_k=gate_k, bias=bias)
    ref = np_cope(q, k, v, e, causal=True, lengths=np.asarray(lengths), gate_k=gate_k, bias=bias)
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)


def test_all_open_gates_give_relative_positions():
    t = 9
    mask = F.attention_mask(t, t, causal=True)[0, 0]
    positions = F.cope_positions(mask.astype(jnp.float32), npos=100)
    i, j = np.indices((t, t))
    np.testing.assert_array_equal(np.asarray(positions), np.where(j <= i, i - j + 1, 0))


def test_positions_clamp_at_npos_minus_one():
    gates = jax.random.uniform(fresh_keys(1)[0], (3, 40, 40))
    positions = F.cope_positions(gates, npos=6)
    assert float(positions.max()) == 5.0
    unclamped = np.flip(np.cumsum(np.flip(np.asarray(gates), -1), -1), -1)
    np.testing.assert_allclose(positions, np.minimum(unclamped, 5.0), rtol=1e-5, atol=1e-5)


def test_interpolation_at_integers_and_midpoints():
    z = jnp.arange(6.0)[None, :] ** 2  # z[n] = n^2
    p = jnp.array([[0.0, 2.0, 2.5, 4.25, 5.0]])
    got = F.interpolate_position_logits(z, p)
    np.testing.assert_allclose(got, [[0.0, 4.0, 6.5, 16 * 0.75 + 25 * 0.25, 25.0]])


def test_cope_gradients_match_finite_differences():
    with jax.enable_x64(True):
        ks = fresh_keys(4)
        q = randn(ks[0], (1, 5, 2, 4), jnp.float64)
        k = randn(ks[1], (1, 5, 1, 4), jnp.float64)
        v = randn(ks[2], (1, 5, 1, 4), jnp.float64)
        e = randn(ks[3], (8, 4), jnp.float64)
        f = lambda q, k, v, e: F.cope_attention(q, k, v, e, causal=True)
        check_grads(f, (q, k, v, e), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
        out = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3))(q, k, v, e)
        assert all(np.isfinite(np.asarray(g)).all() for g in out)


def test_attention_gradients_match_finite_differences():
    with jax.enable_x64(True):
        ks = fresh_keys(3)
        q = randn(ks[0], (2, 4, 4, 4), jnp.float64)
        k = randn(ks[1], (2, 6, 2, 4), jnp.float64)
        v = randn(ks[2], (2, 6, 2, 4), jnp.float64)
        lengths = jnp.array([6, 4])
        f = lambda q, k, v: F.attention(q, k, v, causal=True, lengths=lengths)
        check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_bf16_in_bf16_out_and_close_to_fp32():
    q, k, v, lengths, _ = make_inputs(CASES[1], jnp.bfloat16)
    e = randn(fresh_keys(1)[0], (16, q.shape[-1]), jnp.bfloat16)
    for fn in (
        lambda *a: F.attention(*a[:3], lengths=lengths),
        lambda *a: F.cope_attention(*a, lengths=lengths),
    ):
        out = jax.jit(fn)(q, k, v, e)
        assert out.dtype == jnp.bfloat16
        ref = fn(*(x.astype(jnp.float32) for x in (q, k, v, e)))
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


def test_rope_scores_depend_only_on_distance():
    ks = fresh_keys(2)
    q = randn(ks[0], (1, 1, 1, 16))
    k = randn(ks[1], (1, 1, 1, 16))
    score = lambda i, j: float(jnp.sum(F.rope(q, jnp.array([i])) * F.rope(k, jnp.array([j]))))
    for i, j, shift in [(3, 1, 7), (10, 10, 100), (0, 5, 33)]:
        np.testing.assert_allclose(score(i, j), score(i + shift, j + shift), rtol=1e-4, atol=1e-4)
    assert abs(score(3, 1) - score(4, 1)) > 1e-3  # and it does depend on the distance
    np.testing.assert_allclose(F.rope(q, jnp.array([0])), q, atol=1e-6)  # position 0: identity


def test_relative_logits_cap_and_offset():
    ks = fresh_keys(2)
    q = randn(ks[0], (2, 3, 2, 4))
    r = randn(ks[1], (4, 4))
    s = 7
    got = np.asarray(F.relative_logits(q, r, s))
    offsets = np.array([1, 4])
    got_ragged = np.asarray(F.relative_logits(q, r, s, q_offset=jnp.asarray(offsets)))
    for b in range(2):
        for h in range(2):
            for i in range(3):
                for j in range(s):
                    dist = np.clip(i + (s - 3) - j, 0, 3)
                    np.testing.assert_allclose(
                        got[b, h, i, j], q[b, i, h] @ r[dist], rtol=1e-5, atol=1e-5
                    )
                    dist = np.clip(i + offsets[b] - j, 0, 3)
                    np.testing.assert_allclose(
                        got_ragged[b, h, i, j], q[b, i, h] @ r[dist], rtol=1e-5, atol=1e-5
                    )


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(q=(2, 3, 4)), "q must be"),
        (dict(k=(2, 5, 3, 8), v=(2, 5, 3, 8)), "multiple of kv heads"),
        (dict(v=(2, 4, 2, 8)), "v must have the shape of k"),
        (dict(k=(3, 5, 2, 8), v=(3, 5, 2, 8)), "share batch and head_dim"),
    ],
)
def test_bad_shapes_raise(args, message):
    shapes = dict(q=(2, 3, 4, 8), k=(2, 5, 2, 8), v=(2, 5, 2, 8)) | args
    arrays = {n: jnp.ones(s) for n, s in shapes.items()}
    with pytest.raises(ValueError, match=message):
        F.attention(**arrays)


def test_bad_arguments_raise():
    q, k, v = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 5, 2, 8)), jnp.ones((2, 5, 2, 8))
    with pytest.raises(ValueError, match="lengths must be"):
        F.attention(q, k, v, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="impl must be"):
        F.attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="pos_emb must be"):
        F.cope_attention(q, k, v, jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="impl='split_kv' cannot serve this call: no CoPE"):
        F.cope_attention(q, k, v, jnp.ones((5, 8)), impl="split_kv")
    with pytest.raises(ValueError, match="floating"):
        F.attention(q.astype(jnp.int32), k, v)


@pytest.mark.parametrize(
    "t, s, r, offset",
    [
        (5, 5, 8, None),
        (3, 7, 4, None),
        (1, 13, 20, None),
        (6, 4, 3, None),
        (4, 9, 4, 2),
        (4, 9, 100, -3),
        (2, 5, 5, 10),
        (3, 4, 6, -20),
        (3, 4, 2, 30),
    ],
)
def test_relative_logits_shift_equals_gather(t, s, r, offset):
    """The gather-free static-offset path equals the gather path (traced offsets)."""
    ks = fresh_keys(2)
    q = randn(ks[0], (2, t, 3, 4))
    table = randn(ks[1], (r, 4))
    static = F.relative_logits(q, table, s, q_offset=offset)
    traced = F.relative_logits(
        q, table, s, q_offset=jnp.full((2,), s - t if offset is None else offset)
    )
    np.testing.assert_array_equal(static, traced)
    grad = lambda off: jax.grad(
        lambda q: jnp.sum(F.relative_logits(q, table, s, q_offset=off) * jnp.arange(s))
    )(q)
    np.testing.assert_allclose(
        grad(offset),
        grad(jnp.full((2,), s - t if offset is None else offset)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_interpolation_gradient_follows_the_official_code():
    """d z(p)/dp = z[ceil p] - z[floor p]: zero at integers (ceil == floor), as in PyTorch."""
    z = jnp.array([[0.0, 1.0, 4.0, 9.0, 16.0]])
    p = jnp.array([[0.5, 2.0, 2.25, 4.0]])
    grad = jax.grad(lambda p: jnp.sum(F.interpolate_position_logits(z, p)))(p)
    np.testing.assert_allclose(grad, [[1.0, 0.0, 5.0, 0.0]])
    dz = jax.grad(lambda z: jnp.sum(F.interpolate_position_logits(z, p)))(z)
    np.testing.assert_allclose(dz, [[0.5, 0.5, 1.75, 0.25, 1.0]])
