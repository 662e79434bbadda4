"""Autoregressive decoding: KV cache, prefill, on-device generation, samplers, φ calibration."""

from decoding import samplers
from decoding.cache import KVCache, LayerCache
from decoding.calibrate import DEFAULT_QUANTILE, calibrate, logit_quantiles
from decoding.generate import Generation, generate, generate_uncached
from decoding.samplers import greedy, temperature, top_k, top_p
from decoding.step import decode_step, prefill

__all__ = [
    "DEFAULT_QUANTILE",
    "Generation",
    "KVCache",
    "LayerCache",
    "calibrate",
    "decode_step",
    "generate",
    "generate_uncached",
    "greedy",
    "logit_quantiles",
    "prefill",
    "samplers",
    "temperature",
    "top_k",
    "top_p",
]
