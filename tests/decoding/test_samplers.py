"""Samplers: top-k/top-p support, temperature -> 0 is greedy, determinism, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import samplers

B, V = 64, 50


def random_logits(scale=3.0):
    return scale * jax.random.normal(jax.random.key(np.random.randint(2**31)), (B, V))


def draws(sampler, logits, n=20):
    keys = jax.random.split(jax.random.key(np.random.randint(2**31)), n)
    return np.stack([np.asarray(jax.jit(sampler)(k, logits)) for k in keys])  # [n, B]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_never_leaves_the_top_k(k):
    logits = random_logits()
    ids = draws(samplers.top_k(k, 2.0), logits)
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]  # [B, k]
    assert all(np.isin(ids[:, b], top[b]).all() for b in range(B))
    if k == 1:
        assert (ids == np.argmax(logits, -1)).all()


@pytest.mark.parametrize("p,t", [(0.5, 1.0), (0.9, 0.7), (0.3, 2.0)])
def test_top_p_stays_in_the_nucleus(p, t):
    logits = random_logits()
    ids = draws(samplers.top_p(p, t), logits)
    scaled = np.asarray(logits, np.float64) / t
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(B):
        # Mass of the tokens strictly more likely than the drawn one must be short of p.
        mass_above = np.array([probs[b][probs[b] > probs[b, i]].sum() for i in ids[:, b]])
        assert (mass_above < p + 1e-5).all()


def test_top_p_one_can_reach_every_token():
    logits = jnp.zeros((B, 4))
    ids = draws(samplers.top_p(1.0), logits, n=10)
    assert set(np.unique(ids)) == {0, 1, 2, 3}


def test_temperature_to_zero_is_greedy():
    logits = random_logits()
    greedy = np.asarray(samplers.greedy()(None, logits))
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    for sampler in (
        samplers.temperature(1e-6),
        samplers.temperature(0.0),
        samplers.top_k(5, 0.0),
        samplers.top_p(0.9, 0.0),
        samplers.top_p(0.9, 1e-6),
    ):
        assert (draws(sampler, logits, n=3) == greedy).all(), sampler


def test_same_key_same_draw():
    logits = random_logits(1.0)
    key = jax.random.key(7)
    for sampler in (samplers.temperature(1.0), samplers.top_k(10), samplers.top_p(0.95)):
        a, b = sampler(key, logits), sampler(key, logits)
        np.testing.assert_array_equal(a, b)
        c = sampler(jax.random.key(8), logits)
        assert (np.asarray(a) != np.asarray(c)).any()
        assert a.shape == (B,) and a.dtype == jnp.int32


def test_samplers_hash_by_value():
    assert samplers.top_p(0.9, 0.5) == samplers.top_p(0.9, 0.5)
    assert hash(samplers.top_k(3)) == hash(samplers.top_k(3))


@pytest.mark.parametrize(
    "make",
    [
        lambda: samplers.top_k(0),
        lambda: samplers.top_k(2.5),
        lambda: samplers.top_k(3, -1.0),
        lambda: samplers.top_p(0.0),
        lambda: samplers.top_p(1.5),
        lambda: samplers.temperature(-0.1),
        lambda: samplers.temperature(float("nan")),
    ],
)
def test_bad_sampler_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_top_k_larger_than_vocab_raises():
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        samplers.top_k(V + 1)(jax.random.key(0), random_logits())
