"""One NaN/inf policy for every attention implementation (README, "The attention API").

Masked keys (padding past `lengths`, future keys under the causal mask) never reach an output or
a gradient, whatever they hold; a NaN or inf at an allowed pair makes exactly the rows that see
it NaN; a row with no allowed key is zeros. Each implementation is one `Impl` line in IMPLS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cope import functional as F
from pallas_kernels import decode_attention, flash_attention
from pallas_kernels.cope_attention import cope_attention
from pallas_kernels.cope_attention.config import BackwardConfig
from pallas_kernels.decode_attention import DecodeConfig


@dataclasses.dataclass(frozen=True)
class Mode:
    """One call shape: q [B, T, H, D], k/v [B, S, K, D], ragged `lengths`, causal or not."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    lengths: tuple[int, ...]
    causal: bool


MODES = {
    # Causal prefill, GQA 4:2; 16-key blocks give the kernels masked and unmasked blocks.
    "prefill": Mode(2, 20, 20, 4, 2, 16, (20, 13), causal=True),
    # One new query per row against a cache, masked by lengths alone (a decode step).
    "decode": Mode(2, 1, 40, 4, 2, 16, (40, 23), causal=False),
    "decode_mha": Mode(2, 1, 40, 2, 2, 16, (40, 23), causal=False),
}
POS_EMB = jnp.asarray(np.random.default_rng().standard_normal((6, 16)), jnp.float32)  # [N, D]
BLOCKS = {f"block_{n}": 16 for n in ("q", "k", "q_dq", "k_dq", "q_dkv", "k_dkv")}
COPE_BLOCKS = {"block_q": 16, "block_k": 16, "backward_config": BackwardConfig(16, 16)}


@dataclasses.dataclass(frozen=True)
class Impl:
    """fn(q [B, T, H, D], k, v [B, S, K, D], lengths [B], causal) -> [B, T, H, D]."""

    name: str
    fn: Callable
    modes: tuple[str, ...]
    grad: bool = True  # differentiable (custom_vjp or plain jnp)


def _decode(softmax: str, splits: int, fallback: str = "kernel", use_dot: bool = True):
    config = DecodeConfig(block_k=16, num_splits=splits, use_dot=use_dot)

    def fn(q, k, v, lengths, causal):
        assert not causal and q.shape[1] == 1
        out = decode_attention(
            q[:, 0], k, v, lengths, softmax=softmax, config=config, fallback=fallback
        )
        return out[:, None]

    return fn


IMPLS = (
    Impl(
        "xla",
        lambda q, k, v, lengths, causal: F.attention(
            q, k, v, causal=causal, lengths=lengths, impl="xla"
        ),
        ("prefill", "decode", "decode_mha"),
    ),
    Impl(
        "xla_cope",
        lambda q, k, v, lengths, causal: F.cope_attention(
            q, k, v, POS_EMB, causal=causal, lengths=lengths, impl="xla"
        ),
        ("prefill", "decode"),
    ),
    Impl(
        "flash",
        lambda q, k, v, lengths, causal: flash_attention(
            q, k, v, causal=causal, lengths=lengths, **BLOCKS
        ),
        ("prefill", "decode"),
    ),
    Impl(
        "cope_flash",
        lambda q, k, v, lengths, causal: cope_attention(
            q, k, v, POS_EMB, causal=causal, lengths=lengths, **COPE_BLOCKS
        ),
        ("prefill", "decode"),
    ),
    Impl("decode_online", _decode("online", 1), ("decode",), grad=False),
    Impl("decode_online_split", _decode("online", 3), ("decode",), grad=False),
    Impl("decode_unified", _decode("unified_max", 1), ("decode",), grad=False),
    Impl("decode_unified_split", _decode("unified_max", 3), ("decode",), grad=False),
    Impl("decode_unified_cond", _decode("unified_max", 3, "cond"), ("decode",), grad=False),
    Impl("decode_vector", _decode("unified_max", 3, use_dot=False), ("decode_mha",), grad=False),
)
PAIRS = [pytest.param(i, m, id=f"{i.name}-{m}") for i in IMPLS for m in i.modes]
GRAD_PAIRS = [p for p in PAIRS if p.values[0].grad]
CAUSAL_PAIRS = [p for p in PAIRS if MODES[p.values[1]].causal]
BAD = (np.nan, np.inf, -np.inf)
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32: the same program on the same allowed inputs

