"""Every Pallas kernel lowers for Hopper GPUs on the CPU (jax.export under an abstract mesh).

A kernel that cannot compile its Triton or Mosaic GPU module for an H100 or H200 fails here, on
the CPU, and so does a call that silently falls back to XLA: each test asserts that the exported
module holds the kernel's custom call.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import _device, decode_attention, flash_attention

DEVICES = ("NVIDIA H100", "NVIDIA H200")
TRITON = "__gpu$xla.gpu.triton"
MOSAIC = ("mosaic_gpu", "mosaic_gpu_v2")
_KERNEL_CALLS = (TRITON, *MOSAIC)
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.]+)")

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def _mesh(device_kind: str) -> AbstractMesh:
    device = AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
    return AbstractMesh((1,), ("x",), abstract_device=device)


def _export(fn, *args, device_kind: str) -> str:
    """Exports `jax.jit(fn)` for CUDA under the abstract device; the StableHLO text."""
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in _KERNEL_CALLS]
    with use_abstract_mesh(_mesh(device_kind)):
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def _lower(fn, *args, device_kind: str) -> dict[str, int]:
    """{custom-call target: count} of the exported module."""
    calls: dict[str, int] = {}
    for target in _CUSTOM_CALL.findall(_export(fn, *args, device_kind=device_kind)):
        calls[target] = calls.get(target, 0) + 1
    return calls


def _mosaic_calls(calls: dict[str, int]) -> int:
    return sum(calls.get(name, 0) for name in MOSAIC)


def _grad(fn, argnums):
    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=argnums)


def _kernel(module: str, function: str, *, needs: str | None = None):
    """`module.function`, skipped only while the module (or its file `needs`) does not exist
    or does not export the function yet; an import error fails."""
    for required in (module, needs):
        if required is not None and importlib.util.find_spec(required) is None:
            pytest.skip(f"{required} does not exist yet")
    fn = getattr(importlib.import_module(module), function, None)
    if fn is None:
        pytest.skip(f"{module} does not export {function} yet")
    return fn


def test_target_device_is_the_abstract_device():
    real = jax.devices()[0].device_kind
    assert _device.device_kind() == real
    for kind in DEVICES:
        with use_abstract_mesh(_mesh(kind)):
            assert _device.device_kind() == kind
            assert _device.is_gpu() and _device.is_hopper()
            assert _device.core_count(0) == 132
    with use_abstract_mesh(_mesh("NVIDIA A100-SXM4-80GB")):
        assert _device.is_gpu() and not _device.is_hopper()
    assert _device.device_kind() == real


# q [B, T, H, D], k/v [B, S, K, D], extra input (None, "lengths" or "segment_ids"): one
# Mosaic-eligible shape (no lengths, T and S multiples of the Mosaic blocks), one that pads (odd
# T < S, GQA 4 -> 1, ragged) and packed rows (odd T, GQA, lengths and segment ids: the Triton
# forward).
FLASH_CASES = {
    "B2 T256 H4 D64": ((2, 256, 4, 64), (2, 256, 4, 64), None),
    "B2 T129 S300 H4 K1 D64 lengths": ((2, 129, 4, 64), (2, 300, 1, 64), "lengths"),
    "B2 T300 H4 K2 D64 lengths segment_ids": ((2, 300, 4, 64), (2, 300, 2, 64), "segment_ids"),
}


def _flash_args(case: str):
    q_shape, k_shape, extra = FLASH_CASES[case]
    args = [S(q_shape, BF16), S(k_shape, BF16), S(k_shape, BF16)]
    if extra is not None:
        args.append(S((q_shape[0],), jnp.int32))
    if extra == "segment_ids":
        args.append(S(q_shape[:2], jnp.int32))
    return args, extra


def _flash(extra: str | None, **kwargs):
    if extra == "segment_ids":
        return lambda q, k, v, n, seg: flash_attention(
            q, k, v, lengths=n, segment_ids=seg, interpret=None, **kwargs
        )
    if extra == "lengths":
        return lambda q, k, v, n: flash_attention(q, k, v, lengths=n, interpret=None, **kwargs)
    return lambda q, k, v: flash_attention(q, k, v, interpret=None, **kwargs)


@pytest.mark.parametrize("device_kind", DEVICES)
def test_flash_forward_uses_mosaic_gpu_on_hopper(device_kind):
    args, extra = _flash_args("B2 T256 H4 D64")
    calls = _lower(_flash(extra), *args, device_kind=device_kind)
    assert _mosaic_calls(calls) == 1 and TRITON not in calls, calls


@pytest.mark.parametrize("device_kind", DEVICES)
def test_flash_forward_with_segment_ids_uses_triton_on_hopper(device_kind):
    # A shape the Mosaic kernel covers: packed rows still go to the Triton forward.
    q = S((2, 256, 4, 64), BF16)
    fn = lambda q, k, v, seg: flash_attention(q, k, v, segment_ids=seg, interpret=None)  # noqa: E731
    calls = _lower(fn, q, q, q, S((2, 256), jnp.int32), device_kind=device_kind)
    assert calls.get(TRITON) == 1 and not _mosaic_calls(calls), calls


@pytest.mark.parametrize("case", FLASH_CASES)
@pytest.mark.parametrize("device_kind", DEVICES)
def test_flash_forward_triton(device_kind, case):
    args, extra = _flash_args(case)
    calls = _lower(_flash(extra, backend="triton"), *args, device_kind=device_kind)
    assert calls.get(TRITON) == 1 and not _mosaic_calls(calls), calls


@pytest.mark.parametrize("case", FLASH_CASES)
@pytest.mark.parametrize("device_kind", DEVICES)
def test_flash_forward_backward(device_kind, case):
    args, extra = _flash_args(case)
    calls = _lower(_grad(_flash(extra), (0, 1, 2)), *args, device_kind=device_kind)
    # The backward is two Triton kernels (dq, then dk/dv); the forward is Mosaic where it covers
    # the shape, else a third Triton kernel.
    mosaic = _mosaic_calls(calls)
    assert mosaic == (0 if extra else 1), calls
    assert calls.get(TRITON) == 3 - mosaic, calls


@pytest.mark.parametrize("softmax", ("online", "unified_max"))
@pytest.mark.parametrize("device_kind", DEVICES)
def test_decode_attention(device_kind, softmax):
    q, cache, lengths = S((2, 8, 64), BF16), S((2, 1000, 2, 64), BF16), S((2,), jnp.int32)

    def fn(q, k, v, n):
        return decode_attention(q, k, v, n, softmax=softmax, num_splits=4, interpret=None)

    calls = _lower(fn, q, cache, cache, lengths, device_kind=device_kind)
    assert calls.get(TRITON) == 1, calls


# q [B, T, H, D], k/v (and gate keys) [B, S, K, D], npos, lengths?, separate gate keys?,
# segment ids (packed rows, T == S)?
COPE_CASES = {
    "B2 T256 H4 D64 npos64": ((2, 256, 4, 64), (2, 256, 4, 64), 64, False, False, False),
    "B2 T129 S300 H4 K1 D64 npos513 lengths gate_k": (
        (2, 129, 4, 64),
        (2, 300, 1, 64),
        513,
        True,
        True,
        False,
    ),
    "B2 T300 H4 K2 D64 npos64 lengths segment_ids": (
        (2, 300, 4, 64),
        (2, 300, 2, 64),
        64,
        True,
        False,
        True,
    ),
}


def _cope_call(case: str):
    """(fn(q, k, v, pos_emb, [lengths], [gate_k], [segment_ids]), its abstract args, the
    positions of its differentiable args)."""
    cope_attention = _kernel("pallas_kernels.cope_attention", "cope_attention")
    why_unsupported = _kernel("pallas_kernels.cope_attention", "why_unsupported")
    q_shape, k_shape, npos, ragged, sep_gates, packed = COPE_CASES[case]
    q, k, pos_emb = S(q_shape, BF16), S(k_shape, BF16), S((npos, q_shape[3]), jnp.float32)
    reason = why_unsupported(q, k, k, pos_emb, gate_k=k if sep_gates else None)
    assert reason is None, reason
    args = [q, k, k, pos_emb]
    if ragged:
        args.append(S((q_shape[0],), jnp.int32))
    if sep_gates:
        args.append(k)
    if packed:
        args.append(S(q_shape[:2], jnp.int32))

    def fn(q, k, v, pos_emb, *rest):
        rest = list(rest)
        lengths = rest.pop(0) if ragged else None
        gate_k = rest.pop(0) if sep_gates else None
        segments = {"segment_ids": rest.pop(0)} if packed else {}
        return cope_attention(
            q, k, v, pos_emb, lengths=lengths, gate_k=gate_k, interpret=None, **segments
        )

    wrt = (0, 1, 2, 3, 4 + ragged) if sep_gates else (0, 1, 2, 3)
    return fn, args, wrt


def _lower_cope(fn, args, case: str, device_kind: str) -> dict[str, int]:
    """Custom calls of the exported module, checking that no [T, S] array appears in it (the
    kernel's residuals are O(T); checked where T != S, so the dims are unambiguous)."""
    module = _export(fn, *args, device_kind=device_kind)
    q_len, kv_len = COPE_CASES[case][0][1], COPE_CASES[case][1][1]
    if q_len != kv_len:
        square = re.compile(rf"tensor<(?:\d+x)*({q_len}x{kv_len}|{kv_len}x{q_len})x")
        assert not square.search(module), f"a [T, S] array in the module: {square.search(module)}"
    calls: dict[str, int] = {}
    for target in _CUSTOM_CALL.findall(module):
        calls[target] = calls.get(target, 0) + 1
    return calls


@pytest.mark.parametrize("case", COPE_CASES)
@pytest.mark.parametrize("device_kind", DEVICES)
def test_cope_attention_forward(device_kind, case):
    fn, args, _ = _cope_call(case)
    calls = _lower_cope(fn, args, case, device_kind)
    assert calls.get(TRITON, 0) >= 1, calls


@pytest.mark.parametrize("case", COPE_CASES)
@pytest.mark.parametrize("device_kind", DEVICES)
def test_cope_attention_forward_backward(device_kind, case):
    bwd = "pallas_kernels.cope_attention.pallas_triton_bwd"
    _kernel("pallas_kernels.cope_attention", "cope_attention", needs=bwd)
    fn, args, wrt = _cope_call(case)
    calls = _lower_cope(_grad(fn, wrt), args, case, device_kind)
    assert calls.get(TRITON, 0) >= 2, calls  # the forward kernel and at least one backward


@pytest.mark.parametrize("softmax", ("online", "unified_max"))
@pytest.mark.parametrize("device_kind", DEVICES)
def test_cope_decode_attention(device_kind, softmax):
    cope_decode_attention = _kernel("pallas_kernels.cope_decode_attention", "cope_decode_attention")
    q, cache = S((2, 8, 64), BF16), S((2, 1000, 2, 64), BF16)
    pos_emb, lengths = S((64, 64), jnp.float32), S((2,), jnp.int32)

    def fn(q, k, v, pos_emb, n):
        return cope_decode_attention(q, k, v, pos_emb, n, softmax=softmax, interpret=None)

    calls = _lower(fn, q, cache, cache, pos_emb, lengths, device_kind=device_kind)
    assert calls.get(TRITON, 0) >= 1, calls
