"""Training and evaluation for every task: `python -m experiments.train --config ... --workdir ...`.

One jitted train step (data parallel over all devices, FSDP optional), periodic evaluation on
every split, metrics to `metrics.jsonl` and TensorBoard, orbax checkpoints with exact resume,
and a final `results.json`. Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # The imports below take seconds (jax); SIGTERM meanwhile (a sweep's deadline) gets the same
    # exit code as during set-up, before anything is written.
    def _stopped_while_starting(signum, frame):
        print(
            "stopped by SIGTERM before training (while starting); rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(3)

    signal.signal(signal.SIGTERM, _stopped_while_starting)

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from cope.model import ModelConfig, Transformer
from experiments import sharding
from experiments.checkpointing import Checkpoints, abstract_like
from experiments.configlib import (
    OPTIMIZERS,
    SCHEDULES,
    apply_override,
    check_config,
    load_config,
    split_overrides,
)
from experiments.metrics import read_metrics, saved_steps
from experiments.tasks import Task, finalize, make_task

OPTIONAL_MODEL_INTS = ("num_kv_heads", "mlp_dim", "npos", "rel_max_distance")


class TrainingDiverged(RuntimeError):
    """The loss, parameters or optimizer state became NaN or inf; every checkpoint kept is
    finite."""


class TrainingStopped(RuntimeError):
    """SIGTERM arrived (preemption, a sweep's deadline); a checkpoint of that step was saved."""


OUT_OF_MEMORY_EXIT = 4


def out_of_memory_message(error: Exception, workdir: str | Path) -> str | None:
    """One line for an XLA out-of-memory error (None for any other error): what failed, what is
    kept, and how to go on. Device OOM happens when runs share a GPU or a config outgrows it."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    first = text.strip().splitlines()[0] if text.strip() else text
    first = re.sub(r"\s*\[[^\]]*\]", "", first).replace("RESOURCE_EXHAUSTED: ", "").strip()
    steps = saved_steps(workdir)
    kept = f"checkpoint at step {steps[-1]} kept" if steps else "no checkpoint yet"
    return (
        f"out of device memory ({first[:160]}); {kept}. Rerun the same command to resume once "
        "the device has room (fewer runs per GPU: sweep --per-gpu); a new run needs less with "
        "model.remat=True or a smaller train.batch_size"
    )


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


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


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


def check_workdir(workdir: Path) -> None:
    """The run directory must be a directory, or creatable: one ValueError otherwise."""
    for path in (workdir, *workdir.absolute().parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == workdir else f"is under {path}, which is a file"
            raise ValueError(f"workdir {workdir} {where}; pass a directory as --workdir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"workdir {workdir}: {path} is not writable")
        return


def build_task(config: ml_collections.ConfigDict) -> Task:
    return make_task(config.task.name, **config.task.options.to_dict())


def build_model_config(config: ml_collections.ConfigDict, task: Task) -> ModelConfig:
    """Model fields from the config; vocabulary and table sizes from the task."""
    fields = config.model.to_dict()
    for name in OPTIONAL_MODEL_INTS:
        if fields.get(name) == 0:
            fields[name] = None
    return ModelConfig.from_dict(
        fields | dict(vocab_size=task.vocab_size, max_len=task.max_seq_len)
    )


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up then constant or cosine decay to 10% of the peak."""
    if train.schedule not in SCHEDULES:
        raise ValueError(
            f"config field train.schedule must be one of {SCHEDULES}, got {train.schedule!r}"
        )
    warmup = int(train.warmup_steps)
    if train.schedule == "constant":
        main = optax.constant_schedule(train.learning_rate)
    else:
        main = optax.cosine_decay_schedule(
            train.learning_rate, max(train.steps - warmup, 1), alpha=0.1
        )
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(0.0, train.learning_rate, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam or AdamW with the configured schedule and optional global-norm clipping."""
    schedule = learning_rate_schedule(train)
    if train.optimizer == "adam":
        tx = optax.adam(schedule, b1=train.b1, b2=train.b2, eps=train.eps)
    elif train.optimizer == "adamw":
        tx = optax.adamw(
            schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay
        )
    else:
        raise ValueError(
            f"config field train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}"
        )
    if train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), tx)
    return tx


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """(summed NLL over scored positions, number of scored positions); logits [B, T, V]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


@dataclasses.dataclass
class TrainState:
    """Everything a step needs: the NNX graph, the (sharded) state and its shardings."""

    graphdef: Any
    rng_state: Any
    state: Any  # nnx.State of (model, optimizer) without RNG streams
    shardings: Any
    mesh: Any

    def model(self) -> Transformer:
        model, _ = nnx.merge(self.graphdef, self.rng_state, self.state)
        return model


def init_train_state(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, devices: list | None = None
) -> TrainState:
    seed = config.train.seed
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    optimizer = nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)
    graphdef, rng_state, state = nnx.split((model, optimizer), nnx.RngState, ...)
    mesh = sharding.make_mesh(devices)
    shardings = sharding.state_shardings(state, mesh, fsdp=config.train.fsdp)
    state = jax.device_put(state, shardings)
    return TrainState(graphdef, rng_state, state, shardings, mesh)


def all_finite(tree) -> jax.Array:
    """True when every float leaf of `tree` is free of NaN and inf (a scalar bool)."""
    flags = [
        jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.stack(flags).all() if flags else jnp.bool_(True)


def make_finite_check(ts: TrainState):
    """state -> None when every parameter and optimizer-state value is finite, else the reason:
    the `check` for restoring a checkpoint (a non-finite one can only produce NaN)."""
    finite = jax.jit(all_finite, out_shardings=NamedSharding(ts.mesh, P()))

    def check(state) -> str | None:
        return (
            None if bool(finite(state)) else "non-finite (NaN or inf parameters or optimizer state)"
        )

    return check


def make_train_step(ts: TrainState, seed: int, *, check_finite: bool = False):
    """The jitted step (state, batch, step) -> (state, loss); state is donated. `loss` is the
    batch's, computed before the update. With `check_finite` it returns (state, loss, finite):
    whether the updated parameters and optimizer state are all finite (training checks it
    before calling a state good)."""
    dropout_key = jax.random.key(seed + 2)
    batch_sharding = sharding.batch_sharding(ts.mesh)

    def step_fn(state, rng_state, batch, step):
        model, optimizer = nnx.merge(ts.graphdef, rng_state, state)
        nnx.reseed(model, dropout=jax.random.fold_in(dropout_key, step))
        model.train()

        def loss_fn(model):
            logits = model(batch["inputs"])
            total, count = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
            return total / jnp.maximum(count, 1.0)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        _, _, new_state = nnx.split((model, optimizer), nnx.RngState, ...)
        if check_finite:
            return new_state, loss, all_finite(new_state)
        return new_state, loss

    step = jax.jit(
        step_fn,
        in_shardings=(ts.shardings, None, batch_sharding, None),
        out_shardings=(ts.shardings, None, None) if check_finite else (ts.shardings, None),
        donate_argnums=0,
    )
    return lambda state, batch, i: step(state, ts.rng_state, batch, i)


def make_eval_step(ts: TrainState):
    """Jitted (state, batch) -> (greedy predictions [B, T], summed NLL, scored count)."""
    batch_sharding = sharding.batch_sharding(ts.mesh)

    def eval_fn(state, rng_state, batch):
        model, _ = nnx.merge(ts.graphdef, rng_state, state)
        model.eval()
        logits = model(batch["inputs"])
        total, count = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), total, count

    # Predictions come back replicated: in a multi-process run each process reads all rows.
    replicated = NamedSharding(ts.mesh, P())
    step = jax.jit(
        eval_fn,
        in_shardings=(ts.shardings, None, batch_sharding),
        out_shardings=(replicated, replicated, replicated),
    )
    return lambda state, batch: step(state, ts.rng_state, batch)


def evaluate(
    task: Task,
    ts: TrainState,
    eval_step,
    config: ml_collections.ConfigDict,
    num_examples: int,
    splits: tuple[str, ...] | None = None,
) -> dict[str, dict]:
    """Error rates and loss on every split: {split: {token_error, sequence_error, loss, ...}}."""
    batch_sharding = sharding.batch_sharding(ts.mesh)
    results = {}
    for split in splits or task.splits:
        counts, nll, scored = [], 0.0, 0.0
        size = min(num_examples, task.num_examples(split))  # fixed splits cap the count
        for batch in task.eval_batches(
            split, config.eval.batch_size, seed=config.eval.seed, num_examples=size
        ):
            preds, total, count = eval_step(ts.state, sharding.global_batch(batch, batch_sharding))
            counts.append(task.error_counts(np.asarray(preds), batch))
            nll, scored = nll + float(total), scored + float(count)
        loss = nll / max(scored, 1.0)
        results[split] = finalize(counts) | {"loss": loss, "perplexity": math.exp(min(loss, 700))}
    return results


# ---------------------------------------------------------------------------------------------
# Run directory: config, metrics, resume
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON lines to metrics.jsonl and scalars to TensorBoard (tensorboardX)."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        self.file = self.writer = None
        if jax.process_index() != 0:  # process 0 writes the run directory's logs
            return
        if self.path.exists():
            # Records past the checkpoint we resume from are redone, and so is a final
            # evaluation; a torn last line is dropped by read_metrics (with a warning).
            kept = [
                record
                for record in read_metrics(workdir)
                if record.get("step", 0) <= resume_step and "final" not in record
            ]
            partial = self.path.with_suffix(".jsonl.tmp")  # a kill now must not erase history
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(partial, self.path)
        elif resume_step > 0:
            warnings.warn(
                f"{self.path} is missing although the run resumes from step {resume_step}: the "
                f"records of steps 1..{resume_step} are lost (throughput then counts only the "
                "intervals logged from now on)",
                stacklevel=2,
            )
        self.file = self.path.open("a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if self.file is None:  # not process 0
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        for key, value in _flatten(record).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def training_rates(self) -> list[float]:
        """tokens/s of every logged interval that did not include compilation."""
        return [
            r["train"]["tokens_per_s"]
            for r in read_metrics(self.path.parent)
            if "train" in r and not r["train"].get("includes_compile", False)
        ]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value
    return out


def refuse_other_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run that was started with another config (reads config.json)."""
    path = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); restore it or use a new --workdir"
            ) from None
        resumable = {
            "train": {"steps", "eval_every", "log_every", "checkpoint_every"},
            "eval": {"num_examples", "final_num_examples", "batch_size"},
        }
        differ = [
            k
            for k in _flatten(saved).keys() | _flatten(current).keys()
            if _flatten(saved).get(k) != _flatten(current).get(k)
            and k.split("/")[-1] not in resumable.get(k.split("/")[0], set())
        ]
        if differ:
            raise ValueError(
                f"{workdir} holds a run with a different config ({', '.join(sorted(differ)[:5])}"
                "); use a new --workdir or the same config to resume"
            )


def write_run_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Writes config.json (process 0; atomically, since the other processes read it)."""
    if jax.process_index() == 0:
        partial = workdir / "config.json.tmp"
        partial.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2))
        os.replace(partial, workdir / "config.json")


