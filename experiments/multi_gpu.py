"""Data-parallel check on every local device: same losses as one device, and how throughput scales.

    python -m experiments.multi_gpu --config configs/flipflop.py:cope --steps 300 \
        --out experiments/results/multi_gpu

Trains one config from the same seed three times in this process: on the first device, data
parallel over all N devices (batch sharded on the mesh's `data` axis, parameters replicated) and
with FSDP (parameters and optimizer state sharded too). The global batch is the same in all
three, so the per-step losses agree up to floating-point rounding: per-device matmuls of a
smaller batch round differently in bf16, reductions run in another order, and Adam turns
rounding-level changes of near-zero gradients into full-size updates, so curves drift apart
after a few steps (`--float32` leaves the reduction order only). The table gives the largest
per-step difference and tokens/s with the scaling efficiency
tokens/s(N) / (N x tokens/s(1)). `--weak` adds a run with an N-times larger global batch (the
per-device batch of the one-device run), whose throughput shows scaling when each device keeps
its load. `--repeat` trains the one-device run twice: the difference between the two is the
floor that no parallel setup can beat (zero when the device computes deterministically;
`--deterministic` asks XLA for deterministic GPU kernels, e.g. sorted scatter-adds instead of
atomics). On CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=4` gives 4 devices.
Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from experiments import loop
from experiments.configlib import apply_override, load_config
from experiments.rundir import read_metrics


def step_losses(workdir: Path) -> np.ndarray:
    """Every step's training loss, in step order, from the run's metrics.jsonl."""
    losses: dict[int, float] = {}
    for record in read_metrics(workdir):
        values = record.get("train", {}).get("step_losses")
        if values:
            first = record["step"] - len(values) + 1
            losses |= {first + i: v for i, v in enumerate(values)}
    return np.array([losses[s] for s in sorted(losses)])


def run_setups(args: argparse.Namespace) -> dict:
    devices = jax.devices()
    n = len(devices)
    if n < 2:
        raise ValueError(
            f"found {n} {devices[0].platform} device; data parallelism needs at least 2 "
            "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4)"
        )
    base = load_config(args.config)
    for override in args.override:
        apply_override(base, override)
    steps = args.steps
    batch = base.train.batch_size
    if batch % n:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {n} devices")
    setups = [("1 device", devices[:1], False, batch)]
    if args.repeat:
        setups.append(("1 device, again", devices[:1], False, batch))
    setups.append((f"{n} devices", devices, False, batch))
    if not args.no_fsdp:
        setups.append((f"{n} devices, FSDP", devices, True, batch))
    if args.weak:
        setups.append((f"{n} devices, batch x{n}", devices, False, batch * n))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="multi_gpu_"))
    rows = []
    for name, devs, fsdp, batch_size in setups:
        workdir = root / name.replace(" ", "_").replace(",", "")
        if workdir.exists():
            raise ValueError(f"{workdir} exists; pass a fresh --workdir (runs are not overwritten)")
        config = base.copy_and_resolve_references()
        config.unlock()
        config.train.update(
            steps=steps,
            batch_size=batch_size,
            fsdp=fsdp,
            log_every=args.log_every,
            eval_every=steps,
            checkpoint_every=steps,
        )
        config.eval.update(num_examples=args.eval_examples, final_num_examples=args.eval_examples)
        print(f"== {name}: {workdir}", file=sys.stderr, flush=True)
        results = loop.train_and_evaluate(config, workdir, devices=devs, progress=True)
        rows.append(
            {
                "setup": name,
                "devices": len(devs),
                "fsdp": fsdp,
                "batch_size": batch_size,
                "tokens_per_s": results["tokens_per_s"],
                "ms_per_batch": results["ms_per_batch"],
                "final": results["final"],
                "losses": step_losses(workdir).tolist(),
            }
        )
    reference = np.array(rows[0]["losses"])
    tps1 = rows[0]["tokens_per_s"]
    for row in rows:
        row["scaling_efficiency"] = row["tokens_per_s"] / (row["devices"] * tps1)
        if row["batch_size"] == batch:
            diff = np.abs(np.array(row["losses"]) - reference)
            row["max_abs_loss_diff"] = float(diff.max())
            row["max_rel_loss_diff"] = float((diff / np.abs(reference)).max())
            row["final_loss_diff"] = float(diff[-1])
    return {
        "config": args.config,
        "overrides": args.override,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "steps": steps,
        "device": devices[0].device_kind,
        "num_devices": n,
        "jax": jax.__version__,
        "tokens_per_batch": rows[0]["tokens_per_s"] * rows[0]["ms_per_batch"] / 1e3,
        "rows": rows,
    }


def markdown(report: dict, command: str) -> str:
    lines = [
        f"# Data-parallel training on {report['num_devices']} x {report['device']}",
        "",
        f"jax {report['jax']}. Config `{report['config']}` (overrides: "
        f"{', '.join(report['overrides']) or 'none'}; matmul precision "
        f"{report['matmul_precision']}), {report['steps']} steps from the same seed. "
        f"Command: `{command}`",
        "",
        "| setup | global batch | ms/batch | tokens/s | scaling efficiency | "
        "max abs Δloss vs 1 device (any step) | max rel Δloss | Δloss at last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        same = "max_abs_loss_diff" in row
        lines.append(
            f"| {row['setup']} | {row['batch_size']} | {row['ms_per_batch']:.1f} | "
            f"{row['tokens_per_s']:,.0f} | {100 * row['scaling_efficiency']:.0f}% | "
            + (
                f"{row['max_abs_loss_diff']:.2e} | {row['max_rel_loss_diff']:.2e} | "
                f"{row['final_loss_diff']:.2e} |"
                if same
                else "n/a (other batch) | | |"
            )
        )
    lines += ["", "Final evaluation (token error %):", ""]
    splits = list(report["rows"][0]["final"])
    lines += ["| setup | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for row in report["rows"]:
        errors = " | ".join(f"{100 * row['final'][s]['token_error']:.2f}" for s in splits)
        lines.append(f"| {row['setup']} | {errors} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    reference = np.array(report["rows"][0]["losses"])
    for row in report["rows"]:
        losses = np.array(row["losses"])
        top.plot(np.arange(1, len(losses) + 1), losses, label=row["setup"], lw=1)
        if "max_abs_loss_diff" in row and row is not report["rows"][0]:
            bottom.semilogy(
                np.arange(1, len(losses) + 1),
                np.abs(losses - reference) + 1e-12,
                label=row["setup"],
                lw=1,
            )
    top.set_ylabel("training loss")
    top.legend()
    bottom.set_ylabel("|loss - loss(1 device)|")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.suptitle(f"{report['config']} on {report['num_devices']} x {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="configs/<task>.py:<variant>[,...]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=50, help="steps per throughput interval")
    parser.add_argument("--eval-examples", type=int, default=1024, help="per split, at the end")
    parser.add_argument("--override", action="append", default=[], help="field=value")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP run")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="compute in float32 with full-precision matmuls (model.dtype=float32, "
        "jax_default_matmul_precision=highest): differences are then reduction order only",
    )
    parser.add_argument("--weak", action="store_true", help="add an N-times-larger-batch run")
    parser.add_argument(
        "--repeat",
        action="store_true",
        help="train the one-device run twice: their difference is the noise floor",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="XLA_FLAGS+=--xla_gpu_deterministic_ops=true (must precede jax's backend start)",
    )
    parser.add_argument("--workdir", default="", help="fresh root for the runs (default: tmp)")
    parser.add_argument("--out", required=True, help="output prefix for .json/.md/.png")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must be at least twice --log-every (the first interval compiles)")
    if args.deterministic:
        # XLA reads XLA_FLAGS once, when the backend starts (jax has no public query for it).
        if jax._src.xla_bridge.backends_are_initialized():
            parser.error("--deterministic must be set before jax starts its backend")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    if args.float32:
        args.override = [*args.override, "model.dtype=float32"]
        jax.config.update("jax_default_matmul_precision", "highest")
    try:
        report = run_setups(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except loop.TrainingStopped as stopped:  # SIGTERM: the runs are not resumable here
        print(f"error: {stopped}", file=sys.stderr)
        return 3
    command = "python -m experiments.multi_gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **report}, indent=1))
    text = markdown(report, command)
    out.with_suffix(".md").write_text(text)
    plot(report, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
