"""Runs several training configs side by side on one GPU and tabulates them beside the paper.

    python -m experiments.sweep --root runs/paper --config configs/flipflop.py:cope \
        --config configs/counting.py:cope,nvars=3 [--override train.steps=2000]

Small models leave an H100 mostly idle, so the runs share it as separate processes that
allocate GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false; an equal split of the memory
starves CoPE runs, whose T² tensors need ~10 GB at batch 64 x 512). `--gpus 0,1` spreads the
runs over several GPUs. `--deadline SECONDS` stops unfinished runs with SIGTERM (each saves a
checkpoint), so a long sweep can be split over time-limited jobs by rerunning the same command.
`--seeds 1,2,3` trains every config once per seed (run `<name>_seed<N>`, finished seeds are
skipped like finished runs) and adds a table of mean ± std over the seeds beside the paper.
Writes `<root>/summary.{json,md,png}` (the png: every run's learning curves); `--report` only
tabulates what is there, unfinished runs with their latest evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments import paper, plots
from experiments.configlib import apply_override, check_config, load_config
from experiments.rundir import RunDirError, read_metrics, read_run, saved_steps
from experiments.tables import paper_table


def run_name(spec: str) -> str:
    path, _, arg = spec.partition(":")
    return re.sub(r"[^A-Za-z0-9_=.-]+", "_", f"{Path(path).stem}_{arg}").strip("_")


def paper_reference(results: dict, options: dict) -> str:
    """The paper's numbers for the run's encoding, split by split ("n/a" when none)."""
    reported = paper.reported(results["task"], results["encoding"], options)
    unit = " ppl" if paper.METRIC[results["task"]] == "perplexity" else ""
    return " / ".join(f"{split} {value:g}{unit}" for split, value in reported.items()) or "n/a"


def format_errors(metrics: dict[str, dict], language_model: bool) -> str:
    return ", ".join(
        f"{split}: ppl {m['perplexity']:.2f}"
        if language_model
        else f"{split}: {100 * m['token_error']:.2f} ({100 * m['sequence_error']:.1f})"
        for split, m in metrics.items()
        if split != "train"
    )


ERROR_LINE = re.compile(r"^(error: |[\w.]+(Error|Exception|Exhausted)\b: )")


def failure(workdir: Path) -> str | None:
    """The error that ended the run's last attempt (its `log.txt` ends with one), else None.

    train.py writes a one-line `error: ...` (bad config, NaN loss, out of device memory); other
    crashes end with a Python traceback, whose last line names the exception.
    """
    path = workdir / "log.txt"
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()[-60:]):
        if "stopped by SIGTERM" in line or line.startswith("resuming "):
            return None  # the last attempt was stopped, or is still running
        if ERROR_LINE.match(line.strip()):
            text = line.strip().removeprefix("error: ")
            return text if len(text) <= 200 else text[:197] + "..."
    return None


def summarize(
    root: Path, names: list[str], steps: dict[str, int] | None = None
) -> tuple[list[dict], str]:
    """Markdown table of the runs: final results, or for an unfinished run how far it trained,
    its newest checkpoint (where a rerun resumes) and its latest periodic evaluation (which reads
    fewer examples than the final one). `steps` are the requested steps per run (a results.json
    for fewer steps is then shown as unfinished)."""
    rows, lines = (
        [],
        [
            "| run | encoding | steps | split: token error % (sequence error %) or perplexity | "
            "paper | ms/batch | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ],
    )
    for name in names:
        workdir = root / name
        path = workdir / "results.json"
        wanted = (steps or {}).get(name)
        if not path.exists() or (wanted is not None and not finished(workdir, wanted)):
            if not (workdir / "config.json").exists():
                failed = failure(workdir)
                status = f"failed before training: {failed}" if failed else "not started"
                lines.append(f"| {name} | {status} (see {name}/log.txt) | | | | | |")
                continue
            config = json.loads((workdir / "config.json").read_text())
            records = read_metrics(workdir)
            trained = max((r["step"] for r in records if "train" in r), default=0)
            saved = saved_steps(workdir)
            evals = [r for r in records if "eval" in r]
            partial = {"encoding": config["model"]["encoding"], "task": config["task"]["name"]}
            failed = failure(workdir)
            progress = (
                f"**{f'failed ({failed}); ' if failed else 'unfinished: '}trained {trained} of "
                f"{wanted or config['train']['steps']}, checkpoint at "
                f"{saved[-1] if saved else 'none'}**"
            )
            if evals:
                last = evals[-1]
                evaluated = f"at step {last['step']} (periodic evaluation): " + format_errors(
                    last["eval"], config["task"]["name"] == "wikitext"
                )
            else:
                evaluated = f"no evaluation yet (see {name}/log.txt)"
            lines.append(
                f"| {name} | {partial['encoding']} | {progress} | {evaluated} | "
                f"{paper_reference(partial, config['task']['options'])} | | |"
            )
            rows.append(
                {
                    "run": name,
                    **partial,
                    "unfinished": True,
                    "failed": failed,
                    "steps_trained": trained,
                    "checkpoint_step": saved[-1] if saved else None,
                    "steps": wanted or config["train"]["steps"],
                    "latest_eval_step": evals[-1]["step"] if evals else None,
                    "latest_eval": evals[-1]["eval"] if evals else None,
                }
            )
            continue
        results = json.loads(path.read_text())
        config = json.loads((root / name / "config.json").read_text())
        errors = format_errors(results["final"], results["task"] == "wikitext")
        ref = paper_reference(results, config["task"]["options"])
        ms = results.get("ms_per_batch")
        tps = results.get("tokens_per_s")
        lines.append(
            f"| {name} | {results['encoding']} | {results['steps']} | {errors} | {ref} | "
            f"{ms:.1f} | {tps:,.0f} |"
            if ms
            else f"| {name} | {results['encoding']} | {results['steps']} | {errors} | {ref} "
            "| n/a | n/a |"
        )
        rows.append({"run": name, **results})
    return rows, "\n".join(lines)


def plot_curves(root: Path, names: list[str], path: Path) -> None:
    """Every run's learning curves (plots.learning_curves), unfinished runs included."""
    runs = []
    for name in names:
        try:
            runs.append(read_run(root / name, unfinished_ok=True))
        except RunDirError:
            continue  # not started, or its directory unreadable: the table says so
    runs = [run for run in runs if run.metrics]
    if runs:
        plots.learning_curves(runs).savefig(path, dpi=110)


