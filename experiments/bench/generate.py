"""Generation benchmark: GPT-2-small-size models (random bf16 weights; absolute, RoPE and CoPE
with npos 64), TTFT (prefill + first token), TPOT (time per output token) and tokens/s for the
kernel path, the XLA attention path and no-cache recomputation.

Run: `python -m experiments.bench_kernels generate` (GPU); `--quick` for a CPU smoke run.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope.model import GPT2_SMALL, ModelConfig, Transformer, with_attention_impl
from decoding import calibrate, generate, generate_uncached, greedy
from experiments.bench.common import default_out

warnings.filterwarnings("ignore", category=DeprecationWarning)

PROMPT, NEW = 512, 256
BATCHES = (1, 8, 64)
# No-cache steps actually timed per batch; the rest is extrapolated (constant per-step cost).
UNCACHED_STEPS = {1: 64, 8: 32, 64: 8}
# Variants, most important first; "kernel-online" runs last and is skipped when time is short.
VARIANTS = ("kernel", "xla", "no-cache", "kernel-online")
ENCODINGS = ("absolute", "rope", "cope")
QUICK_ENCODINGS = ("absolute", "cope")
TIME_BUDGET_S = 420.0  # stay inside a short device lease


@dataclasses.dataclass
class GenRecord:
    """One (variant, batch) measurement; times in ms, medians over `runs` whole generations."""

    variant: str
    batch: int
    prompt: int
    new_tokens: int
    encoding: str = "absolute"
    ttft_ms: float | None = None  # time to first token: prefill + first token (num_steps=1)
    total_ms: float | None = None  # prefill + all new tokens (extrapolated for no-cache)
    tpot_ms: float | None = None  # time per output token: one decode step for the whole batch
    tokens_per_s: float | None = None  # batch · new_tokens / total
    steps_timed: int | None = None
    note: str = ""
    error: str | None = None
    device: str = ""


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def model_config(quick: bool, attention_impl: str, encoding: str = "absolute") -> ModelConfig:
    if quick:
        return ModelConfig(
            vocab_size=512,
            num_layers=2,
            d_model=64,
            num_heads=4,
            max_len=128,
            npos=16,
            encoding=encoding,
            post_norm=False,
            attention_impl=attention_impl,
            dtype="bfloat16",
            param_dtype="bfloat16",
        )
    return ModelConfig(
        vocab_size=50257,
        **GPT2_SMALL,
        encoding=encoding,
        attention_impl=attention_impl,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def _random_cope_tables(model: Transformer, seed: int) -> None:
    """CoPE tables start at zero (a position-free model); random ones exercise the term."""
    for path, param in nnx.iter_graph(model):
        if path and path[-1] == "table" and isinstance(param, nnx.Param):
            key = jax.random.key(seed)
            param[...] = (jax.random.normal(key, param.shape) * 0.1).astype(param.dtype)


def bench_one(
    variant: str, model, prompts, lengths, phi, runs: int, new: int, uncached_steps: int
) -> GenRecord:
    batch, prompt = prompts.shape
    rec = GenRecord(variant, batch, prompt, new, encoding=model.cfg.encoding)
    if variant == "no-cache":

        def gen(steps):
            return generate_uncached(
                model, prompts, lengths, max_new_tokens=new, sampler=greedy(), num_steps=steps
            )

        timed = min(uncached_steps, new)
    else:
        softmax = "online" if variant == "kernel-online" else "unified_max"

        def gen(steps):
            return generate(
                model,
                prompts,
                lengths,
                max_new_tokens=new,
                sampler=greedy(),
                softmax=softmax,
                phi=phi if softmax == "unified_max" else None,
                num_steps=steps,
            )

        timed = new
    out = gen(timed)  # compile + warm up (num_steps is traced: gen(1) reuses the executable)
    jax.block_until_ready(out)
    jax.block_until_ready(gen(1))
    assert int(out.lengths.min()) == timed, "greedy generation stopped early"
    rec.ttft_ms = _median_ms(lambda: gen(1), runs)
    measured = _median_ms(lambda: gen(timed), runs)
    rec.steps_timed = timed
    rec.tpot_ms = (measured - rec.ttft_ms) / (timed - 1)
    rec.total_ms = rec.ttft_ms + rec.tpot_ms * (new - 1)
    rec.tokens_per_s = batch * new / (rec.total_ms * 1e-3)
    if timed < new:
        rec.note = (
            f"timed {timed} of {new} steps; every step re-runs the full model over the "
            f"fixed [B, {prompt}+{new}] buffer, so the per-step cost is constant and the "
            "total is extrapolated"
        )
    return rec


def _table(records: list[GenRecord]) -> str:
    lines = [
        "| encoding | batch | variant | TTFT (ms) | TPOT (ms) | tokens/s | total (s) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        head = f"| {r.encoding} | {r.batch} | {r.variant} |"
        if r.error:
            lines.append(f"{head} err | err | err | err | {r.error} |")
            continue
        lines.append(
            f"{head} {r.ttft_ms:.1f} | {r.tpot_ms:.3f} | "
            f"{r.tokens_per_s:.0f} | {r.total_ms / 1e3:.2f} | "
            f"{'extrapolated' if r.note else ''} |"
        )
    return "\n".join(lines)


def _write(records: list[GenRecord], out: str, title: str, extra: str) -> None:
    prefix = Path(out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(
        json.dumps([dataclasses.asdict(r) for r in records], indent=1)
    )
    device = records[0].device if records else "?"
    table = _table(records)
    print(table, flush=True)
    prefix.with_suffix(".md").write_text(
        f"# {title}\n\nDevice: {device}, jax {jax.__version__}.\n\n{table}\n\n{extra}\n"
    )
    from matplotlib.figure import Figure

    ok = [
        dataclasses.replace(r, variant=f"{r.encoding} {r.variant}") for r in records if not r.error
    ]
    variants = list(dict.fromkeys(r.variant for r in ok))
    batches = sorted({r.batch for r in ok})
    width = 0.8 / max(len(variants), 1)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, v in enumerate(variants):
        vals = [
            next((r.tokens_per_s for r in ok if r.variant == v and r.batch == b), 0.0)
            for b in batches
        ]
        ax.bar(np.arange(len(batches)) + i * width, vals, width, label=v)
    ax.set_xticks(np.arange(len(batches)) + 0.4 - width / 2, [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{title} ({device})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(prefix.with_suffix(".png"), dpi=120)


def run(out: str | None = None, iters: int = 20, quick: bool = False) -> list[GenRecord]:
    start = time.perf_counter()
    device = jax.devices()[0].device_kind
    prompt, new = (32, 16) if quick else (PROMPT, NEW)
    batches = (1, 2) if quick else BATCHES
    runs = max(1, min(iters, 5))  # whole generations are long; 5 runs give a stable median
    encodings = QUICK_ENCODINGS if quick else ENCODINGS
    models, phis = {}, {}
    rng = np.random.default_rng(0)
    for encoding in encodings:
        xla = Transformer(model_config(quick, "xla", encoding), rngs=nnx.Rngs(0))
        if xla.cfg.spec.cope:
            _random_cope_tables(xla, 0)
        xla.eval()
        models[encoding, "xla"] = xla
        models[encoding, "pallas"] = with_attention_impl(xla, "pallas")
        calib = jnp.asarray(rng.integers(0, xla.cfg.vocab_size, (2, prompt)), jnp.int32)
        phis[encoding] = calibrate(xla, calib)
        phi_list = np.round(np.asarray(phis[encoding]), 3).tolist()
        print(f"{encoding}: phi per layer {phi_list}", flush=True)
    cfg = models[encodings[0], "xla"].cfg
    if out is None:
        out = default_out("generate", quick)
    title = (
        f"Generation, {cfg.num_layers}L d{cfg.d_model} {cfg.num_heads}h V{cfg.vocab_size} "
        f"bf16 random weights, prompt {prompt}, {new} new tokens, greedy"
    )
    extra = (
        "Variants: `kernel` = the model with attention_impl='pallas': flash-attention prefill "
        "(the fused CoPE kernel for CoPE) + our split-KV decode kernel (the CoPE one for CoPE; "
        "FlashDecoding++ unified max, φ per layer from `decoding.calibrate`); `kernel-online` = "
        "the same with the online-softmax (Flash-Decoding) mode; `xla` = XLA attention for "
        "prefill and decode; `no-cache` = every step re-runs the full model (XLA attention) "
        "over the [B, prompt+new] buffer. All run as one jitted on-device `lax.while_loop`. "
        "TTFT (time to first token) = `generate(num_steps=1)`: prefill + the first token; "
        "TPOT (time per output token) = (time of N steps - TTFT) / (N - 1), one decode step "
        "for the whole batch; tokens/s = batch·new / (TTFT + (new-1)·TPOT). Medians over "
        f"{runs} whole generations after a warm-up. Encodings: {', '.join(encodings)} "
        "(CoPE: npos from the GPT-2-small config, random tables)."
    )
    records: list[GenRecord] = []
    order = [(e, v, b) for e in encodings for v in VARIANTS[:-1] for b in batches]
    order = sorted(order, key=lambda evb: (evb[2], VARIANTS.index(evb[1])))
    order += [(e, VARIANTS[-1], b) for e in encodings for b in batches]
    for encoding, variant, batch in order:
        elapsed = time.perf_counter() - start
        if elapsed > TIME_BUDGET_S:
            print(f"skip {encoding} {variant} B{batch}: {elapsed:.0f}s elapsed", flush=True)
            continue
        lengths = jnp.full((batch,), prompt, jnp.int32)
        prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
        model = models[encoding, "pallas" if variant.startswith("kernel") else "xla"]
        phi = phis[encoding]
        t0 = time.perf_counter()
        try:
            steps = UNCACHED_STEPS.get(batch, 8) if not quick else 4
            rec = bench_one(variant, model, prompts, lengths, phi, runs, new, steps)
        except Exception as e:  # keep going: one failing variant must not lose the others
            traceback.print_exc()
            rec = GenRecord(
                variant,
                batch,
                prompt,
                new,
                encoding=encoding,
                error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
            )
        rec.device = device
        records.append(rec)
        print(
            f"{encoding} {variant} B{batch}: TPOT {rec.tpot_ms} ms, {rec.tokens_per_s} tok/s "
            f"({time.perf_counter() - t0:.0f}s incl. compile)",
            flush=True,
        )
        _write(records, out, title, extra)
    return records


if __name__ == "__main__":
    run(quick=True)
