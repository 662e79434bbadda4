"""The fused CoPE backward alone (interpret mode) against jax.vjp of float64
`cope.functional.cope_attention`, with its residuals (out, lse, gate totals) computed in float64
from the definitions, and its lowering for Hopper."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from cope import functional as F
from pallas_kernels.cope_attention.config import BackwardConfig
from pallas_kernels.cope_attention.pallas_triton_bwd import (
    MAX_NPOS,
    backward_with_saturation,
    cope_attention_bwd,
)

# ‖grad − ref‖/‖ref‖ against float64 on the same (dtype-rounded) inputs. bf16: P and dS are
# rounded to bf16 before their matmuls (as in every flash kernel) and `out` arrives in bf16,
# so δ = rowsum(dO·O) carries its rounding too.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
GRAD_NAMES = ("q", "k", "v", "pos_emb", "gate_k")
MIN_GAP = 2e-5  # positions closer than this to an integer sit on a jump of the gradient
TILES_16 = BackwardConfig(16, 16, 4, 1, 4, 1)  # several tiles per row at small sizes
ATOMICS_16 = dataclasses.replace(TILES_16, band_atomics=True)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    npos: int
    causal: bool = True
    nodiv: bool = False
    gate_k: bool = False
    lengths: tuple[int, ...] | None = None
    segments: tuple[int, ...] | None = None  # packed rows: the segment lengths of every row
    gate_bias: float = 0.0  # > 0 pushes every gate toward 1, < 0 toward 0
    dtype: type = jnp.float32
    config: BackwardConfig | None = None
    saturates: bool | None = None  # expected: some tile ran as saturated (None: not checked)


CASES = [
    Case("causal_T17_gqa4to1_npos17", 1, 17, 17, 4, 1, 32, 17),
    Case("causal_T129_gqa8to2_npos2", 1, 129, 129, 8, 2, 16, 2, config=TILES_16, saturates=True),
    Case("noncausal_T65_npos8", 2, 65, 65, 2, 1, 16, 8, causal=False, config=TILES_16),
    Case("band_atomics_gatek", 1, 65, 65, 4, 2, 16, 8, gate_k=True, config=ATOMICS_16),
    Case("causal_T17_S80_gatek_nodiv", 1, 17, 80, 2, 1, 32, 17, nodiv=True, gate_k=True),
    Case("T1_S33_npos513", 2, 1, 33, 2, 1, 16, 513),
    Case("ragged_with_zero_length", 3, 40, 40, 2, 1, 16, 8, lengths=(0, 7, 40), config=TILES_16),
    Case("ragged_noncausal_T9_S40", 2, 9, 40, 2, 1, 16, 17, causal=False, lengths=(0, 23)),
    Case("gates_near_0", 1, 96, 96, 2, 1, 32, 64, gate_bias=-6.0, config=TILES_16, saturates=False),
    Case(
        "gates_near_1_gatek",
        1,
        96,
        96,
        2,
        1,
        32,
        17,
        gate_k=True,
        gate_bias=6.0,
        config=TILES_16,
        saturates=True,
    ),  # fmt: skip
    Case("bf16_gqa4to1_npos64", 1, 64, 64, 4, 1, 64, 64, dtype=jnp.bfloat16),
    Case("packed_rows_causal", 2, 70, 70, 2, 1, 16, 17, segments=(20, 3, 47), config=TILES_16),
    Case(
        "packed_rows_noncausal_gatek",
        1,
        40,
        40,
        2,
        1,
        16,
        8,
        causal=False,
        gate_k=True,
        lengths=(37,),
        segments=(1, 25, 14),
        config=TILES_16,
        saturates=False,
    ),  # fmt: skip
    Case(
        "bf16_gatek_nodiv_S90", 1, 40, 90, 2, 1, 32, 17, nodiv=True, gate_k=True, dtype=jnp.bfloat16
    ),  # fmt: skip
]


def _inputs(case: Case, seed: int):
    """q, k, v, pos_emb, gate keys (or None), dout, rounded to the case's dtype.

    `gate_bias` c adds one shared direction u (|u|² = |c|·√D) to q and sign(c)·u to the gate
    keys, so the gate logits scale·q·gk ≈ ±|c|: every gate near 1 or near 0.
    """
    keys = jax.random.split(jax.random.key(seed), 7)
    b, t, s, h, kh, d = (
        case.batch,
        case.q_len,
        case.kv_len,
        case.heads,
        case.kv_heads,
        case.head_dim,
    )
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, s, kh, d))
    v = jax.random.normal(keys[2], (b, s, kh, d))
    e = jax.random.normal(keys[3], (case.npos, d))
    gk = jax.random.normal(keys[4], (b, s, kh, d)) if case.gate_k else None
    do = jax.random.normal(keys[6], (b, t, h, d))
    if case.gate_bias:
        u = jax.random.normal(keys[5], (d,))
        u = u / jnp.linalg.norm(u) * (abs(case.gate_bias) * d**0.5) ** 0.5
        q = q + u
        if gk is None:
            k = k + np.sign(case.gate_bias) * u
        else:
            gk = gk + np.sign(case.gate_bias) * u
    cast = lambda x: None if x is None else x.astype(case.dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), e, cast(gk), cast(do)


def _segment_ids(case: Case):
    """[B, T] int32 ids of `case.segments` (each row packed the same way), or None."""
    if case.segments is None:
        return None
    ids = np.repeat(np.arange(len(case.segments)), case.segments)
    return jnp.asarray(np.broadcast_to(ids, (case.batch, case.q_len)), jnp.int32)


def _float64_reference(case: Case, q, k, v, e, gk, do, lengths):
    """(out, lse, gate_total) from the definitions and the float64 gradients of the reference;
    None when an unclamped position (suffix sum <= npos - 1) lies within MIN_GAP of an
    integer."""
    scale = case.head_dim**-0.5
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        q, k, v, e, gk, do = map(f64, (q, k, v, e, gk, do))
        lens = None if lengths is None else jnp.asarray(lengths)
        segment_ids = _segment_ids(case)
        group = case.heads // case.kv_heads

        def residuals(q, k, e, gk):
            rep = lambda x: jnp.repeat(x, group, axis=2)  # noqa: E731
            content = jnp.einsum("bthd,bshd->bhts", q, rep(k))
            gate_logits = content if gk is None else jnp.einsum("bthd,bshd->bhts", q, rep(gk))
            mask = jnp.broadcast_to(
                F.attention_mask(
                    case.q_len,
                    case.kv_len,
                    causal=case.causal,
                    lengths=lens,
                    segment_ids=segment_ids,
                ),
                content.shape,
            )
            gates = jnp.where(mask, jax.nn.sigmoid(gate_logits * scale), 0.0)
            suffix = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), -1), -1)
            pos = jnp.minimum(suffix, case.npos - 1)
            z = jnp.einsum("bthd,nd->bhtn", q, e)
            lower = jnp.floor(pos)
            index = lower.astype(jnp.int32)
            z_lo = jnp.take_along_axis(z, index, -1)
            z_hi = jnp.take_along_axis(z, jnp.minimum(index + 1, case.npos - 1), -1)
            z_pos = z_lo + (pos - lower) * (z_hi - z_lo)
            logits = content * scale + z_pos if case.nodiv else (content + z_pos) * scale
            lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
            # Distance of the unclamped suffix sums to the integers 1..npos-1 (inf: none).
            nearest = jnp.round(suffix)
            near = mask & (nearest >= 1) & (nearest <= case.npos - 1)
            gap = jnp.min(jnp.where(near, jnp.abs(suffix - nearest), jnp.inf))
            lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # inf: a row with no visible key
            return lse, gates.sum(-1), gap

        lse, gate_total, gap = jax.jit(residuals)(q, k, e, gk)
        if gap < MIN_GAP:
            return None

        def attend(q, k, v, e, *gate_k):
            return F.cope_attention(
                q,
                k,
                v,
                e,
                causal=case.causal,
                lengths=lens,
                nodiv=case.nodiv,
                gate_k=gate_k[0] if gate_k else None,
                segment_ids=segment_ids,
            )

        def out_and_grads(do, *args):
            out, vjp = jax.vjp(attend, *args)
            return out, vjp(do)

        args = (q, k, v, e, *([] if gk is None else [gk]))
        out, grads = jax.jit(out_and_grads)(do, *args)
        grads = [np.asarray(g) for g in grads]
        return np.asarray(out), np.asarray(lse), np.asarray(gate_total), grads


def _error(x, ref) -> float:
    x = np.asarray(x, np.float64)
    assert np.isfinite(x).all(), "non-finite gradient"
    if np.linalg.norm(ref) == 0:
        return float(np.sqrt(np.mean(x**2)))
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_match_float64_reference(case: Case):
    # Fresh inputs every run. The exact gradient jumps where a position crosses an integer
    # (the interpolation slope changes, and the clamp at npos - 1 cuts it to 0); float32
    # positions are off by a few ulps of the row's gate total, so inputs that put a position
    # within MIN_GAP of an integer are drawn again rather than compared across the jump.
    for _ in range(20):
        seed = int(np.random.default_rng().integers(2**31))
        q, k, v, e, gk, do = _inputs(case, seed)
        reference = _float64_reference(case, q, k, v, e, gk, do, case.lengths)
        if reference is not None:
            break
    else:
        pytest.fail(f"no inputs with every position {MIN_GAP} away from an integer ({case})")
    out, lse, gate_total, ref_grads = reference
    lengths = None if case.lengths is None else jnp.asarray(case.lengths, jnp.int32)
    backward = jax.jit(
        lambda *args: backward_with_saturation(
            *args,
            causal=case.causal,
            scale=None,
            nodiv=case.nodiv,
            config=case.config,
            interpret=True,
        )
    )
    residuals = (
        jnp.asarray(out, case.dtype),
        jnp.asarray(lse, jnp.float32),
        jnp.asarray(gate_total, jnp.float32),
    )
    grads, n_sat = backward(q, k, v, e, gk, lengths, *residuals, do, _segment_ids(case))
    msg = f"seed={seed} case={case.name}"
    for name, g, x, rg in zip(GRAD_NAMES, grads, (q, k, v, e, gk), ref_grads):
        assert g.shape == x.shape and g.dtype == x.dtype, f"d{name} {g.shape} {g.dtype} {msg}"
        err = _error(g, rg)
        assert err < TOL[case.dtype], f"d{name} {err:.2e} {msg}"
    if gk is None:
        assert grads[4] is None
    if case.lengths is not None and case.lengths[0] == 0:  # a sequence with no valid key
        assert not np.any(np.asarray(grads[0][0])), f"dq of an empty sequence {msg}"
        for name, g in zip(("k", "v"), grads[1:3]):
            assert not np.any(np.asarray(g[0])), f"d{name} of an empty sequence {msg}"
    if case.saturates is not None:
        assert bool(np.any(np.asarray(n_sat) > 0)) == case.saturates, f"n_sat {n_sat} {msg}"


def test_validation():
    q = jnp.zeros((1, 4, 2, 16))
    k = jnp.zeros((1, 4, 1, 16))
    rows = jnp.zeros((1, 2, 4))
    kwargs = dict(causal=True, scale=None, nodiv=False, config=None, interpret=True)
    with pytest.raises(ValueError, match="npos"):
        cope_attention_bwd(
            q, k, k, jnp.zeros((MAX_NPOS + 1, 16)), None, None, q, rows, rows, q, **kwargs
        )
    with pytest.raises(ValueError, match="lse"):
        cope_attention_bwd(q, k, k, jnp.zeros((8, 16)), None, None, q, rows[0], rows, q, **kwargs)
    with pytest.raises(ValueError, match="dout"):
        cope_attention_bwd(q, k, k, jnp.zeros((8, 16)), None, None, q, rows, rows, k, **kwargs)


@pytest.mark.parametrize("device_kind", ["NVIDIA H100", "NVIDIA H200"])
def test_lowers_for_hopper(device_kind):
    """The three kernels lower to Triton custom calls (with and without separate gate keys,
    with locks and with atomics in the band kernel, with packed rows)."""
    mesh = AbstractMesh(
        (1,),
        ("x",),
        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu"),
    )
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    sds = jax.ShapeDtypeStruct
    q = sds((2, 200, 4, 64), jnp.bfloat16)
    k = sds((2, 200, 2, 64), jnp.bfloat16)
    rows = sds((2, 4, 200), jnp.float32)
    segment_ids = sds((2, 200), jnp.int32)
    variants = [(None, 64, False, None), (k, 513, False, None), (None, 64, True, None)]
    for gate_k, npos, atomics, segments in variants + [(None, 17, False, segment_ids)]:

        def bwd(q, k, v, e, gk, lengths, out, lse, gate_total, dout, seg, atomics=atomics):
            return cope_attention_bwd(
                q,
                k,
                v,
                e,
                gk,
                lengths,
                out,
                lse,
                gate_total,
                dout,
                seg,
                causal=True,
                scale=None,
                nodiv=False,
                config=BackwardConfig(band_atomics=atomics),
                interpret=False,
            )

        args = (q, k, k, sds((npos, 64), jnp.float32), gate_k, sds((2,), jnp.int32))
        with use_abstract_mesh(mesh):
            exported = export.export(jax.jit(bwd), platforms=["cuda"], disabled_checks=checks)(
                *args, q, rows, rows, q, segments
            )
        text = exported.mlir_module()
        assert text.count("__gpu$xla.gpu.triton") >= 3, "expected the three backward kernels"