def seed_tables(root: Path, names: list[str]) -> str:
    """Mean ± std over seeds beside the paper (tables.paper_table), one table per task and
    task options, from the finished runs; a group that cannot be averaged says why."""
    groups: dict[str, list] = {}
    for name in names:
        try:
            run = read_run(root / name)
        except RunDirError:
            continue
        options = json.dumps(run.config.task.options.to_dict(), sort_keys=True)
        groups.setdefault(f"{run.task_name} {options}", []).append(run)
    parts = []
    for runs in groups.values():
        try:
            parts.append(paper_table(runs).markdown())
        except ValueError as error:
            parts.append(f"{runs[0].task_name}: no table over seeds ({error})")
    return "\n\n".join(parts) or "No finished runs to average over seeds yet."


STOPPED = 3  # experiments.train's exit code after SIGTERM (checkpoint saved)
GRACE_S = 120.0  # after the deadline's SIGTERM, how long a run may take to save and exit


@dataclasses.dataclass
class Run:
    name: str
    command: list[str]
    gpu: str | None  # a CUDA_VISIBLE_DEVICES value, or None for the default devices
    proc: subprocess.Popen | None = None
    log: Any = None
    code: int | None = None


def finished(workdir: Path, steps: int) -> bool:
    """True when the run's results.json is there for `steps` training steps."""
    try:
        return json.loads((workdir / "results.json").read_text()).get("steps") == steps
    except (OSError, ValueError):
        return False


