"""The training loop: `train_and_evaluate(config, workdir)` trains or resumes the run in
`workdir`, evaluates it periodically and at the end, and writes the run directory."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments import rundir, sharding
from experiments.checkpointing import Checkpoints, abstract_like
from experiments.configlib import check_config
from experiments.evaluation import evaluate, in_distribution_split
from experiments.optimizer import learning_rate_schedule
from experiments.steps import (
    build_model_config,
    build_task,
    init_train_state,
    make_eval_step,
    make_finite_check,
    make_train_step,
)


class TrainingDiverged(RuntimeError):
    """The loss, parameters or optimizer state became NaN or inf; every checkpoint kept is
    finite."""


class TrainingStopped(RuntimeError):
    """SIGTERM arrived (preemption, a sweep's deadline); a checkpoint of that step was saved."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Yields a list that becomes non-empty once SIGTERM arrives (main thread only)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_train_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The train and eval fields (configlib.check_config), checked before anything is built or
    written: one ValueError naming the field. Batches are split over the devices, so they must
    divide evenly."""
    check_config(config)
    for field in ("train.batch_size", "eval.batch_size"):
        section, name = field.split(".")
        value = config[section][name]
        if value % num_devices:
            raise ValueError(
                f"config field {field}={value} is not divisible by the {num_devices} devices "
                "it is split over (data parallel)"
            )


def interval_steps(every: int, total: int) -> set[int]:
    return set(range(every, total + 1, every)) | {total} if every > 0 else {total}


class Progress:
    """A progress bar on a terminal; on anything else (a log file, a pipe) one plain line per
    logged step, since a bar there is one long line of carriage returns."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.total, self.desc = total, desc
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def report(self, step: int, loss: float, error: tuple[str, float] | None) -> None:
        """`error` is (split, token error in [0, 1]) of the latest evaluation, if any."""
        shown = {"loss": f"{loss:.4f}"}
        if error is not None:
            shown[f"{error[0]} err"] = f"{100 * error[1]:.2f}%"
        if self.bar is not None:
            self.bar.set_postfix(shown)
        elif self.lines:
            text = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.desc} step {step}/{self.total}: {text}", file=sys.stderr, flush=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    devices: list | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` and returns the final results.

    Everything about the run is in `workdir`: config.json, metrics.jsonl, tensorboard/,
    checkpoints/ and results.json (the final evaluation, the resolved config, the code's git
    commit, package versions and the command line). A run whose checkpoint is at the last step
    only re-does the final evaluation.

    Everything is checked before the first file is written: the config's fields, the model,
    optimizer and task it builds, `workdir` itself, and on resume that the config matches
    config.json and that no checkpoint is past train.steps (ValueError, one line). An unusable
    checkpoint (unreadable, or non-finite) is renamed `<step>.unusable` with a warning and the
    previous one is used. A NaN or inf loss, parameter or optimizer-state value raises
    TrainingDiverged naming the step; only finite states are ever checkpointed.

    SIGTERM raises TrainingStopped: during training after saving a checkpoint of the current
    step, during set-up before training starts (nothing is lost). Once the last step is done the
    final evaluation is finished and results.json written first (its checkpoint exists anyway).
    """
    with stop_on_sigterm() as stop_requested:
        return _train_and_evaluate(config, Path(workdir), devices, progress, stop_requested)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: Path,
    devices: list | None,
    progress: bool,
    stop_requested: list[int],
) -> dict[str, Any]:
    check_train_config(config, len(devices) if devices else jax.device_count())
    rundir.check_workdir(workdir)
    rundir.refuse_other_config(workdir, config)
    task = build_task(config)
    model_cfg = build_model_config(config, task)
    ts = init_train_state(config, model_cfg, devices)  # builds the optimizer and schedule
    train_cfg = config.train
    writes = jax.process_index() == 0  # process 0 writes the run directory's files
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=train_cfg.keep_checkpoints)

    start_step = 0
    restored = checkpoints.restore_latest(
        abstract_like(ts.state, ts.shardings), check=make_finite_check(ts), set_aside=True
    )
    if restored is not None:
        start_step, ts.state, _ = restored
        if start_step > train_cfg.steps:
            checkpoints.close()
            raise ValueError(
                f"{workdir} has a checkpoint at step {start_step}, past train.steps="
                f"{train_cfg.steps}; rerun with --config.train.steps={start_step} or more "
                "(python -m experiments.evaluate evaluates it), or use a new --workdir"
            )
        print(f"resuming {workdir} from step {start_step}", file=sys.stderr)
    if writes:
        rundir.write_config(workdir, config)
    log = rundir.MetricsLog(workdir, start_step, writes)
    train_step = make_train_step(ts, train_cfg.seed, check_finite=True)
    eval_step = make_eval_step(ts)
    batch_sharding = sharding.batch_sharding(ts.mesh)
    eval_steps = interval_steps(train_cfg.eval_every, train_cfg.steps)
    ckpt_steps = interval_steps(train_cfg.checkpoint_every, train_cfg.steps)
    log_steps = interval_steps(train_cfg.log_every, train_cfg.steps)
    in_dist = in_distribution_split(task)
    tokens_per_batch = train_cfg.batch_size * task.seq_len(task.train_split)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(ts.model(), nnx.Param)))
    schedule = learning_rate_schedule(train_cfg)

    def run_evaluation(num_examples: int) -> dict[str, dict]:
        return evaluate(
            task,
            ts,
            eval_step,
            batch_size=config.eval.batch_size,
            seed=config.eval.seed,
            num_examples=num_examples,
        )

    # (loss, state finite) of the steps not yet fetched: no host sync between log steps.
    pending: list[tuple[jax.Array, jax.Array]] = []
    interval_start, interval_steps_done = time.perf_counter(), 0
    latest_error: tuple[str, float] | None = None
    bar = Progress(
        train_cfg.steps, start_step, f"{config.task.name}/{model_cfg.encoding}", progress
    )

    def flush(done: int) -> np.ndarray:
        """Fetches the losses since the last flush, stops on NaN/inf, logs them."""
        nonlocal pending, interval_start, interval_steps_done
        fetched = jax.device_get(pending)
        losses = np.asarray([loss for loss, _ in fetched])  # of steps done-len+1 .. done
        finite_state = np.asarray([finite for _, finite in fetched])
        elapsed = time.perf_counter() - interval_start
        pending = []
        bad = ~np.isfinite(losses) | ~finite_state
        if bad.any():
            i = int(np.argmax(bad))
            what = (
                f"loss became {losses[i]}"
                if not np.isfinite(losses[i])
                else f"parameters or optimizer state became NaN/inf (loss {losses[i]:.4g})"
            )
            kept = checkpoints.steps()
            raise TrainingDiverged(
                f"{what} at step {done - len(losses) + 1 + i}; stopped. Last good checkpoint: "
                f"{workdir / 'checkpoints' / str(kept[-1]) if kept else 'none'} (resuming "
                "repeats the same steps: change the config, e.g. a lower train.learning_rate, "
                "in a new --workdir)"
            )
        tokens_per_s = tokens_per_batch * interval_steps_done / elapsed
        record = {
            "train": {
                "loss": float(losses.mean()),
                "step_losses": [float(x) for x in losses],  # steps done-len+1 .. done
                "lr": float(schedule(done - 1)),
                "tokens_per_s": tokens_per_s,
                "ms_per_batch": 1e3 * elapsed / interval_steps_done,
                # The first interval after a (re)start includes compilation.
                "includes_compile": done - interval_steps_done == start_step,
            }
        }
        log.write(done, record)
        interval_start, interval_steps_done = time.perf_counter(), 0
        return losses

    try:
        if stop_requested:
            raise TrainingStopped(
                f"stopped by SIGTERM before training (resuming at step {start_step}); rerun "
                "the same command to resume"
            )
        for step in range(start_step, train_cfg.steps):
            batch = task.train_batch(train_cfg.seed, step, train_cfg.batch_size)
            ts.state, loss, finite = train_step(
                ts.state, sharding.global_batch(batch, batch_sharding), jnp.int32(step)
            )
            pending.append((loss, finite))
            interval_steps_done += 1
            done = step + 1
            if done in log_steps or done in ckpt_steps or done in eval_steps:
                losses = flush(done)
                if done in ckpt_steps:
                    checkpoints.save(done, ts.state, {"step": done})
                if done in eval_steps and done != train_cfg.steps:
                    last_eval = run_evaluation(config.eval.num_examples)
                    log.write(done, {"eval": last_eval})
                    latest_error = (in_dist, last_eval[in_dist]["token_error"])
                if done in log_steps or done in eval_steps:
                    bar.report(done, float(losses.mean()), latest_error)
                interval_start = time.perf_counter()  # evaluation is not training time
            bar.update()
            if stop_requested and done < train_cfg.steps:
                if pending:
                    flush(done)
                if done not in ckpt_steps:
                    checkpoints.save(done, ts.state, {"step": done})
                raise TrainingStopped(
                    f"stopped by SIGTERM after step {done}; the checkpoint is saved, rerun the "
                    "same command to resume"
                )
        final = run_evaluation(config.eval.final_num_examples)
        log.write(train_cfg.steps, {"final": final})
    finally:
        bar.close()
        checkpoints.close()
        log.close()
    rates = rundir.training_rates(rundir.read_metrics(workdir))  # the whole run's, resumes too
    results = {
        "task": config.task.name,
        "variant": config.variant,
        "encoding": model_cfg.encoding,
        "seed": train_cfg.seed,
        "steps": train_cfg.steps,
        "num_params": int(num_params),
        "in_distribution_split": in_dist,
        "final": final,
        "tokens_per_s": float(np.median(rates)) if rates else None,
        "ms_per_batch": 1e3 * tokens_per_batch / float(np.median(rates)) if rates else None,
        "batch_tokens": tokens_per_batch,
        "device": jax.devices()[0].device_kind,
        "num_devices": ts.mesh.devices.size,
        "jax": jax.__version__,
        "config": json.loads(config.to_json_best_effort()),
        **rundir.provenance(),
    }
    if writes:
        rundir.write_results(workdir, results)
    return results
