"""Training and evaluation for every task: `python -m experiments.train --config ... --workdir ...`.

One jitted train step (data parallel over all devices, FSDP optional), periodic evaluation on
every split, metrics to `metrics.jsonl` and TensorBoard, orbax checkpoints with exact resume,
and a final `results.json`. Rerunning the same command resumes from the latest checkpoint.
Exit codes: 0 done, 2 bad input or divergence, 3 stopped by SIGTERM, 4 out of device memory.
"""

from __future__ import annotations

import signal
import sys

# The imports below take seconds (jax). A SIGTERM meanwhile (a sweep's deadline) is recorded
# here and honoured by main() before anything is written: exit 3, as during set-up. (Raising
# from the handler instead can be swallowed by an import's own error handling.)
if __name__ == "__main__":
    sigterm_while_starting: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sigterm_while_starting.append(signum))
else:  # imported: train_and_evaluate's own handler covers the run
    sigterm_while_starting = []

import argparse
import re
import warnings
from pathlib import Path

import jax

from experiments import sharding
from experiments.configlib import apply_override, load_config, split_overrides
from experiments.evaluation import format_results
from experiments.loop import TrainingDiverged, TrainingStopped, train_and_evaluate
from experiments.rundir import saved_steps

OUT_OF_MEMORY_EXIT = 4
STOPPED_WHILE_STARTING = (
    "stopped by SIGTERM before training (while starting); rerun the same command to resume"
)


def out_of_memory_message(error: Exception, workdir: str | Path) -> str | None:
    """One line for an XLA out-of-memory error (None for any other error): what failed, what is
    kept, and how to go on. Device OOM happens when runs share a GPU or a config outgrows it."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    first = text.strip().splitlines()[0] if text.strip() else text
    first = re.sub(r"\s*\[[^\]]*\]", "", first).replace("RESOURCE_EXHAUSTED: ", "").strip()
    steps = saved_steps(workdir)
    kept = f"checkpoint at step {steps[-1]} kept" if steps else "no checkpoint yet"
    return (
        f"out of device memory ({first[:160]}); {kept}. Rerun the same command to resume once "
        "the device has room (fewer runs per GPU: sweep --per-gpu); a new run needs less with "
        "model.remat=True or a smaller train.batch_size"
    )


def one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: `warning: <message>`, one line each."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warnings
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        if sigterm_while_starting:
            raise TrainingStopped(STOPPED_WHILE_STARTING)
        overrides, rest = split_overrides(argv)
        parser = argparse.ArgumentParser(
            description=__doc__,
            epilog="Override any config field with --config.<field>=<value>, "
            "e.g. --config.train.steps=2000.",
        )
        parser.add_argument(
            "--config", required=True, help="configs/<task>.py:<variant>[,<option>...]"
        )
        parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        args = parser.parse_args(rest)
        config = load_config(args.config)
        for override in overrides:
            apply_override(config, override)
        sharding.maybe_initialize_distributed()
        if sigterm_while_starting:  # train_and_evaluate handles SIGTERM from here on
            raise TrainingStopped(STOPPED_WHILE_STARTING)
        results = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    except (ValueError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(str(stopped), file=sys.stderr)
        return 3
    except jax.errors.JaxRuntimeError as error:
        message = out_of_memory_message(error, args.workdir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return OUT_OF_MEMORY_EXIT
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
