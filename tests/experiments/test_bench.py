"""Benchmark scripts run end to end on tiny shapes (their numbers are only meaningful on a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from cope import functional as F
from experiments.bench import cope_parts


def test_matmul_suffix_sums_match_cumsum():
    gates = jax.random.uniform(jax.random.key(3), (2, 3, 37, 37), jnp.float32)
    expected = np.flip(np.cumsum(np.flip(np.asarray(gates, np.float64), -1), -1), -1)
    got = cope_parts.suffix_sums_matmul(gates)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(F.cope_positions(gates, 1000), expected, rtol=1e-5, atol=1e-5)


def test_cope_parts_writes_a_row_per_piece(tmp_path, capsys):
    out = tmp_path / "parts"
    cope_parts.main(["--batch", "1", "--seq", "19", "--heads", "2", "--head-dim", "8",
                     "--npos", "11", "--out", str(out)])  # fmt: skip
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["shape"] == "B1 T19 H2 D8 npos11"
    assert len(report["rows"]) == 6
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in report["rows"])
    assert "| CoPE attention |" in capsys.readouterr().out