_compiled: dict = {}


def _run(impl: Impl, mode: str, q, k, v, lengths=None):
    """The implementation's float64 output [B, T, H, D] (one jit per implementation and mode)."""
    m = MODES[mode]
    key = (impl.name, mode, "fwd")
    if key not in _compiled:
        _compiled[key] = jax.jit(lambda q, k, v, n: impl.fn(q, k, v, n, m.causal))
    lengths = np.asarray(m.lengths) if lengths is None else lengths
    out = _compiled[key](*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(lengths, jnp.int32))
    return np.asarray(out, np.float64)


def _grads(impl: Impl, mode: str, q, k, v, weight, lengths=None):
    """d Σ(out · weight) / d(q, k, v), float64."""
    m = MODES[mode]
    key = (impl.name, mode, "grad")
    if key not in _compiled:

        def loss(q, k, v, n, w):
            return jnp.sum(impl.fn(q, k, v, n, m.causal) * w)

        _compiled[key] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    lengths = np.asarray(m.lengths) if lengths is None else lengths
    args = (*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(lengths, jnp.int32))
    return tuple(np.asarray(g, np.float64) for g in _compiled[key](*args, jnp.asarray(weight)))


def _inputs(mode: str):
    """Fresh float32 numpy q [B, T, H, D], k, v [B, S, K, D] and a cotangent like q."""
    m, rng = MODES[mode], np.random.default_rng()
    q = rng.standard_normal((m.batch, m.q_len, m.heads, m.head_dim)).astype(np.float32)
    k, v = (
        rng.standard_normal((m.batch, m.kv_len, m.kv_heads, m.head_dim)).astype(np.float32)
        for _ in range(2)
    )
    return q, k, v, rng.standard_normal(q.shape).astype(np.float32)


def _poison_padding(x: np.ndarray, lengths, shift: int = 0) -> np.ndarray:
    """x with NaN, inf or -inf in one component of every key past the length (the last one all
    NaN): the kinds that leak through 0·x or read as a masked -inf."""
    x = x.copy()
    for b, n in enumerate(lengths):
        for j in range(n, x.shape[1]):
            x[b, j, :, (j + shift) % x.shape[3]] = BAD[(j + shift) % 3]
        if n < x.shape[1]:
            x[b, -1] = np.nan
    return x


def _assert_rows(out: np.ndarray, clean: np.ndarray, nan_rows: np.ndarray) -> None:
    """Rows marked in nan_rows [B, T, H] are NaN in every column; every other row is finite and
    equals the clean run."""
    assert np.isnan(out[nan_rows]).all(), "a row that sees the bad value is not all NaN"
    keep = ~nan_rows
    assert np.isfinite(out[keep]).all(), "a row that does not see the bad value is not finite"
    np.testing.assert_allclose(out[keep], clean[keep], **TOL)


@pytest.mark.parametrize("impl, mode", PAIRS)
def test_padding_never_reaches_the_output(impl, mode):
    q, k, v, _ = _inputs(mode)
    lengths = MODES[mode].lengths
    clean = _run(impl, mode, q, k, v)
    out = _run(impl, mode, q, _poison_padding(k, lengths), _poison_padding(v, lengths, 1))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, clean, **TOL)


