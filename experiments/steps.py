"""The model and its jitted steps: building both from a config, the loss, the train step, the
eval step, and the finiteness checks that keep NaN out of checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cope.model import ModelConfig, Transformer
from experiments import sharding
from experiments.checkpointing import abstract_like
from experiments.optimizer import make_optimizer
from experiments.tasks import Task, make_task

# A checkpoint holds the nnx.State of (model, optimizer); the model's part is item 0.
MODEL_ITEM = 0


def build_task(config: ml_collections.ConfigDict) -> Task:
    return make_task(config.task.name, **config.task.options.to_dict())


def build_model_config(config: ml_collections.ConfigDict, task: Task) -> ModelConfig:
    """Model fields from the config; vocabulary and table sizes from the task."""
    return ModelConfig.from_dict(
        config.model.to_dict() | dict(vocab_size=task.vocab_size, max_len=task.max_seq_len)
    )


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """(summed NLL over scored positions, number of scored positions); logits [B, T, V]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


@dataclasses.dataclass
class TrainState:
    """Everything a step needs: the NNX graph of (model, optimizer) in training, or of the
    model alone for evaluation, its RNG streams, the (sharded) state and its shardings."""

    graphdef: Any
    rng_state: Any
    state: Any  # nnx.State without RNG streams
    shardings: Any
    mesh: Any

    def model(self) -> Transformer:
        merged = nnx.merge(self.graphdef, self.rng_state, self.state)
        return merged[MODEL_ITEM] if isinstance(merged, tuple) else merged


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


def abstract_model_state(model_cfg: ModelConfig, devices: list | None = None) -> TrainState:
    """The model alone, from nnx.eval_shape: `state` holds ShapeDtypeStructs (replicated over
    the devices) to restore a checkpoint's model part into; nothing is initialised."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    nnx.reseed(model, dropout=0)  # concrete RNG streams; evaluation never draws from them
    graphdef, rng_state, state = nnx.split(model, nnx.RngState, ...)
    mesh = sharding.make_mesh(devices)
    shardings = sharding.state_shardings(state, mesh, fsdp=False)
    return TrainState(graphdef, rng_state, abstract_like(state, shardings), shardings, mesh)


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
            # Packed batches carry segment_ids: each example attends and counts within itself.
            logits = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
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
        merged = nnx.merge(ts.graphdef, rng_state, state)
        model = merged[MODEL_ITEM] if isinstance(merged, tuple) else merged
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
