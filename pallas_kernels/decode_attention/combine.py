"""Split-KV combine steps of Flash-Decoding (LSE rescale) and FlashDecoding++ (unified max)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ln of the largest and of the smallest normal float32.
LN_FLT_MAX = math.log(float(np.finfo(np.float32).max))  # 88.72
LN_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))  # -87.34
# Relative precision we keep: terms lost to underflow add up to < 2^-24 of the row's sum.
LN_PRECISION = 24 * math.log(2.0)


class DecodePartials(NamedTuple):
    """Per-split partial results of split-KV decode attention (all float32).

    `o`: [batch, kv_heads, splits, group, head_dim], `l`, `m`: [batch, kv_heads, splits, group].
    `o = Σ e^{s-shift}·v` and `l = Σ e^{s-shift}` over the split's valid keys, `m` the split's
    max logit. Online softmax: shift = m. Unified max: shift = φ, except for splits the kernel
    recomputed with the online softmax because m left the window around φ (shift = m there).
    Logits `s = scale·q·k` are in natural-log units; a split with no valid key has o = 0,
    l = 0, m = shift = -inf.
    """

    o: jax.Array
    l: jax.Array
    m: jax.Array
    shift: jax.Array


def _safe_divide(o: jax.Array, l: jax.Array) -> jax.Array:
    """o / l per row: zeros where l == 0 (rows with no valid key), and a row with any NaN or inf
    (a non-finite input at a valid key) all NaN."""
    empty = l == 0
    out = jnp.where(empty[..., None], 0.0, o / jnp.where(empty, 1.0, l)[..., None])
    return jnp.where(jnp.all(jnp.isfinite(out), axis=-1, keepdims=True), out, jnp.nan)


def combine_online(partials: DecodePartials) -> jax.Array:
    """Flash-Decoding combine: rescale split j by e^{shift_j - max_j shift_j}, then Σo / Σl.

    Exact for any mix of shifts (online splits, unified splits, recomputed splits). Returns
    float32 [batch, kv_heads, group, head_dim]; rows with no valid key are zeros, rows with a
    non-finite partial NaN.
    """
    o, l, shift = partials.o, partials.l, partials.shift
    top = jnp.max(shift, axis=2, keepdims=True)  # [B, K, 1, G]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.exp(shift - top)  # [B, K, splits, G]; empty online splits (-inf) weigh 0
    l_sum = jnp.sum(weight * l, axis=2)
    o_sum = jnp.sum(weight[..., None] * o, axis=2)
    return _safe_divide(o_sum, l_sum)


def combine_unified(partials: DecodePartials) -> jax.Array:
    """FlashDecoding++ combine when every split used the same φ: out = Σ_j o_j / Σ_j l_j."""
    return _safe_divide(jnp.sum(partials.o, axis=2), jnp.sum(partials.l, axis=2))


def unified_window(max_len: int) -> tuple[float, float]:
    """Open window (a, b) for `M - φ`, M a row's max logit, where the unified max path is exact.

    Upper end: each term e^{s-φ} <= e^{M-φ} and a split sums at most n = max_len of them, so
    l < FLT_MAX needs M - φ < ln FLT_MAX - ln n; we keep a factor 2 of headroom for the
    bfloat16 rounding of e^{s-φ} before the PV product: b = ln FLT_MAX - ln(2n).
    Lower end: terms below FLT_MIN (2^-126) may flush to zero. At most n of them are lost,
    less than n·FLT_MIN together, and l >= e^{M-φ}; their share stays under 2^-24 when
    M - φ >= ln FLT_MIN + ln n + 24 ln 2 = a. For n = 32768: (a, b) ≈ (-60.3, 77.6).
    Outputs that still overflow because |v| is huge are caught separately (non-finite rows).
    """
    ln_n = math.log(max(1, max_len))
    return LN_FLT_MIN + ln_n + LN_PRECISION, LN_FLT_MAX - ln_n - math.log(2.0)


def unified_fallback_flags(
    partials: DecodePartials, phi: jax.Array, max_len: int, unified_out: jax.Array
) -> jax.Array:
    """Rows whose unified-max result may be inexact: [batch, kv_heads, group] bool.

    A row is flagged when its max logit M leaves the window (a, b) of `unified_window` relative
    to φ (`phi`: [kv_heads, group]), or when its combined output is not finite. Rows without
    valid keys (M = -inf) are never flagged; they are zeros on both paths.
    """
    lo, hi = unified_window(max_len)
    row_max = jnp.max(partials.m, axis=2)  # [B, K, G]
    shifted = row_max - phi
    has_keys = row_max > -jnp.inf
    out_of_window = ~((shifted > lo) & (shifted < hi))  # also a NaN φ
    not_finite = ~jnp.all(jnp.isfinite(unified_out), axis=-1)
    return has_keys & (out_of_window | not_finite)


def unified_with_fallback(
    partials: DecodePartials, phi: jax.Array, max_len: int, online_out: Callable[[], jax.Array]
) -> jax.Array:
    """Unified-max combine; flagged rows are replaced by `online_out()` (recomputed lazily).

    `online_out` runs the Flash-Decoding path for the same inputs; it is only evaluated (under
    `lax.cond`) when at least one row is flagged, and only flagged rows take its values.
    """
    out = combine_unified(partials)
    flags = unified_fallback_flags(partials, phi, max_len, out)

    def recompute(out):
        return jnp.where(flags[..., None], online_out(), out)

    return jax.lax.cond(jnp.any(flags), recompute, lambda out: out, out)