@pytest.mark.parametrize("impl, mode", GRAD_PAIRS)
def test_padding_never_reaches_the_gradients(impl, mode):
    q, k, v, w = _inputs(mode)
    lengths = MODES[mode].lengths
    clean = _grads(impl, mode, q, k, v, w)
    grads = _grads(impl, mode, q, _poison_padding(k, lengths), _poison_padding(v, lengths, 1), w)
    for name, g, ref in zip("qkv", grads, clean, strict=True):
        assert np.isfinite(g).all(), f"d{name} is not finite"
        np.testing.assert_allclose(g, ref, **TOL, err_msg=f"d{name}")
    for g in grads[1:]:  # padded keys and values get exact zeros
        for b, n in enumerate(lengths):
            assert not g[b, n:].any()


@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("impl, mode", CAUSAL_PAIRS)
def test_a_future_key_never_reaches_earlier_rows(impl, mode, tensor):
    m = MODES[mode]
    q, k, v, w = _inputs(mode)
    key, kv_head, group = 9, m.kv_heads - 1, m.heads // m.kv_heads
    bad = {"k": k.copy(), "v": v.copy()}
    bad[tensor][0, key, kv_head, 0] = np.nan
    nan_rows = np.zeros((m.batch, m.q_len, m.heads), bool)
    nan_rows[0, key - (m.kv_len - m.q_len) :, kv_head * group : (kv_head + 1) * group] = True
    _assert_rows(_run(impl, mode, q, bad["k"], bad["v"]), _run(impl, mode, q, k, v), nan_rows)
    if impl.grad:  # the rows before the key: their gradients are those of clean inputs
        w_early = np.zeros_like(w)
        w_early[0, :key] = w[0, :key]
        dq = _grads(impl, mode, q, bad["k"], bad["v"], w_early)[0]
        dq_clean = _grads(impl, mode, q, k, v, w_early)[0]
        assert np.isfinite(dq[:, :key]).all()
        np.testing.assert_allclose(dq[:, :key], dq_clean[:, :key], **TOL)


