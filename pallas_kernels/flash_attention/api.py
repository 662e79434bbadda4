"""Public flash attention (FlashAttention-2/3, Dao 2023/Shah et al. 2024): validation, custom_vjp,
backend choice."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _device
from pallas_kernels._interpret import resolve_interpret
from pallas_kernels._segments import pad_segments
from pallas_kernels.flash_attention import pallas_triton
from pallas_kernels.flash_attention.config import (
    MosaicConfig,
    TritonConfig,
    heuristic_config,
    heuristic_mosaic_config,
)

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_BACKENDS = ("triton", "mosaic")

# `segment_ids=` (packed rows) is served, forward and backward; the seam reads this flag.
TAKES_SEGMENT_IDS = True


def why_unsupported(q, k, v) -> str | None:
    """None when `flash_attention` can serve q, k, v (arrays or ShapeDtypeStructs); else the
    reason, in one line. The attention seam (`cope.backends`) dispatches on it."""
    if q.shape[3] > 256:
        return f"head_dim {q.shape[3]} > 256 is not supported (q shape {q.shape})"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (
            f"q, k, v must share one dtype of bf16/fp16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    return None


def _validate(q, k, v, lengths, segment_ids) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {q.shape}")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must be [B, S, K, D] of one shape, got {k.shape} and {v.shape}")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"empty inputs: q {q.shape}, k {k.shape}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {k.shape} must match q {q.shape} in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    reason = why_unsupported(q, k, v)
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


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_to(x: jax.Array, seq: int, head_dim: int) -> jax.Array:
    pad_s, pad_d = seq - x.shape[1], head_dim - x.shape[3]
    if pad_s == 0 and pad_d == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, pad_d)))


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Static description of one call: the padded sizes and how to reach them."""

    q_len: int
    kv_len: int
    head_dim: int
    q_pad: int
    kv_pad: int
    d_pad: int
    causal: bool
    scale: float
    config: TritonConfig
    mosaic: MosaicConfig | None
    interpret: bool
    debug: bool

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len


def _pad_segments(segment_ids, prob: _Problem):
    """None, or the padded (q_seg [B, T_pad], kv_seg [B, S_pad]) int32 of `segment_ids`."""
    if segment_ids is None:
        return None
    return pad_segments(segment_ids, prob.q_pad, prob.kv_pad)


def _forward(q, k, v, lengths, segment_ids, prob: _Problem):
    qp = _pad_to(q, prob.q_pad, prob.d_pad)
    kp = _pad_to(k, prob.kv_pad, prob.d_pad)
    vp = _pad_to(v, prob.kv_pad, prob.d_pad)
    if prob.mosaic is not None:  # never with segment_ids (see `_plan`)
        from pallas_kernels.flash_attention import pallas_mosaic_gpu

        return pallas_mosaic_gpu.forward(
            qp, kp, vp, scale=prob.scale, causal=prob.causal, config=prob.mosaic
        )
    return pallas_triton.forward(
        qp,
        kp,
        vp,
        lengths,
        _pad_segments(segment_ids, prob),
        scale=prob.scale,
        causal=prob.causal,
        offset=prob.offset,
        config=prob.config,
        interpret=prob.interpret,
        debug=prob.debug,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, lengths, segment_ids, prob: _Problem):
    out, _ = _forward(q, k, v, lengths, segment_ids, prob)
    return out[:, : prob.q_len, :, : prob.head_dim]


def _flash_fwd(q, k, v, lengths, segment_ids, prob: _Problem):
    out, lse = _forward(q, k, v, lengths, segment_ids, prob)
    residuals = (q, k, v, lengths, segment_ids, out, lse)
    return out[:, : prob.q_len, :, : prob.head_dim], residuals


def _flash_bwd(prob: _Problem, residuals, d_out):
    q, k, v, lengths, segment_ids, out, lse = residuals
    dq, dk, dv = pallas_triton.backward(
        _pad_to(q, prob.q_pad, prob.d_pad),
        _pad_to(k, prob.kv_pad, prob.d_pad),
        _pad_to(v, prob.kv_pad, prob.d_pad),
        lengths,
        out,
        lse,
        _pad_to(d_out.astype(q.dtype), prob.q_pad, prob.d_pad),
        _pad_segments(segment_ids, prob),
        scale=prob.scale,
        causal=prob.causal,
        offset=prob.offset,
        config=prob.config,
        interpret=prob.interpret,
        debug=prob.debug,
    )
    dq = dq[:, : prob.q_len, :, : prob.head_dim]
    dk = dk[:, : prob.kv_len, :, : prob.head_dim]
    dv = dv[:, : prob.kv_len, :, : prob.head_dim]
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _mosaic_supported(q, k, interpret: bool) -> bool:
    if interpret or q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[3] not in (64, 128):
        return False
    return _device.is_hopper()


