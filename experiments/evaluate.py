"""Re-evaluates the latest checkpoint of a run on every split: `python -m experiments.evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from experiments.analysis import load_run
from experiments.evaluation import format_results
from experiments.train import one_line_warnings


def evaluate_run(
    workdir: str | Path, *, num_examples: int | None = None, splits: tuple[str, ...] | None = None
) -> dict:
    """Restores the newest usable checkpoint of `workdir` (finished or not) and evaluates it on
    `num_examples` per split (default: the config's final_num_examples)."""
    if num_examples is not None and (
        isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1
    ):
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}")
    run = load_run(workdir, unfinished_ok=True)
    return {
        "task": run.task_name,
        "encoding": run.model_config.encoding,
        "step": run.step,
        "in_distribution_split": run.in_distribution_split,
        "final": run.evaluate(splits, num_examples=num_examples),
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
