"""Reading a run directory without jax: its metrics.jsonl (written by experiments.train's
MetricsLog) and its checkpoint steps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def read_metrics(workdir: Path) -> list[dict]:
    """The records of `workdir`/metrics.jsonl in file order ([] when there is no file).

    A last line that is not a JSON object is the record a crash cut off mid-write: it is
    dropped with a warning. Any other unparseable line raises a ValueError naming the file and
    the line.
    """
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if i == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped its last line {number}, cut off mid-write ({error})",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path} line {number} is not a JSON record ({error}); fix or delete that line"
            ) from None
        records.append(record)
    return records


def saved_steps(workdir: str | Path) -> list[int]:
    """Steps of the run's checkpoint folders (`<workdir>/checkpoints/<step>`), oldest first,
    read from the directory alone (no orbax manager), for reports and error messages."""
    folder = Path(workdir) / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )
