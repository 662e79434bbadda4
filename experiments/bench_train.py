"""Training-step speed per encoding: `python -m experiments.bench_train [--config ...]`.

Times the real training loop of `experiments.train` (host batch generation, the jitted step with
donated state, no host sync inside the timed window) for the paper's counting setup (4 layers,
256 wide, 4 heads, batch 64, 512 tokens) by default, and compares tokens/s with Meta's official
PyTorch code on the same H100 (~50 / 59 / 100 ms per batch for absolute / relative / CoPE).
tokens/s is given with and without padding: counting's programs (~315 tokens on average) are
padded to 511, and the official figures (~200k-400k tokens/s) count real tokens. `--pack` times
each variant unpacked, packed (the config's `pack` option: several programs per row) or both;
the padding column is the fraction of input positions that hold no example's token.
Prints a table and writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cope.model import ModelConfig, Transformer
from experiments import sharding
from experiments.configlib import apply_override, load_config
from experiments.steps import build_model_config, build_task, init_train_state, make_train_step
from experiments.tasks import Task, make_task

OFFICIAL_MS = {"abs": 50.0, "rel": 59.0, "cope": 100.0}  # issue 3, measured on this H100
H100_BF16_TFLOPS = 989.4  # dense bf16 tensor-core peak of an H100 SXM


def flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token, the PaLM/nanoGPT convention: 6 N + 12 L d T.

    6 N covers the forward and backward matmuls of every parameter (the tied output projection
    included), 12 L d T the attention scores and values over all T keys (no causal discount).
    N leaves out position tables (`matmul_params`), and the extra work of an encoding (CoPE's
    gates and position logits, relative logits) is not model FLOPs, so every encoding of a shape
    is held to the same count.
    """
    return 6.0 * num_params + 12.0 * num_layers * d_model * seq_len


VARIANTS = ("abs", "rel", "cope", "rope", "nope", "cope_rel", "cope_rope")
# --pack: which of unpacked (False) and packed (True) batches each variant is timed with.
PACKING = {"no": (False,), "yes": (True,), "both": (False, True)}


