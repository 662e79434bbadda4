"""Prefill (one forward pass that fills the KV cache) and one cached decode step."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope import functional as F
from cope.model import Attention, ModelConfig, Transformer
from decoding.cache import KVCache
from pallas_kernels import decode_attention
from pallas_kernels.decode_attention import SOFTMAX_MODES

DECODE_IMPLS = ("auto", "pallas", "xla")
# Kernel dtypes and head sizes (see pallas_kernels/decode_attention/api.py).
_KERNEL_DTYPES = ("float32", "bfloat16")

# attention(layer index, attention module, normed hidden [B, T, d]) -> [B, T, d]
AttentionFn = Callable[[int, Attention, jax.Array], jax.Array]


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model`, the static and array halves that jitted functions take."""
    return nnx.split(model)


def merge_model(graphdef: nnx.GraphDef, state: nnx.State) -> Transformer:
    """Rebuilds the model inside a traced function, in eval mode (no dropout)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def last_valid(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """x [B, T, ...] -> x[b, lengths[b] - 1] [B, ...]."""
    index = (lengths - 1).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def run_layers(
    model: Transformer, x: jax.Array, attention: AttentionFn, head_at: jax.Array | None = None
) -> jax.Array:
    """Runs every block on x [B, T, d] with `attention` as the attention sublayer -> logits.

    The residual/norm wiring is the model's own (`Block.residual`), so only attention differs
    from `Transformer.__call__`. Returns [B, T, V] float32, or with `head_at` [B] only the
    logits [B, V] at position head_at[b] - 1 (the LM head on every position would cost
    B·T·V floats that generation never reads).
    """
    for i, block in enumerate(model.blocks):
        x = block.residual(x, functools.partial(attention, i, block.attn), block.attn_norm)
        x = block.residual(x, block.mlp, block.mlp_norm)
    if head_at is not None:
        return model.head(last_valid(x, head_at)[:, None])[:, 0]
    return model.head(x)


def cope_table_of(attn: Attention, shared: jax.Array | None) -> jax.Array | None:
    """The CoPE table a layer uses: its own, else the model's shared one (None without CoPE)."""
    return attn.cope.table[...] if attn.cope is not None else shared


def resolve_decode_impl(cfg: ModelConfig, decode_impl: str) -> str:
    """Maps "auto" to "pallas" (the decode kernel) where it applies, else "xla".

    CoPE encodings decode with the XLA path (`Attention.attend` against the cached keys) until
    the fused CoPE kernel exists. Relative encodings can use the kernel with its logit bias
    (`decode_impl="pallas"`), but "auto" keeps them on XLA until that compiled path has been
    checked on a GPU (tests/pallas_kernels: `test_gpu_bias_matches_float64_reference`). "auto"
    also falls back for head sizes or dtypes the kernel does not take.
    """
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
    kernel_ok = (
        not cfg.spec.needs_bias
        and cfg.dtype in _KERNEL_DTYPES
        and cfg.head_dim >= 16
        and cfg.head_dim & (cfg.head_dim - 1) == 0
    )
    if decode_impl == "auto":
        return "pallas" if kernel_ok else "xla"
    if decode_impl == "pallas" and cfg.spec.cope:
        raise ValueError(
            f"decode_impl='pallas' does not take CoPE encodings yet (no fused CoPE kernel), "
            f"got {cfg.encoding!r}; use 'xla'"
        )
    return decode_impl


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
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = model.embed_tokens(tokens, positions)
    rel_table, shared_cope = model.shared_tables()
    ks, vs, gks = [], [], []

    def attention(i: int, attn: Attention, h: jax.Array) -> jax.Array:
        q, k, v, gate_k = attn.project(h, positions)
        ks.append(k)
        vs.append(v)
        gks.append(gate_k)
        # The model's own attention call: the configured impl (flash kernel when "pallas").
        out = attn.attend(
            q,
            k,
            v,
            gate_k,
            causal=True,
            lengths=lengths,
            rel_table=rel_table,
            cope_table=shared_cope,
        )  # [B, T, H, D]
        return attn.out(out.reshape(b, t, -1))

    logits = run_layers(model, x, attention, head_at=lengths if last_only else None)

    def pad(x: jax.Array) -> jax.Array:  # [B, T, K, D] -> [B, max_len, K, D]
        return jnp.pad(x, ((0, 0), (0, max_len - t), (0, 0), (0, 0)))

    cache = KVCache(
        k=tuple(map(pad, ks)),
        v=tuple(map(pad, vs)),
        gate_k=None if gks[0] is None else tuple(map(pad, gks)),
        lengths=lengths,
    )
    return logits, cache


