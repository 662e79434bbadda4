"""Shared timing, table, JSON and chart helpers for the kernel benchmarks."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from experiments import plots


@dataclasses.dataclass
class Record:
    """One benchmark measurement; `pass_` is the pass name ("fwd", "fwd+bwd", "decode")."""

    kernel: str
    impl: str
    shape: str
    causal: bool | None
    pass_: str
    ms: float | None
    tflops: float | None = None
    gbps: float | None = None
    error: str | None = None
    device: str = ""
    jax: str = jax.__version__

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return {k: v for k, v in d.items() if v is not None or k in ("ms",)}


# Benchmarks write here unless told otherwise; committed results in experiments/results/ are
# only ever replaced by naming them with --out.
RUNS_DIR = Path("runs/bench")


def device_name() -> str:
    return jax.devices()[0].device_kind


def device_tag() -> str:
    """The device part of output names: "cpu", or the GPU model in lower case ("h100")."""
    if jax.default_backend() != "gpu":
        return "cpu"
    return device_name().lower().replace("nvidia ", "").split()[0]


def default_out(bench: str, quick: bool = False) -> Path:
    """`runs/bench/bench_<bench>_<device>[_quick]`, the output prefix when none is named."""
    return RUNS_DIR / f"bench_{bench}_{device_tag()}{'_quick' if quick else ''}"


def time_pipelined(fn: Callable, *args, iters: int = 20, reps: int = 5) -> float:
    """Median over `reps` of the mean time (ms) of `iters` back-to-back calls, one sync each.

    Calls are dispatched asynchronously and synchronised once per repetition, so the host's
    per-call dispatch overlaps the previous kernel: this measures device throughput, the same
    way for every implementation.
    """
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times) * 1e3)


def print_table(records: Sequence[Record], metric: str, ours: str) -> str:
    """Prints (and returns, as markdown) one row per (shape, pass) with every impl's metric.

    The last column is ours ÷ the best peer (every impl whose name does not start with `ours`).
    """
    impls = list(dict.fromkeys(r.impl for r in records))
    keys = list(dict.fromkeys((r.shape, r.causal, r.pass_) for r in records))
    header = ["shape", "causal", "pass", *impls, f"{ours} / best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        row = {r.impl: r for r in records if (r.shape, r.causal, r.pass_) == key}
        cells, peers, mine = [], [], None
        for impl in impls:
            r = row.get(impl)
            value = getattr(r, metric) if r is not None else None
            cells.append("n/a" if r is None else ("err" if value is None else f"{value:.0f}"))
            if value is None:
                continue
            if impl == ours:
                mine = value
            elif not impl.startswith("ours"):
                peers.append(value)
        ratio = f"{mine / max(peers):.2f}×" if mine and peers else "n/a"
        lines.append("| " + " | ".join([key[0], str(key[1]), key[2], *cells, ratio]) + " |")
    table = "\n".join(lines)
    print(table)
    return table


def write_outputs(
    records: Sequence[Record], out_prefix: str | Path, metric: str, ours: str, title: str
) -> None:
    """Writes `<prefix>.json` (records), `<prefix>.md` (table) and `<prefix>.png` (bar chart)."""
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps([r.to_json() for r in records], indent=1))
    table = print_table(records, metric, ours)
    errors = [f"- {r.impl} {r.shape} {r.pass_}: {r.error}" for r in records if r.error]
    device = records[0].device if records else "?"
    md = f"# {title}\n\nDevice: {device}, jax {jax.__version__}. Metric: {metric}.\n\n{table}\n"
    if errors:
        md += "\nFailures:\n" + "\n".join(errors) + "\n"
    prefix.with_suffix(".md").write_text(md)

    figure = plots.benchmark_bars([r.to_json() for r in records], metric, title)
    figure.savefig(prefix.with_suffix(".png"), dpi=120)
