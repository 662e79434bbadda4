"""The attention seam: `attend`, one function for training, prefill, cached decoding and
analysis, with the XLA reference and the Pallas kernels as backends.

Every caller goes through `attend`. A backend says what it covers (`why_not` returns None or a
one-line reason, built from the kernel's own `why_unsupported` beside its code) and the
dispatcher takes the first that covers the call:

  impl="auto"    on a GPU (real, or the abstract device being lowered for) the first kernel that
                 serves the call, else the XLA reference; without a GPU the reference (the
                 kernels would run in Pallas interpret mode, which is for tests). The choice is
                 logged at DEBUG level ("cope.backends") and reported by `serving_backend`.
  impl="pallas"  kernels wherever one serves the call, in interpret mode without a GPU, also the
                 paths "auto" holds back (the split-KV bias); the reference for the rest, with
                 an INFO log line naming each kernel and why it cannot.
  impl="xla"     the reference, `cope.functional.reference_attention`.
  impl=<name>    that backend (one of BACKENDS), or a one-line error saying why it cannot.

One bias convention for every backend: `bias` is in q·k units, added before scaling.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from cope import functional as F
from pallas_kernels import _device
from pallas_kernels.cope_attention import api as cope_api
from pallas_kernels.cope_decode_attention import api as cope_decode_api
from pallas_kernels.decode_attention import api as decode_api
from pallas_kernels.flash_attention import api as flash_api

_log = logging.getLogger("cope.backends")


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call, as the backends see it (arrays or ShapeDtypeStructs)."""

    q: jax.Array  # [B, T, H, D]
    k: jax.Array  # [B, S, K, D]
    v: jax.Array  # [B, S, K, D]
    causal: bool
    lengths: jax.Array | None  # [B]
    q_offset: int | jax.Array | None  # [B] or scalar: key position of query 0
    segment_ids: jax.Array | None  # [B, T] (T == S): packed sequences
    scale: float
    bias: jax.Array | None  # [B or 1, H or 1, T, S], q·k units
    cope: F.CoPE | None
    softmax: str  # split-KV kernels: "unified_max" or "online"
    phi: jax.Array | float | None  # split-KV kernels: the unified max, scaled-logit units

    @property
    def one_query_per_row(self) -> bool:
        """One new query against a cache, masked by `lengths` alone (a decode step)."""
        return self.q.shape[1] == 1 and not self.causal and self.segment_ids is None


class Backend:
    """An attention implementation: `why_not(call)` (None when it serves the call) and `run`."""

    name: str = ""

    def why_not(self, call: Call) -> str | None:
        raise NotImplementedError

    def auto_ok(self, call: Call) -> bool:
        """Whether impl="auto" may pick this backend for a call it serves."""
        return True

    def run(self, call: Call) -> jax.Array:
        raise NotImplementedError


class Reference(Backend):
    name = "xla"

    def why_not(self, call: Call) -> str | None:
        return None

    def run(self, call: Call) -> jax.Array:
        return F.reference_attention(
            call.q,
            call.k,
            call.v,
            causal=call.causal,
            lengths=call.lengths,
            q_offset=call.q_offset,
            segment_ids=call.segment_ids,
            scale=call.scale,
            bias=call.bias,
            cope=call.cope,
        )


def _kernel_takes_segments(kernel, call: Call) -> str | None:
    """Why a kernel cannot take this call's segment ids (None when it can or there are none)."""
    if call.segment_ids is None or getattr(kernel, "TAKES_SEGMENT_IDS", False):
        return None
    return "no segment_ids (packed sequences) yet"


class Flash(Backend):
    """`pallas_kernels.flash_attention`: full sequences, no logit term."""

    name = "flash"

    def why_not(self, call: Call) -> str | None:
        if call.cope is not None:
            return "no CoPE term (use cope_flash)"
        if call.bias is not None:
            return "takes no bias (relative PE)"
        if call.q_offset is not None:
            return "queries must end at the last key (no q_offset)"
        return _kernel_takes_segments(flash_api, call) or flash_api.why_unsupported(
            call.q, call.k, call.v
        )

    def auto_ok(self, call: Call) -> bool:
        # A one-query step pads to a whole query block: the reference is as fast there.
        return not call.one_query_per_row

    def run(self, call: Call) -> jax.Array:
        segments = {} if call.segment_ids is None else {"segment_ids": call.segment_ids}
        return flash_api.flash_attention(
            call.q,
            call.k,
            call.v,
            causal=call.causal,
            lengths=call.lengths,
            scale=call.scale,
            **segments,
        )


