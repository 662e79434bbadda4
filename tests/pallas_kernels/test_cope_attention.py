"""Fused CoPE attention (Pallas) against float64 `cope.functional.cope_attention`: forward,
residuals and every gradient through the custom_vjp, and lowering for Hopper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from cope import functional as F
from pallas_kernels.cope_attention import (
    ForwardConfig,
    cope_attention,
    cope_attention_fwd,
    why_unsupported,
)
from pallas_kernels.cope_attention.shapes import GPU_TEST, CopeShape

# Relative-norm tolerances ‖x − ref‖/‖ref‖ against float64 on the same inputs, by input dtype:
# (forward, gradients). The kernels round P and dS to the input dtype before their second
# matmuls, as every flash kernel does; gates and positions stay float32.
TOL = {
    jnp.float32: (2e-5, 1e-4),
    jnp.bfloat16: (1e-2, 2e-2),
}
GRAD_NAMES = ("q", "k", "v", "pos_emb", "gate_k")
MIN_GAP = 2e-5  # positions closer than this to an integer sit on a jump of the gradient


def _position_gap(q, gate_k, lengths, causal: bool, npos: int) -> float:
    """Smallest float64 distance of an unclamped position (suffix sum of gates, <= npos - 1)
    to an integer >= 1, over allowed pairs."""
    q, gate_k = np.asarray(q, np.float64), np.asarray(gate_k, np.float64)
    b, t, h, d = q.shape
    s = gate_k.shape[1]
    keys = np.repeat(gate_k, h // gate_k.shape[2], axis=2)
    mask = np.ones((b, 1, t, s), bool)
    if causal:
        mask &= (np.arange(s)[None, :] <= np.arange(t)[:, None] + s - t)[None, None]
    if lengths is not None:
        mask &= (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    gates = np.where(mask, 1 / (1 + np.exp(-np.einsum("bthd,bshd->bhts", q, keys) / d**0.5)), 0)
    suffix = np.flip(np.cumsum(np.flip(gates, -1), -1), -1)
    nearest = np.round(suffix)
    near = mask & (nearest >= 1) & (nearest <= npos - 1)
    return float(np.min(np.where(near, np.abs(suffix - nearest), np.inf), initial=np.inf))


def _rel(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.isfinite(x).all(), "non-finite kernel output"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _inputs(shape: CopeShape, dtype, seed: int, *, gate_k: bool, gate_bias: float = 0.0):
    """Random q, k, v, pos_emb (and gate keys), plus the output cotangent.

    `gate_bias` adds a shared direction c·u to q and sign(gate_bias)·c·u to the gate keys, so
    q·gk ~ ±c² pushes every gate toward 1 (> 0) or toward 0 (< 0).
    """
    keys = jax.random.split(jax.random.key(seed), 7)
    b, t, h, d, s, kh = shape.batch, shape.q_len, shape.heads, shape.head_dim, shape.s, shape.k
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, s, kh, d))
    v = jax.random.normal(keys[2], (b, s, kh, d))
    e = jax.random.normal(keys[3], (shape.npos, d))
    gk = jax.random.normal(keys[4], (b, s, kh, d)) if gate_k else None
    if gate_bias:
        u = jax.random.normal(keys[5], (d,))
        u = u / jnp.linalg.norm(u) * abs(gate_bias) ** 0.5 * d**0.25
        q = q + u
        if gk is None:
            k = k + np.sign(gate_bias) * u
        else:
            gk = gk + np.sign(gate_bias) * u
    do = jax.random.normal(keys[6], (b, t, h, d))
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return tuple(map(cast, (q, k, v, e, gk, do)))


def _check(
    shape: CopeShape,
    *,
    causal: bool,
    dtype,
    lengths=None,
    nodiv: bool = False,
    gate_k: bool = False,
    gate_bias: float = 0.0,
    grads: bool = True,
    vanishing: tuple[str, ...] = (),
    **tuning,
):
    """Kernel vs float64 reference: output, then (grads) every input gradient.

    Gradients named in `vanishing` are ~0 by cancellation in this regime, so their error is
    measured against the norm of dq instead of their own.
    """
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    # Fresh inputs every run. The exact gradient jumps where a position crosses an integer and
    # float32 positions are a few ulps of the gate total off, so for gradients, inputs that put
    # a position within MIN_GAP of an integer are drawn again rather than compared there.
    for _ in range(20):
        seed = int(np.random.default_rng().integers(2**31))
        q, k, v, e, gk, do = _inputs(shape, dtype, seed, gate_k=gate_k, gate_bias=gate_bias)
        gate_keys = k if gk is None else gk
        if not grads or _position_gap(q, gate_keys, lengths, causal, shape.npos) >= MIN_GAP:
            break
    else:
        pytest.fail(f"no inputs with every position {MIN_GAP} away from an integer")
    args = (q, k, v, e) + ((gk,) if gate_k else ())
    kw = dict(causal=causal, lengths=lengths, nodiv=nodiv)

    def ours(q, k, v, e, gk=None):
        return cope_attention(q, k, v, e, gate_k=gk, **kw, **tuning)

    def ref(q, k, v, e, gk=None):
        return F.cope_attention(q, k, v, e, gate_k=gk, **kw)

    def ref_vjp(do, *args):
        out, vjp = jax.vjp(ref, *args)
        return out, vjp(do)

    tol_fwd, tol_bwd = TOL[dtype]
    msg = f"seed={seed} {shape.name} causal={causal} {jnp.dtype(dtype).name} {kw} {tuning}"
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (do, *args)]
        if grads:
            ref_out, ref_grads = jax.jit(ref_vjp)(*args64)
        else:
            ref_out = jax.jit(ref)(*args64[1:])
    if grads:
        out, vjp = jax.vjp(jax.jit(ours), *args)
        got = jax.jit(vjp)(do)
    else:
        out, got = jax.jit(ours)(*args), ()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref_out) < tol_fwd, f"out {_rel(out, ref_out):.2e} {msg}"
    for name, g, rg, x in zip(GRAD_NAMES, got, ref_grads if grads else (), args):
        assert g.shape == x.shape and g.dtype == x.dtype, f"d{name} {g.shape} {g.dtype}"
        err = _rel(g, rg)
        if name in vanishing:
            err *= np.linalg.norm(np.asarray(rg)) / np.linalg.norm(np.asarray(ref_grads[0]))
        assert err < tol_bwd, f"d{name} {err:.2e} {msg}"
    return out, got


# Forward and every gradient. Each case folds several features together (interpret mode is
# slow): GQA 4→1 and 8→2, ragged lengths with an empty sequence, T < S, npos 2/17/64/513,
# nodiv, gate keys, tiles with block_q > block_k, bf16 with every gate near 0 (no row ever
# saturates; positions sit at ~0, so d pos_emb cancels to ~0).
GRAD_CASES = [
    (
        CopeShape(3, 129, 4, 32, 17, kv_heads=1),
        dict(dtype=jnp.float32, causal=True, lengths=[129, 50, 0], block_q=64, block_k=16),
    ),
    (
        CopeShape(2, 64, 8, 32, 64, kv_heads=2),
        dict(dtype=jnp.float32, causal=False, lengths=[40, 64], nodiv=True, gate_k=True),
    ),
    (CopeShape(2, 17, 2, 32, 513, kv_len=64), dict(dtype=jnp.float32, causal=True, gate_k=True)),
    (
        CopeShape(2, 129, 4, 32, 2, kv_heads=2),
        dict(dtype=jnp.bfloat16, causal=True, gate_bias=-40.0, vanishing=("pos_emb",)),
    ),
]


@pytest.mark.parametrize("shape, case", GRAD_CASES, ids=lambda x: getattr(x, "name", None))
def test_forward_and_gradients(shape, case):
    lengths = case.get("lengths")
    out, grads = _check(shape, **case)
    for b, n in enumerate([] if lengths is None else lengths):
        # Keys past a sequence's length get exactly zero gradient; an empty sequence has zero
        # output and zero (finite) gradients everywhere.
        assert np.all(np.asarray(grads[1])[b, n:] == 0) and np.all(np.asarray(grads[2])[b, n:] == 0)
        if n == 0:
            assert np.all(np.asarray(out)[b] == 0)
            assert all(np.all(np.asarray(g)[b] == 0) for g in grads[:3])


# Forward only: the lengths the gradient cases leave out (300 is ten 32-key tiles), and bf16
# with every gate near 1 (positions are distances, saturated npos - 1 keys left of the diagonal).
FORWARD_CASES = [
    (CopeShape(1, 300, 2, 64, 64), dict(dtype=jnp.bfloat16, causal=False)),
    (CopeShape(2, 1, 4, 64, 2, kv_heads=1), dict(dtype=jnp.float32, causal=True)),
    (
        CopeShape(2, 129, 4, 32, 17, kv_heads=2),
        dict(dtype=jnp.bfloat16, causal=True, gate_bias=40.0),
    ),
]


@pytest.mark.parametrize("shape, case", FORWARD_CASES, ids=lambda x: getattr(x, "name", None))
def test_forward(shape, case):
    _check(shape, grads=False, **case)


def _reference_residuals(q, k, e, lengths, *, causal, scale, nodiv):
    """float64 lse [B, H, T] (+inf without visible keys) and gate totals, from the definition."""
    q, k, e = (np.asarray(x, np.float64) for x in (q, k, e))
    b, t, h, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    kk = np.repeat(k, h // kh, axis=2)
    content = np.einsum("bthd,bshd->bhts", q, kk)
    mask = np.ones((b, 1, t, s), bool)
    if causal:
        mask &= (np.arange(s)[None, :] <= np.arange(t)[:, None] + s - t)[None, None]
    mask &= (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    gates = np.where(mask, 1 / (1 + np.exp(-content * scale)), 0.0)
    pos = np.minimum(np.flip(np.cumsum(np.flip(gates, -1), -1), -1), e.shape[0] - 1)
    z = np.einsum("bthd,nd->bhtn", q, e)
    lo = np.floor(pos).astype(int)
    z_lo = np.take_along_axis(z, lo, -1)
    z_hi = np.take_along_axis(z, np.minimum(lo + 1, e.shape[0] - 1), -1)
    z_pos = z_lo + (pos - lo) * (z_hi - z_lo)
    logits = content * scale + z_pos if nodiv else (content + z_pos) * scale
    logits = np.where(mask, logits, -np.inf)
    top = np.max(logits, -1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    lse = np.log(np.sum(np.exp(logits - top), -1)) + top[..., 0]
    return np.where(mask.any(-1), lse, np.inf), gates.sum(-1)


def test_residuals_lse_and_gate_totals():
    # T < S, an empty sequence, nodiv; non-causal residuals are covered through the gradients.
    shape = CopeShape(2, 77, 4, 32, 17, kv_len=90, kv_heads=2)
    q, k, v, e, _, _ = _inputs(
        shape, jnp.float32, int(np.random.default_rng().integers(2**31)), gate_k=False
    )
    lengths = jnp.array([90, 0], jnp.int32)
    common = dict(causal=True, scale=None, nodiv=True, config=None, interpret=True)
    _, lse, gate_total = cope_attention_fwd(q, k, v, e, None, lengths, **common)
    ref_lse, ref_total = _reference_residuals(
        q, k, e, lengths, causal=True, scale=32**-0.5, nodiv=True
    )
    assert lse.shape == gate_total.shape == (2, 4, 77)
    assert lse.dtype == gate_total.dtype == jnp.float32
    assert np.all(np.asarray(lse[1]) == np.inf) and np.all(np.asarray(gate_total[1]) == 0)
    assert _rel(lse[0], ref_lse[0]) < 2e-6
    assert _rel(gate_total, ref_total) < 2e-6
    # Without exact totals (the forward-only path) saturated blocks stop summing at the
    # saturation switch (which these sizes reach), but the clamp to npos - 1 stays exact.
    _, _, partial = cope_attention_fwd(q, k, v, e, None, lengths, exact_gate_total=False, **common)
    clamp = lambda x: np.minimum(np.asarray(x), shape.npos - 1)  # noqa: E731
    np.testing.assert_allclose(clamp(partial), clamp(ref_total), rtol=2e-6, atol=2e-6)
    assert np.all(np.asarray(partial) <= np.asarray(gate_total) * (1 + 1e-6) + 1e-6)
    assert np.any(np.asarray(partial) < np.asarray(gate_total) - 1)


def test_why_unsupported_and_validation():
    q = jnp.zeros((1, 8, 4, 32))
    k = jnp.zeros((1, 8, 2, 32))
    e = jnp.zeros((5, 32))
    assert why_unsupported(q, k, k, e) is None
    assert why_unsupported(q, k, k, e, gate_k=k) is None
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, k, e)]
    assert why_unsupported(*bf16) is None
    assert "dtype" in why_unsupported(q.astype(jnp.int32), k, k, e)
    assert "gate_k" in why_unsupported(q, k, k, e, gate_k=k.astype(jnp.bfloat16))
    big = jnp.zeros((1, 8, 2, 512))
    assert "head_dim" in why_unsupported(big, big, big, jnp.zeros((5, 512)))
    assert "npos" in why_unsupported(q, k, k, jnp.zeros((4096, 32)))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cope_attention(q, jnp.zeros((1, 8, 3, 32)), jnp.zeros((1, 8, 3, 32)), e)
    with pytest.raises(ValueError, match="pos_emb"):
        cope_attention(q, k, k, jnp.zeros((5, 16)))
    with pytest.raises(ValueError, match="gate_k"):
        cope_attention(q, k, k, e, gate_k=q)
    with pytest.raises(ValueError, match="lengths"):
        cope_attention(q, k, k, e, lengths=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="unknown tuning"):
        cope_attention(q, k, k, e, block_z=64)
    with pytest.raises(ValueError, match="block_q"):
        cope_attention(q, k, k, e, block_q=48)


@pytest.mark.parametrize("device_kind", ["NVIDIA H100", "NVIDIA H200"])
def test_lowers_for_hopper(device_kind):
    # Forward and forward + backward (jax.grad through the custom_vjp), compiled config.
    mesh = AbstractMesh(
        (1,),
        ("x",),
        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu"),
    )
    checks = [
        export.DisabledSafetyCheck.custom_call(n)
        for n in ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
    ]
    sds = jax.ShapeDtypeStruct
    kv = sds((2, 300, 2, 64), jnp.bfloat16)
    args = (
        sds((2, 300, 4, 64), jnp.bfloat16),
        kv,
        kv,
        sds((513, 64), jnp.bfloat16),
        kv,
        sds((2,), jnp.int32),
    )
    config = ForwardConfig(64, 64, 4, 2)

    def fwd(q, k, v, e, gk, lengths):
        return cope_attention(
            q, k, v, e, gate_k=gk, lengths=lengths, interpret=False, config=config
        )

    def loss(q, k, v, e, gk, lengths):
        return fwd(q, k, v, e, gk, lengths).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    with use_abstract_mesh(mesh):
        for f in (fwd, grad):
            text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
                *args
            ).mlir_module()
            assert "__gpu$xla.gpu.triton" in text


# Compiled on the GPU with the default (large) tiles.
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", GPU_TEST, ids=lambda x: x.name)
def test_gpu_compiled(shape, causal):
    _check(shape, causal=causal, dtype=jnp.bfloat16, gate_k=shape.npos == 513)
