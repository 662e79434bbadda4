"""Flash attention (Pallas) against the fp32 reference: forward, lse and all three gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
        if np.linalg.norm(np.asarray(rg, np.float64)) > 0:
            err = _rel(g, rg)
        else:  # e.g. dq with a single visible key: compare the RMS instead
            err = float(np.sqrt(np.mean(np.asarray(g, np.float64) ** 2)))
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
