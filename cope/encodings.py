"""Position encodings selectable by name, and the small NNX modules holding their tables."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ENCODINGS = (
    "none",
    "absolute",
    "sinusoidal",
    "relative",
    "rope",
    "cope",
    "cope+rope",
    "cope+relative",
)


@dataclasses.dataclass(frozen=True)
class EncodingSpec:
    """What an encoding name turns on. `absolute` is None, "learned" or "sinusoidal"."""

    name: str
    absolute: str | None = None
    relative: bool = False
    rope: bool = False
    cope: bool = False

    @property
    def needs_bias(self) -> bool:
        """True when attention needs a logit term the flash kernel cannot take."""
        return self.relative or self.cope


def parse_encoding(name: str) -> EncodingSpec:
    """Maps an encoding name to what it turns on; unknown names raise a ValueError."""
    if name not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {name!r}")
    parts = set(name.split("+"))
    return EncodingSpec(
        name=name,
        absolute={"absolute": "learned", "sinusoidal": "sinusoidal"}.get(name),
        relative="relative" in parts,
        rope="rope" in parts,
        cope="cope" in parts,
    )


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """The fixed sin/cos table of Vaswani et al. 2017, [length, dim] float32."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    inv_freq = 10000.0 ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(positions * inv_freq)
    table[:, 1::2] = np.cos(positions * inv_freq[: dim // 2])
    return table.astype(np.float32)


class AbsolutePositions(nnx.Module):
    """Learned absolute position table added to token embeddings, init randn·d^-0.5."""

    def __init__(self, max_len: int, dim: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.table = nnx.Param(
            jax.random.normal(rngs.params(), (max_len, dim), param_dtype) * dim**-0.5
        )

    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions [B, T] int -> [B, T, dim]."""
        return jnp.take(self.table[...], positions, axis=0)


class SinusoidalPositions(nnx.Module):
    """Fixed sinusoidal table (not trained) added to token embeddings."""

    def __init__(self, max_len: int, dim: int):
        self.table = nnx.Variable(jnp.asarray(sinusoidal_table(max_len, dim)))

    def __call__(self, positions: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], positions, axis=0)


class RelativeTable(nnx.Module):
    """Relative-position table r[0..R-1] [R, head_dim], init randn·head_dim^-0.5.

    As in the official code, one table is shared by every layer and head.
    """

    def __init__(self, max_distance: int, head_dim: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.table = nnx.Param(
            jax.random.normal(rngs.params(), (max_distance, head_dim), param_dtype) * head_dim**-0.5
        )


class CoPETable(nnx.Module):
    """CoPE position embeddings e[0..npos-1] [npos, head_dim], zero-initialised.

    Zero init makes the model position-free (NoPE) at step 0, as in the official code.
    """

    def __init__(self, npos: int, head_dim: int, *, param_dtype: jnp.dtype):
        self.table = nnx.Param(jnp.zeros((npos, head_dim), param_dtype))
