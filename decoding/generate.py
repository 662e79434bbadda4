"""On-device autoregressive generation: cached (prefill + while_loop of decode steps) and the
no-cache recomputation baseline."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cope.model import ModelConfig, Transformer
from decoding.samplers import greedy
from decoding.step import (
    as_phi,
    check_prompts,
    check_softmax,
    decode_fn,
    merge_model,
    prefill_fn,
    split_model,
)

Sampler = Callable[[jax.Array, jax.Array], jax.Array]


class Generation(NamedTuple):
    """Output of `generate`: the new tokens only (the prompts are not repeated)."""

    tokens: jax.Array  # [batch, max_new_tokens] int32; pad_id after a row's EOS
    lengths: jax.Array  # [batch] int32, new tokens per row, the EOS included
    finished: jax.Array  # [batch] bool, True where the row emitted eos_id


def _key(seed) -> jax.Array:
    if isinstance(seed, int):
        return jax.random.key(seed)
    return seed


def _check_generation(
    cfg: ModelConfig, prompts, lengths, max_new_tokens, max_len, eos_id, pad_id, sampler
) -> tuple[jax.Array, jax.Array, int, int]:
    """Validates everything `generate` takes; returns (prompts, lengths, max_len, pad_id)."""
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (not isinstance(value, int) or not 0 <= value < cfg.vocab_size):
            raise ValueError(
                f"{name} must be None or an int in [0, {cfg.vocab_size}), got {value!r}"
            )
    if not callable(sampler):
        raise ValueError(
            f"sampler must be a function (key, logits [B, V]) -> ids [B], got {sampler!r}"
        )
    t = jnp.shape(prompts)[-1] if jnp.ndim(prompts) == 2 else 0
    if max_len is None:
        max_len = t + max_new_tokens
    prompts, lengths, max_len = check_prompts(cfg, prompts, lengths, max_len)
    longest = t
    if not isinstance(lengths, jax.core.Tracer):
        longest = int(jnp.max(lengths))
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"generation past max_len: a prompt of length {longest} plus "
            f"max_new_tokens={max_new_tokens} exceeds the cache (max_len={max_len})"
        )
    if cfg.spec.absolute and longest + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"generation past the absolute position table: prompt length {longest} "
            f"+ max_new_tokens={max_new_tokens} > ModelConfig.max_len={cfg.max_len}"
        )
    pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
    return prompts, lengths, max_len, pad_id


def _num_steps(num_steps, max_new_tokens: int) -> jax.Array:
    if num_steps is None:
        num_steps = max_new_tokens
    if isinstance(num_steps, int) and not 1 <= num_steps <= max_new_tokens:
        raise ValueError(
            f"num_steps must be in [1, max_new_tokens={max_new_tokens}], got {num_steps}"
        )
    return jnp.asarray(num_steps, jnp.int32)


class _Emit(NamedTuple):
    tokens: jax.Array  # [B] int32, the tokens just emitted
    finished: jax.Array  # [B] bool
    out: jax.Array  # [B, max_new_tokens] int32
    count: jax.Array  # [B] int32


def _emit(
    step: jax.Array,
    logits: jax.Array,
    state: _Emit,
    key: jax.Array,
    sampler: Sampler,
    eos_id: int | None,
    pad_id: int,
) -> _Emit:
    """Samples token number `step` of every row from logits [B, V]; finished rows emit pad."""
    tokens = sampler(jax.random.fold_in(key, step), logits).astype(jnp.int32)
    tokens = jnp.where(state.finished, pad_id, tokens)
    out = state.out.at[:, step].set(tokens)
    count = state.count + (~state.finished).astype(jnp.int32)
    finished = state.finished
    if eos_id is not None:
        finished = finished | (tokens == eos_id)
    return _Emit(tokens, finished, out, count)


def _start(batch: int, max_new_tokens: int, pad_id: int) -> _Emit:
    return _Emit(
        tokens=jnp.zeros((batch,), jnp.int32),
        finished=jnp.zeros((batch,), bool),
        out=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        count=jnp.zeros((batch,), jnp.int32),
    )


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("max_new_tokens", "max_len", "sampler", "eos_id", "pad_id", "softmax"),
)
def _generate_jit(
    graphdef,
    state,
    prompts,
    lengths,
    key,
    phi,
    num_steps,
    *,
    max_new_tokens,
    max_len,
    sampler,
    eos_id,
    pad_id,
    softmax,
):
    model = merge_model(graphdef, state)
    logits, cache = prefill_fn(model, prompts, lengths, max_len, last_only=True)
    emitted = _emit(
        0, logits, _start(prompts.shape[0], max_new_tokens, pad_id), key, sampler, eos_id, pad_id
    )

    def cond(carry) -> jax.Array:
        step, _, emitted = carry
        return (step < num_steps) & ~jnp.all(emitted.finished)

    def body(carry):
        step, cache, emitted = carry
        # The token just emitted is fed back; rows that finished (EOS) stop growing.
        logits, cache = decode_fn(
            model, cache, emitted.tokens, ~emitted.finished, softmax=softmax, phi=phi
        )
        return step + 1, cache, _emit(step, logits, emitted, key, sampler, eos_id, pad_id)

    _, _, emitted = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, emitted))
    return Generation(emitted.out, emitted.count, emitted.finished)


def generate(
    model: Transformer,
    prompts: jax.Array,
    lengths: jax.Array | None = None,
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    seed: int | jax.Array = 0,
    max_len: int | None = None,
    softmax: str = "unified_max",
    phi=None,
    num_steps: int | jax.Array | None = None,
) -> Generation:
    """Generates up to `max_new_tokens` per row on device: prefill, then a `lax.while_loop` of
    jitted decode steps (no per-token Python).

    Args:
      model: the Transformer (run in eval mode).
      prompts: [B, T] int, right-padded; row b continues from its own length.
      lengths: [B] int in [1, T]; None means all T.
      max_new_tokens: tokens to generate per row (the loop stops early once every row is done).
      sampler: `(key, logits [B, V]) -> ids [B]`, e.g. `samplers.top_p(0.9)`; default greedy.
        Use the `decoding.samplers` factories: a fresh closure per call recompiles.
      eos_id: rows that emit it stop (they emit `pad_id` afterwards and their cache stops).
      pad_id: filler after EOS; default eos_id, or 0 without EOS.
      seed: int or PRNG key; step i samples with `fold_in(key, i)`, so a seed fixes the output.
      max_len: cache capacity, default T + max_new_tokens; max(lengths) + max_new_tokens must
        fit in it (and in ModelConfig.max_len for absolute/sinusoidal encodings).
      softmax: the split-KV kernels' mode, "unified_max" (FlashDecoding++) or "online". Which
        backend serves prefill and each step is the model's `attention_impl` (on a GPU "auto"
        takes the kernels that cover the encoding; `cope.model.attention_backends` says which).
      phi: the kernel's unified max per layer, scalar or [num_layers] (see `calibrate`); None
        uses the kernel's default.
      num_steps: emit only the first `num_steps` <= max_new_tokens tokens (the rest is pad); a
        traced bound, so it does not recompile: the benchmark times prefill with num_steps=1.

    Returns:
      Generation(tokens [B, max_new_tokens], lengths [B], finished [B]).
    """
    cfg = model.cfg
    sampler = greedy() if sampler is None else sampler
    prompts, lengths, max_len, pad_id = _check_generation(
        cfg, prompts, lengths, max_new_tokens, max_len, eos_id, pad_id, sampler
    )
    check_softmax(softmax)
    graphdef, state = split_model(model)
    return _generate_jit(
        graphdef,
        state,
        prompts,
        lengths,
        _key(seed),
        as_phi(phi, cfg.num_layers),
        _num_steps(num_steps, max_new_tokens),
        max_new_tokens=max_new_tokens,
        max_len=max_len,
        sampler=sampler,
        eos_id=eos_id,
        pad_id=pad_id,
        softmax=softmax,
    )


@functools.partial(
    jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "sampler", "eos_id", "pad_id")
)
def _generate_uncached_jit(
    graphdef, state, prompts, lengths, key, num_steps, *, max_new_tokens, sampler, eos_id, pad_id
):
    model = merge_model(graphdef, state)
    b, t = prompts.shape
    width = t + max_new_tokens
    buffer = jnp.pad(prompts, ((0, 0), (0, max_new_tokens)))  # [B, T + N]
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))

    def next_logits(buffer: jax.Array, lengths: jax.Array) -> jax.Array:
        # The model's full forward over the whole buffer (no cache); only the head is applied
        # to the last valid position, as [B, T + N, V] float32 logits would not fit at B = 64.
        return model(buffer, lengths=lengths, positions=positions, logits_at=lengths - 1)

    emitted = _emit(
        0,
        next_logits(buffer, lengths),
        _start(b, max_new_tokens, pad_id),
        key,
        sampler,
        eos_id,
        pad_id,
    )

    def cond(carry) -> jax.Array:
        step, _, _, emitted = carry
        return (step < num_steps) & ~jnp.all(emitted.finished)

    def body(carry):
        step, buffer, lengths, emitted = carry
        advance = ~emitted.finished
        buffer = buffer.at[jnp.arange(b), lengths].set(
            jnp.where(advance, emitted.tokens, buffer[jnp.arange(b), lengths]), mode="drop"
        )
        lengths = lengths + advance.astype(jnp.int32)
        logits = next_logits(buffer, lengths)
        return step + 1, buffer, lengths, _emit(step, logits, emitted, key, sampler, eos_id, pad_id)

    _, _, _, emitted = jax.lax.while_loop(cond, body, (jnp.int32(1), buffer, lengths, emitted))
    return Generation(emitted.out, emitted.count, emitted.finished)


def generate_uncached(
    model: Transformer,
    prompts: jax.Array,
    lengths: jax.Array | None = None,
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    seed: int | jax.Array = 0,
    num_steps: int | jax.Array | None = None,
) -> Generation:
    """The no-cache baseline: every step re-runs the full model over a [B, T + max_new_tokens]
    buffer (static shape, causal, `lengths` masking the unwritten tail) and samples at each
    row's last valid position. Same arguments and output as `generate`; per-step cost is
    constant (that of the final length), so timing a few steps extrapolates exactly.
    """
    cfg = model.cfg
    sampler = greedy() if sampler is None else sampler
    prompts, lengths, _, pad_id = _check_generation(
        cfg, prompts, lengths, max_new_tokens, None, eos_id, pad_id, sampler
    )
    if cfg.spec.absolute and prompts.shape[1] + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"the buffer of {prompts.shape[1]} + {max_new_tokens} tokens exceeds "
            f"the absolute position table (ModelConfig.max_len={cfg.max_len})"
        )
    graphdef, state = split_model(model)
    return _generate_uncached_jit(
        graphdef,
        state,
        prompts,
        lengths,
        _key(seed),
        _num_steps(num_steps, max_new_tokens),
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        eos_id=eos_id,
        pad_id=pad_id,
    )