class SplitKV(Backend):
    """`pallas_kernels.decode_attention`: one query per row against a cache."""

    name = "split_kv"

    def why_not(self, call: Call) -> str | None:
        if call.cope is not None:
            return "no CoPE term (use cope_split_kv)"
        if not call.one_query_per_row:
            return "needs one query per row with causal=False (a decode step)"
        return decode_api.why_unsupported(_one_query(call.q), call.k, call.v)

    def auto_ok(self, call: Call) -> bool:
        # The bias path is tested in interpret mode only; "auto" uses it once it has run compiled.
        return call.bias is None

    def run(self, call: Call) -> jax.Array:
        b, s = call.k.shape[:2]
        lengths = jnp.full((b,), s, jnp.int32) if call.lengths is None else call.lengths
        bias = None
        if call.bias is not None:  # [B|1, H|1, 1, S] in q·k units -> [B, H, S] scaled
            bias = jnp.broadcast_to(call.bias[:, :, 0], (b, call.q.shape[2], s)) * call.scale
        out = decode_api.decode_attention(
            call.q[:, 0],
            call.k,
            call.v,
            lengths,
            scale=call.scale,
            softmax=call.softmax,
            phi=call.phi,
            bias=bias,
        )
        return out[:, None]


def _one_query(q) -> jax.ShapeDtypeStruct:
    """The [B, H, D] query of a decode step, as a shape (what capability checks read)."""
    b, _, h, d = q.shape
    return jax.ShapeDtypeStruct((b, h, d), q.dtype)


class CoPEFlash(Backend):
    """`pallas_kernels.cope_attention`: the fused CoPE flash kernel, forward and backward."""

    name = "cope_flash"

    def why_not(self, call: Call) -> str | None:
        if call.cope is None:
            return "needs a CoPE table"
        if call.bias is not None:
            return "takes no bias (cope+relative)"
        if call.q_offset is not None:
            return "queries must end at the last key (no q_offset)"
        return _kernel_takes_segments(cope_api, call) or cope_api.why_unsupported(
            call.q, call.k, call.v, call.cope.table, gate_k=call.cope.gate_k
        )

    def auto_ok(self, call: Call) -> bool:
        return not call.one_query_per_row

    def run(self, call: Call) -> jax.Array:
        return cope_api.cope_attention(
            call.q,
            call.k,
            call.v,
            call.cope.table,
            causal=call.causal,
            lengths=call.lengths,
            scale=call.scale,
            nodiv=call.cope.nodiv,
            gate_k=call.cope.gate_k,
            **({} if call.segment_ids is None else {"segment_ids": call.segment_ids}),
        )


class CoPESplitKV(Backend):
    """`pallas_kernels.cope_decode_attention`: one CoPE query per row against a cache."""

    name = "cope_split_kv"

    def why_not(self, call: Call) -> str | None:
        if call.cope is None:
            return "needs a CoPE table"
        if not call.one_query_per_row:
            return "needs one query per row with causal=False (a decode step)"
        if call.bias is not None:
            return "takes no bias (cope+relative)"
        return cope_decode_api.why_unsupported(
            _one_query(call.q), call.k, call.v, call.cope.table, gate_k_cache=call.cope.gate_k
        )

    def run(self, call: Call) -> jax.Array:
        b, s = call.k.shape[:2]
        lengths = jnp.full((b,), s, jnp.int32) if call.lengths is None else call.lengths
        out = cope_decode_api.cope_decode_attention(
            call.q[:, 0],
            call.k,
            call.v,
            call.cope.table,
            lengths,
            gate_k_cache=call.cope.gate_k,
            scale=call.scale,
            nodiv=call.cope.nodiv,
            softmax=call.softmax,
            phi=call.phi,
        )
        return out[:, None]


REFERENCE = Reference()
# Kernels in the order "auto" and "pallas" try them: decode kernels first (they take only
# one-query steps, which the flash kernels would pad to a whole query block).
KERNELS: tuple[Backend, ...] = (CoPESplitKV(), SplitKV(), CoPEFlash(), Flash())
BACKENDS = {b.name: b for b in (REFERENCE, *KERNELS)}
IMPLS = ("auto", "xla", "pallas", *(b.name for b in KERNELS))


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def choose(call: Call, impl: str = "auto") -> Backend:
    """The backend that serves `call` under the preference `impl` (module docstring)."""
    check_impl(impl)
    if impl == "xla":
        return REFERENCE
    if impl in BACKENDS:
        backend = BACKENDS[impl]
        reason = backend.why_not(call)
        if reason is not None:
            raise ValueError(f"attention impl={impl!r} cannot serve this call: {reason}")
        return backend
    if impl == "auto" and not _device.is_gpu():
        return REFERENCE
    reasons = []
    for backend in KERNELS:
        reason = backend.why_not(call)
        if reason is None and (impl == "pallas" or backend.auto_ok(call)):
            return backend
        reasons.append(f"{backend.name}: {reason or 'only under impl=pallas or by name'}")
    log = _log.info if impl == "pallas" else _log.debug
    log(
        "attention %s: no kernel serves it, the reference does (%s)",
        _describe(call),
        "; ".join(reasons),
    )
    return REFERENCE


