"""Training on packed rows: the step's loss is the examples' loss alone, evaluation equals the
unpacked run's, and a packed run resumes exactly."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import loop, sharding, steps
from experiments.configlib import apply_override, load_config
from experiments.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; printed so a failure can be reproduced."""
    value = random.SystemRandom().randrange(2**20)
    print(f"seed={value}")
    return value


def counting_smoke(*options: str, **overrides):
    spec = str(ROOT / "configs/counting.py") + ":cope,smoke" + "".join(f",{o}" for o in options)
    config = load_config(spec)
    for field, value in overrides.items():
        apply_override(config, f"{field}={value}")
    return config


def one_example_per_row(batch: dict[str, np.ndarray], fill: int) -> dict[str, np.ndarray]:
    """The scored segments of a packed batch, each alone at the start of a row (the rest
    `fill`, unscored): the examples as an unpacked batch holds them."""
    pieces = []
    for row, ids in enumerate(batch["segment_ids"]):
        cuts = [0, *np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]
        pieces += [
            (row, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if batch["loss_mask"][row, a:b].any()
        ]
    width = batch["inputs"].shape[1]
    out = {
        "inputs": np.full((len(pieces), width), fill, np.int32),
        "targets": np.full((len(pieces), width), fill, np.int32),
        "loss_mask": np.zeros((len(pieces), width), bool),
    }
    for i, (row, start, end) in enumerate(pieces):
        for key in out:
            out[key][i, : end - start] = batch[key][row, start:end]
    return out


def row_losses(model, inputs: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[n] mean NLL over each row's scored positions, the model run on `inputs` (no segments)."""
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(inputs))
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]  # [n, T]
    mask = batch["loss_mask"]
    return (nll * mask).sum(1) / np.maximum(mask.sum(1), 1)


def test_packed_training_loss_and_evaluation(seed):
    """The train step's loss on a packed batch is the mean of its programs' losses, each
    program run alone (counting scores one answer per program), and not the loss without
    segment ids. Evaluation never packs: after the step, the packed task's evaluation equals
    the unpacked task's for the same parameters."""
    config = counting_smoke("pack", **{"model.dropout": 0.0, "train.seed": seed})
    task, unpacked = steps.build_task(config), steps.build_task(counting_smoke())
    assert task.pack and not unpacked.pack
    ts = steps.init_train_state(config, steps.build_model_config(config, task))
    batch = task.train_batch(seed, 3, config.train.batch_size)
    alone = one_example_per_row(batch, fill=task.pad_id)
    assert len(alone["inputs"]) > config.train.batch_size  # some rows hold several programs
    assert (alone["loss_mask"].sum(1) == 1).all()
    # One forward pass: the programs alone, then the packed rows without their segment ids.
    both = {k: np.concatenate([alone[k], batch[k]]) for k in alone}
    losses = row_losses(ts.model(), both["inputs"], both)
    expected = losses[: len(alone["inputs"])].mean()
    unsegmented = np.average(losses[len(alone["inputs"]) :], weights=batch["loss_mask"].sum(1))
    step = steps.make_train_step(ts, config.train.seed)
    batch_sharding = sharding.batch_sharding(ts.mesh)
    ts.state, loss = step(ts.state, sharding.global_batch(batch, batch_sharding), 3)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    assert abs(unsegmented - expected) > 1e-4 * expected  # 5x the tolerance above

    eval_step = steps.make_eval_step(ts)
    kwargs = dict(batch_size=config.eval.batch_size, num_examples=config.eval.num_examples)
    assert evaluate(task, ts, eval_step, **kwargs) == evaluate(unpacked, ts, eval_step, **kwargs)


def test_packed_run_resumes_exactly(tmp_path, capsys):
    """A copy of a finished 8-step packed run, its step-8 checkpoint and results gone (as if
    killed after saving step 4), resumes from step 4 to the same step losses and results."""
    config = counting_smoke(
        "pack",
        **{
            "train.steps": 8,
            "train.checkpoint_every": 4,
            "train.eval_every": 0,
            "train.log_every": 1,
            "eval.final_num_examples": 32,
        },
    )

    def step_losses(workdir: Path) -> dict[int, float]:
        records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["train"]["loss"] for r in records if "train" in r}

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = loop.train_and_evaluate(config, straight, progress=False)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    (resumed / "results.json").unlink()
    capsys.readouterr()
    b = loop.train_and_evaluate(config, resumed, progress=False)
    assert f"resuming {resumed} from step 4" in capsys.readouterr().err
    assert b["final"] == a["final"]
    assert step_losses(resumed) == step_losses(straight)
    assert sorted(step_losses(straight)) == list(range(1, 9))
