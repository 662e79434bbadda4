"""Public fused CoPE flash attention (Golovneva et al. 2024): validation, custom_vjp, coverage."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.cope_attention.config import ForwardConfig, heuristic_config
from pallas_kernels.cope_attention.pallas_triton_bwd import MAX_NPOS, cope_attention_bwd
from pallas_kernels.cope_attention.pallas_triton_fwd import cope_attention_fwd

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
MAX_HEAD_DIM = 256

# `segment_ids=` (packed rows) is served, forward and backward; the seam reads this flag.
TAKES_SEGMENT_IDS = True


def why_unsupported(q, k, v, pos_emb, *, gate_k=None) -> str | None:
    """None when the kernel serves these inputs, else a one-line reason.

    Covers dtype, head size and table size (the backward's limit, since a caller may
    differentiate); malformed shapes are `cope_attention`'s ValueErrors.
    """
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        return f"q dtype {q.dtype}: the CoPE kernel takes bfloat16, float16 or float32"
    for name, x in (("k", k), ("v", v), ("gate_k", gate_k)):
        if x is not None and x.dtype != q.dtype:
            return f"{name} dtype {x.dtype} differs from q dtype {q.dtype}"
    if not jnp.issubdtype(pos_emb.dtype, jnp.floating):
        return f"pos_emb dtype {pos_emb.dtype} is not floating"
    if q.ndim == 4 and q.shape[3] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} (q shape {q.shape})"
    if pos_emb.ndim == 2 and pos_emb.shape[0] > MAX_NPOS:
        return f"npos {pos_emb.shape[0]} > {MAX_NPOS} (the backward's limit)"
    return None


def _validate(q, k, v, pos_emb, gate_k, lengths, segment_ids) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {q.shape}")
    if k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, S, K, D] of one shape, got {k.shape} and {v.shape}")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"empty inputs: q {q.shape}, k {k.shape}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {k.shape} must match q {q.shape} in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if pos_emb.ndim != 2 or pos_emb.shape[0] < 1 or pos_emb.shape[1] != q.shape[3]:
        raise ValueError(f"pos_emb must be [npos >= 1, head_dim={q.shape[3]}], got {pos_emb.shape}")
    if gate_k is not None and gate_k.shape != k.shape:
        raise ValueError(f"gate_k must have the shape of k {k.shape}, got {gate_k.shape}")
    reason = why_unsupported(q, k, v, pos_emb, gate_k=gate_k)
    if reason is not None:
        raise ValueError(reason)
    if lengths is not None and (
        lengths.shape != (q.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer)
    ):
        raise ValueError(
            f"lengths must be an int array of shape ({q.shape[0]},), got "
            f"{lengths.shape} {lengths.dtype}"
        )
    if segment_ids is not None:
        if q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]:
            raise ValueError(
                f"segment_ids must be [batch, q_len]={q.shape[:2]} for self-attention "
                f"(q_len == kv_len), got shape {segment_ids.shape} with k {k.shape}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array, got {segment_ids.dtype}")


def _as_arrays(*xs):
    """Python lists or tuples (of numbers) become arrays; everything else is left to `_validate`."""
    return tuple(jnp.asarray(x) if isinstance(x, list | tuple) else x for x in xs)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The static arguments of one call."""

    causal: bool
    scale: float
    nodiv: bool
    config: ForwardConfig
    backward_config: Any
    interpret: bool
    debug: bool


