"""Runs several training configs side by side on one GPU and tabulates them beside the paper.

    python -m experiments.sweep --root runs/paper --config configs/flipflop.py:cope \
        --config configs/counting.py:cope,nvars=3 [--override train.steps=2000]

Small models leave an H100 mostly idle, so the runs share it as separate processes that
allocate GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false; an equal split of the memory
starves CoPE runs, whose T² tensors need ~10 GB at batch 64 x 512). `--gpus 0,1` spreads the
runs over several GPUs. `--deadline SECONDS` stops unfinished runs with SIGTERM (each saves a
checkpoint), so a long sweep can be split over time-limited jobs by rerunning the same command.
Writes `<root>/summary.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments import paper


def run_name(spec: str) -> str:
    path, _, arg = spec.partition(":")
    return re.sub(r"[^A-Za-z0-9_=.-]+", "_", f"{Path(path).stem}_{arg}").strip("_")


def paper_reference(results: dict, options: dict) -> str:
    enc, task = results["encoding"], results["task"]
    if task == "flipflop" and enc in paper.FLIPFLOP:
        return "in-dist {} / sparse {}".format(*paper.FLIPFLOP[enc])
    if task == "selective_copy" and enc in paper.SELECTIVE_COPY:
        return "in-dist {} / dense {} / sparse {}".format(*paper.SELECTIVE_COPY[enc])
    if task == "counting" and enc in paper.COUNTING:
        return f"test {paper.COUNTING[enc].get(options.get('nvars'), 'n/a')}"
    if task == "wikitext" and enc in paper.WIKITEXT103:
        return "WikiText-103 val {} / test {} ppl".format(*paper.WIKITEXT103[enc])
    return "n/a"


def summarize(root: Path, names: list[str]) -> tuple[list[dict], str]:
    rows, lines = (
        [],
        [
            "| run | encoding | steps | split: token error % (sequence error %) or perplexity | "
            "paper | ms/batch | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ],
    )
    for name in names:
        path = root / name / "results.json"
        if not path.exists():
            lines.append(f"| {name} | not finished (see {name}/log.txt) | | | | | |")
            continue
        results = json.loads(path.read_text())
        config = json.loads((root / name / "config.json").read_text())
        language_model = results["task"] == "wikitext"
        errors = ", ".join(
            f"{split}: ppl {m['perplexity']:.2f}"
            if language_model
            else f"{split}: {100 * m['token_error']:.2f} ({100 * m['sequence_error']:.1f})"
            for split, m in results["final"].items()
            if split != "train"
        )
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


STOPPED = 3  # experiments.train's exit code after SIGTERM (checkpoint saved)


def wait_all(procs: list, start: float, deadline: float) -> dict[str, int]:
    """Waits for every run; at `deadline` seconds (0: none) sends SIGTERM to those still going."""
    codes: dict[str, int] = {}
    signalled = False
    while len(codes) < len(procs):
        for name, proc in procs:
            if name not in codes and proc.poll() is not None:
                codes[name] = proc.returncode
                elapsed = time.time() - start
                print(f"{name}: exit {proc.returncode} after {elapsed:.0f} s", flush=True)
        if deadline and not signalled and time.time() - start > deadline:
            signalled = True
            for name, proc in procs:
                if name not in codes:
                    print(f"{name}: deadline, sending SIGTERM", flush=True)
                    proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
    return codes


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
        "--deadline",
        type=float,
        default=0.0,
        help="seconds; then every unfinished run gets SIGTERM, saves a checkpoint and stops "
        "(rerunning the same command resumes them)",
    )
    args = parser.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    names = [run_name(spec) for spec in args.config]
    procs = []
    start = time.time()
    for i, (spec, name) in enumerate(zip(args.config, names)):
        cmd = [
            sys.executable,
            "-m",
            "experiments.train",
            "--config",
            spec,
            "--workdir",
            str(root / name),
            "--no-progress",
            *(f"--config.{o}" for o in args.override),
        ]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        where = ""
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            where = f" on GPU {gpus[i % len(gpus)]}"
        (root / name).mkdir(parents=True, exist_ok=True)
        log = (root / name / "log.txt").open("a")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        print(f"started {name}{where}: {' '.join(cmd)}", flush=True)
    codes = wait_all(procs, start, args.deadline)
    failed = sum(code not in (0, STOPPED) for code in codes.values())
    stopped = [name for name, code in codes.items() if code == STOPPED]
    rows, table = summarize(root, names)
    command = "python -m experiments.sweep --root {} {} {}".format(
        args.root,
        " ".join(f"--config {c}" for c in args.config),
        " ".join(f"--override {o}" for o in args.override),
    )
    device = rows[0]["device"] if rows else "?"
    md = (
        f"# Runs beside the CoPE paper\n\nDevice: {device} (runs share it as {len(names)} "
        f"processes, so ms/batch is under sharing). Command: `{command}`\n\n{table}\n"
    )
    (root / "summary.md").write_text(md)
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    print(md)
    if stopped:
        print(f"stopped at the deadline (rerun the same command to resume): {', '.join(stopped)}")
    return 1 if failed else STOPPED if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
