"""Flash attention (Pallas) against the fp32 reference: forward, lse and all three gradients;
packed rows (segment_ids) against each segment alone and the model's reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cope import functional as F
from pallas_kernels.flash_attention import (
    attention_reference,
    flash_attention,
    flash_attention_with_lse,
)
from pallas_kernels.flash_attention.shapes import GPU_TEST, TEST_LENGTHS, AttentionShape

# Relative-norm tolerances ‖x − ref‖/‖ref‖ by input dtype: (forward, gradients). The reference
# runs in fp32 on the same (upcast) inputs; the kernels round P and dS to the input dtype
# before their second matmul, as every flash kernel does.
TOL = {
    jnp.float32: (2e-5, 1e-4),
    jnp.bfloat16: (1e-2, 2e-2),
    jnp.float16: (2e-3, 4e-3),
}


def _rel(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(x).any(), "NaN in kernel output"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _err(x, ref) -> float:
    """`_rel`, or the RMS of x where ref is exactly zero (e.g. dq with a single visible key)."""
    if np.linalg.norm(np.asarray(ref, np.float64)) > 0:
        return _rel(x, ref)
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


def _inputs(shape: AttentionShape, dtype, seed: int):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (shape.batch, shape.q_len, shape.heads, shape.head_dim), dtype)
    k = jax.random.normal(kk, (shape.batch, shape.s, shape.k, shape.head_dim), dtype)
    v = jax.random.normal(kv, (shape.batch, shape.s, shape.k, shape.head_dim), dtype)
    do = jax.random.normal(kd, q.shape, dtype)
    return q, k, v, do


def _check(shape: AttentionShape, *, causal: bool, dtype, lengths=None, **tuning) -> None:
    seed = int(np.random.default_rng().integers(2**31))  # fresh inputs every run
    q, k, v, do = _inputs(shape, dtype, seed)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=causal, lengths=lengths, **tuning)

    def ref(q, k, v):
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        return attention_reference(f32(q), f32(k), f32(v), causal=causal, lengths=lengths)[0]

    out, vjp = jax.vjp(jax.jit(ours), q, k, v)
    grads = jax.jit(vjp)(do)
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    ref_grads = ref_vjp(do.astype(jnp.float32))
    tol_fwd, tol_bwd = TOL[dtype]
    msg = f"seed={seed} shape={shape.name} causal={causal} dtype={dtype.__name__}"
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref_out) < tol_fwd, f"out {_rel(out, ref_out):.2e} {msg}"
    for name, g, rg, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        err = _err(g, rg)
        assert err < tol_bwd, f"d{name} {err:.2e} {msg}"


# CPU (interpret mode) cases: every length, causal and not; bf16 with GQA 4→1, fp32 with 8→2.
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", TEST_LENGTHS)
def test_lengths_bf16_gqa_4_to_1(length, causal):
    _check(AttentionShape(1, length, 4, 64, kv_heads=1), causal=causal, dtype=jnp.bfloat16)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", TEST_LENGTHS)
def test_lengths_fp32_gqa_8_to_2(length, causal):
    _check(AttentionShape(1, length, 8, 64, kv_heads=2), causal=causal, dtype=jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_ragged_lengths(causal):
    _check(AttentionShape(3, 129, 2, 64), causal=causal, dtype=jnp.float32, lengths=[129, 50, 1])


def test_ragged_lengths_with_empty_sequence():
    # lengths 0: every row of that sequence sees nothing -> zeros and zero gradients.
    _check(AttentionShape(2, 40, 2, 64), causal=True, dtype=jnp.bfloat16, lengths=[0, 40])


@pytest.mark.parametrize("q_len, kv_len", [(17, 129), (129, 17)])
def test_q_len_differs_from_kv_len(q_len, kv_len):
    # T < S: last query aligned with last key. T > S (causal): the first rows see no key.
    _check(
        AttentionShape(2, q_len, 4, 64, kv_len=kv_len, kv_heads=2), causal=True, dtype=jnp.float32
    )


@pytest.mark.parametrize("head_dim", [128, 40])
def test_head_dims(head_dim):
    _check(AttentionShape(1, 65, 2, head_dim), causal=True, dtype=jnp.bfloat16)


def test_fp16_and_mixed_blocks():
    _check(
        AttentionShape(1, 100, 2, 64),
        causal=True,
        dtype=jnp.float16,
        block_q=16,
        block_k=32,
        block_q_dkv=32,
        block_k_dkv=16,
        block_q_dq=16,
        block_k_dq=64,
    )


def test_lse_matches_reference():
    q, k, v, _ = _inputs(
        AttentionShape(2, 77, 4, 64, kv_len=90, kv_heads=2),
        jnp.float32,
        int(np.random.default_rng().integers(2**31)),
    )
    lengths = jnp.array([90, 30])
    out, lse = flash_attention_with_lse(q, k, v, causal=True, lengths=lengths)
    ref_out, ref_lse = attention_reference(q, k, v, causal=True, lengths=lengths)
    assert _rel(out, ref_out) < 2e-5
    assert _rel(lse, ref_lse) < 2e-5


def test_causality_via_gradients():
    # ∂out_i/∂k_j = ∂out_i/∂v_j = 0 for every key j after query i.
    q, k, v, _ = _inputs(
        AttentionShape(1, 48, 2, 64), jnp.float32, int(np.random.default_rng().integers(2**31))
    )
    i = 20
    _, (dk, dv) = jax.value_and_grad(
        lambda k, v: flash_attention(q, k, v, causal=True)[:, i].sum(), argnums=(0, 1)
    )(k, v)
    assert np.all(np.asarray(dk)[:, i + 1 :] == 0) and np.all(np.asarray(dv)[:, i + 1 :] == 0)
    assert np.abs(np.asarray(dv)[:, : i + 1]).sum() > 0


def test_input_validation():
    q = jnp.zeros((1, 8, 4, 64))
    k = jnp.zeros((1, 8, 3, 64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(
            jnp.zeros((1, 8, 2, 512)), jnp.zeros((1, 8, 2, 512)), jnp.zeros((1, 8, 2, 512))
        )
    with pytest.raises(ValueError, match="lengths"):
        flash_attention(q, q, q, lengths=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="unknown tuning"):
        flash_attention(q, q, q, block_z=64)
    with pytest.raises(ValueError, match="segment_ids must be"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be"):
        kv = jnp.zeros((1, 9, 4, 64))
        flash_attention(q, kv, kv, segment_ids=[[0] * 8])
    with pytest.raises(ValueError, match="integer"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match="mosaic"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((1, 8), jnp.int32), backend="mosaic")


# Packed rows: one row holding segments of odd lengths, one of length 1 and one longer than
# a 16-row block, so that tiles are skipped, fully inside one segment or split by a boundary.
PACKED = (5, 23, 1, 40)
BLOCKS_16 = {f"block_{n}": 16 for n in ("q", "k", "q_dq", "k_dq", "q_dkv", "k_dkv")}


def _segment_ids(seg_lengths) -> np.ndarray:
    """[1, sum(seg_lengths)] int32: ids 0, 1, ... in runs of the given lengths."""
    return np.repeat(np.arange(len(seg_lengths)), seg_lengths)[None].astype(np.int32)


def _out_and_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of jit(fn) at (q, k, v) for the cotangent do."""
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return (out, *jax.jit(vjp)(do))


