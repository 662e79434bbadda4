"""Test helpers shared by the model and decoding tests."""

import jax
import numpy as np
from flax import nnx

from cope.model import ModelConfig, Transformer


def tiny_config(encoding: str, vocab_size: int, **overrides) -> ModelConfig:
    """A 2-layer, 32-wide GQA model (4 heads, 2 KV heads) with short tables, for fast tests."""
    fields = dict(
        vocab_size=vocab_size,
        num_layers=2,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        encoding=encoding,
        max_len=24,
        npos=9,
    )
    return ModelConfig(**(fields | overrides))


def make_model(cfg: ModelConfig, seed: int | None = None) -> Transformer:
    """A model in eval mode with fresh random weights, CoPE tables included.

    The CoPE tables start at zero, which would make the model position-free; they are drawn
    at random here so that tests exercise the position term.
    """
    seed = np.random.SeedSequence().entropy % 2**31 if seed is None else seed
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    if cfg.spec.cope:
        for path, param in nnx.iter_graph(model):
            if path and path[-1] == "table" and isinstance(param, nnx.Param):
                param[...] = jax.random.normal(jax.random.key(seed), param.shape, param.dtype)
    model.eval()
    return model
