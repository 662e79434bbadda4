"""Token samplers `(key, logits [B, V]) -> ids [B]`: greedy, temperature, top-k, top-p.

Samplers are frozen dataclasses, so equal settings hash equal and a jitted generation loop that
takes one as a static argument compiles once per setting. Temperature is applied first; top-k
and top-p then restrict the tempered distribution (the Hugging Face order).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _check_temperature(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {t!r}")
    return float(t)


def _argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _check_logits(logits: jax.Array) -> None:
    if logits.ndim != 2:
        raise ValueError(f"sampler logits must be [batch, vocab], got shape {logits.shape}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token."""

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        _check_logits(logits)
        return _argmax(logits)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Samples from softmax(logits / t); t = 0 is greedy."""

    t: float

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        _check_logits(logits)
        if self.t == 0:
            return _argmax(logits)
        return jax.random.categorical(key, logits.astype(jnp.float32) / self.t).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Samples among the k most likely tokens, from softmax(logits / t) renormalised."""

    k: int
    t: float = 1.0

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        _check_logits(logits)
        if self.k > logits.shape[-1]:
            raise ValueError(f"top_k: k={self.k} exceeds the vocabulary ({logits.shape[-1]})")
        values, ids = jax.lax.top_k(logits.astype(jnp.float32), self.k)  # [B, k]
        if self.t == 0:
            return ids[:, 0].astype(jnp.int32)
        choice = jax.random.categorical(key, values / self.t)  # [B]
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely tokens whose tempered mass reaches p."""

    p: float
    t: float = 1.0

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        _check_logits(logits)
        if self.t == 0:
            return _argmax(logits)
        scaled = logits.astype(jnp.float32) / self.t
        order = jnp.argsort(-scaled, axis=-1)  # [B, V], most likely first
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The first token always stays (mass_before = 0 < p); a token stays while the mass
        # of the tokens ranked above it is still short of p.
        ranked = jnp.where(mass_before < self.p, ranked, -jnp.inf)
        choice = jax.random.categorical(key, ranked)  # [B]
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def greedy() -> Greedy:
    """Argmax sampler."""
    return Greedy()


def temperature(t: float) -> Temperature:
    """Samples from softmax(logits / t); `t` >= 0, 0 meaning greedy."""
    return Temperature(_check_temperature(t))


def top_k(k: int, t: float = 1.0) -> TopK:
    """Samples among the `k` >= 1 most likely tokens at temperature `t`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k: k must be a positive int, got {k!r}")
    return TopK(k, _check_temperature(t))


def top_p(p: float, t: float = 1.0) -> TopP:
    """Nucleus sampler: `p` in (0, 1] is the probability mass kept, `t` the temperature."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"top_p: p must be in (0, 1], got {p!r}")
    return TopP(float(p), _check_temperature(t))
