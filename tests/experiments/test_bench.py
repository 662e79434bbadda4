"""Benchmark scripts run end to end on tiny shapes (their numbers are only meaningful on a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    args += ["--pack", "no"]
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
        from experiments.steps import build_task

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


def test_bench_train_reports_padding_packed(tmp_path):
    """Packed counting rows: the real-token count and padding are the packed batch's, and the
    speed-up over the official code compares real tokens/s with its unpacked batches."""
    from experiments import bench_train
    from experiments.configlib import load_config
    from experiments.steps import build_task

    out = tmp_path / "speed"
    args = ["--config", "configs/counting.py", "--variants", "cope", "--options", "smoke"]
    bench_train.main([*args, "--pack", "yes", "--steps", "1", "--warmup", "1", "--out", str(out)])
    (r,) = json.loads(out.with_suffix(".json").read_text())
    assert r["config"] == "configs/counting.py:cope,smoke,pack" and r["packed"]
    packed, unpacked = (
        build_task(load_config(f"configs/counting.py:cope,smoke{o}")) for o in (",pack", "")
    )
    seed, size = load_config(r["config"]).train.seed, r["batch"] * r["seq_len"]
    real = (packed.train_batch(seed, 1, r["batch"])["inputs"] != 0).sum()
    plain = (unpacked.train_batch(seed, 1, r["batch"])["inputs"] != 0).sum()
    assert (r["real_tokens_per_batch"], r["unpacked_real_tokens_per_batch"]) == (real, plain)
    np.testing.assert_allclose(r["padding_fraction"], 1 - real / size)
    assert r["padding_fraction"] < 0.5 * (1 - plain / size)
    official = bench_train.OFFICIAL_MS["cope"] / 1e3
    np.testing.assert_allclose(
        r["speedup_vs_official"], r["real_tokens_per_s"] / (plain / official)
    )
    assert "| cope | yes |" in out.with_suffix(".md").read_text()


def test_cope_bench_quick_records_every_impl(tmp_path):
    import importlib.util

    from experiments import bench_kernels
    from experiments.bench import cope

    out = tmp_path / "cope"
    bench_kernels.main(["cope", "--quick", "--iters", "1", "--out", str(out)])
    records = json.loads(out.with_suffix(".json").read_text())
    fields = {"kernel", "impl", "shape", "T", "pass", "ms", "temp_bytes", "device", "jax"}
    assert all(fields <= r.keys() for r in records)
    rows = {(r["impl"], r["shape"], r["pass"]): r for r in records}
    backward = importlib.util.find_spec("pallas_kernels.cope_attention.pallas_triton_bwd")
    for shape in cope.BENCH_QUICK:
        for pass_ in cope.PASSES:
            peers = [cope.XLA, cope.FLASH] + ([cope.XLA_REMAT] if pass_ == "fwd+bwd" else [])
            for impl in peers:
                r = rows[(impl, shape.name, pass_)]
                assert r["status"] == "ok", r
                assert r["ms"] > 0 and r["temp_bytes"] > 0 and r["T"] == shape.q_len
            ours = rows[(cope.OURS, shape.name, pass_)]
            if pass_ == "fwd" or backward is not None:  # fwd+bwd needs the backward kernel
                assert ours["status"] == "ok" and ours["ms"] > 0 and ours["temp_bytes"] > 0, ours
    md = out.with_suffix(".md").read_text()
    assert "| shape | pass | cope-xla ms |" in md
    assert out.with_suffix(".png").stat().st_size > 0


def test_cope_bench_records_out_of_memory(monkeypatch):
    from experiments.bench import cope

    def too_big(q, k, v, pos_emb):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 48.00GiB.")

    monkeypatch.setattr(cope, "_impl", lambda name, shape, pass_: too_big)
    rec = cope.measure(cope.XLA, cope.BENCH_QUICK[0], "fwd+bwd", 1, "cpu")
    assert rec.status == "out of memory" and rec.ms is None and "48.00GiB" in rec.error
    assert "| OOM |" in cope.table([rec])


def test_cope_bench_flags_a_wrong_kernel(monkeypatch):
    from experiments.bench import cope

    real = cope._impl
    wrong = lambda q, k, v, pos_emb: v  # noqa: E731 - attention that ignores q and k
    monkeypatch.setattr(
        cope, "_impl", lambda name, *a: wrong if name == cope.OURS else real(name, *a)
    )
    shape = cope.CopeShape(2, 16, 2, 16, 8)
    for pass_ in cope.PASSES:
        rec = cope.measure(cope.OURS, shape, pass_, 1, "cpu")
        assert rec.status == "wrong" and rec.ms is None and "relative error" in rec.error


def test_benches_default_outside_committed_results(capsys):
    from experiments import bench_kernels
    from experiments.bench.common import default_out

    for bench in bench_kernels.BENCHES:
        out = default_out(bench, quick=False)
        assert out.parts[:2] == ("runs", "bench") and bench in out.name
    with pytest.raises(SystemExit):
        bench_kernels.main(["--help"])
    assert "runs/bench/" in capsys.readouterr().out
