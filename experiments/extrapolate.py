"""Context extrapolation (the CoPE paper's Fig. 3): perplexity of a run at T' = f * T.

    python -m experiments.extrapolate --workdir runs/wt2_cope runs/wt2_rel --lengths 1.0,1.5,2.0,2.5

Restores each run's newest checkpoint into the model built from its TRAINING config (same
parameter shapes, absolute table of the training length), then evaluates the whole validation
split cut into windows of T' tokens. Absolute position encodings cannot go past their table:
for those lengths the model's error is recorded in place of a perplexity. Each run directory
gets extrapolation.json; the combined table and plot go to --out (.json, .md, .png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from experiments import plots
from experiments.analysis import load_run
from experiments.tasks import make_task

DEFAULT_FACTORS = (1.0, 1.5, 2.0, 2.5)
ABSOLUTE_TABLE_ERROR = "exceeds the absolute position table"


def eval_rows(batch_size: int, train_len: int, eval_len: int) -> int:
    """Rows per eval batch at `eval_len`: the run's token budget per batch, whole per device."""
    devices = jax.device_count()
    rows = max(1, batch_size * train_len // eval_len)
    return max(devices, rows // devices * devices)


def extrapolate_run(
    workdir: str | Path,
    *,
    factors: Sequence[float] = DEFAULT_FACTORS,
    split: str = "valid",
    stride: int = 0,
    batch_size: int | None = None,
    num_examples: int | None = None,
) -> dict[str, Any]:
    """Perplexity of the run in `workdir` on `split` at eval lengths round(f * T) for f in factors.

    Args:
        workdir: a wikitext run directory (config.json and checkpoints/).
        factors: multiples of the training length T.
        split: the split to score ("valid" in the paper's Fig. 3).
        stride: evaluation stride at every length (0 = non-overlapping windows).
        batch_size: rows per eval batch at length T (default: the run's eval.batch_size); longer
            windows use proportionally fewer rows.
        num_examples: score only the first this many windows (default: the whole split).

    Returns:
        dict(workdir, variant, encoding, step, train_seq_len, split, stride, lengths=[...]) where
        each length is dict(factor, eval_seq_len, perplexity, loss, tokens) or, when the model
        cannot run at that length (absolute PE past its table), dict(factor, eval_seq_len,
        error).
    """
    for name, value in (("batch_size", batch_size), ("num_examples", num_examples)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    workdir = Path(workdir)
    run = load_run(workdir, unfinished_ok=True)
    config = run.config
    if run.task_name != "wikitext":
        raise ValueError(f"{workdir} is a {run.task_name!r} run; extrapolation needs wikitext")
    train_len = run.task.seq_len(run.task.train_split)
    rows_at_train_len = config.eval.batch_size if batch_size is None else batch_size

    lengths = []
    for factor in factors:
        eval_len = round(float(factor) * train_len)
        if eval_len < 1:
            raise ValueError(f"length factor {factor} gives an empty window (T={train_len})")
        options = config.task.options.to_dict() | dict(eval_seq_len=eval_len, eval_stride=stride)
        task = make_task("wikitext", **options)
        entry: dict[str, Any] = {"factor": float(factor), "eval_seq_len": eval_len}
        try:
            metrics = run.evaluate(
                split,
                num_examples=task.num_examples(split) if num_examples is None else num_examples,
                batch_size=eval_rows(rows_at_train_len, train_len, eval_len),
                task=task,
            )[split]
        except ValueError as error:
            if ABSOLUTE_TABLE_ERROR not in str(error):
                raise
            entry["error"] = str(error).strip().splitlines()[0]
        else:
            entry |= {
                "perplexity": metrics["perplexity"],
                "loss": metrics["loss"],
                "tokens": metrics["tokens"],
            }
        lengths.append(entry)
    return {
        "workdir": str(workdir),
        "variant": config.variant,
        "encoding": run.encoding,
        "step": run.step,
        "train_seq_len": train_len,
        "split": split,
        "stride": stride or None,
        "lengths": lengths,
    }


def labels(runs: Sequence[dict]) -> list[str]:
    """The variant of each run, or its directory name where variants repeat."""
    variants = [r["variant"] for r in runs]
    return [
        r["variant"] if variants.count(r["variant"]) == 1 else Path(r["workdir"]).name for r in runs
    ]


def format_markdown(runs: Sequence[dict]) -> str:
    """A table: one row per run, one column per eval length, perplexity or the error."""
    factors = sorted({e["factor"] for r in runs for e in r["lengths"]})
    header = ["run", "encoding", "T", *[f"{f:g}T" for f in factors]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, run in zip(labels(runs), runs, strict=True):
        by_factor = {e["factor"]: e for e in run["lengths"]}
        cells = []
        for f in factors:
            e = by_factor.get(f)
            if e is None:
                cells.append("")
            elif "error" in e:
                cells.append(f"n/a (T'={e['eval_seq_len']} past the absolute table)")
            else:
                cells.append(f"{e['perplexity']:.2f} (T'={e['eval_seq_len']})")
        lines.append(
            f"| {label} | {run['encoding']} | {run['train_seq_len']} | " + " | ".join(cells) + " |"
        )
    split = runs[0]["split"] if runs else "valid"
    stride = runs[0]["stride"] if runs else None
    windows = f"windows with stride {stride}" if stride else "non-overlapping windows"
    note = f"{split} perplexity at evaluation length T' ({windows}); each model was trained at T."
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_outputs(runs: Sequence[dict], prefix: str | Path, *, png: bool = True) -> list[Path]:
    """Writes <prefix>.json, <prefix>.md and (optionally) <prefix>.png; returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_suffix(".json"), prefix.with_suffix(".md")]
    paths[0].write_text(json.dumps(list(runs), indent=2))
    paths[1].write_text(format_markdown(runs))
    if png:
        paths.append(prefix.with_suffix(".png"))
        plots.extrapolation(runs, labels(runs)).savefig(paths[2], dpi=150)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", nargs="+", required=True, help="one or more run directories")
    parser.add_argument(
        "--lengths",
        default="1.0,1.5,2.0,2.5",
        help="comma-separated multiples of the training length T",
    )
    parser.add_argument("--split", default="valid")
    parser.add_argument(
        "--stride", type=int, default=0, help="evaluation stride (default: non-overlapping windows)"
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="rows per eval batch at length T (default: the run's)",
    )
    parser.add_argument(
        "--num_examples",
        type=int,
        default=None,
        help="windows per length (default: the whole split)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output prefix (default: <workdir>/extrapolation for one run, "
        "else extrapolation in the runs' common parent)",
    )
    parser.add_argument("--no-png", action="store_true", help="skip the matplotlib figure")
    args = parser.parse_args(argv)
    try:
        try:
            factors = [float(f) for f in args.lengths.split(",") if f.strip()]
        except ValueError:
            raise ValueError(
                f"--lengths must be comma-separated numbers (multiples of T), got {args.lengths!r}"
            ) from None
        if not factors or min(factors) <= 0:
            raise ValueError(f"--lengths must be positive multiples of T, got {args.lengths!r}")
        runs = []
        for workdir in args.workdir:
            run = extrapolate_run(
                workdir,
                factors=factors,
                split=args.split,
                stride=args.stride,
                batch_size=args.batch_size,
                num_examples=args.num_examples,
            )
            (Path(workdir) / "extrapolation.json").write_text(json.dumps(run, indent=2))
            runs.append(run)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        prefix = Path(args.out)
    elif len(args.workdir) == 1:
        prefix = Path(args.workdir[0]) / "extrapolation"
    else:
        parents = [str(Path(w).resolve().parent) for w in args.workdir]
        prefix = Path(os.path.commonpath(parents)) / "extrapolation"
    paths = write_outputs(runs, prefix, png=not args.no_png)
    print(format_markdown(runs))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
