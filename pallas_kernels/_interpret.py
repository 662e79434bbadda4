"""Choosing between compiled Pallas and interpret mode (CPU CI) for every kernel."""

from pallas_kernels import _device


def gpu_available() -> bool:
    """True when the kernels are built for a GPU: the default device, or the abstract mesh's
    device when lowering for one (`jax.sharding.use_abstract_mesh`)."""
    return _device.is_gpu()


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret when no GPU is the target, compile otherwise."""
    if interpret is None:
        return not gpu_available()
    return bool(interpret)