def matmul_params(model_cfg: ModelConfig) -> int:
    """Parameters of the same model without position encoding: those whose matmuls count."""
    bare = dataclasses.replace(model_cfg, encoding="none")
    abstract = nnx.eval_shape(lambda: Transformer(bare, rngs=nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def time_variant(
    config_spec: str, overrides: list[str], steps: int, warmup: int, peak_tflops: float
) -> dict:
    config = load_config(config_spec)
    for override in overrides:
        apply_override(config, override)
    task = build_task(config)
    ts = init_train_state(config, build_model_config(config, task))
    step_fn = make_train_step(ts, config.train.seed)
    batch_sharding = sharding.batch_sharding(ts.mesh)
    bs, seed = config.train.batch_size, config.train.seed

    def run(first: int, count: int) -> float:
        start = time.perf_counter()
        loss = None
        for i in range(first, first + count):
            batch = sharding.global_batch(task.train_batch(seed, i, bs), batch_sharding)
            ts.state, loss = step_fn(ts.state, batch, np.int32(i))
        jax.block_until_ready(loss)
        return time.perf_counter() - start

    run(0, warmup)
    elapsed = run(warmup, steps)
    tokens = bs * task.seq_len(task.train_split)

    def real_tokens(task: Task) -> float:
        """Non-padding input tokens per timed batch (a pure function of seed and step), counted
        outside the timed window."""
        if task.pad_id is None:
            return float(tokens)
        batches = (task.train_batch(seed, i, bs) for i in range(warmup, warmup + steps))
        return float(np.mean([(b["inputs"] != task.pad_id).sum() for b in batches]))

    real = unpacked_real = real_tokens(task)
    if task.pack:  # the same steps unpacked: B examples per batch, as the official code trains
        options = config.task.options.to_dict() | {"pack": False}
        unpacked_real = real_tokens(make_task(config.task.name, **options))
    ms = 1e3 * elapsed / steps
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(ts.model(), nnx.Param)))
    flop_params = matmul_params(build_model_config(config, task))
    per_token = flops_per_token(
        flop_params, config.model.num_layers, config.model.d_model, task.seq_len(task.train_split)
    )
    model_tflops = per_token * tokens / (ms / 1e3) / 1e12
    return {
        "num_params": int(num_params),
        "flop_params": flop_params,
        "flops_per_token": per_token,
        "model_tflops": model_tflops,
        "mfu": model_tflops / peak_tflops,
        "attention_impl": config.model.attention_impl,
        "config": config_spec,
        "encoding": config.model.encoding,
        "batch": bs,
        "seq_len": task.seq_len(task.train_split),
        "ms_per_batch": ms,
        "tokens_per_s": tokens / (ms / 1e3),  # batch x seq_len, padding included
        # Padding excluded (counting pads its variable-length programs to seq_len); the unit
        # of the official code's tokens/s in issue 3.
        "real_tokens_per_batch": real,
        "real_tokens_per_s": real / (ms / 1e3),
        "packed": task.pack,
        "padding_fraction": 1.0 - real / tokens,
        "unpacked_real_tokens_per_batch": unpacked_real,
        "dtype": config.model.dtype,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--config",
        default="configs/counting.py",
        help="config file; each variant is appended as :<variant>",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--options",
        default="",
        help="config options appended to every variant, e.g. size=gpt2_small,source=local",
    )
    parser.add_argument(
        "--pack",
        choices=PACKING,
        default="both",
        help="time unpacked batches, packed ones (the `pack` config option), or both",
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--override", action="append", default=[], help="config override field=value (repeatable)"
    )
    parser.add_argument("--out", default=None, help="output prefix for .json and .md")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_BF16_TFLOPS,
        help="the device's dense bf16 peak for MFU (default: H100 SXM)",
    )
    args = parser.parse_args(argv)

    device = jax.devices()[0].device_kind
    records = []
    columns = (
        "| variant | packed | padding | ms/batch | tokens/s | tokens/s without padding "
        "| model TFLOP/s | MFU | official ms/batch | speed-up vs official (real tokens/s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    print(columns)
    lines = []
    runs = [
        (variant, packed) for variant in args.variants.split(",") for packed in PACKING[args.pack]
    ]
    for variant, packed in runs:
        options = ",".join(o for o in (args.options, "pack" if packed else "") if o)
        spec = f"{args.config}:{variant}" + (f",{options}" if options else "")
        r = time_variant(spec, args.override, args.steps, args.warmup, args.peak_tflops)
        r |= {"variant": variant, "device": device, "jax": jax.__version__}
        official = OFFICIAL_MS.get(variant) if "counting" in args.config else None
        # Real tokens/s over the official code's: its batches are B programs, unpacked.
        r["speedup_vs_official"] = (
            r["real_tokens_per_s"] * official / 1e3 / r["unpacked_real_tokens_per_batch"]
            if official
            else None
        )
        records.append(r)
        speedup = f"{r['speedup_vs_official']:.1f}×" if official else "n/a"
        line = (
            f"| {variant} | {'yes' if r['packed'] else 'no'} | "
            f"{100 * r['padding_fraction']:.1f}% | "
            f"{r['ms_per_batch']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['real_tokens_per_s']:,.0f} | {r['model_tflops']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{official or 'n/a'} | {speedup} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.out:
        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(records, indent=1))
        header = (
            f"# Training speed ({args.config}, batch {records[0]['batch']} x "
            f"{records[0]['seq_len']} tokens, {records[0]['dtype']})\n\nDevice: {device}, "
            f"jax {jax.__version__}. Command: `python -m experiments.bench_train "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
            f"MFU: model FLOPs (6 N + 12 L d T per token, N = {records[0]['flop_params']:,} "
            f"parameters without position tables) per second over a {args.peak_tflops} TFLOP/s "
            "bf16 peak.\n\n"
            f"{columns}\n"
        )
        prefix.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
