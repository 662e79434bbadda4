"""The optimizer and learning-rate schedule a config's `train` section names."""

from __future__ import annotations

import ml_collections
import optax

from experiments.configlib import OPTIMIZERS, SCHEDULES


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
