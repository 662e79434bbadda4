"""The device a kernel is built for: the abstract mesh's device when one is set, else the first
real device, so that lowering for a GPU on a machine without one makes the same choices."""

from __future__ import annotations

import re

import jax
from jax.sharding import AbstractDevice

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# Hopper device kinds as the CUDA driver reports them ("NVIDIA H100 80GB HBM3", "NVIDIA H200",
# "NVIDIA GH200 480GB", "NVIDIA H800", "NVIDIA H20"), for abstract devices, which carry no
# compute capability.
_HOPPER_KIND = re.compile(r"\bG?H(100|200|800|20)\b")


def target_device() -> AbstractDevice:
    """The device being compiled for, as an `AbstractDevice` with platform "gpu" for any GPU.

    Under `jax.sharding.use_abstract_mesh(mesh)` with `mesh.abstract_device` set (lowering for
    a GPU from a CPU host, e.g. with `jax.export`) that device; otherwise `jax.devices()[0]`.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        real = jax.devices()[0]
        cores = getattr(real, "core_count", None) if real.platform == "gpu" else None
        device = AbstractDevice(
            device_kind=real.device_kind, num_cores=cores, platform=real.platform
        )
    if device.platform in _GPU_PLATFORMS and device.platform != "gpu":
        device = AbstractDevice(device.device_kind, device.num_cores, "gpu")
    return device


def device_kind() -> str:
    """`device_kind` of the target device, e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
    return target_device().device_kind


def is_gpu() -> bool:
    """True when the target device is a GPU (real or abstract)."""
    return target_device().platform == "gpu"


def is_hopper() -> bool:
    """True when the target is a Hopper GPU (sm_90: TMA and wgmma, which Mosaic GPU needs)."""
    if not is_gpu():
        return False
    if jax.sharding.get_abstract_mesh().abstract_device is None:
        capability = getattr(jax.devices()[0], "compute_capability", None)
        if capability is not None:
            return str(capability).split(".")[0] == "9"
    return _HOPPER_KIND.search(device_kind()) is not None


def core_count(default: int) -> int:
    """Streaming multiprocessors (GPU) or cores of the target device; `default` when unknown."""
    return int(target_device().num_cores or default)