@pytest.mark.parametrize("impl, mode", [p for p in CAUSAL_PAIRS if p.values[0].grad])
def test_a_nan_query_never_reaches_the_keys_it_cannot_see(impl, mode):
    """The NaN row is left out of the loss: the keys after it and the other rows keep the
    gradients of clean inputs."""
    m = MODES[mode]
    q, k, v, w = _inputs(mode)
    row, head = m.q_len // 3, m.heads - 1
    bad = q.copy()
    bad[0, row, head] = np.nan
    w[0, row, head] = 0.0
    clean = _grads(impl, mode, q, k, v, w)
    grads = _grads(impl, mode, bad, k, v, w)
    other_rows = np.ones(q.shape[:3], bool)
    other_rows[0, row, head] = False
    np.testing.assert_allclose(grads[0][other_rows], clean[0][other_rows], **TOL)
    later = row + 1 + (m.kv_len - m.q_len)  # the first key the NaN row may not see
    for name, g, ref in zip("kv", grads[1:], clean[1:], strict=True):
        for part, part_ref in ((g[0, later:], ref[0, later:]), (g[1], ref[1])):
            assert np.isfinite(part).all(), f"d{name} is not finite"
            np.testing.assert_allclose(part, part_ref, **TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
@pytest.mark.parametrize("impl, mode", PAIRS)
def test_a_nonfinite_allowed_value_makes_exactly_its_rows_nan(impl, mode, tensor):
    """One component of one query, or of one valid key or value, set to NaN, inf or -inf (a
    single inf gives -inf logits for part of the rows, which a softmax would silently drop)."""
    m = MODES[mode]
    q, k, v, _ = _inputs(mode)
    clean = _run(impl, mode, q, k, v)
    group = m.heads // m.kv_heads
    nan_rows = np.zeros((m.batch, m.q_len, m.heads), bool)
    if tensor == "q":
        row = m.q_len // 3
        nan_rows[0, row, m.heads - 1] = True
    else:
        key = 3  # valid in every row of batch 0 from query key - (S - T) on
        first_row = max(0, key - (m.kv_len - m.q_len)) if m.causal else 0
        nan_rows[0, first_row:, (m.kv_heads - 1) * group :] = True
    for value in BAD:
        bad = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
        if tensor == "q":
            bad["q"][0, row, m.heads - 1, 0] = value
        else:
            bad[tensor][0, key, m.kv_heads - 1, 0] = value
        _assert_rows(_run(impl, mode, bad["q"], bad["k"], bad["v"]), clean, nan_rows)


@pytest.mark.parametrize("impl, mode", PAIRS)
def test_a_row_without_allowed_keys_is_zeros_whatever_it_holds(impl, mode):
    m = MODES[mode]
    q, k, v, w = _inputs(mode)
    lengths = (0, *m.lengths[1:])
    clean = _run(impl, mode, q, k, v, lengths)
    bad = [x.copy() for x in (q, k, v)]
    for x in bad:
        x[0] = np.nan
    out = _run(impl, mode, *bad, lengths)
    assert (out[0] == 0).all()
    np.testing.assert_allclose(out[1:], clean[1:], **TOL)
    if impl.grad:
        grads = _grads(impl, mode, *bad, w, lengths)
        for name, g in zip("qkv", grads, strict=True):
            assert np.isfinite(g).all(), f"d{name} is not finite"
            assert not g[0].any(), f"d{name} of the empty sequence is not zero"


# -------------------------------------------------------------------------------------------
# Input validation of the same public functions
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", ["S", "D", "K"])
@pytest.mark.parametrize("impl, mode", PAIRS)
def test_an_empty_dimension_is_a_one_line_value_error(impl, mode, dim):
    m = MODES[mode]
    s = 0 if dim == "S" else m.kv_len
    d = 0 if dim == "D" else m.head_dim
    kv = 0 if dim == "K" else m.kv_heads
    q = jnp.zeros((m.batch, m.q_len, m.heads, d))
    k = jnp.zeros((m.batch, s, kv, d))
    with pytest.raises(ValueError) as error:
        impl.fn(q, k, k, jnp.zeros((m.batch,), jnp.int32), m.causal)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("impl, mode", PAIRS)
def test_lengths_as_a_python_list(impl, mode):
    q, k, v, _ = _inputs(mode)
    m = MODES[mode]
    out = impl.fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), list(m.lengths), m.causal)
    np.testing.assert_allclose(np.asarray(out, np.float64), _run(impl, mode, q, k, v), **TOL)


def test_queries_as_python_lists():
    q, k, v, _ = _inputs("decode")
    lengths = list(MODES["decode"].lengths)
    ref = F.attention(q, k, v, causal=False, lengths=np.asarray(lengths))
    np.testing.assert_allclose(F.attention(q.tolist(), k, v, causal=False, lengths=lengths), ref)
    np.testing.assert_allclose(
        flash_attention(q.tolist(), k, v, causal=False, lengths=lengths), ref, **TOL
    )
    out = decode_attention(q[:, 0].tolist(), k, v, lengths, softmax="online")
    np.testing.assert_allclose(out, ref[:, 0], **TOL)


def test_bad_encoding_arguments_raise():
    q, k, v, _ = _inputs("prefill")
    with pytest.raises(ValueError, match="pos_emb"):
        F.cope_attention(q, k, v, jnp.zeros((0, q.shape[-1])))
    with pytest.raises(ValueError, match="bias"):
        F.attention(q, k, v, bias=jnp.zeros((1, 1, q.shape[1], k.shape[1] + 1)))
    with pytest.raises(ValueError, match="bias"):
        F.attention(q, k, v, bias=jnp.zeros((3, 1, q.shape[1], k.shape[1])))
    with pytest.raises(ValueError, match="floating"):
        F.rope(jnp.ones(q.shape, jnp.int32), jnp.arange(q.shape[1]))
    with pytest.raises(ValueError, match="rel_emb"):
        F.relative_logits(q, jnp.zeros((0, q.shape[-1])), k.shape[1])
