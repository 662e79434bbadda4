"""Public CoPE split-KV decode attention: validation, the coverage check, and the two passes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.cope_decode_attention.combine import (
    merge_recomputed,
    split_carries,
    splits_to_recompute,
)
from pallas_kernels.cope_decode_attention.config import (
    DecodeConfig,
    heuristic_config,
    split_layout,
)
from pallas_kernels.cope_decode_attention.pallas_triton import cope_decode_partials
from pallas_kernels.cope_decode_attention.reference import position_logits
from pallas_kernels.decode_attention.combine import combine_online

SOFTMAX_MODES = ("online", "unified_max")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
# Default unified max φ in natural-log units of the CoPE logits (content plus position term);
# the exact window around it is about (-60, 78) at 32k keys, see `unified_window`.
DEFAULT_PHI = 0.0


def _check_tensors(q, k_cache, v_cache, pos_emb, gate_k_cache) -> None:
    """Raises a one-line ValueError for shapes, dtypes or head sizes the kernel does not take."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(
            f"k_cache must be [batch, max_len, kv_heads, head_dim], got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} must equal k_cache shape {k_cache.shape}")
    if gate_k_cache is not None and gate_k_cache.shape != k_cache.shape:
        raise ValueError(
            f"gate_k_cache shape {gate_k_cache.shape} must equal k_cache shape {k_cache.shape}"
        )
    batch, heads, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache shape {k_cache.shape} does not match q shape {q.shape} "
            "(batch and head_dim must agree)"
        )
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache max_len must be >= 1, got shape {k_cache.shape}")
    if heads % k_cache.shape[2]:
        raise ValueError(
            f"q heads ({heads}) must be a multiple of k_cache kv_heads "
            f"({k_cache.shape[2]}), got q {q.shape} and k_cache {k_cache.shape}"
        )
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"q head_dim must be a power of two >= 16, got shape {q.shape}")
    if pos_emb.ndim != 2 or pos_emb.shape[0] < 1 or pos_emb.shape[1] != head_dim:
        raise ValueError(f"pos_emb must be [npos >= 1, head_dim={head_dim}], got {pos_emb.shape}")
    if not jnp.issubdtype(pos_emb.dtype, jnp.floating):
        raise ValueError(f"pos_emb must be a floating array, got {pos_emb.dtype}")
    caches = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
    if gate_k_cache is not None:
        caches += (("gate_k_cache", gate_k_cache),)
    for name, x in caches:
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be bfloat16 or float32, got {x.dtype}")
    if len({jnp.dtype(x.dtype) for _, x in caches}) != 1:
        raise ValueError(
            "q, k_cache, v_cache"
            + (", gate_k_cache" if gate_k_cache is not None else "")
            + f" dtypes must agree, got {', '.join(str(x.dtype) for _, x in caches)}"
        )


def why_unsupported(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos_emb: jax.Array,
    *,
    gate_k_cache: jax.Array | None = None,
) -> str | None:
    """None when `cope_decode_attention` serves these inputs, else a one-line reason.

    For an attention dispatcher: the same checks `cope_decode_attention` raises as ValueErrors
    (shapes, bfloat16/float32, power-of-two head_dim >= 16), without needing `lengths`.
    """
    try:
        _check_tensors(q, k_cache, v_cache, pos_emb, gate_k_cache)
    except ValueError as e:
        return str(e)
    return None


def _phi_per_head(phi, heads: int) -> jax.Array:
    """φ as float32 [heads] from None (DEFAULT_PHI), a scalar, or a [heads] array."""
    if phi is None:
        phi = DEFAULT_PHI
    shape = np.shape(phi)
    if shape not in ((), (heads,)):
        raise ValueError(f"phi must be a scalar or [heads] = ({heads},), got shape {shape}")
    return jnp.broadcast_to(jnp.asarray(phi, jnp.float32), (heads,))


