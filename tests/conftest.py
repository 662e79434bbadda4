"""Shared pytest setup: skip `gpu`-marked tests when no GPU is present."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