def _forward(
    q, k, v, pos_emb, gate_k, lengths, segment_ids, prob: _Problem, *, exact_gate_total: bool
):
    return cope_attention_fwd(
        q,
        k,
        v,
        pos_emb,
        gate_k,
        lengths,
        segment_ids,
        causal=prob.causal,
        scale=prob.scale,
        nodiv=prob.nodiv,
        config=prob.config,
        interpret=prob.interpret,
        exact_gate_total=exact_gate_total,
        debug=prob.debug,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _cope(q, k, v, pos_emb, gate_k, lengths, segment_ids, prob: _Problem):
    # Forward only: saturated tiles may skip their gates (the total is not needed).
    args = (q, k, v, pos_emb, gate_k, lengths, segment_ids, prob)
    return _forward(*args, exact_gate_total=False)[0]


def _cope_fwd(q, k, v, pos_emb, gate_k, lengths, segment_ids, prob: _Problem):
    args = (q, k, v, pos_emb, gate_k, lengths, segment_ids, prob)
    out, lse, gate_total = _forward(*args, exact_gate_total=True)
    return out, (q, k, v, pos_emb, gate_k, lengths, segment_ids, out, lse, gate_total)


def _cope_bwd(prob: _Problem, residuals, d_out):
    q, k, v, pos_emb, gate_k, lengths, segment_ids, out, lse, gate_total = residuals
    dq, dk, dv, dpos_emb, dgate_k = cope_attention_bwd(
        q,
        k,
        v,
        pos_emb,
        gate_k,
        lengths,
        out,
        lse,
        gate_total,
        d_out.astype(q.dtype),
        segment_ids,
        causal=prob.causal,
        scale=prob.scale,
        nodiv=prob.nodiv,
        config=prob.backward_config,
        interpret=prob.interpret,
    )
    return dq, dk, dv, dpos_emb, dgate_k, None, None


_cope.defvjp(_cope_fwd, _cope_bwd)


def cope_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_emb: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    nodiv: bool = False,
    gate_k: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool | None = None,
    **tuning,
) -> jax.Array:
    """Fused CoPE attention, differentiable, with the semantics of `cope.functional.cope_attention`.

    g_ij = sigmoid(scale·q_i·gk_j) on visible pairs; p_ij = Σ_{m=j..i} g_im clamped to npos - 1;
    logits (q_i·k_j + z_i(p_ij))·scale (nodiv: q_i·k_j·scale + z_i(p_ij)) with z_i[n] = q_i·e[n]
    interpolated linearly between floor(p) and floor(p) + 1; softmax over visible keys. No [T, S]
    tensor is written to memory, forward or backward.

    Args:
      q: [B, T, H, D] queries (bf16, fp16 or fp32; fp32 accumulation and gate sums).
      k, v: [B, S, K, D] keys and values, H % K == 0 (head h reads kv head h // (H/K)).
      pos_emb: [N, D] position table e, shared by all heads.
      causal: mask keys after the query, the last query aligned with the last key.
      lengths: optional [B] int, valid keys per sequence (0 gives zero rows).
      scale: logit and gate scale, default 1/sqrt(D).
      nodiv: add the position term after scaling.
      gate_k: optional [B, S, K, D] separate gate keys (default: the gates use k).
      segment_ids: optional [B, T] int (self-attention, T == S): packed rows, several sequences
        per row; a query attends only keys of its own segment and gates of other segments are
        0, so positions restart in each. Tiles whose query and key blocks share no segment are
        skipped; that pruning reads each block's min and max id, so it is tight when every
        segment is one run and ids do not decrease along the row (what packing makes); the mask
        itself is exact for any ids.
      interpret: Pallas interpret mode; None means interpret exactly when no GPU is present.
      **tuning: `config` (a `ForwardConfig`), any `ForwardConfig` field by name,
        `backward_config` (handed to the backward kernels), `debug`.

    Returns:
      [B, T, H, D] in q.dtype.
    """
    q, k, v, pos_emb, gate_k, lengths, segment_ids = _as_arrays(
        q, k, v, pos_emb, gate_k, lengths, segment_ids
    )
    _validate(q, k, v, pos_emb, gate_k, lengths, segment_ids)
    interpret = resolve_interpret(interpret)
    tuning = dict(tuning)
    config = tuning.pop("config", None)
    backward_config = tuning.pop("backward_config", None)
    debug = bool(tuning.pop("debug", False))
    fields = {f.name for f in dataclasses.fields(ForwardConfig)}
    unknown = set(tuning) - fields
    if unknown:
        raise ValueError(f"unknown tuning arguments {sorted(unknown)}; known: {sorted(fields)}")
    head_dim, q_len, kv_len = q.shape[3], q.shape[1], k.shape[1]
    if config is None:
        config = heuristic_config(head_dim, q_len, kv_len, interpret=interpret)
    config = dataclasses.replace(config, **tuning).clipped(q_len, kv_len)
    prob = _Problem(
        causal=bool(causal),
        scale=float(head_dim**-0.5 if scale is None else scale),
        nodiv=bool(nodiv),
        config=config,
        backward_config=backward_config,
        interpret=interpret,
        debug=debug,
    )
    if lengths is not None:
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)
    return _cope(q, k, v, pos_emb, gate_k, lengths, segment_ids, prob)