def interval_steps(every: int, total: int) -> set[int]:
    return set(range(every, total + 1, every)) | {total} if every > 0 else {total}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    devices: list | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` and returns the final results.

    Everything about the run is in `workdir`: config.json, metrics.jsonl, tensorboard/,
    checkpoints/ and results.json. A run whose checkpoint is at the last step only re-does the
    final evaluation.

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
    check_workdir(workdir)
    refuse_other_config(workdir, config)
    task = build_task(config)
    model_cfg = build_model_config(config, task)
    ts = init_train_state(config, model_cfg, devices)  # builds the optimizer and schedule
    train_cfg = config.train
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
    write_run_config(workdir, config)
    log = MetricsLog(workdir, start_step)
    train_step = make_train_step(ts, train_cfg.seed, check_finite=True)
    eval_step = make_eval_step(ts)
    batch_sharding = sharding.batch_sharding(ts.mesh)
    eval_steps = interval_steps(train_cfg.eval_every, train_cfg.steps)
    ckpt_steps = interval_steps(train_cfg.checkpoint_every, train_cfg.steps)
    log_steps = interval_steps(train_cfg.log_every, train_cfg.steps)
    in_dist = task.splits[1] if len(task.splits) > 1 else task.splits[0]
    tokens_per_batch = train_cfg.batch_size * task.seq_len(task.train_split)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(ts.model(), nnx.Param)))
    schedule = learning_rate_schedule(train_cfg)

    # (loss, state finite) of the steps not yet fetched: no host sync between log steps.
    pending: list[tuple[jax.Array, jax.Array]] = []
    interval_start, interval_steps_done = time.perf_counter(), 0
    last_eval: dict[str, dict] = {}
    bar = tqdm(
        total=train_cfg.steps,
        initial=start_step,
        disable=not progress,
        desc=f"{config.task.name}/{model_cfg.encoding}",
        dynamic_ncols=True,
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
                bar.set_postfix(
                    loss=f"{losses.mean():.4f}",
                    err=f"{last_eval.get(in_dist, {}).get('token_error', float('nan')):.4f}",
                )
                if done in ckpt_steps:
                    checkpoints.save(done, ts.state, {"step": done})
                if done in eval_steps and done != train_cfg.steps:
                    last_eval = evaluate(task, ts, eval_step, config, config.eval.num_examples)
                    log.write(done, {"eval": last_eval})
                    bar.set_postfix(
                        loss=f"{losses.mean():.4f}",
                        err=f"{last_eval[in_dist]['token_error']:.4f}",
                    )
                interval_start = time.perf_counter()  # evaluation is not training time
            bar.update(1)
            if stop_requested and done < train_cfg.steps:
                if pending:
                    flush(done)
                if done not in ckpt_steps:
                    checkpoints.save(done, ts.state, {"step": done})
                raise TrainingStopped(
                    f"stopped by SIGTERM after step {done}; the checkpoint is saved, rerun the "
                    "same command to resume"
                )
        final = evaluate(task, ts, eval_step, config, config.eval.final_num_examples)
        log.write(train_cfg.steps, {"final": final})
    finally:
        bar.close()
        checkpoints.close()
        log.close()
    rates = log.training_rates()  # the whole run's, across resumes
    results = {
        "task": config.task.name,
        "variant": config.variant,
        "encoding": model_cfg.encoding,
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
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def format_results(results: dict[str, Any]) -> str:
    """A short table: error per split (token and sequence level, in percent), loss, perplexity."""
    # Language modelling scores every token of a window, so a window is never all right and
    # sequence error says nothing there: the table then shows token error, loss and perplexity.
    lm = results["task"] == "wikitext"
    lines = [
        f"{results['task']} / {results['encoding']}: final "
        + ("token error (%), loss, perplexity" if lm else "errors (%)"),
        f"{'split':>12} {'token':>8} "
        + ("" if lm else f"{'sequence':>9} ")
        + f"{'loss':>8} {'ppl':>9}",
    ]
    for split, m in results["final"].items():
        marker = "  (in-distribution)" if split == results["in_distribution_split"] else ""
        sequence = "" if lm else f"{100 * m['sequence_error']:9.2f} "
        lines.append(
            f"{split:>12} {100 * m['token_error']:8.2f} {sequence}"
            f"{m['loss']:8.4f} {m.get('perplexity', math.exp(min(m['loss'], 700))):9.3f}{marker}"
        )
    if results.get("tokens_per_s"):
        lines.append(
            f"throughput: {results['tokens_per_s']:,.0f} tokens/s "
            f"({results['ms_per_batch']:.1f} ms/batch) on {results['num_devices']} x "
            f"{results['device']}"
        )
    return "\n".join(lines)


def one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: `warning: <message>`, one line each."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warnings
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        overrides, rest = split_overrides(argv)
        parser = argparse.ArgumentParser(
            description=__doc__,
            epilog="Override any config field with --config.<field>=<value>, "
            "e.g. --config.train.steps=2000.",
        )
        parser.add_argument(
            "--config", required=True, help="configs/<task>.py:<variant>[,<option>...]"
        )
        parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        args = parser.parse_args(rest)
        config = load_config(args.config)
        for override in overrides:
            apply_override(config, override)
        sharding.maybe_initialize_distributed()
        results = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    except (ValueError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(str(stopped), file=sys.stderr)
        return 3
    except jax.errors.JaxRuntimeError as error:
        message = out_of_memory_message(error, args.workdir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return OUT_OF_MEMORY_EXIT
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
