"""Public split-KV decode attention: validation, the unified-max φ, and backend dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.decode_attention.combine import combine_online, unified_with_fallback
from pallas_kernels.decode_attention.config import DecodeConfig, heuristic_config, split_layout
from pallas_kernels.decode_attention.pallas_triton import decode_partials

SOFTMAX_MODES = ("online", "unified_max")
FALLBACKS = ("kernel", "cond")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
# Default unified max φ (natural-log units of the scaled logits). Trained models keep their
# logits within tens of 0 (FlashDecoding++ Fig. 5: Llama2-7B in [-16.8, 6.5]); with φ = 0 the
# exact window of `unified_window` is about (-60, 78) at 32k keys, so the fallback is rare.
DEFAULT_PHI = 0.0


def why_unsupported(q, k_cache, v_cache) -> str | None:
    """None when the kernel takes these head sizes and dtypes (arrays or ShapeDtypeStructs);
    else the reason, in one line. The attention seam (`cope.backends`) dispatches on it."""
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"q head_dim must be a power of two >= 16, got shape {q.shape}"
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            return f"{name} dtype must be bfloat16 or float32, got {x.dtype}"
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        return (
            f"q, k_cache, v_cache dtypes must agree, got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    return None


def _validate(q, k_cache, v_cache, lengths) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(
            f"k_cache must be [batch, max_len, kv_heads, head_dim], got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} must equal k_cache shape {k_cache.shape}")
    batch, heads, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache shape {k_cache.shape} does not match q shape {q.shape} "
            "(batch and head_dim must agree)"
        )
    if min(q.shape) == 0 or min(k_cache.shape) == 0:
        raise ValueError(
            f"empty inputs: q {q.shape}, k_cache {k_cache.shape} (max_len must be >= 1)"
        )
    if heads % k_cache.shape[2]:
        raise ValueError(
            f"q heads ({heads}) must be a multiple of k_cache kv_heads "
            f"({k_cache.shape[2]}), got q {q.shape} and k_cache {k_cache.shape}"
        )
    reason = why_unsupported(q, k_cache, v_cache)
    if reason is not None:
        raise ValueError(reason)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [batch] = ({batch},), got shape {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths dtype must be int32, got {lengths.dtype}")


def _validate_bias(bias, q, k_cache) -> None:
    expected = (q.shape[0], q.shape[1], k_cache.shape[1])
    if bias.shape != expected:
        raise ValueError(f"bias must be [batch, heads, max_len] = {expected}, got {bias.shape}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise ValueError(f"bias must be a floating array, got {bias.dtype}")


def _phi_per_head(phi, heads: int) -> jax.Array:
    """φ as float32 [heads] from None (DEFAULT_PHI), a scalar, or a [heads] array."""
    if phi is None:
        phi = DEFAULT_PHI
    shape = np.shape(phi)
    if shape not in ((), (heads,)):
        raise ValueError(f"phi must be a scalar or [heads] = ({heads},), got shape {shape}")
    return jnp.broadcast_to(jnp.asarray(phi, jnp.float32), (heads,))


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    softmax: str = "unified_max",
    phi=None,
    bias: jax.Array | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    fallback: str = "kernel",
    interpret: bool | None = None,
    debug: bool = False,
) -> jax.Array:
    """Attention of one new query token over a KV cache, split along the keys (Flash-Decoding).

    Args:
      q: [batch, heads, head_dim] bfloat16 or float32, the new token's queries.
      k_cache, v_cache: [batch, max_len, kv_heads, head_dim], q's dtype. GQA: the query heads
        h = j·group .. (j+1)·group-1 attend kv head j and are processed together, so every
        K/V byte is read once.
      lengths: [batch] int32, valid cached keys per row (clipped to [0, max_len]); keys at
        positions >= lengths[b] are never read. Rows with lengths == 0 return zeros; a NaN or
        inf in q, in a valid key or value, or in the bias of a valid key makes its rows NaN.
      scale: logit scale (a Python float), default 1/sqrt(head_dim).
      softmax: "online" (Flash-Decoding: running max per split, log-sum-exp combine) or
        "unified_max" (FlashDecoding++: every split sums e^{s-φ} and e^{s-φ}·v with no running
        max, combined as Σo/Σl; work whose max logit leaves the exact window around φ, see
        `combine.unified_window`, is recomputed with the online path). Both are exact.
      phi: the unified max φ in the units of the scaled logits `scale·q·k`: a scalar (one per
        layer) or [heads] (one per query head); None means DEFAULT_PHI = 0. Ignored by "online".
      bias: optional [batch, heads, max_len] float logits added to the scaled logits scale·q·k
        before the softmax (e.g. relative-position terms of the new token); keys past
        lengths[b] stay masked whatever their bias.
      num_splits: KV splits per (batch, kv_head); None picks from max_len, batch and the SM
        count (`config.heuristic_config`). Overrides `config.num_splits` when both are given.
      config: full tuning config; None uses `heuristic_config`.
      fallback: where unified max recomputes out-of-window work. "kernel" (default): each split
        program checks its own max against the window and, if it left it, redoes its keys with
        the online softmax inside the kernel (a branch on the flag), reporting its own max as
        its exponent shift; the combine weighs splits by e^{shift_j - max shift}, which is
        Σo/Σl when no split was recomputed. No host round trip. "cond": the issue's row-level
        scheme: combine Σo/Σl, flag rows by their global max, and `lax.cond` on any flag to
        rerun the online kernel and replace the flagged rows; XLA's GPU conditional reads the
        predicate on the host, which cost ~15-18 µs per call on an H100.
      interpret: run the Pallas kernel in interpret mode; None interprets when there is no GPU.

    Returns:
      [batch, heads, head_dim] in q's dtype.
    """
    q, k_cache, v_cache, lengths, bias = (
        jnp.asarray(x) if isinstance(x, list | tuple) else x
        for x in (q, k_cache, v_cache, lengths, bias)
    )
    _validate(q, k_cache, v_cache, lengths)
    if bias is not None:
        _validate_bias(bias, q, k_cache)
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    batch, heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    if config is None:
        config = heuristic_config(
            batch,
            max_len,
            kv_heads,
            group,
            head_dim,
            itemsize=jnp.dtype(q.dtype).itemsize,
            num_splits=num_splits,
        )
    elif num_splits is not None:
        config = DecodeConfig(**{**_asdict(config), "num_splits": num_splits})
    if not config.use_dot and group != 1:
        raise ValueError(
            f"config.use_dot=False needs heads == kv_heads, got q {q.shape} "
            f"and k_cache {k_cache.shape}"
        )
    scale = float(head_dim**-0.5 if scale is None else scale)
    return _decode_attention(
        q,
        k_cache,
        v_cache,
        lengths.astype(jnp.int32),
        _phi_per_head(phi, heads),
        None if bias is None else bias.astype(jnp.float32),
        scale=scale,
        softmax=softmax,
        config=config,
        fallback=fallback,
        interpret=resolve_interpret(interpret),
        debug=debug,
    )


def _asdict(config: DecodeConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


@functools.partial(
    jax.jit, static_argnames=("scale", "softmax", "config", "fallback", "interpret", "debug")
)
def _decode_attention(
    q, k_cache, v_cache, lengths, phi, bias, *, scale, softmax, config, fallback, interpret, debug
):
    batch, heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, D]
    phig = phi.reshape(kv_heads, group)  # [K, G]
    lengths = jnp.clip(lengths, 0, max_len)
    if bias is not None:
        bias = bias.reshape(batch, kv_heads, group, max_len)  # [B, K, G, S]
    run = functools.partial(
        decode_partials,
        qg,
        k_cache,
        v_cache,
        lengths,
        phig,
        bias,
        scale=scale,
        config=config,
        interpret=interpret,
        debug=debug,
    )
    _, splits = split_layout(max_len, config.num_splits, config.block_k)

    if softmax == "unified_max" and fallback == "cond":

        def online():
            return combine_online(run(softmax="online", final=False))

        parts = run(softmax="unified_max", recompute=False, final=False)
        out = unified_with_fallback(parts, phig, max_len, online)
    elif splits == 1:  # the kernel normalised (and, for unified max, recomputed) already
        out = run(softmax=softmax).o[:, :, 0]
    else:
        out = combine_online(run(softmax=softmax))
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
