"""Choosing between compiled Pallas and interpret mode (CPU CI) for every kernel."""

import jax


def gpu_available() -> bool:
    """True when the default backend is a CUDA GPU."""
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret when no GPU is present, compile otherwise."""
    if interpret is None:
        return not gpu_available()
    return bool(interpret)