def _unpack(x, seg_lengths) -> jax.Array:
    """[1, T, ...] packed row -> [len(seg_lengths), max length, ...]: one segment per row,
    zero-padded at the end."""
    starts = np.cumsum((0, *seg_lengths))
    width = max(seg_lengths)
    return jnp.stack(
        [
            jnp.pad(x[0, a:b], [(0, width - (b - a))] + [(0, 0)] * (x.ndim - 2))
            for a, b in zip(starts[:-1], starts[1:])
        ]
    )


def _pack(x, seg_lengths) -> jax.Array:
    """The inverse of `_unpack`."""
    return jnp.concatenate([x[i, :n] for i, n in enumerate(seg_lengths)])[None]


@pytest.mark.parametrize(
    "dtype, kv_heads, causal", [(jnp.float32, 2, True), (jnp.bfloat16, 1, False)]
)
def test_packed_row_equals_each_segment_alone_and_the_reference(dtype, kv_heads, causal):
    """Each segment alone is one row of a batch (its padding masked by `lengths`), in one
    kernel call; the reference is the model's, `cope.functional.attention`, in fp32."""
    seed = int(np.random.default_rng().integers(2**31))
    q, k, v, do = _inputs(AttentionShape(1, sum(PACKED), 4, 32, kv_heads=kv_heads), dtype, seed)
    seg = _segment_ids(PACKED)
    packed = _out_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, **BLOCKS_16),
        q,
        k,
        v,
        do,
    )
    lengths = jnp.asarray(PACKED, jnp.int32)
    alone = _out_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, lengths=lengths, **BLOCKS_16),
        *(_unpack(x, PACKED) for x in (q, k, v, do)),
    )
    # Compared over the whole row: the length-1 segment's dq is zero up to rounding.
    alone = [_pack(x, PACKED) for x in alone]
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref = _out_and_grads(
        lambda q, k, v: F.attention(q, k, v, causal=causal, segment_ids=seg, impl="xla"), *f32
    )
    tol_fwd, tol_bwd = TOL[dtype]
    for name, x, y, r, tol in zip(
        ("out", "dq", "dk", "dv"), packed, alone, ref, (tol_fwd, tol_bwd, tol_bwd, tol_bwd)
    ):
        assert _rel(x, y) < tol, f"{name} vs alone {_rel(x, y):.2e} seed={seed}"
        assert _rel(x, r) < tol, f"{name} vs reference {_rel(x, r):.2e} seed={seed}"


