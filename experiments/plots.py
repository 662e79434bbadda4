"""Figures of runs, attention and benchmarks. Each function returns a matplotlib Figure (shown
by a notebook, saved by the CLIs with `fig.savefig`), made without pyplot, so no backend is
chosen here and no figure stays open."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from experiments import paper


def _metric(task: str, metrics: Mapping[str, float]) -> float:
    return paper.as_metric(task, metrics)


def _ylabel(task: str) -> str:
    return "perplexity" if paper.METRIC[task] == "perplexity" else "token error %"


def learning_curves(runs: Sequence[Any], *, splits: Sequence[str] | None = None) -> Figure:
    """Training loss and the periodic (and final) evaluations against the step: a row per task,
    a panel per split, a line per run. `runs` are RunRecords (or Runs: anything with `name`,
    `task_name` and `metrics`)."""
    by_task: dict[str, list[Any]] = {}
    for run in runs:
        by_task.setdefault(run.task_name, []).append(run)
    panels = {}
    for task, group in by_task.items():
        seen = {s for run in group for r in run.evaluations() for s in r["eval"]} - {"train"}
        panels[task] = [s for s in (splits or sorted(seen)) if s in seen]
    cols = 1 + max((len(p) for p in panels.values()), default=0)
    fig = Figure(figsize=(3.8 * cols, 3.1 * max(len(by_task), 1)), layout="constrained")
    axes = fig.subplots(max(len(by_task), 1), cols, squeeze=False)
    for row, (task, group) in enumerate(by_task.items()):
        ax = axes[row][0]
        for run in group:
            points = [(r["step"], r["train"]["loss"]) for r in run.metrics if "train" in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=run.name)
        ax.set(title=f"{task}: training loss", xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for col in range(1, cols):
            ax = axes[row][col]
            if col > len(panels[task]):
                ax.axis("off")
                continue
            split = panels[task][col - 1]
            for run in group:
                points = [
                    (r["step"], _metric(task, r["eval"][split]))
                    for r in run.evaluations()
                    if split in r["eval"]
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), marker=".", label=run.name)
            ax.set(title=f"{task}: {split}", xlabel="step", ylabel=_ylabel(task))
            ax.grid(alpha=0.3)
    return fig


def errors_beside_paper(table) -> Figure:
    """Bars of an `analysis.paper_table`: a group per split, a bar per encoding (mean, with the
    standard deviation over seeds as an error bar) and the paper's number as a black mark."""
    encodings = [row[0] for row in table.rows]
    splits = list(table.columns[2:])
    width = 0.8 / max(len(encodings), 1)
    fig = Figure(figsize=(max(5.0, 1.2 * len(splits) * len(encodings)), 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(splits))
    for i, encoding in enumerate(encodings):
        cells = [table.cells[(encoding, s)] for s in splits]
        offset = x + (i - (len(encodings) - 1) / 2) * width
        ax.bar(
            offset,
            [c.mean for c in cells],
            width,
            yerr=[c.std or 0.0 for c in cells],
            capsize=3,
            label=encoding,
        )
        marks = [(o, c.paper) for o, c in zip(offset, cells, strict=True) if c.paper is not None]
        if marks:
            ax.scatter(
                *zip(*marks, strict=True),
                marker="_",
                s=300,
                color="black",
                zorder=3,
                label="paper" if i == 0 else None,
            )
    ax.set_xticks(x, splits)
    ax.set(title=f"{table.task}: final {table.unit} beside the paper", ylabel=table.unit)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def attention_maps(
    layers: Sequence[Mapping[str, np.ndarray]],
    key: str = "positions",
    *,
    row: int = 0,
    layer: int | None = None,
    heads: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Heatmaps of one of `Run.attention`'s arrays ("positions" p_ij, "probs", "gates",
    "logits") for batch row `row`: a row of panels per layer (or only `layer`), one per head
    (or `heads`), query i down, key j across; masked pairs are blank. `labels` name the tokens
    on the axes (used up to 64 tokens)."""
    if key not in layers[0]:
        raise ValueError(f"key must be one of {sorted(layers[0])}, got {key!r}")
    chosen = range(len(layers)) if layer is None else [layer]
    heads = list(range(layers[0][key].shape[1])) if heads is None else list(heads)
    t, s = layers[0][key].shape[2:]
    fig = Figure(figsize=(3.4 * len(heads) + 0.8, 3.1 * len(chosen)), layout="constrained")
    axes = fig.subplots(len(chosen), len(heads), squeeze=False)
    for r, index in enumerate(chosen):
        parts = layers[index]
        allowed = np.isfinite(parts["logits"][row])  # [H, T, S]
        values = np.where(allowed, parts[key][row], np.nan)
        for c, head in enumerate(heads):
            ax = axes[r][c]
            image = ax.imshow(values[head], cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
            ax.set_title(f"layer {index} head {head}: {key}", fontsize=9)
            if labels is not None and max(t, s) <= 64:
                ax.set_xticks(range(s), list(labels)[:s], fontsize=6)
                ax.set_yticks(range(t), list(labels)[:t], fontsize=6)
            else:
                ax.set(xlabel="key j", ylabel="query i")
    return fig


def extrapolation(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> Figure:
    """Perplexity against the evaluation length T' of `extrapolate.extrapolate_run` results, a
    line per run (lengths a model cannot run at are left out)."""
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for label, run in zip(labels, runs, strict=True):
        points = [(e["eval_seq_len"], e["perplexity"]) for e in run["lengths"] if "error" not in e]
        if points:
            label = f"{label} (T={run['train_seq_len']})"
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set(
        xlabel="evaluation context T'",
        ylabel=f"{runs[0]['split'] if runs else 'valid'} perplexity",
        title="Context extrapolation",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def load_benchmark(path: str | Path) -> list[dict]:
    """The records of a kernel benchmark's JSON (experiments/results/bench_*.json)."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list) or not all("impl" in r for r in records):
        raise ValueError(f"{path} is not a kernel benchmark's records (a list with 'impl')")
    return records


def benchmark_bars(records: Sequence[Mapping[str, Any]], metric: str, title: str = "") -> Figure:
    """Grouped bars of kernel benchmark records: a group per (shape, causal, pass), a bar per
    implementation, the height its `metric` (e.g. "tflops", "gbps", "ms"); a failed
    measurement is a missing bar."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    keys = list(dict.fromkeys((r["shape"], r.get("causal"), r["pass"]) for r in records))
    by_key = {(r["shape"], r.get("causal"), r["pass"], r["impl"]): r for r in records}
    width = 0.8 / max(len(impls), 1)
    fig = Figure(figsize=(max(8, 1.6 * len(keys)), 4.5), layout="constrained")
    ax = fig.subplots()
    for i, impl in enumerate(impls):
        heights = [(by_key.get((*key, impl)) or {}).get(metric) or 0.0 for key in keys]
        ax.bar(np.arange(len(keys)) + i * width, heights, width, label=impl)
    ticks = [
        f"{shape}\n{'causal' if causal else ('full' if causal is not None else '')} {pass_}"
        for shape, causal, pass_ in keys
    ]
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, ticks, fontsize=7)
    device = records[0].get("device", "") if records else ""
    ax.set(ylabel=metric, title=f"{title} ({device})" if title else device)
    ax.legend(fontsize=7)
    return fig