def _plan(
    q, k, v, *, causal, lengths, segment_ids, scale, interpret, tuning
) -> tuple[jax.Array, _Problem]:
    """Validates the inputs and fixes backend, blocks and padding: (clipped lengths, problem)."""
    _validate(q, k, v, lengths, segment_ids)
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    interpret = resolve_interpret(interpret)
    tuning = dict(tuning)
    backend = tuning.pop("backend", None)
    debug = bool(tuning.pop("debug", False))
    config = tuning.pop("config", None)
    mosaic = tuning.pop("mosaic_config", None)
    if backend not in (None, *_BACKENDS):
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    fields = {f.name for f in dataclasses.fields(TritonConfig)}
    unknown = set(tuning) - fields
    if unknown:
        raise ValueError(f"unknown tuning arguments {sorted(unknown)}; known: {sorted(fields)}")
    if config is None:
        config = heuristic_config(head_dim, q_len, kv_len, interpret=interpret)
    config = dataclasses.replace(config, **tuning)

    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    if backend == "mosaic" and segment_ids is not None:
        raise ValueError("backend='mosaic' takes no segment_ids (packed rows use the Triton one)")
    # Packed rows go to the Triton forward: the Mosaic GPU kernel has no segment mask, and it
    # cannot run in interpret mode, where the packing tests run.
    use_mosaic = backend == "mosaic" or (
        backend is None and segment_ids is None and _mosaic_supported(q, k, interpret)
    )
    if use_mosaic:
        if not _mosaic_supported(q, k, interpret):
            raise ValueError(
                f"backend='mosaic' needs a Hopper GPU, bf16/fp16 and head_dim 64 or "
                f"128; got {q.dtype}, q shape {q.shape}"
            )
        mosaic = mosaic or heuristic_mosaic_config(head_dim, kv_len)
        from pallas_kernels.flash_attention import pallas_mosaic_gpu

        if not pallas_mosaic_gpu.supports(q.shape, k.shape, causal, lengths, mosaic):
            if backend == "mosaic":
                raise ValueError(
                    f"the Mosaic kernel does not cover q {q.shape}, k {k.shape}, "
                    f"lengths={lengths is not None} with {mosaic}"
                )
            mosaic = None
    else:
        mosaic = None
    q_pad = _round_up(q_len, max(config.block_q, config.block_q_dq, config.block_q_dkv))
    kv_pad = _round_up(kv_len, max(config.block_k, config.block_k_dq, config.block_k_dkv))
    if mosaic is not None and (q_pad, kv_pad, d_pad) != (q_len, kv_len, head_dim):
        # The Mosaic forward takes unpadded inputs; its residuals must match the Triton
        # backward's padded layout, so fall back when padding would be needed.
        if backend == "mosaic":
            raise ValueError(
                f"backend='mosaic' needs q_len, kv_len multiples of the backward "
                f"blocks; got q {q.shape}, k {k.shape}"
            )
        mosaic = None
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)
    scale = float(head_dim**-0.5 if scale is None else scale)
    prob = _Problem(
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        q_pad=q_pad,
        kv_pad=kv_pad,
        d_pad=d_pad,
        causal=bool(causal),
        scale=scale,
        config=config,
        mosaic=mosaic,
        interpret=interpret,
        debug=debug,
    )
    return lengths, prob


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool | None = None,
    **tuning,
) -> jax.Array:
    """Flash attention, differentiable, with the contract of `attention_reference`.

    Args:
      q: [B, T, H, D] queries (bf16, fp16 or fp32; fp32 accumulation throughout).
      k, v: [B, S, K, D] keys and values, `H % K == 0` (GQA: head h reads kv head h // (H/K)).
      causal: mask keys after the query, the last query aligned with the last key.
      lengths: optional [B] int, valid keys per sequence (ragged padding masked).
      scale: logit scale, default 1/sqrt(D).
      segment_ids: optional [B, T] int (self-attention, T == S): packed rows, several sequences
        per row; a query attends only keys of its own segment. Tiles whose query and key
        blocks share no segment are skipped; that pruning reads each block's min and max id, so
        it is tight when every segment is one run and ids do not decrease along the row (what
        packing makes); the mask itself is exact for any ids.
      interpret: Pallas interpret mode; None means interpret exactly when no GPU is present.
      **tuning: `backend` ("triton", "mosaic" or None = best for the device and inputs),
        `config` (a `TritonConfig`), any `TritonConfig` field by name, `mosaic_config`
        (a `MosaicConfig`), `debug`.

    Returns:
      [B, T, H, D] in q.dtype.
    """
    q, k, v, lengths, segment_ids = _as_arrays(q, k, v, lengths, segment_ids)
    lengths, prob = _plan(
        q,
        k,
        v,
        causal=causal,
        lengths=lengths,
        segment_ids=segment_ids,
        scale=scale,
        interpret=interpret,
        tuning=tuning,
    )
    return _flash(q, k, v, lengths, segment_ids, prob)


def flash_attention_with_lse(
    q,
    k,
    v,
    *,
    causal=True,
    lengths=None,
    scale=None,
    segment_ids=None,
    interpret=None,
    **tuning,
) -> tuple[jax.Array, jax.Array]:
    """Forward only, also returning the [B, H, T] fp32 log-sum-exp (for tests and combines)."""
    tuning = {"backend": "triton", **tuning, "debug": False}
    q, k, v, lengths, segment_ids = _as_arrays(q, k, v, lengths, segment_ids)
    lengths, prob = _plan(
        q,
        k,
        v,
        causal=causal,
        lengths=lengths,
        segment_ids=segment_ids,
        scale=scale,
        interpret=interpret,
        tuning=tuning,
    )
    out, lse = _forward(q, k, v, lengths, segment_ids, prob)
    return out[:, : prob.q_len, :, : prob.head_dim], lse[:, :, : prob.q_len]
