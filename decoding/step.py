"""Prefill (one forward pass that fills the KV cache) and one cached decode step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope.model import ModelConfig, Transformer
from decoding.cache import KVCache
from pallas_kernels.decode_attention import SOFTMAX_MODES


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model`, the static and array halves that jitted functions take."""
    return nnx.split(model)


def merge_model(graphdef: nnx.GraphDef, state: nnx.State) -> Transformer:
    """Rebuilds the model inside a traced function, in eval mode (no dropout)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def check_softmax(softmax: str) -> None:
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")


def as_phi(phi, num_layers: int) -> jax.Array | None:
    """φ as float32 [num_layers] from None, a scalar or a per-layer array."""
    if phi is None:
        return None
    phi = jnp.asarray(phi, jnp.float32)
    if phi.ndim == 0:
        phi = jnp.broadcast_to(phi, (num_layers,))
    if phi.shape != (num_layers,):
        raise ValueError(
            f"phi must be a scalar or [num_layers]=({num_layers},), got shape {phi.shape}"
        )
    return phi


def _concrete(x) -> np.ndarray | None:
    """x as numpy when its value is known (not a tracer), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_prompts(
    cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array | None, max_len: int | None
) -> tuple[jax.Array, jax.Array, int]:
    """Validates prompts [B, T] and lengths [B]; returns (tokens, lengths int32, max_len)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"prompts must be an integer [batch, seq_len] array, "
            f"got {tokens.dtype} shape {tokens.shape}"
        )
    b, t = tokens.shape
    if t < 1:
        raise ValueError(f"prompts must hold at least one token, got shape {tokens.shape}")
    if max_len is None:
        max_len = t
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if t > max_len:
        raise ValueError(f"prompts of length {t} do not fit a cache of max_len={max_len}")
    if cfg.spec.absolute and t > cfg.max_len:
        raise ValueError(
            f"prompt length {t} exceeds the absolute position table "
            f"(ModelConfig.max_len={cfg.max_len})"
        )
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an integer [batch]=({b},) array, "
            f"got {lengths.dtype} shape {lengths.shape}"
        )
    values = _concrete(lengths)
    if values is not None and (values.min() < 1 or values.max() > t):
        raise ValueError(
            f"lengths must be in [1, {t}] (the prompt width), "
            f"got min {values.min()} max {values.max()}"
        )
    ids = _concrete(tokens)
    if ids is not None and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(
            f"prompt token ids must be in [0, {cfg.vocab_size}), "
            f"got min {ids.min()} max {ids.max()}"
        )
    return tokens.astype(jnp.int32), lengths.astype(jnp.int32), max_len


def prefill_fn(
    model: Transformer,
    tokens: jax.Array,
    lengths: jax.Array,
    max_len: int,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Traceable prefill: tokens [B, T], lengths [B] -> (logits [B, T, V], cache); with
    `last_only` the logits are [B, V], those of each row's last prompt token."""
    cache = KVCache.create(model.cfg, tokens.shape[0], max_len)
    logits_at = lengths - 1 if last_only else None
    return model(tokens, lengths=lengths, cache=cache, logits_at=logits_at)


def decode_fn(
    model: Transformer,
    cache: KVCache,
    tokens: jax.Array,
    advance: jax.Array,
    *,
    softmax: str,
    phi: jax.Array | None,
) -> tuple[jax.Array, KVCache]:
    """Traceable decode step for one new token per row.

    tokens [B] are written at index cache.lengths[b] (their absolute position) in every layer;
    rows with advance[b] False (finished) do not grow: their query still runs but its output is
    meaningless and their lengths stay. Returns (logits [B, V] float32, updated cache).
    """
    logits, cache = model(
        tokens[:, None],
        lengths=advance.astype(jnp.int32),
        cache=cache,
        softmax=softmax,
        phi=phi,
    )
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_len",))
def _prefill_jit(graphdef, state, tokens, lengths, *, max_len):
    return prefill_fn(merge_model(graphdef, state), tokens, lengths, max_len)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("softmax",))
def _decode_jit(graphdef, state, cache, tokens, advance, phi, *, softmax):
    return decode_fn(merge_model(graphdef, state), cache, tokens, advance, softmax=softmax, phi=phi)


def prefill(
    model: Transformer,
    tokens: jax.Array,
    lengths: jax.Array | None = None,
    *,
    max_len: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """One forward pass over right-padded prompts that also fills a KV cache.

    Args:
      model: the Transformer (run in eval mode: no dropout).
      tokens: [B, T] int prompts, right-padded.
      lengths: [B] int in [1, T], the prompt lengths; None means all T.
      max_len: cache capacity (>= T), default T.

    Returns:
      (logits [B, T, V] float32, equal to `model(tokens, lengths=lengths)`, and a KVCache with
      `lengths` valid entries per row). Attention runs with the model's `attention_impl`
      (`cope.backends.attend` picks the backend).
    """
    tokens, lengths, max_len = check_prompts(model.cfg, tokens, lengths, max_len)
    graphdef, state = split_model(model)
    return _prefill_jit(graphdef, state, tokens, lengths, max_len=max_len)


def decode_step(
    model: Transformer,
    cache: KVCache,
    tokens: jax.Array,
    *,
    softmax: str = "unified_max",
    phi=None,
) -> tuple[jax.Array, KVCache]:
    """Appends one token per row to the cache and returns the next-token logits.

    Args:
      model: the Transformer the cache was filled with.
      cache: a KVCache whose row b holds lengths[b] < max_len entries.
      tokens: [B] int, the new tokens (position lengths[b] of their row).
      softmax: the split-KV kernel's mode, "unified_max" or "online".
      phi: the kernel's unified max per layer (scalar or [num_layers]); None: kernel default.

    Returns:
      (logits [B, V] float32, the cache with every row one longer).
    """
    cfg = model.cfg
    check_softmax(softmax)
    tokens = jnp.asarray(tokens)
    if tokens.shape != (cache.batch,) or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an integer [batch]=({cache.batch},) array, "
            f"got {tokens.dtype} shape {tokens.shape}"
        )
    if cache.num_layers != cfg.num_layers:
        raise ValueError(f"cache has {cache.num_layers} layers, the model {cfg.num_layers}")
    lengths = _concrete(cache.lengths)
    if lengths is not None and lengths.max() >= cache.max_len:
        raise ValueError(
            f"cannot decode past the cache: a row holds {lengths.max()} entries "
            f"and max_len={cache.max_len}"
        )
    if lengths is not None and cfg.spec.absolute and lengths.max() >= cfg.max_len:
        raise ValueError(
            f"position {lengths.max()} exceeds the absolute position table "
            f"(ModelConfig.max_len={cfg.max_len})"
        )
    graphdef, state = split_model(model)
    advance = jnp.ones((cache.batch,), bool)
    return _decode_jit(
        graphdef,
        state,
        cache,
        tokens.astype(jnp.int32),
        advance,
        as_phi(phi, cfg.num_layers),
        softmax=softmax,
    )
