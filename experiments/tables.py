"""Tables of runs, without jax: `compare` (a row per run) and `paper_table` (a row per
encoding, mean ± std over seeds, the paper's number beside each cell)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import paper
from experiments.rundir import RESUMABLE, RunRecord, flatten


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell: the mean and sample standard deviation over `n` seeds (None for one
    seed) of a number, and the paper's number for it (None when it reports none)."""

    mean: float
    std: float | None
    n: int
    paper: float | None = None

    def __str__(self) -> str:
        text = f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")
        return text + (f" (paper {self.paper:g})" if self.paper is not None else "")


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of runs; shows as markdown (in a notebook too). `cells[(row, column)]` holds
    the numbers of the Cell entries."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    cells: dict[tuple[str, str], Cell] = dataclasses.field(default_factory=dict)
    note: str = ""
    task: str = ""
    unit: str = ""  # what the numbers are: "token error (%)" or "perplexity"

    def markdown(self) -> str:
        def text(value) -> str:
            if isinstance(value, float):
                return "n/a" if math.isnan(value) else f"{value:.2f}"
            return str(value)

        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines + ([f"\n{self.note}"] if self.note else []))

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __str__(self) -> str:
        return self.markdown()


def metric_name(task: str) -> str:
    return "perplexity" if paper.METRIC[task] == "perplexity" else "token error (%)"


def _final(run: RunRecord) -> dict[str, dict]:
    if run.results is None:
        raise ValueError(f"run {run.workdir} is unfinished (no results.json); finish it first")
    return run.results["final"]


def _one_task(runs: Sequence[RunRecord], what: str) -> str:
    if not runs:
        raise ValueError(f"{what} needs at least one run, got none")
    tasks: dict[str, list[str]] = {}
    for run in runs:
        tasks.setdefault(run.task_name, []).append(run.name)
    if len(tasks) > 1:
        seen = "; ".join(f"{task} ({', '.join(names)})" for task, names in tasks.items())
        raise ValueError(f"{what} needs runs of one task, got {seen}")
    return next(iter(tasks))


def compare(runs: Sequence[RunRecord]) -> Table:
    """One row per run (name, encoding, seed, steps) with its final number on every split but
    train: error in percent, or perplexity for language models."""
    task = _one_task(runs, "compare")
    splits = [s for s in _final(runs[0]) if s != "train"]
    rows = []
    for run in runs:
        final = _final(run)
        numbers = [paper.as_metric(task, final[s]) if s in final else math.nan for s in splits]
        rows.append((run.name, run.encoding, run.seed, run.results["steps"], *numbers))
    return Table(
        f"{task}: final {metric_name(task)}",
        ("run", "encoding", "seed", "steps", *splits),
        tuple(rows),
        task=task,
        unit=metric_name(task),
    )


def _differences(a: RunRecord, b: RunRecord, ignore: set[str]) -> list[str]:
    fa, fb = flatten(a.config.to_dict()), flatten(b.config.to_dict())
    return sorted(
        k
        for k in fa.keys() | fb.keys()
        if fa.get(k) != fb.get(k)
        and k not in ignore
        and k.split("/")[-1] not in RESUMABLE.get(k.split("/")[0], set())
    )


def paper_table(runs: Sequence[RunRecord]) -> Table:
    """One row per encoding, a column per split (but train): the mean ± std over the runs'
    seeds of the final error in percent (perplexity for language models), the paper's number
    beside each cell.

    The runs must be of one task with the same task options; the runs of one encoding must
    differ in their seed only (a ValueError line names what else differs).
    """
    task = _one_task(runs, "paper_table")
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        _final(run)
        other = _differences(run, runs[0], ignore=set())
        options = [k for k in other if k.startswith("task/")]
        if options:
            raise ValueError(
                f"paper_table needs runs with the same task options; {run.name} and "
                f"{runs[0].name} differ in {', '.join(options)}"
            )
        groups.setdefault(run.encoding, []).append(run)
    for encoding, group in groups.items():
        seeds = [run.seed for run in group]
        if len(set(seeds)) < len(seeds):
            raise ValueError(
                f"paper_table: two {encoding} runs have the same seed ({seeds}); pass each once"
            )
        for run in group[1:]:
            other = _differences(run, group[0], ignore={"train/seed"})
            if other:
                raise ValueError(
                    f"paper_table averages seeds, but {encoding} runs {group[0].name} and "
                    f"{run.name} also differ in {', '.join(other[:5])}"
                )
    splits = [s for s in _final(runs[0]) if s != "train"]
    options = runs[0].config.task.options.to_dict()
    rows, cells = [], {}
    for encoding, group in groups.items():
        reported = paper.reported(task, encoding, options)
        row: list[Any] = [encoding, len(group)]
        for split in splits:
            values = np.array([paper.as_metric(task, _final(run)[split]) for run in group])
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            cells[(encoding, split)] = Cell(
                float(values.mean()), std, len(values), reported.get(split)
            )
            row.append(cells[(encoding, split)])
        rows.append(tuple(row))
    return Table(
        f"{task}: final {metric_name(task)}, mean ± std over seeds "
        f"(the paper's {paper.SOURCE[task]} beside)",
        ("encoding", "seeds", *splits),
        tuple(rows),
        cells,
        note="std is the sample standard deviation over seeds; one seed shows the mean only.",
        task=task,
        unit=metric_name(task),
    )