def _call(
    q, k, v, *, causal, lengths, q_offset, segment_ids, scale, bias, cope, softmax, phi
) -> Call:
    q, k, v = (jnp.asarray(x) if isinstance(x, list) else x for x in (q, k, v))
    if isinstance(lengths, list | tuple):
        lengths = jnp.asarray(lengths)
    F.check_qkv(q, k, v, lengths, bias=bias)
    if cope is not None:
        F.check_cope(q, k, cope)
    if isinstance(segment_ids, list | tuple):
        segment_ids = jnp.asarray(segment_ids)
    if segment_ids is not None:
        if q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]:
            raise ValueError(
                f"segment_ids must be [batch, q_len]={q.shape[:2]} for self-attention "
                f"(q_len == kv_len), got shape {segment_ids.shape} with k {k.shape}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array, got {segment_ids.dtype}")
        if q_offset is not None:
            raise ValueError(
                "segment_ids (packed sequences) and q_offset (a cache) exclude each other"
            )
    return Call(
        q=q,
        k=k,
        v=v,
        causal=causal,
        lengths=lengths,
        q_offset=q_offset,
        segment_ids=segment_ids,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        bias=bias,
        cope=cope,
        softmax=softmax,
        phi=phi,
    )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    q_offset: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    cope: F.CoPE | None = None,
    impl: str = "auto",
    softmax: str = "unified_max",
    phi=None,
    intermediates: bool = False,
):
    """Softmax attention with an optional CoPE term, served by the backend `impl` picks.

    Args:
      q: [B, T, H, D] queries; k, v: [B, S, K, D] keys and values (GQA: H % K == 0).
      causal: query i attends keys j <= i + q_offset.
      lengths: [B] int, valid keys per sequence (padding, or the filled part of a cache).
      q_offset: key position of query 0, an int or [B] (appending to a cache); default S - T,
        the last query at the last key. Decode steps pass causal=False and `lengths` instead.
      segment_ids: [B, T] int (self-attention, T == S): packed sequences; a query attends only
        keys of its own segment (CoPE gates never count another segment's keys).
      scale: logit scale, default 1/sqrt(D).
      bias: [B or 1, H or 1, T, S] logits in q·k units, added before scaling (relative PE).
      cope: a `cope.functional.CoPE` (table, gate keys, nodiv) for CoPE attention.
      impl: "auto", "xla", "pallas" or a backend name (module docstring).
      softmax, phi: the split-KV decode kernels' softmax mode ("unified_max" or "online") and
        unified max φ (scalar or [H], scaled-logit units); other backends ignore them.
      intermediates: also return the reference's float32 [B, H, T, S] `logits` (scaled, -inf
        where masked), `probs`, and for CoPE `gates` and `positions`; computed by the XLA
        reference whatever `impl` says (kernels keep no [T, S] tensor).

    Returns:
      [B, T, H, D] in q's dtype; with `intermediates`, (out, dict of arrays).
    """
    call = _call(
        q,
        k,
        v,
        causal=causal,
        lengths=lengths,
        q_offset=q_offset,
        segment_ids=segment_ids,
        scale=scale,
        bias=bias,
        cope=cope,
        softmax=softmax,
        phi=phi,
    )
    if intermediates:
        check_impl(impl)
        return F.reference_attention(
            call.q,
            call.k,
            call.v,
            causal=causal,
            lengths=call.lengths,
            q_offset=q_offset,
            segment_ids=call.segment_ids,
            scale=call.scale,
            bias=bias,
            cope=cope,
            intermediates=True,
        )
    backend = choose(call, impl)
    _log.debug("attention %s -> %s", _describe(call), backend.name)
    return backend.run(call)


def serving_backend(
    q,
    k,
    v,
    *,
    causal: bool = True,
    lengths=None,
    q_offset=None,
    segment_ids=None,
    bias=None,
    cope: F.CoPE | None = None,
    impl: str = "auto",
) -> str:
    """The name of the backend `attend` would use for these arguments (arrays or
    ShapeDtypeStructs), or the one-line error it would raise."""
    call = _call(
        q,
        k,
        v,
        causal=causal,
        lengths=lengths,
        q_offset=q_offset,
        segment_ids=segment_ids,
        scale=None,
        bias=bias,
        cope=cope,
        softmax="unified_max",
        phi=None,
    )
    return choose(call, impl).name


def _describe(call: Call) -> str:
    parts = [f"q{tuple(call.q.shape)}", f"k{tuple(call.k.shape)}", str(jnp.dtype(call.q.dtype))]
    if call.cope is not None:
        parts.append(f"cope[{call.cope.table.shape[0]}]")
    if call.bias is not None:
        parts.append("bias")
    if call.segment_ids is not None:
        parts.append("segments")
    return " ".join(parts)
