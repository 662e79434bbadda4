"""Evaluation on a task's splits (error rates, loss, perplexity) and the table that shows it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from experiments import sharding
from experiments.steps import TrainState
from experiments.tasks import Task, finalize


def in_distribution_split(task: Task) -> str:
    """The split drawn like the training data (the first after `train`)."""
    return task.splits[1] if len(task.splits) > 1 else task.splits[0]


def evaluate(
    task: Task,
    ts: TrainState,
    eval_step,
    *,
    batch_size: int,
    num_examples: int,
    seed: int = 0,
    splits: tuple[str, ...] | None = None,
) -> dict[str, dict]:
    """Error rates and loss on every split: {split: {token_error, sequence_error, loss, ...}}.

    `eval_step` is `steps.make_eval_step(ts)`; `num_examples` per split (fixed splits cap it at
    their size), drawn in batches of `batch_size` from the evaluation stream of `seed`.
    """
    batch_sharding = sharding.batch_sharding(ts.mesh)
    results = {}
    for split in splits or task.splits:
        counts, nll, scored = [], 0.0, 0.0
        size = min(num_examples, task.num_examples(split))
        for batch in task.eval_batches(split, batch_size, seed=seed, num_examples=size):
            preds, total, count = eval_step(ts.state, sharding.global_batch(batch, batch_sharding))
            counts.append(task.error_counts(np.asarray(preds), batch))
            nll, scored = nll + float(total), scored + float(count)
        loss = nll / max(scored, 1.0)
        results[split] = finalize(counts) | {"loss": loss, "perplexity": math.exp(min(loss, 700))}
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
