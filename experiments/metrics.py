"""Reading a run directory without jax: its metrics.jsonl (written by experiments.train's
MetricsLog) and its checkpoint steps."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(workdir: Path) -> list[dict]:
    """The records of `workdir`/metrics.jsonl in file order ([] when there is no file)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def saved_steps(workdir: str | Path) -> list[int]:
    """Steps of the run's checkpoint folders (`<workdir>/checkpoints/<step>`), oldest first,
    read from the directory alone (no orbax manager), for reports and error messages."""
    folder = Path(workdir) / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )
