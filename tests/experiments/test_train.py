"""Training system: configs, overrides, smoke training, exact resume after SIGKILL, corrupt
checkpoints, NaN stops, data-parallel == single device, evaluation CLI."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from configs.base import VARIANTS
from experiments import loop, steps, train
from experiments.checkpointing import Checkpoints
from experiments.configlib import apply_override, load_config
from experiments.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["flipflop", "selective_copy", "counting"]


def smoke(task, variant="cope", **overrides):
    config = load_config(str(ROOT / f"configs/{task}.py") + f":{variant},smoke")
    for key, value in overrides.items():
        apply_override(config, f"{key}={value}")
    return config


def assert_results_close(a, b, rtol: float = 1e-5, where: str = "results") -> None:
    """Counts, strings and structure equal exactly; floats (losses, perplexities) to `rtol`.

    Other device layouts or process counts sum in another order, which moves float32 results
    at rounding level (~1e-7 relative); a real bug (a wrong gradient or batch) moves them at
    full size, far past `rtol`. NaN never passes.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_results_close(a[key], b[key], rtol, f"{where}.{key}")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isfinite(a) and math.isfinite(b), f"{where}: {a} vs {b}"
        assert abs(a - b) <= rtol * max(abs(a), abs(b)), f"{where}: {a} vs {b} (rtol {rtol})"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def test_results_compare_counts_exactly_and_floats_to_rounding():
    rng = np.random.default_rng()
    loss = float(rng.uniform(1, 5))
    a = {"valid": {"token_errors": 7, "tokens": 96, "loss": loss, "perplexity": math.exp(loss)}}
    rounded = loss * (1 + 5e-8)  # the size of a reduction-order difference in float32
    assert_results_close(
        a, {"valid": a["valid"] | {"loss": rounded, "perplexity": math.exp(rounded)}}
    )
    for wrong in ({"loss": loss * 1.001}, {"token_errors": 8}, {"loss": float("nan")}):
        with pytest.raises(AssertionError):
            assert_results_close(a, {"valid": a["valid"] | wrong})


def run_child(code: str, env_extra: dict | None = None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize("task", CONFIGS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_config_builds_for_every_variant(task, variant):
    config = load_config(str(ROOT / f"configs/{task}.py") + f":{variant}")
    task_obj = steps.build_task(smoke(task, variant))
    model_cfg = steps.build_model_config(config, task_obj)
    assert model_cfg.encoding == VARIANTS[variant]
    assert (model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads) == (4, 256, 4)


def test_counting_config_is_the_official_run():
    config = load_config(str(ROOT / "configs/counting.py:cope,nvars=5"))
    assert config.task.options.nvars == 5
    assert config.train.learning_rate == 7e-5 and config.train.batch_size == 64
    assert config.train.steps == 15_625  # 100 epochs of 10k samples
    assert config.model.post_norm and config.model.tie_embeddings and config.model.dropout == 0.1
    model_cfg = steps.build_model_config(config, steps.build_task(smoke("counting")))
    assert model_cfg.cope_npos == 513  # the official block_size 512 + 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config field 'train.stepz'"),
        ("train.steps=abc", "config field train.steps expects int"),
        ("modle.dropout=0.1", "unknown config field 'modle'"),
        ("train=3", "is a group"),
    ],
)
def test_bad_overrides_raise_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        apply_override(smoke("flipflop"), override)


def test_bad_variant_and_option_raise():
    with pytest.raises(ValueError, match="config variant must be one of"):
        load_config(str(ROOT / "configs/flipflop.py:alibi"))
    with pytest.raises(ValueError, match="config option 'nvarz' unknown"):
        load_config(str(ROOT / "configs/counting.py:cope,nvarz=3"))


