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


def test_bench_train_reports_mfu_with_options(tmp_path):
    from experiments import bench_train

    out = tmp_path / "speed"
    args = ["--config", "configs/counting.py", "--variants", "abs,cope", "--options", "smoke"]
    bench_train.main([*args, "--steps", "1", "--warmup", "1", "--out", str(out)])
    records = json.loads(out.with_suffix(".json").read_text())
    assert records[0]["flop_params"] == records[1]["flop_params"]
    assert [r["config"] for r in records] == [
        "configs/counting.py:abs,smoke",
        "configs/counting.py:cope,smoke",
    ]
    for r in records:
        assert r["flop_params"] < r["num_params"]  # the position tables are left out
        per_token = bench_train.flops_per_token(r["flop_params"], 1, 32, r["seq_len"])
        assert r["flops_per_token"] == per_token
        expected = per_token * r["tokens_per_s"] / 1e12
        np.testing.assert_allclose(r["model_tflops"], expected, rtol=1e-9)
        np.testing.assert_allclose(r["mfu"], r["model_tflops"] / bench_train.H100_BF16_TFLOPS)
        # Counting pads its programs to seq_len: the real-token rate counts the timed batch's
        # non-padding inputs (batch 1 at step `warmup`), so it is below the padded rate.
        from experiments.configlib import load_config
        from experiments.train import build_task

        config = load_config(r["config"])
        task = build_task(config)
        inputs = task.train_batch(config.train.seed, 1, r["batch"])["inputs"]
        assert r["real_tokens_per_batch"] == (inputs != task.pad_id).sum()
        assert r["real_tokens_per_batch"] < r["batch"] * r["seq_len"]
        np.testing.assert_allclose(
            r["real_tokens_per_s"] / r["tokens_per_s"],
            r["real_tokens_per_batch"] / (r["batch"] * r["seq_len"]),
        )
    assert "MFU" in out.with_suffix(".md").read_text()
