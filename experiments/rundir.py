"""The run directory, without jax: config.json, metrics.jsonl (the writer and the one reader
every tool uses), results.json, checkpoint steps and the checks that guard them."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_collections

from configs.base import LAYOUT

# Fields a run may change when it is resumed (lengths and intervals, not what it learns).
RESUMABLE = {
    "train": {"steps", "eval_every", "log_every", "checkpoint_every"},
    "eval": {"num_examples", "final_num_examples", "batch_size"},
}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


class RunDirError(ValueError):
    """A run directory that is missing, unfinished, corrupt or of another layout; the message
    is one line that says which and what to do."""


def check_workdir(workdir: Path) -> None:
    """The run directory must be a directory, or creatable: one ValueError otherwise."""
    for path in (workdir, *workdir.absolute().parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == workdir else f"is under {path}, which is a file"
            raise ValueError(f"workdir {workdir} {where}; pass a directory as --workdir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"workdir {workdir}: {path} is not writable")
        return


def flatten(record: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a/b': 1}."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----- config.json ---------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RunDirError(f"{path} is not valid JSON ({error})") from None


def _older_layout(saved: dict) -> str | None:
    """Why `saved` (a config.json) is of another layout than this code's, else None."""
    layout = saved.get("layout")
    if layout == LAYOUT:
        return None
    return (
        f"written by an older config layout ({'no layout field' if layout is None else layout}"
        f"; this code reads layout {LAYOUT}, where e.g. unset model sizes are null, not 0)"
    )


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's config.json as a ConfigDict; RunDirError when it is missing, not JSON, or of
    another config layout."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        why = "it does not exist" if not workdir.exists() else "no config.json"
        raise RunDirError(f"{workdir} is not a run directory ({why})")
    saved = _read_json(path)
    why = _older_layout(saved) if isinstance(saved, dict) else "not a JSON object"
    if why:
        raise RunDirError(f"{path} is {why}; retrain it with this code or use that version")
    return ml_collections.ConfigDict(saved)


def refuse_other_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run that was started with another config (reads config.json)."""
    path = workdir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); restore it or use a new --workdir"
        ) from None
    why = _older_layout(saved)
    if why:
        raise ValueError(f"{workdir} holds a run {why}; use a new --workdir")
    current = json.loads(config.to_json_best_effort())
    saved_flat, current_flat = flatten(saved), flatten(current)
    differ = [
        k
        for k in saved_flat.keys() | current_flat.keys()
        if saved_flat.get(k) != current_flat.get(k)
        and k.split("/")[-1] not in RESUMABLE.get(k.split("/")[0], set())
    ]
    if differ:
        raise ValueError(
            f"{workdir} holds a run with a different config ({', '.join(sorted(differ)[:5])}"
            "); use a new --workdir or the same config to resume"
        )


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Writes config.json atomically (other processes of the run read it)."""
    partial = workdir / "config.json.tmp"
    partial.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2))
    os.replace(partial, workdir / "config.json")


# ----- metrics.jsonl -------------------------------------------------------------------------


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of `workdir`/metrics.jsonl in file order ([] when there is no file).

    Each record has a `step` and one of `train` (loss, step_losses, lr, tokens_per_s, ...),
    `eval` (the periodic evaluation, {split: metrics}) or `final` (the final evaluation).
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


def training_rates(records: list[dict]) -> list[float]:
    """tokens/s of every logged training interval that did not include compilation."""
    return [
        r["train"]["tokens_per_s"]
        for r in records
        if "train" in r and not r["train"].get("includes_compile", False)
    ]


class MetricsLog:
    """Appends JSON lines to metrics.jsonl and scalars to TensorBoard (tensorboardX); only the
    process that `writes` (process 0) touches the files."""

    def __init__(self, workdir: Path, resume_step: int, writes: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.file = self.writer = None
        if not writes:
            return
        if self.path.exists():
            # Records past the checkpoint we resume from are redone, and so is a final
            # evaluation; a torn last line is dropped by read_metrics (with a warning).
            kept = [
                record
                for record in read_metrics(workdir)
                if record.get("step", 0) <= resume_step and "final" not in record
            ]
            partial = self.path.with_suffix(".jsonl.tmp")  # a kill now must not erase history
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(partial, self.path)
        elif resume_step > 0:
            warnings.warn(
                f"{self.path} is missing although the run resumes from step {resume_step}: the "
                f"records of steps 1..{resume_step} are lost (throughput then counts only the "
                "intervals logged from now on)",
                stacklevel=2,
            )
        self.file = self.path.open("a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if self.file is None:  # not the writing process
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        for key, value in flatten(record).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


# ----- checkpoints and results ---------------------------------------------------------------


def saved_steps(workdir: str | Path) -> list[int]:
    """Steps of the run's checkpoint folders (`<workdir>/checkpoints/<step>`), oldest first,
    read from the directory alone (no orbax manager), for reports and error messages."""
    folder = Path(workdir) / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )


def read_results(workdir: str | Path) -> dict | None:
    """results.json (written when a run finishes), or None when there is none yet."""
    path = Path(workdir) / "results.json"
    if not path.exists():
        return None
    results = _read_json(path)
    if not isinstance(results, dict) or "final" not in results:
        raise RunDirError(f"{path} is not a run's results (no 'final' evaluation)")
    return results


def write_results(workdir: Path, results: dict) -> None:
    partial = workdir / "results.json.tmp"
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, workdir / "results.json")


def provenance() -> dict[str, Any]:
    """What made a result: the git commit of this code (and whether it had uncommitted
    changes), the versions of the packages that compute it, and the command line."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "versions": versions,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


# ----- a run as it is on disk ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run directory's contents, read without jax: config, metrics records, results (None
    until the run finishes) and the steps of its checkpoints."""

    workdir: Path
    config: ml_collections.ConfigDict
    metrics: list[dict]
    results: dict | None
    checkpoint_steps: list[int]

    @property
    def name(self) -> str:
        return self.workdir.name

    @property
    def task_name(self) -> str:
        return self.config.task.name

    @property
    def encoding(self) -> str:
        return self.config.model.encoding

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def finished(self) -> bool:
        return self.results is not None and self.results.get("steps") == self.config.train.steps

    def evaluations(self) -> list[dict]:
        """The periodic evaluation records, then the final one: {step, eval: {split: ...}}."""
        out = [r for r in self.metrics if "eval" in r]
        out += [{"step": r["step"], "eval": r["final"]} for r in self.metrics if "final" in r]
        return out


def read_run(workdir: str | Path, *, unfinished_ok: bool = False) -> RunRecord:
    """Reads a run directory; one RunDirError line when it is missing, corrupt, of another
    config layout, or (unless `unfinished_ok`) not finished."""
    workdir = Path(workdir)
    config = read_config(workdir)
    try:
        metrics = read_metrics(workdir)
    except ValueError as error:
        raise RunDirError(str(error)) from None
    record = RunRecord(workdir, config, metrics, read_results(workdir), saved_steps(workdir))
    if not unfinished_ok and not record.finished:
        trained = max((r["step"] for r in metrics if "train" in r), default=0)
        raise RunDirError(
            f"{workdir} is unfinished (trained {trained} of {config.train.steps} steps, no "
            "results.json for them); rerun its training command to finish it, or pass "
            "unfinished_ok=True to read its latest checkpoint"
        )
    return record
