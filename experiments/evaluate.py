"""Re-evaluates the latest checkpoint of a run on every split: `python -m experiments.evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import ml_collections

from cope.model import ModelConfig
from experiments.checkpointing import Checkpoints, abstract_like
from experiments.tasks import Task
from experiments.train import (
    TrainState,
    build_model_config,
    build_task,
    evaluate,
    format_results,
    init_train_state,
    make_eval_step,
    make_finite_check,
    one_line_warnings,
)


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise ValueError(f"{workdir} is not a run directory (no config.json)")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def restore_run(
    workdir: Path, config: ml_collections.ConfigDict, task: Task
) -> tuple[TrainState, ModelConfig, int]:
    """The run's newest usable checkpoint (readable, finite), restored into a train state built
    from `config` (model sizes from `task`); returns (state, model config, step). Unusable ones
    are skipped with a warning and left where they are (training sets them aside)."""
    model_cfg = build_model_config(config, task)
    ts = init_train_state(config, model_cfg)
    if not (workdir / "checkpoints").is_dir():
        raise ValueError(f"no checkpoint in {workdir / 'checkpoints'}")
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    restored = checkpoints.restore_latest(
        abstract_like(ts.state, ts.shardings), check=make_finite_check(ts)
    )
    checkpoints.close()
    if restored is None:
        raise ValueError(f"no usable checkpoint in {workdir / 'checkpoints'}")
    step, ts.state, _ = restored
    return ts, model_cfg, step


def evaluate_run(
    workdir: str | Path, *, num_examples: int | None = None, splits: tuple[str, ...] | None = None
) -> dict:
    """Restores the newest usable checkpoint of `workdir` and evaluates it on `num_examples`
    per split (default: the config's final_num_examples)."""
    if num_examples is not None and (
        isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1
    ):
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}")
    workdir = Path(workdir)
    config = load_run_config(workdir)
    task = build_task(config)
    ts, model_cfg, step = restore_run(workdir, config, task)
    final = evaluate(
        task,
        ts,
        make_eval_step(ts),
        config,
        config.eval.final_num_examples if num_examples is None else num_examples,
        splits,
    )
    return {
        "task": config.task.name,
        "encoding": model_cfg.encoding,
        "step": step,
        "in_distribution_split": task.splits[1] if len(task.splits) > 1 else task.splits[0],
        "final": final,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--num_examples",
        type=int,
        default=None,
        help="examples per split (default: the config's final_num_examples)",
    )
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: all)")
    args = parser.parse_args(argv)
    try:
        splits = tuple(args.splits.split(",")) if args.splits else None
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warnings
            results = evaluate_run(args.workdir, num_examples=args.num_examples, splits=splits)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    (Path(args.workdir) / "eval.json").write_text(json.dumps(results, indent=2))
    print(f"checkpoint step {results['step']}")
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