def test_packed_rows_with_padding_and_unsorted_ids_match_the_reference():
    """Row 0 ends in padding (lengths); row 1's ids neither increase nor form one run per id
    (id 3 twice): tile pruning is loose there, the mask must still be exact."""
    causal = True
    seg = np.concatenate(
        [_segment_ids(PACKED), np.repeat([3, 1, 3, 0], [10, 20, 9, 30])[None]]
    ).astype(np.int32)
    lengths = jnp.asarray([60, 69], jnp.int32)
    seed = int(np.random.default_rng().integers(2**31))
    q, k, v, do = _inputs(AttentionShape(2, sum(PACKED), 4, 32, kv_heads=2), jnp.float32, seed)

    def ours(q, k, v):
        return flash_attention(
            q, k, v, causal=causal, lengths=lengths, segment_ids=seg, **BLOCKS_16
        )

    def ref(q, k, v):
        return F.attention(q, k, v, causal=causal, lengths=lengths, segment_ids=seg, impl="xla")

    got, want = _out_and_grads(ours, q, k, v, do), _out_and_grads(ref, q, k, v, do)
    tol_fwd, tol_bwd = TOL[jnp.float32]
    for name, x, r, tol in zip(
        ("out", "dq", "dk", "dv"), got, want, (tol_fwd, tol_bwd, tol_bwd, tol_bwd)
    ):
        assert _rel(x, r) < tol, f"{name} {_rel(x, r):.2e} seed={seed}"
    # The seam hands segment_ids to this kernel (default blocks).
    seam = F.attention(q, k, v, causal=causal, lengths=lengths, segment_ids=seg, impl="flash")
    assert _rel(seam, want[0]) < tol_fwd


def test_a_nan_in_one_segment_never_reaches_another():
    """NaN in a key and a value of segment 1 and in the padding: the other segments' outputs
    and gradients equal those of clean inputs (segment 1's rows left out of the loss)."""
    seg = _segment_ids(PACKED)
    seed = int(np.random.default_rng().integers(2**31))
    q, k, v, do = _inputs(AttentionShape(1, sum(PACKED), 4, 32, kv_heads=2), jnp.float32, seed)
    lengths = jnp.asarray([60], jnp.int32)
    one = np.asarray(seg[0] == 1)  # [T]
    do = jnp.where(one[None, :, None, None], 0.0, do)
    bad_k = k.at[0, 10].set(jnp.nan).at[0, 60:].set(jnp.nan)
    bad_v = v.at[0, 12, 0, 3].set(jnp.nan).at[0, 60:].set(jnp.inf)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, lengths=lengths, segment_ids=seg, **BLOCKS_16)

    clean = _out_and_grads(fn, q, k, v, do)
    bad = _out_and_grads(fn, q, bad_k, bad_v, do)
    assert np.isnan(np.asarray(bad[0])[0, 12:28]).all()  # segment 1's rows that see them
    for name, x, ref in zip(("out", "dq", "dk", "dv"), bad, clean):
        x, ref = np.asarray(x)[0, ~one], np.asarray(ref)[0, ~one]
        if name in ("dk", "dv"):
            x, ref = x[: 60 - 23], ref[: 60 - 23]  # keys before the padding
        assert np.isfinite(x).all(), f"{name} seed={seed}"
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6, err_msg=f"{name} seed={seed}")


# Compiled on the GPU with the tuned (large) blocks of the device table. Each case compiles
# three kernels, so dtypes alternate over shapes instead of multiplying them.
GPU_CASES = [(shape, dtype) for shape, dtype in zip(GPU_TEST, [jnp.bfloat16, jnp.float16] * 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape, dtype", GPU_CASES, ids=lambda x: getattr(x, "name", None))
def test_gpu_tuned_triton(shape, dtype, causal):
    _check(shape, causal=causal, dtype=dtype, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_ragged_tuned(causal):
    shape = GPU_TEST[0]
    _check(
        shape,
        causal=causal,
        dtype=jnp.bfloat16,
        lengths=[shape.s // 3 + 1] + [shape.s] * (shape.batch - 1),
    )


MOSAIC_CASES = [
    (AttentionShape(2, 1024, 8, 128, kv_heads=2), jnp.bfloat16),
    (AttentionShape(2, 512, 4, 64), jnp.float16),
    (AttentionShape(2, 1024, 4, 64), jnp.bfloat16),
    (AttentionShape(1, 512, 4, 128, kv_len=1536, kv_heads=1), jnp.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape, dtype", MOSAIC_CASES, ids=lambda x: getattr(x, "name", None))
def test_gpu_mosaic(shape, dtype, causal):
    # The Hopper forward (backward: Triton kernels on its residuals), forced so that a silent
    # fallback cannot hide a failure.
    _check(shape, causal=causal, dtype=dtype, backend="mosaic")
