"""Reading a run's metrics.jsonl (written by experiments.train's MetricsLog)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(workdir: Path) -> list[dict]:
    """The records of `workdir`/metrics.jsonl in file order ([] when there is no file)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