def cope_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos_emb: jax.Array,
    lengths: jax.Array,
    *,
    gate_k_cache: jax.Array | None = None,
    scale: float | None = None,
    nodiv: bool = False,
    softmax: str = "unified_max",
    phi=None,
    interpret: bool | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    debug: bool = False,
) -> jax.Array:
    """CoPE attention of one new query token over a KV cache, split along the keys.

    Exactly the last valid row of `cope.functional.cope_attention` for each sequence: the query
    sits at position lengths[b] - 1 and attends keys 0..lengths[b] - 1, with gates
    g_j = sigmoid(scale·q·gk_j), positions p_j = min(Σ_{m=j..L-1} g_m, npos - 1) (float32) and
    z(p) = q·e interpolated between floor p and floor p + 1.

    Args:
      q: [batch, heads, head_dim] bfloat16 or float32, the new token's queries.
      k_cache, v_cache: [batch, max_len, kv_heads, head_dim], q's dtype (GQA: the query heads
        of one kv head are processed together, so every K/V byte is read once per pass).
      pos_emb: [npos, head_dim] position table e (rounded to q's dtype, as in the model).
      lengths: [batch] int32, valid cached keys per row, the new token's own key included
        (clipped to [0, max_len]); rows with lengths == 0 return zeros.
      gate_k_cache: optional [batch, max_len, kv_heads, head_dim] separate gate keys (the
        official `--cope-sep-key`); None gates on k_cache.
      scale: gate and logit scale (a Python float), default 1/sqrt(head_dim).
      nodiv: logits q·k·scale + z(p) instead of (q·k + z(p))·scale.
      softmax: "online" (Flash-Decoding running max per split) or "unified_max"
        (FlashDecoding++: each split sums e^{s-φ} with no running max; heads whose split max
        leaves the exact window around φ redo that split with the online softmax). Both exact.
      phi: the unified max φ in natural-log units of the CoPE logits s (content plus position
        term, as `reference.cope_decode_logits`): a scalar or [heads]; None means 0. Ignored by
        "online".
      interpret: run the Pallas kernels in interpret mode; None interprets when no GPU is the
        target.
      num_splits: KV splits per (batch, kv_head); None picks from the shape and SM count.
        Overrides `config.num_splits` when both are given.
      config: full tuning config (`config.heuristic_config` when None).
      debug: print the Pallas kernels' jaxprs.

    The first pass treats every split left of the one holding the row's last key as saturated
    (each key at position npos - 1) and returns the splits' gate totals; the combine sums them
    into right-hand carries, and a second pass recomputes exactly the splits whose carry is
    below npos - 1 (all of them when the gates are near 0: K and V are then read twice).

    Returns:
      [batch, heads, head_dim] in q's dtype.
    """
    _check_tensors(q, k_cache, v_cache, pos_emb, gate_k_cache)
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths must be [batch] = ({q.shape[0]},), got shape {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths dtype must be int32, got {lengths.dtype}")
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if scale is not None and not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"scale must be a Python float or None, got {type(scale).__name__}")
    batch, heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if config is None:
        config = heuristic_config(
            batch,
            max_len,
            kv_heads,
            heads // kv_heads,
            head_dim,
            itemsize=jnp.dtype(q.dtype).itemsize,
            gate_keys=gate_k_cache is not None,
            num_splits=num_splits,
        )
    elif num_splits is not None:
        config = dataclasses.replace(config, num_splits=num_splits)
    if not config.use_dot:
        raise ValueError("config.use_dot must be True: CoPE decoding runs on tensor-core tiles")
    scale = float(head_dim**-0.5 if scale is None else scale)
    return _cope_decode_attention(
        q,
        k_cache,
        v_cache,
        gate_k_cache,
        pos_emb,
        lengths.astype(jnp.int32),
        _phi_per_head(phi, heads),
        scale=scale,
        nodiv=bool(nodiv),
        softmax=softmax,
        config=config,
        interpret=resolve_interpret(interpret),
        debug=debug,
    )


@functools.partial(
    jax.jit, static_argnames=("scale", "nodiv", "softmax", "config", "interpret", "debug")
)
def _cope_decode_attention(
    q,
    k_cache,
    v_cache,
    gate_k_cache,
    pos_emb,
    lengths,
    phi,
    *,
    scale,
    nodiv,
    softmax,
    config,
    interpret,
    debug,
):
    batch, heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    npos = pos_emb.shape[0]
    qg = q.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, D]
    phig = phi.reshape(kv_heads, group)  # [K, G]
    z = position_logits(q, pos_emb).reshape(batch, kv_heads, group, npos)  # [B, K, G, N]
    lengths = jnp.clip(lengths, 0, max_len)
    run = functools.partial(
        cope_decode_partials,
        qg,
        k_cache,
        v_cache,
        gate_k_cache,
        lengths,
        phig,
        z,
        scale=scale,
        pos_scale=1.0 if nodiv else scale,
        softmax=softmax,
        config=config,
        interpret=interpret,
        debug=debug,
    )
    split_len, splits = split_layout(max_len, config.num_splits, config.block_k)
    first = run()
    if splits == 1:  # the only split holds every row's last key: exact and normalised already
        out = first.partials.o[:, :, 0]
    else:
        carries = split_carries(first.gate_totals)
        recompute = splits_to_recompute(carries, lengths, npos=npos, split_len=split_len)
        exact = run(carries, recompute)
        out = combine_online(merge_recomputed(first.partials, exact, recompute))
        # A NaN gate at a valid key makes the row NaN, also where its split ran saturated.
        gates_ok = jnp.all(jnp.isfinite(first.gate_totals), axis=2)  # [B, K, G]
        out = jnp.where(gates_ok[..., None], out, jnp.nan)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)