def test_cli_reports_bad_field_in_one_line(tmp_path, capsys):
    code = train.main(
        [
            "--config",
            "configs/flipflop.py:cope,smoke",
            "--workdir",
            str(tmp_path),
            "--config.model.encodin=rope",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.encodin" in err[0]
    code = train.main(
        [
            "--config",
            "configs/flipflop.py:cope,smoke",
            "--workdir",
            str(tmp_path),
            "--config.model.encoding=alibi",
        ]
    )
    assert code == 2 and "encoding must be one of" in capsys.readouterr().err


def train_records(workdir: Path) -> list[dict]:
    return [r for r in read_metrics(workdir) if "train" in r]


def test_smoke_train_writes_the_run_directory(tmp_path):
    results = train.train_and_evaluate(
        smoke("counting", **{"train.steps": 12}), tmp_path, progress=False
    )
    assert set(results["final"]) == {"train", "valid", "test"}
    for split in results["final"].values():
        assert 0.0 <= split["token_error"] <= 1.0 and np.isfinite(split["loss"])
    for name in ("config.json", "metrics.jsonl", "results.json"):
        assert (tmp_path / name).exists()
    assert list((tmp_path / "tensorboard").iterdir())
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == [10, 12]
    records = read_metrics(tmp_path)
    assert (
        any("eval" in r for r in records) and records[-1]["step"] == 12 and "final" in records[-1]
    )


def test_training_reduces_the_loss(tmp_path):
    config = smoke(
        "flipflop",
        **{
            "train.steps": 60,
            "train.learning_rate": 3e-3,
            "train.warmup_steps": 0,
            "train.log_every": 10,
        },
    )
    train.train_and_evaluate(config, tmp_path, progress=False)
    losses = [r["train"]["loss"] for r in train_records(tmp_path)]
    assert losses[-1] < 0.8 * losses[0]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """The child is killed with SIGKILL three steps after its checkpoint at step 10."""
    script = """
        import os, signal, sys
        from experiments import rundir, train
        from experiments.configlib import load_config, apply_override
        config = load_config("configs/selective_copy.py:cope,smoke")
        for o in ["train.steps=24", "train.checkpoint_every=10", "train.log_every=1",
                  "train.eval_every=12", "model.dropout=0.1"]:
            apply_override(config, o)
        kill_at = int(os.environ.get("KILL_AT", "0"))
        write = rundir.MetricsLog.write
        def write_then_maybe_die(self, step, record):
            write(self, step, record)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        rundir.MetricsLog.write = write_then_maybe_die
        train.train_and_evaluate(config, sys.argv[-1] if False else os.environ["WORKDIR"],
                                 progress=False)
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_child(script, {"WORKDIR": str(straight)})
    killed = run_child(script, {"WORKDIR": str(resumed), "KILL_AT": "13"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (resumed / "results.json").exists()
    run_child(script, {"WORKDIR": str(resumed)})
    a = json.loads((straight / "results.json").read_text())["final"]
    b = json.loads((resumed / "results.json").read_text())["final"]
    # Two processes: floats to rounding (a resume off by one batch differs at full size).
    assert_results_close(a, b)
    steps = [r["step"] for r in train_records(resumed)]
    assert steps == sorted(set(steps)) == list(range(1, 25))  # no duplicated records


@pytest.mark.parametrize("when", ["mid_interval", "setup"])
def test_sigterm_stops_cleanly_and_the_rerun_finishes_identically(tmp_path, when):
    """SIGTERM after step 7 of a 4-step log interval (a checkpoint at 7 and the partial interval
    logged), or during set-up (nothing trained, nothing lost): exit code 3, then an exact resume."""
    script = """
        import os, signal, sys
        from experiments import loop, rundir, train
        when = os.environ.get("TERM_WHEN", "")
        if when == "mid_interval":
            make = loop.make_train_step
            def make_and_wrap(ts, seed, **options):
                step = make(ts, seed, **options)
                def wrapped(state, batch, i):
                    out = step(state, batch, i)
                    if int(i) == 6:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return out
                return wrapped
            loop.make_train_step = make_and_wrap
        if when == "setup":
            init = rundir.MetricsLog.__init__
            def init_then_term(self, *args):
                init(self, *args)
                os.kill(os.getpid(), signal.SIGTERM)
            rundir.MetricsLog.__init__ = init_then_term
        sys.exit(train.main(["--config", "configs/flipflop.py:cope,smoke", "--workdir",
                             os.environ["WORKDIR"], "--no-progress", "--config.train.steps=16",
                             "--config.train.log_every=4", "--config.train.checkpoint_every=12"]))
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_child(script, {"WORKDIR": str(straight)})
    stopped = run_child(script, {"WORKDIR": str(resumed), "TERM_WHEN": when}, check=False)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    if when == "mid_interval":
        assert "stopped by SIGTERM after step 7" in stopped.stderr
        assert Checkpoints(resumed / "checkpoints", keep=3).steps() == [7]
        assert [r["step"] for r in train_records(resumed)] == [4, 7]
    else:
        assert "stopped by SIGTERM before training" in stopped.stderr
        assert not (resumed / "checkpoints").exists() or not any(
            (resumed / "checkpoints").iterdir()
        )
    run_child(script, {"WORKDIR": str(resumed)})
    a = json.loads((straight / "results.json").read_text())["final"]
    b = json.loads((resumed / "results.json").read_text())["final"]
    # Two processes: floats to rounding (a resume off by one batch differs at full size).
    assert_results_close(a, b)
    steps = [r["step"] for r in train_records(resumed)]
    assert steps == ([4, 7, 8, 10, 12, 16] if when == "mid_interval" else [4, 8, 10, 12, 16])
    losses = [x for r in train_records(resumed) for x in r["train"]["step_losses"]]
    assert losses == [x for r in train_records(straight) for x in r["train"]["step_losses"]]


def test_corrupt_latest_checkpoint_is_set_aside_and_the_rerun_finishes(tmp_path):
    """The unreadable step-10 checkpoint is renamed (not deleted), the run resumes from 5 and
    can save step 10 again; results equal the uninterrupted run's."""
    config = smoke("flipflop", **{"train.steps": 10, "train.checkpoint_every": 5})
    first = train.train_and_evaluate(config, tmp_path, progress=False)
    (tmp_path / "results.json").unlink()
    for file in (tmp_path / "checkpoints" / "10" / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="10 is unreadable.*moved to 10.unusable.*step 5") as w:
        again = train.train_and_evaluate(config, tmp_path, progress=False)
    assert sum("unreadable" in str(x.message) for x in w) == 1
    assert again["final"] == first["final"]  # same process, same devices: bitwise
    assert (tmp_path / "results.json").exists()
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == [5, 10]
    aside = tmp_path / "checkpoints" / "10.unusable" / "state"
    assert {f.read_bytes() for f in aside.rglob("*") if f.is_file()} == {b"not a checkpoint"}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = smoke("flipflop", **{"train.steps": 10, "train.checkpoint_every": 5})
    train.train_and_evaluate(config, tmp_path, progress=False)
    before = Checkpoints(tmp_path / "checkpoints", keep=3).steps()
    apply_override(config, "train.steps=20")
    real = steps.masked_cross_entropy
    monkeypatch.setattr(
        steps, "masked_cross_entropy", lambda *a: (real(*a)[0] * np.nan, real(*a)[1])
    )
    # Steps are counted from 1: step 11 is the first after the checkpoint at 10.
    with pytest.raises(loop.TrainingDiverged, match="loss became nan at step 11.*checkpoints/10"):
        train.train_and_evaluate(config, tmp_path, progress=False)
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == before


def test_resuming_with_a_different_config_is_refused(tmp_path):
    train.train_and_evaluate(smoke("flipflop", **{"train.steps": 2}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config .*model/encoding"):
        train.train_and_evaluate(
            smoke("flipflop", "rope", **{"train.steps": 2}), tmp_path, progress=False
        )


def test_data_parallel_step_equals_single_device():
    """4 fake CPU devices: params after 3 steps equal the 1-device run (and FSDP)."""
    run_child(
        """
        import jax, numpy as np
        from flax import nnx
        from experiments import sharding, steps
        from experiments.configlib import load_config, apply_override
        assert len(jax.devices()) == 4
        params = {}
        for name, devices, fsdp in [("one", jax.devices()[:1], False), ("dp", None, False),
                                    ("fsdp", None, True)]:
            config = load_config("configs/counting.py:cope_rel,smoke")
            apply_override(config, f"train.fsdp={fsdp}")
            apply_override(config, "model.dropout=0.0")
            # The key bias has an exactly-zero true gradient (softmax is shift invariant and the
            # zero-initialised CoPE table hides the gates); Adam turns its float noise into
            # full-size steps that differ between reduction orders, so leave it out.
            apply_override(config, "model.use_bias=False")
            task = steps.build_task(config)
            ts = steps.init_train_state(config, steps.build_model_config(config, task), devices)
            step = steps.make_train_step(ts, config.train.seed)
            bs = sharding.batch_sharding(ts.mesh)
            for i in range(3):
                batch = task.train_batch(config.train.seed, i, 8)
                ts.state, loss = step(ts.state, sharding.global_batch(batch, bs), i)
            leaves = jax.tree.leaves(nnx.state(ts.model(), nnx.Param))
            if fsdp:
                assert any(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated
                           for x in leaves)
            params[name] = [np.asarray(x) for x in leaves]
        for name in ("dp", "fsdp"):
            for a, b in zip(params["one"], params[name]):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        print("ok")
    """,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
    )


def test_evaluate_cli_reloads_the_run(tmp_path, capsys):
    from experiments import evaluate

    results = train.train_and_evaluate(
        smoke("counting", **{"train.steps": 3}), tmp_path, progress=False
    )
    assert evaluate.main(["--workdir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["step"] == 3 and again["final"] == results["final"]
    assert evaluate.main(["--workdir", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(tmp_path), "--num_examples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: num_examples must be an integer >= 1, got 0"]


def test_multi_gpu_script_matches_one_device(tmp_path):
    """experiments.multi_gpu on 4 fake CPU devices: same per-step losses, report files written."""
    run_child(
        f"""
        import json
        from experiments import multi_gpu
        out = "{tmp_path}/report"
        assert multi_gpu.main(["--config", "configs/flipflop.py:cope,smoke", "--steps", "8",
                               "--log-every", "4", "--weak", "--repeat", "--deterministic",
                               "--out", out,
                               "--workdir", "{tmp_path}/runs",
                               "--override", "model.dropout=0.0"]) == 0
        report = json.load(open(out + ".json"))
        rows = {{row["setup"]: row for row in report["rows"]}}
        assert set(rows) == {{"1 device", "1 device, again", "4 devices", "4 devices, FSDP",
                              "4 devices, batch x4"}}
        assert rows["1 device, again"]["max_abs_loss_diff"] == 0.0  # CPU is deterministic
        assert "--xla_gpu_deterministic_ops=true" in report["xla_flags"]
        for name in ("4 devices", "4 devices, FSDP"):
            assert len(rows[name]["losses"]) == 8
            assert rows[name]["max_rel_loss_diff"] < 1e-5, rows[name]["max_rel_loss_diff"]
        assert "max_abs_loss_diff" not in rows["4 devices, batch x4"]
        assert "| 4 devices, FSDP |" in open(out + ".md").read()
        # A second call refuses to overwrite the runs.
        assert multi_gpu.main(["--config", "configs/flipflop.py:cope,smoke", "--steps", "8",
                               "--log-every", "4", "--out", out,
                               "--workdir", "{tmp_path}/runs"]) == 2
        try:  # too late: the backend already runs without the flag
            multi_gpu.main(["--config", "configs/flipflop.py:cope,smoke", "--deterministic",
                            "--out", out])
            raise AssertionError("--deterministic after the backend started was accepted")
        except SystemExit as exit:
            assert exit.code == 2
        print("ok")
    """,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
    )


def test_sweep_deadline_stops_runs_and_the_rerun_resumes(tmp_path):
    """A sweep past its deadline SIGTERMs its runs (exit 3); a rerun resumes from there."""
    command = [
        sys.executable, "-m", "experiments.sweep", "--root", str(tmp_path),
        "--config", "configs/flipflop.py:cope,smoke",
        "--override", "train.checkpoint_every=100000", "--override", "train.eval_every=100000",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    run = tmp_path / "flipflop_cope_smoke"
    # On a loaded machine the first deadline may fall before the first training step (then
    # nothing is saved and the stop is still exit 3): a later, longer deadline resumes it.
    for deadline in (12, 40, 120):
        first = subprocess.run(
            command + ["--override", "train.steps=100000", "--deadline", str(deadline)],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert first.returncode == 3, first.stdout[-2000:] + (run / "log.txt").read_text()[-2000:]
        assert "stopped at the deadline" in first.stdout
        if Checkpoints(run / "checkpoints", keep=3).steps():
            break
    saved = Checkpoints(run / "checkpoints", keep=3).steps()
    assert len(saved) == 1 and 0 < saved[0] < 100000
    finish = [f"train.steps={saved[0] + 5}", "--override", "eval.final_num_examples=32"]
    second = subprocess.run(
        command + ["--override", *finish], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, (run / "log.txt").read_text()[-2000:]
    assert json.loads((run / "results.json").read_text())["steps"] == saved[0] + 5
    assert f"resuming {run} from step {saved[0]}" in (run / "log.txt").read_text()


def test_throughput_is_the_whole_runs_and_survives_a_rerun(tmp_path):
    """results.json's tokens/s is the median of the logged intervals without compilation."""
    config = smoke(
        "flipflop",
        **{
            "train.steps": 12,
            "train.log_every": 3,
            "train.eval_every": 6,
            "train.checkpoint_every": 6,
        },
    )
    first = train.train_and_evaluate(config, tmp_path, progress=False)
    records = [r["train"] for r in train_records(tmp_path)]
    assert [r["includes_compile"] for r in records] == [True, False, False, False]
    assert first["tokens_per_s"] == np.median([r["tokens_per_s"] for r in records[1:]])
    again = train.train_and_evaluate(config, tmp_path, progress=False)  # only re-evaluates
    assert again["tokens_per_s"] == first["tokens_per_s"]
    assert again["final"] == first["final"]


def test_sweep_per_gpu_queues_runs_and_skips_finished_ones(tmp_path):
    command = [
        sys.executable, "-m", "experiments.sweep", "--root", str(tmp_path), "--per-gpu", "1",
        "--config", "configs/flipflop.py:abs,smoke", "--config", "configs/counting.py:rope,smoke",
        "--override", "train.steps=4",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:]
    events = [line.split(":")[0] for line in first.stdout.splitlines() if ": exit" in line or
              line.startswith("started")]  # fmt: skip
    assert events == [
        "started flipflop_abs_smoke",
        "flipflop_abs_smoke",
        "started counting_rope_smoke",
        "counting_rope_smoke",
    ]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("finished earlier, not rerun") == 2
    bad = subprocess.run(
        command + ["--override", "train.stepz=3"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown config field 'train.stepz'" in bad.stderr


def test_sweep_deadline_before_the_runs_handle_sigterm_counts_as_stopped(tmp_path):
    """A run terminated while still importing (no handler yet) is stopped, not failed."""
    command = [
        sys.executable, "-m", "experiments.sweep", "--root", str(tmp_path), "--deadline", "0.5",
        "--config", "configs/flipflop.py:abs,smoke",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 3, result.stdout[-2000:]
    assert "stopped at the deadline (rerun the same command to resume): flipflop_abs_smoke" in (
        result.stdout
    )


OOM = (
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.96GiB with allocator "
    "GPU_0_bfc on device 0. [tf-allocator-allocation-error=''] [executable_name='jit_step_fn']"
)


def test_out_of_device_memory_is_one_line_keeping_the_checkpoints(tmp_path, capsys, monkeypatch):
    import jax

    (tmp_path / "checkpoints" / "256").mkdir(parents=True)

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(train, "train_and_evaluate", out_of_memory)
    argv = ["--config", "configs/flipflop.py:cope,smoke", "--workdir", str(tmp_path)]
    assert train.main(argv) == train.OUT_OF_MEMORY_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: out of device memory (Out of memory while trying to "
                             "allocate 8.96GiB with allocator GPU_0_bfc on device 0.)")  # fmt: skip
    assert "checkpoint at step 256 kept" in err[0] and "[" not in err[0]

    def other_runtime_error(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(train, "train_and_evaluate", other_runtime_error)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        train.main(argv)


def test_sweep_reports_why_a_run_failed(tmp_path):
    from experiments import sweep

    name = "flipflop_abs_smoke"
    train.train_and_evaluate(smoke("flipflop", "abs", **{"train.steps": 2}), tmp_path / name,
                             progress=False)  # fmt: skip
    log = tmp_path / name / "log.txt"
    log.write_text(f"resuming {tmp_path / name} from step 2\nTraceback (most recent call last):\n"
                   f"  File \"x.py\", line 1\njax.errors.JaxRuntimeError: {OOM}\n")  # fmt: skip
    assert sweep.failure(tmp_path / name).startswith("jax.errors.JaxRuntimeError: RESOURCE_EXH")
    rows, table = sweep.summarize(tmp_path, [name], {name: 10})
    assert rows[0]["unfinished"] and "RESOURCE_EXHAUSTED" in rows[0]["failed"]
    assert "**failed (jax.errors.JaxRuntimeError" in table and "trained 2 of 10" in table
    log.write_text(log.read_text() + f"resuming {tmp_path / name} from step 2\n")
    assert sweep.failure(tmp_path / name) is None  # a later attempt is running
    log.write_text(log.read_text() + "error: out of device memory (x); checkpoint kept. Rerun\n")
    assert sweep.failure(tmp_path / name) == "out of device memory (x); checkpoint kept. Rerun"
    log.write_text(log.read_text() + "stopped by SIGTERM after step 2; the checkpoint is saved\n")
    assert sweep.failure(tmp_path / name) is None


def test_two_processes_match_one_process_and_resume(tmp_path):
    """jax.distributed on CPU: 2 processes x 2 devices train, evaluate, checkpoint and resume
    like 1 process x 4 devices; only process 0 writes the run directory's files."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["-m", "experiments.train", "--config", "configs/flipflop.py:cope,smoke",
            "--no-progress", "--config.train.eval_every=3",
            "--config.train.checkpoint_every=3"]  # fmt: skip
    base = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")

    def launch(workdir, steps, processes):
        devices = 4 // processes
        env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        procs = []
        for pid in range(processes):
            if processes > 1:
                env = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                           JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid))  # fmt: skip
            command = [sys.executable, *args, "--workdir", str(workdir),
                       f"--config.train.steps={steps}"]  # fmt: skip
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))  # fmt: skip
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        return outs

    launch(tmp_path / "one", 6, 1)
    launch(tmp_path / "two", 6, 2)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert_results_close(one["final"], two["final"])
    assert two["num_devices"] == 4
    losses = [np.concatenate([r["train"]["step_losses"] for r in train_records(tmp_path / d)])
              for d in ("one", "two")]  # fmt: skip
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    outs = launch(tmp_path / "two", 8, 2)  # resumes from the step-6 checkpoint
    assert "resuming" in outs[0][1] and "resuming" in outs[1][1]
    steps = [r["step"] for r in train_records(tmp_path / "two")]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # one writer, no duplicated records


def test_half_specified_multi_process_launch_is_one_error(monkeypatch):
    from experiments import sharding

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        sharding.maybe_initialize_distributed()


@pytest.mark.parametrize(
    "override, devices, message",
    [
        ("train.batch_size=0", 1, "config field train.batch_size must be an integer >= 1, got 0"),
        ("eval.batch_size=-2", 1, "config field eval.batch_size must be an integer >= 1, got -2"),
        ("train.steps=0", 1, "config field train.steps must be an integer >= 1, got 0"),
        ("train.batch_size=6", 4, "train.batch_size=6 is not divisible by the 4 devices"),
    ],
)
def test_bad_sizes_are_one_error_before_anything_is_written(tmp_path, override, devices, message):
    config = smoke("flipflop", **dict([override.split("=")]))
    with pytest.raises(ValueError, match=message):
        loop.check_train_config(config, devices)
    if devices == 1:
        with pytest.raises(ValueError, match=message):
            train.train_and_evaluate(config, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_sigterm_while_importing_exits_3(tmp_path):
    """SIGTERM before train_and_evaluate installs its handler (here: as jax is imported) exits
    with the documented code 3, not -15, and writes nothing."""
    script = """
        import os, runpy, signal, sys

        class TermOnJaxImport:
            def find_spec(self, name, path=None, target=None):
                if name == "jax":
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGTERM)
                return None

        sys.meta_path.insert(0, TermOnJaxImport())
        sys.argv = ["train", "--config", "configs/flipflop.py:cope,smoke", "--workdir",
                    os.environ["WORKDIR"]]
        runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
    """
    result = run_child(script, {"WORKDIR": str(tmp_path / "run")}, check=False)
    assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
    assert result.stderr.strip().splitlines() == [
        "stopped by SIGTERM before training (while starting); rerun the same command to resume"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optimizer=sgd", "train.optimizer must be one of ('adam', 'adamw'), got 'sgd'"),
        ("train.schedule=linear", "train.schedule must be one of"),
        ("train.learning_rate=-0.001", "train.learning_rate must be a number >= 0, got -0.001"),
        ("train.learning_rate=nan", "train.learning_rate must be a number >= 0, got nan"),
        ("train.warmup_steps=-1", "train.warmup_steps must be an integer >= 0, got -1"),
        ("train.grad_clip=-1", "train.grad_clip must be a number >= 0, got -1.0"),
        ("train.b1=1.0", "train.b1 must be a number in [0, 1), got 1.0"),
        ("train.b2=-0.5", "train.b2 must be a number in [0, 1), got -0.5"),
        ("train.eps=0", "train.eps must be a number > 0, got 0.0"),
        ("train.weight_decay=-1", "train.weight_decay must be a number >= 0"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be an integer >= 1, got 0"),
        ("train.checkpoint_every=-5", "train.checkpoint_every must be an integer >= 0"),
        ("train.seed=-1", "train.seed must be an integer >= 0, got -1"),
        ("eval.num_examples=0", "eval.num_examples must be an integer >= 1, got 0"),
        ("model.num_heads=3", "ModelConfig.d_model: must be divisible by num_heads=3"),
        ("model.dropout=1.0", "ModelConfig.dropout: must be in [0, 1)"),
    ],
)
def test_nonsense_values_are_one_line_errors_before_anything_is_written(
    tmp_path, capsys, override, message
):
    """Every field (train, eval, model, optimizer, schedule) is checked before the run
    directory exists, so the corrected command is not refused as "a different config"."""
    argv = ["--config", "configs/flipflop.py:cope,smoke", "--workdir", str(tmp_path / "run")]
    assert train.main(argv + ["--no-progress", f"--config.{override}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_sweep_checks_values_before_starting_and_a_root_under_a_file(tmp_path, capsys):
    from experiments import sweep

    spec = ["--config", "configs/flipflop.py:cope,smoke"]
    assert sweep.main(["--root", str(tmp_path / "runs"), *spec, "--override", "train.b1=2"]) == 2
    assert "train.b1 must be a number in [0, 1), got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "flipflop_cope_smoke").exists()
    (tmp_path / "file").write_text("x")
    assert sweep.main(["--root", str(tmp_path / "file" / "runs"), *spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--root" in err[0] and "file" in err[0], err


def test_bad_workdir_and_config_file_are_one_line_errors(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(arg=None):\n    return {\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import a_module_that_does_not_exist\n")
    cases = [
        (["configs/flipflop.py:cope,smoke", file], f"workdir {file} is a file"),
        (["configs/flipflop.py:cope,smoke", file / "run"], f"is under {file}, which is a file"),
        ([syntax, tmp_path / "run"], f"config file '{syntax}' has a syntax error at line 2"),
        ([broken, tmp_path / "run"], "failed to load (ModuleNotFoundError: No module named"),
    ]
    for (config, workdir), message in cases:
        assert train.main(["--config", str(config), "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert file.read_text() == "x" and not (tmp_path / "run").exists()


def test_fewer_steps_torn_or_missing_metrics_on_resume(tmp_path):
    """Fewer train.steps than the checkpoint: refused, nothing changed. A torn last line of
    metrics.jsonl: dropped with a warning. A deleted metrics.jsonl: a warning. Each rerun
    finishes with exactly one final record."""

    def run(steps):
        every = {f"train.{k}_every": 2 for k in ("checkpoint", "log", "eval")}
        config = smoke("flipflop", **{"train.steps": steps, **every})
        return train.train_and_evaluate(config, tmp_path, progress=False)

    metrics = tmp_path / "metrics.jsonl"
    run(4)
    before = metrics.read_text()
    with pytest.raises(ValueError, match=r"checkpoint at step 4, past train.steps=2; rerun with "
                       r"--config.train.steps=4 or more"):  # fmt: skip
        run(2)
    assert metrics.read_text() == before
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4

    with metrics.open("a") as f:
        f.write('{"step": 5, "train": {"loss": 0.')  # a crash mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped its last line 5, cut off"):
        run(6)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "train" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "final" in r] == [6]

    metrics.unlink()  # the rerun of a finished run only re-evaluates
    with pytest.warns(UserWarning, match="metrics.jsonl is missing although the run resumes "
                      "from step 6: the records of steps 1..6 are lost"):  # fmt: skip
        results = run(6)
    assert results["tokens_per_s"] is None  # no training interval is left to time
    assert [list(r) for r in read_metrics(tmp_path)] == [["step", "final"]]


def test_metrics_log_errors_name_the_file_and_line(tmp_path):

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON record"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[2]\n')
    with pytest.warns(UserWarning, match="dropped its last line 2"):
        assert read_metrics(tmp_path) == [{"step": 1}]


def test_divergence_never_checkpoints_a_non_finite_state(tmp_path):
    """learning_rate 1e39 (inf in float32): step 1's loss is finite (computed before the
    update) but its update makes the parameters inf/NaN, so step 1 is never checkpointed."""
    config = smoke(
        "flipflop",
        **{
            "train.steps": 4,
            "train.learning_rate": 1e39,
            "train.schedule": "constant",
            "train.warmup_steps": 0,
            "train.checkpoint_every": 1,
            "train.log_every": 1,
        },
    )
    with pytest.raises(
        loop.TrainingDiverged,
        match=r"parameters or optimizer state became NaN/inf \(loss [0-9.]+\) at step 1; "
        r"stopped. Last good checkpoint: none",
    ):
        train.train_and_evaluate(config, tmp_path, progress=False)
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == []


def test_a_non_finite_checkpoint_is_skipped_and_set_aside(tmp_path):
    """A NaN checkpoint (as an older version, or a copy, could leave) is never restored:
    evaluate skips it and leaves it in place; training renames it and finishes."""
    import jax
    import jax.numpy as jnp

    from experiments import evaluate

    config = smoke("flipflop", **{"train.steps": 4, "train.checkpoint_every": 2})
    first = train.train_and_evaluate(config, tmp_path, progress=False)
    ts = steps.init_train_state(config, steps.build_model_config(config, steps.build_task(config)))
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
    checkpoints.manager.delete(4)
    poisoned = jax.tree.map(
        lambda x: x.at[(0,) * x.ndim].set(np.nan) if jnp.issubdtype(x.dtype, jnp.inexact) else x,
        ts.state,
    )
    checkpoints.save(4, poisoned, {"step": 4})
    checkpoints.close()
    with pytest.warns(UserWarning, match=r"4 is non-finite .*; falling back to step 2"):
        assert evaluate.evaluate_run(tmp_path)["step"] == 2
    assert (tmp_path / "checkpoints" / "4").is_dir()
    with pytest.warns(UserWarning, match=r"4 is non-finite .*moved to 4.unusable"):
        again = train.train_and_evaluate(config, tmp_path, progress=False)
    assert again["final"] == first["final"]  # same process, same devices: bitwise
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == [2, 4]
