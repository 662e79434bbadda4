"""Runs for analysis: `load_run(workdir)` gives a trained model with its task, metrics and
results; `compare` and `paper_table` (from experiments.tables) tabulate runs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import decoding
from cope.model import ModelConfig, Transformer, attention_intermediates
from experiments.checkpointing import Checkpoints
from experiments.evaluation import evaluate, in_distribution_split
from experiments.rundir import RunDirError, RunRecord, read_run
from experiments.steps import (
    MODEL_ITEM,
    TrainState,
    abstract_model_state,
    build_model_config,
    build_task,
    make_eval_step,
    make_finite_check,
)
from experiments.tables import Cell, Table, compare, paper_table
from experiments.tasks import Batch, Task

__all__ = [
    "Cell",
    "Run",
    "RunDirError",
    "Table",
    "compare",
    "load_run",
    "paper_table",
]


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Run(RunRecord):
    """A run directory with its task and its trained model (the parameters of checkpoint
    `step`, restored without the optimizer state), in evaluation mode."""

    task: Task
    model_config: ModelConfig
    step: int
    state: TrainState

    @functools.cached_property
    def model(self) -> Transformer:
        model = self.state.model()
        model.eval()
        return model

    @functools.cached_property
    def _eval_step(self):
        return make_eval_step(self.state)

    @property
    def in_distribution_split(self) -> str:
        return in_distribution_split(self.task)

    def evaluate(
        self,
        split: str | Sequence[str] | None = None,
        *,
        num_examples: int | None = None,
        batch_size: int | None = None,
        task: Task | None = None,
    ) -> dict[str, dict]:
        """{split: {token_error, sequence_error, loss, perplexity, counts...}} on `split` (one
        name, several, or None for all), `num_examples` per split (default: the config's
        final_num_examples) in batches of `batch_size` (default the config's). `task` evaluates
        on another task of the same vocabulary, e.g. WikiText at a longer window."""
        task = self.task if task is None else task
        splits = (split,) if isinstance(split, str) else tuple(split or task.splits)
        for name in splits:
            if name not in task.splits:
                raise ValueError(f"split must be one of {task.splits}, got {name!r}")
        config = self.config.eval
        return evaluate(
            task,
            self.state,
            self._eval_step,
            batch_size=_positive("batch_size", batch_size or config.batch_size),
            seed=config.seed,
            num_examples=_positive(
                "num_examples", config.final_num_examples if num_examples is None else num_examples
            ),
            splits=splits,
        )

    def sample(self, split: str | None = None, n: int = 1, seed: int = 0) -> Batch:
        """n examples of `split` (default: the in-distribution one): inputs, targets, loss_mask
        [n, T]."""
        return self.task.sample(split or self.in_distribution_split, n, seed)

    def tokens(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Text -> (ids [B, T] int32 right-padded with 0, lengths [B]) in the task's vocabulary."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.task.encode(text) for text in texts]
        if not encoded or min(len(ids) for ids in encoded) == 0:
            raise ValueError(f"prompts must be non-empty texts, got {prompts!r}")
        ids = np.zeros((len(encoded), max(len(e) for e in encoded)), np.int32)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = e
        return ids, np.array([len(e) for e in encoded], np.int32)

    def decode(self, ids) -> str:
        """Token ids -> text in the task's vocabulary."""
        return self.task.decode(ids)

    def generate(
        self,
        prompts: str | Sequence[str] | np.ndarray,
        lengths=None,
        *,
        max_new_tokens: int,
        **options: Any,
    ) -> decoding.Generation:
        """Continues `prompts` (texts, or ids [B, T] right-padded with `lengths` [B]) by
        `max_new_tokens` tokens through `decoding.generate` (the model's cached decoding path);
        `options` are its sampler, eos_id, seed, ... The new tokens are `.tokens`; `decode`
        turns a row into text."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], str)
        ):
            prompts, lengths = self.tokens(prompts)
        return decoding.generate(
            self.model,
            jnp.asarray(prompts),
            None if lengths is None else jnp.asarray(lengths),
            max_new_tokens=max_new_tokens,
            **options,
        )

    def attention(self, tokens, lengths=None) -> list[dict[str, np.ndarray]]:
        """What each layer's attention computed for `tokens` (ids [B, T], a batch from `sample`,
        or texts): per layer a dict of float32 [B, H, T, S] arrays `logits` (scaled, -inf where
        masked), `probs`, and for CoPE `gates` and `positions` (the contextual positions p_ij).
        They come through the model's own attention call (cope.model.attention_intermediates),
        from the XLA reference: use analysis-sized batches."""
        if isinstance(tokens, dict):
            tokens = tokens["inputs"]
        elif isinstance(tokens, str) or (
            isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str)
        ):
            tokens, lengths = self.tokens(tokens)
        lengths = None if lengths is None else jnp.asarray(lengths)
        graphdef, state = nnx.split(self.model)
        layers = _attention_jit(graphdef, state, jnp.asarray(tokens), lengths)
        return [{k: np.asarray(v) for k, v in layer.items()} for layer in layers]


@functools.partial(jax.jit, static_argnums=0)
def _attention_jit(graphdef, state, tokens, lengths):
    return attention_intermediates(nnx.merge(graphdef, state), tokens, lengths=lengths)[1]


def load_run(
    workdir: str | Path, *, unfinished_ok: bool = False, devices: list | None = None
) -> Run:
    """The run in `workdir` with its model restored from the newest usable checkpoint.

    Only the model's parameters are read, into the abstract state from nnx.eval_shape (no
    optimizer state, nothing initialised). A directory that is missing, corrupt, of an older
    config layout, without a usable checkpoint or (unless `unfinished_ok`) unfinished is one
    RunDirError line. An unusable newest checkpoint is skipped with a warning and left in
    place. `devices` (default all) hold the replicated parameters; evaluation batches are split
    over them.
    """
    record = read_run(workdir, unfinished_ok=unfinished_ok)
    config = record.config
    task = build_task(config)
    try:
        model_cfg = build_model_config(config, task)
    except ValueError as error:
        raise RunDirError(f"{record.workdir / 'config.json'}: {error}") from None
    ts = abstract_model_state(model_cfg, devices)
    folder = record.workdir / "checkpoints"
    if not folder.is_dir():
        raise RunDirError(f"{record.workdir} has no checkpoints/ to load a model from")
    checkpoints = Checkpoints(folder, keep=config.train.keep_checkpoints)
    try:
        restored = checkpoints.restore_latest(
            {MODEL_ITEM: ts.state}, check=make_finite_check(ts), partial=True
        )
    finally:
        checkpoints.close()
    if restored is None:
        raise RunDirError(f"no usable checkpoint in {folder}")
    step, state, _ = restored
    ts.state = state[MODEL_ITEM]
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(RunRecord)}
    return Run(**fields, task=task, model_config=model_cfg, step=step, state=ts)