def schedule(
    runs: list[Run], root: Path, per_gpu: int, deadline: float, grace: float = GRACE_S
) -> dict[str, int]:
    """Runs everything, at most `per_gpu` at a time on each GPU (0: no limit), in list order.

    At `deadline` seconds (0: none) running runs get SIGTERM (they save a checkpoint and exit 3)
    and queued ones are not started; a run still alive `grace` seconds later is killed (it
    resumes from its last checkpoint). All of these are reported as STOPPED.
    """
    start = time.time()
    queued = list(runs)
    running: list[Run] = []
    past_deadline = False
    while queued or running:
        for run in list(running):
            if run.proc.poll() is not None:
                run.code = run.proc.returncode
                if past_deadline and run.code in (-signal.SIGTERM, -signal.SIGKILL):
                    run.code = STOPPED  # killed before its handler was installed, or hung
                run.log.close()
                running.remove(run)
                elapsed = time.time() - start
                why = failure(root / run.name) if run.code not in (0, STOPPED) else None
                print(
                    f"{run.name}: exit {run.proc.returncode} after {elapsed:.0f} s"
                    + (f" ({why}; see {run.name}/log.txt)" if why else ""),
                    flush=True,
                )
        if past_deadline and time.time() - start > deadline + grace:
            for run in running:
                if run.proc.poll() is None:
                    print(f"{run.name}: no exit {grace:.0f} s after SIGTERM, killing", flush=True)
                    run.proc.kill()
        if deadline and not past_deadline and time.time() - start > deadline:
            past_deadline = True
            for run in running:
                print(f"{run.name}: deadline, sending SIGTERM", flush=True)
                run.proc.send_signal(signal.SIGTERM)
            for run in queued:
                run.code = STOPPED
                print(f"{run.name}: deadline, not started", flush=True)
            queued = []
        for run in list(queued):
            busy = sum(r.gpu == run.gpu for r in running)
            if per_gpu and busy >= per_gpu:
                continue
            queued.remove(run)
            env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
            if run.gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = run.gpu
            run.log = (root / run.name / "log.txt").open("a")
            run.proc = subprocess.Popen(
                run.command, stdout=run.log, stderr=subprocess.STDOUT, env=env
            )
            running.append(run)
            where = f" on GPU {run.gpu}" if run.gpu is not None else ""
            print(f"started {run.name}{where}: {' '.join(run.command)}", flush=True)
        time.sleep(1.0)
    return {run.name: run.code for run in runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="field=value applied to every run (repeatable)",
    )
    parser.add_argument(
        "--gpus",
        default="",
        help="comma-separated GPU ids; runs go to them round-robin via CUDA_VISIBLE_DEVICES",
    )
    parser.add_argument(
        "--per-gpu",
        type=int,
        default=0,
        help="at most this many runs at once on each GPU, the rest wait (default: all at once; "
        "runs that share a GPU allocate on demand and can run out of its memory together)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds; then every unfinished run gets SIGTERM, saves a checkpoint and stops "
        "(rerunning the same command resumes them)",
    )
    parser.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds (train.seed): every config runs once per seed, and the "
        "summary adds mean ± std over them",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="start nothing: tabulate and plot the runs as they are (unfinished ones included)",
    )
    args = parser.parse_args(argv)
    if args.per_gpu < 0:
        parser.error("--per-gpu must be >= 0")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    root = Path(args.root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, or no permission
        print(f"error: --root {root} cannot be a directory ({error.strerror})", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if min(seeds, default=0) < 0:
            raise ValueError
    except ValueError:
        print(f"error: --seeds must be comma-separated integers >= 0, got {args.seeds!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    # (config spec, run name, overrides) of every run: one per config, or per config and seed.
    planned = [
        (spec, run_name(spec) + ("" if seed is None else f"_seed{seed}"),
         args.override + ([] if seed is None else [f"train.seed={seed}"]))
        for spec in args.config
        for seed in (seeds or [None])
    ]  # fmt: skip
    names = [name for _, name, _ in planned]
    if len(set(names)) != len(names):
        parser.error(f"two --config give the same run directory: {names}")
    steps = {}
    try:  # every config and override is checked before anything starts
        for spec, name, overrides in planned:
            config = load_config(spec)
            for override in overrides:
                apply_override(config, override)
            check_config(config)
            steps[name] = config.train.steps
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    runs = []
    for i, (spec, name, overrides) in enumerate(planned):
        if args.report:
            break
        (root / name).mkdir(parents=True, exist_ok=True)
        if finished(root / name, steps[name]):
            print(f"{name}: finished earlier, not rerun ({root / name}/results.json)", flush=True)
            continue
        command = [
            sys.executable,
            "-m",
            "experiments.train",
            "--config",
            spec,
            "--workdir",
            str(root / name),
            "--no-progress",
            *(f"--config.{o}" for o in overrides),
        ]
        runs.append(Run(name, command, gpus[i % len(gpus)] if gpus else None))
    codes = schedule(runs, root, args.per_gpu, args.deadline)
    failed = sum(code not in (0, STOPPED) for code in codes.values())
    stopped = [name for name, code in codes.items() if code == STOPPED]
    rows, table = summarize(root, names, steps)
    command = "python -m experiments.sweep --root {} {} {}{}".format(
        args.root,
        " ".join(f"--config {c}" for c in args.config),
        " ".join(f"--override {o}" for o in args.override),
        f" --seeds {args.seeds}" if seeds else "",
    )
    device = next((row["device"] for row in rows if "device" in row), "?")
    md = (
        f"# Runs beside the CoPE paper\n\nDevice: {device} (runs may share a GPU, so ms/batch is "
        f"under sharing). Command: `{command}`\n\n{table}\n"
    )
    if seeds:
        md += f"\n## Over seeds {', '.join(map(str, seeds))}\n\n{seed_tables(root, names)}\n"
    (root / "summary.md").write_text(md)
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    plot_curves(root, names, root / "summary.png")
    print(md)
    if stopped:
        print(f"stopped at the deadline (rerun the same command to resume): {', '.join(stopped)}")
    return 1 if failed else STOPPED if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