def decode_fn(
    model: Transformer,
    cache: KVCache,
    tokens: jax.Array,
    advance: jax.Array,
    *,
    impl: str,
    softmax: str,
    phi: jax.Array | None,
) -> tuple[jax.Array, KVCache]:
    """Traceable decode step for one new token per row.

    tokens [B] are written at index cache.lengths[b] (their absolute position) in every layer;
    rows with advance[b] False (finished) do not grow: their query still runs but its output is
    meaningless and their lengths stay. `impl` is "pallas" (decode kernel) or "xla".
    Returns (logits [B, V] float32, updated cache).
    """
    b = tokens.shape[0]
    pos = cache.lengths  # [B], index of the new token
    new_lengths = pos + advance.astype(jnp.int32)  # [B], valid keys including the new one
    positions = pos[:, None]  # [B, 1]
    rows = jnp.arange(b)
    x = model.embed_tokens(tokens[:, None], positions)  # [B, 1, d]
    rel_table, shared_cope = model.shared_tables()
    ks, vs = list(cache.k), list(cache.v)
    gks = None if cache.gate_k is None else list(cache.gate_k)

    def attention(i: int, attn: Attention, h: jax.Array) -> jax.Array:
        q, k, v, gate_k = attn.project(h, positions)  # q [B, 1, H, D], k, v [B, 1, K, D]
        # Scatter row b's new key to index pos[b]; out-of-range writes are dropped.
        ks[i] = ks[i].at[rows, pos].set(k[:, 0], mode="drop")  # [B, max_len, K, D]
        vs[i] = vs[i].at[rows, pos].set(v[:, 0], mode="drop")
        if gks is not None:
            gks[i] = gks[i].at[rows, pos].set(gate_k[:, 0], mode="drop")
        if impl == "pallas":
            bias = None
            if attn.cfg.spec.relative:  # q_b·r[pos_b - j] against every cached key, scaled
                rel = F.relative_logits(q, rel_table, ks[i].shape[1], q_offset=pos)
                bias = rel[:, :, 0, :] * attn.cfg.head_dim**-0.5  # [B, H, max_len]
            out = decode_attention(
                q[:, 0],
                ks[i],
                vs[i],
                new_lengths,
                softmax=softmax,
                phi=None if phi is None else phi[i],
                bias=bias,
            )[:, None]
        elif attn.cfg.spec.needs_bias:
            # One query against all cached keys: `causal=False, lengths` is the mask, and the
            # relative term places the query at pos[b]; CoPE recomputes gates over the cache.
            out = attn.attend(
                q,
                ks[i],
                vs[i],
                None if gks is None else gks[i],
                causal=False,
                lengths=new_lengths,
                rel_table=rel_table,
                cope_table=shared_cope,
                q_offset=pos,
            )
        else:
            out = F.attention(q, ks[i], vs[i], causal=False, lengths=new_lengths, impl="xla")
        return attn.out(out.reshape(b, 1, -1))  # [B, 1, d]

    logits = run_layers(model, x, attention)[:, 0]  # [B, V]
    cache = KVCache(
        k=tuple(ks), v=tuple(vs), gate_k=None if gks is None else tuple(gks), lengths=new_lengths
    )
    return logits, cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_len",))
def _prefill_jit(graphdef, state, tokens, lengths, *, max_len):
    return prefill_fn(merge_model(graphdef, state), tokens, lengths, max_len)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("impl", "softmax"))
def _decode_jit(graphdef, state, cache, tokens, advance, phi, *, impl, softmax):
    return decode_fn(
        merge_model(graphdef, state), cache, tokens, advance, impl=impl, softmax=softmax, phi=phi
    )


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
      `lengths` valid entries per row). Attention runs with the model's `attention_impl`.
    """
    tokens, lengths, max_len = check_prompts(model.cfg, tokens, lengths, max_len)
    graphdef, state = split_model(model)
    return _prefill_jit(graphdef, state, tokens, lengths, max_len=max_len)


def decode_step(
    model: Transformer,
    cache: KVCache,
    tokens: jax.Array,
    *,
    decode_impl: str = "auto",
    softmax: str = "unified_max",
    phi=None,
) -> tuple[jax.Array, KVCache]:
    """Appends one token per row to the cache and returns the next-token logits.

    Args:
      model: the Transformer the cache was filled with.
      cache: a KVCache whose row b holds lengths[b] < max_len entries.
      tokens: [B] int, the new tokens (position lengths[b] of their row).
      decode_impl: "auto" (decode kernel where the encoding has no logit term, else XLA),
        "pallas" or "xla".
      softmax: the kernel's mode, "unified_max" or "online".
      phi: the kernel's unified max per layer (scalar or [num_layers]); None: kernel default.

    Returns:
      (logits [B, V] float32, the cache with every row one longer).
    """
    cfg = model.cfg
    impl = resolve_decode_impl(cfg, decode_impl)
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
        impl=impl,
        softmax=softmax,
    )
