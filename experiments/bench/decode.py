"""Decode-attention benchmark (one query token over a KV cache): ours vs XLA, cuDNN, jax's Pallas
`decode_attention.gqa` and tokamax, in effective GB/s of K+V read once; CoPE rows: our CoPE
decode kernel vs our plain decode kernel at the same shape and vs the XLA CoPE decode step.

Run: `python -m experiments.bench_kernels decode` (H100); `--quick` for a CPU smoke run;
`python -m experiments.bench.decode --sweep` for the block/split tuning sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import (
    Record,
    default_out,
    device_name,
    time_pipelined,
    write_outputs,
)
from pallas_kernels.cope_decode_attention import (
    cope_decode_attention,
    cope_decode_attention_reference,
)
from pallas_kernels.cope_decode_attention import shapes as cope_shapes
from pallas_kernels.decode_attention import (
    DecodeConfig,
    decode_attention,
    decode_attention_reference,
    heuristic_config,
)
from pallas_kernels.decode_attention.shapes import BENCH_SHAPES, QUICK_SHAPES, DecodeShape

warnings.filterwarnings("ignore", category=DeprecationWarning)

MODES = ("online", "unified_max")
PALLAS_K_SPLITS = (4, 8, 16, 32, 64)


def make_inputs(shape: DecodeShape, dtype=jnp.bfloat16, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (shape.batch, shape.heads, shape.head_dim), dtype)
    kv_shape = (shape.batch, shape.max_len, shape.kv_heads, shape.head_dim)
    k = jax.random.normal(keys[1], kv_shape, dtype)
    v = jax.random.normal(keys[2], kv_shape, dtype)
    lengths = jnp.full((shape.batch,), shape.max_len, jnp.int32)
    return q, k, v, lengths


def _ours(
    mode: str,
    config: DecodeConfig | None = None,
    interpret: bool | None = None,
    fallback: str = "kernel",
):
    return jax.jit(
        lambda q, k, v, n: decode_attention(
            q, k, v, n, softmax=mode, config=config, fallback=fallback, interpret=interpret
        )
    )


def _jax_nn(implementation: str):
    def fn(q, k, v, lengths):
        out = jax.nn.dot_product_attention(
            q[:, None], k, v, implementation=implementation, key_value_seq_lengths=lengths
        )
        return out[:, 0]

    return jax.jit(fn)


def _pallas_gqa(k_splits: int):
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

    return jax.jit(lambda q, k, v, n: jax_decode.gqa(q, k, v, kv_seq_len=n, k_splits=k_splits))


def _tokamax(implementation: str, split_k: int | None = None):
    import tokamax

    if split_k is None:
        return jax.jit(
            lambda q, k, v, n: tokamax.dot_product_attention(
                q[:, None], k, v, implementation=implementation
            )[:, 0]
        )
    from tokamax._src.ops.attention import api as tk_api
    from tokamax._src.ops.attention import base as tk_base
    from tokamax._src.ops.attention import pallas_mosaic_gpu_kernel_sm90 as sm90

    op = tk_api.IMPLEMENTATIONS["mosaic_gpu"].replace(
        config=sm90.Config(
            block_q=64,
            block_kv=128,
            num_stages=2,
            fold_q_sequence_heads=True,
            split_k=split_k,
            persistent=False,
        )
    )
    return jax.jit(
        lambda q, k, v, n: op(q[:, None], k, v, mask=tk_base.Mask(None), logits_scale=tk_base.AUTO)[
            :, 0
        ]
    )


def _check(out, ref) -> str | None:
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    if np.isnan(out).any():
        return "NaN in output"
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return None if err < 2e-2 else f"relative error {err:.2e} vs reference"


def _measure(
    name: str, make: Callable, args, ref, shape: DecodeShape, iters: int, device: str
) -> Record:
    rec = Record(
        kernel="decode_attention",
        impl=name,
        shape=shape.name,
        causal=None,
        pass_="decode",
        ms=None,
        device=device,
    )
    try:
        fn = make()
        rec.error = _check(fn(*args), ref)
        if rec.error is None:
            rec.ms = time_pipelined(fn, *args, iters=iters)
            rec.gbps = shape.kv_bytes(jnp.dtype(args[1].dtype).itemsize) / (rec.ms * 1e-3) / 1e9
    except Exception as e:  # one failing implementation must not stop the benchmark
        rec.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    status = f"{rec.gbps:8.0f} GB/s {rec.ms:.4f} ms" if rec.gbps else f"ERROR {rec.error}"
    print(f"  {shape.name:28s} {name:24s} {status}", flush=True)
    return rec


def _best(records: list[Record]) -> Record | None:
    ok = [r for r in records if r.gbps]
    return max(ok, key=lambda r: r.gbps) if ok else None


def bench_shape(
    shape: DecodeShape, iters: int, quick: bool, device: str, tune_ours: bool = True
) -> list[Record]:
    args = make_inputs(shape)
    ref = decode_attention_reference(*args)
    on_gpu = jax.default_backend() == "gpu"
    records = []
    measure = lambda name, make: _measure(name, make, args, ref, shape, iters, device)  # noqa: F821 (args is deleted only after every call)
    records.append(measure("xla", lambda: _jax_nn("xla")))
    if on_gpu:
        records.append(measure("cudnn", lambda: _jax_nn("cudnn")))
        tries = [
            measure(f"pallas-gqa k_splits={s}", lambda s=s: _pallas_gqa(s))
            for s in PALLAS_K_SPLITS
            if shape.max_len % s == 0 and (shape.max_len // s) % 128 == 0
        ]
        records.append(_pick(tries, "jax-pallas-gqa"))
        tk = [
            measure("tokamax-mosaic", lambda: _tokamax("mosaic")),
            measure("tokamax-triton", lambda: _tokamax("triton")),
        ]
        tk += [
            measure(f"tokamax-mosaic split_k={s}", lambda s=s: _tokamax("mosaic", s))
            for s in (4, 16)
            if shape.max_len % (128 * s) == 0
        ]
        records.append(_pick(tk, "tokamax"))
    config = None
    if on_gpu and tune_ours:
        config, tuned, default = tune(shape, args)
        _TUNED[shape.name] = (config, tuned, default)
    for mode in MODES:
        records.append(
            measure(
                f"ours-{mode}",
                lambda mode=mode: _ours(mode, config, interpret=None if on_gpu else True),
            )
        )
    if on_gpu:  # the row-level lax.cond fallback, for comparison (not counted as ours)
        records.append(
            measure("ours-unified_max-cond", lambda: _ours("unified_max", config, fallback="cond"))
        )
    del args
    return records


def _pick(tries: list[Record], name: str) -> Record:
    """The best of a peer's variants, under the peer's name (the variant goes in `error`-free
    notes printed by `run`)."""
    best = _best(tries)
    if best is None:
        rec = (
            dataclasses.replace(tries[0], impl=name)
            if tries
            else Record(
                kernel="decode_attention", impl=name, shape="", causal=None, pass_="decode", ms=None
            )
        )
        rec.error = "; ".join(f"{t.impl}: {t.error}" for t in tries) or "no valid variant"
        return rec
    rec = dataclasses.replace(best, impl=name)
    _VARIANTS[(rec.shape, name)] = best.impl
    return rec


_VARIANTS: dict[tuple[str, str], str] = {}
_TUNED: dict[str, tuple[DecodeConfig, float, float]] = {}


def summary(records: list[Record]) -> str:
    """Per shape: our best mode, ratios vs every peer, unified / online."""
    lines = [
        "",
        "## Ratios",
        "",
        "| shape | our best | GB/s | % of 3350 | vs xla | vs cudnn | vs jax-pallas-gqa "
        "| vs tokamax | unified / online |",
        "|" + "---|" * 9,
    ]
    for shape in dict.fromkeys(r.shape for r in records):
        rows = {r.impl: r for r in records if r.shape == shape}
        on, un = rows.get("ours-online"), rows.get("ours-unified_max")
        best = _best([r for r in (on, un) if r is not None])
        if best is None:
            continue
        cells = [
            shape,
            best.impl.removeprefix("ours-"),
            f"{best.gbps:.0f}",
            f"{100 * best.gbps / 3350:.0f}%",
        ]
        for peer in ("xla", "cudnn", "jax-pallas-gqa", "tokamax"):
            r = rows.get(peer)
            cells.append(f"{best.gbps / r.gbps:.2f}×" if r is not None and r.gbps else "n/a")
        ratio = (un.gbps / on.gbps) if (on and un and on.gbps and un.gbps) else None
        cells.append(f"{ratio:.3f}×" if ratio else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if _VARIANTS:
        lines += [
            "",
            "Peer variants chosen (best of those tried): "
            + "; ".join(f"{s} {p} = {v}" for (s, p), v in _VARIANTS.items()),
        ]
    if _TUNED:
        lines += [
            "",
            "Our configs (tuned in this run for unified max from the heuristic, greedy "
            "over splits, block_k, stages, vector path; both modes then use it):",
            "",
        ]
        lines += [
            f"- {s}: {c} — {t:.0f} GB/s tuned vs {d:.0f} GB/s heuristic"
            for s, (c, t, d) in _TUNED.items()
        ]
    text = "\n".join(lines)
    print(text)
    return text


def run(out: str | None = None, iters: int = 20, quick: bool = False) -> list[Record]:
    device = device_name()
    shapes = QUICK_SHAPES if quick else BENCH_SHAPES
    records: list[Record] = []
    for shape in shapes:
        print(f"{shape.name}: K+V {shape.kv_bytes() / 1e9:.3f} GB", flush=True)
        shape_records = bench_shape(shape, iters, quick, device)
        best = _best([r for r in shape_records if r.impl in ("ours-online", "ours-unified_max")])
        if best is not None:
            records.extend(shape_records)
            records.append(dataclasses.replace(best, impl="ours"))
            _VARIANTS[(shape.name, "ours")] = best.impl
        else:
            records.extend(shape_records)
    cope_records = bench_cope(iters, quick, device)
    records.extend(cope_records)
    if out is None:
        out = default_out("decode", quick)
    write_outputs(
        records,
        out,
        metric="gbps",
        ours="ours",
        title="Decode attention (one query token), effective GB/s of K+V",
    )
    md = Path(out).with_suffix(".md")
    md.write_text(
        md.read_text() + summary(records) + cope_summary(cope_records) + "\n\nTiming: median of 5 "
        "repetitions of "
        f"{iters} back-to-back calls (one sync per repetition), all lengths = S, "
        "bf16; GB/s = K+V bytes / time. `ours` = our best mode per shape.\n"
    )
    return records


# --- CoPE decode rows ---------------------------------------------------------------------------


def make_cope_inputs(shape: cope_shapes.CopeDecodeShape, gates: str = "random", seed: int = 0):
    """q, k, v (bf16), pos_emb [N, D] float32, lengths = S. Random q and k give gates around 0.5,
    so every split but the last saturates; gates="near_0" shifts q and k along one direction
    (q·k/sqrt(D) about -23, gates about 1e-10): nothing saturates and every split is redone."""
    q, k, v, lengths = make_inputs(shape, seed=seed)
    pos_emb = jax.random.normal(
        jax.random.PRNGKey(seed + 1), (shape.npos, shape.head_dim), jnp.float32
    )
    if gates == "near_0":
        u = jax.random.normal(jax.random.PRNGKey(seed + 2), (shape.head_dim,), jnp.float32)
        u = 16.0 * u / jnp.linalg.norm(u)
        q = (0.3 * q.astype(jnp.float32) - u).astype(q.dtype)
        k = (k.astype(jnp.float32) + u).astype(k.dtype)
    return q, k, v, pos_emb, lengths


def _cope_ours(mode: str, interpret: bool | None):
    return jax.jit(
        lambda q, k, v, e, n: cope_decode_attention(
            q, k, v, e, n, softmax=mode, interpret=interpret
        )
    )


def _cope_plain(mode: str, interpret: bool | None):
    """Our plain decode kernel on the same caches (no position term), heuristic config."""
    return jax.jit(
        lambda q, k, v, e, n: decode_attention(q, k, v, n, softmax=mode, interpret=interpret)
    )


def _cope_xla():
    """The XLA CoPE decode step: `cope_attention` with one query over the valid keys."""
    import cope.functional as F

    return jax.jit(
        lambda q, k, v, e, n: F.cope_attention(q[:, None], k, v, e, causal=False, lengths=n)[:, 0]
    )


def bench_cope_shape(shape: cope_shapes.CopeDecodeShape, iters: int, device: str) -> list[Record]:
    """CoPE rows of one shape (kernel "cope_decode_attention"): the XLA step, our kernel in both
    modes, our plain decode kernel, and our kernel with gates near 0 (two passes)."""
    interpret = None if jax.default_backend() == "gpu" else True
    args = make_cope_inputs(shape)
    ref = cope_decode_attention_reference(*args)
    plain_ref = decode_attention_reference(args[0], args[1], args[2], args[4])
    near_0 = make_cope_inputs(shape, gates="near_0")
    near_0_ref = cope_decode_attention_reference(*near_0)

    def measure(name, make, inputs=args, want=ref):
        rec = _measure(name, make, inputs, want, shape, iters, device)
        return dataclasses.replace(rec, kernel="cope_decode_attention")

    records = [measure("cope-xla", _cope_xla)]
    for mode in MODES:
        records.append(measure(f"cope-ours-{mode}", lambda mode=mode: _cope_ours(mode, interpret)))
    for mode in MODES:
        records.append(
            measure(
                f"plain-decode-{mode}",
                lambda mode=mode: _cope_plain(mode, interpret),
                want=plain_ref,
            )
        )
    records.append(
        measure(
            "cope-ours-unified_max gates≈0",
            lambda: _cope_ours("unified_max", interpret),
            near_0,
            near_0_ref,
        )
    )
    best = _best([r for r in records if r.impl in ("cope-ours-online", "cope-ours-unified_max")])
    if best is not None:
        records.append(dataclasses.replace(best, impl="ours-cope"))
    return records


def bench_cope(iters: int, quick: bool, device: str) -> list[Record]:
    shapes = cope_shapes.QUICK_SHAPES if quick else cope_shapes.BENCH_SHAPES
    records = []
    for shape in shapes:
        print(f"{shape.name} (CoPE): K+V {shape.kv_bytes() / 1e9:.3f} GB", flush=True)
        records.extend(bench_cope_shape(shape, iters, device))
    return records


def cope_summary(records: list[Record]) -> str:
    """Per CoPE shape: our best mode vs our plain decode kernel (best mode) and vs XLA, and the
    cost of gates near 0 (every split recomputed)."""
    lines = [
        "",
        "## CoPE decode",
        "",
        "| shape | our best | GB/s | vs plain decode | vs XLA CoPE | gates≈0 GB/s "
        "| gates≈0 / best |",
        "|" + "---|" * 7,
    ]

    def ratio(num: Record | None, den: Record | None) -> str:
        ok = num is not None and num.gbps and den is not None and den.gbps
        return f"{num.gbps / den.gbps:.2f}×" if ok else "n/a"

    for shape in dict.fromkeys(r.shape for r in records):
        rows = {r.impl: r for r in records if r.shape == shape}
        best = _best([rows[i] for i in ("cope-ours-online", "cope-ours-unified_max") if i in rows])
        if best is None:
            continue
        plain = _best([r for i, r in rows.items() if i.startswith("plain-decode")])
        near_0 = rows.get("cope-ours-unified_max gates≈0")
        cells = [
            shape,
            best.impl.removeprefix("cope-ours-"),
            f"{best.gbps:.0f}",
            ratio(best, plain),
            ratio(best, rows.get("cope-xla")),
            f"{near_0.gbps:.0f}" if near_0 is not None and near_0.gbps else "n/a",
            ratio(near_0, best),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "CoPE rows: npos 64, bf16, all lengths = S, heuristic configs for our CoPE and plain "
        "kernels; GB/s = K+V bytes / time (the position table and gate work not counted).",
    ]
    text = "\n".join(lines)
    print(text)
    return text


def tune(shape: DecodeShape, args, iters: int = 10) -> tuple[DecodeConfig, float, float]:
    """Greedy coordinate search (splits, block_k, stages, MHA vector path) for the unified-max
    kernel from the heuristic config. Returns (best config, its GB/s, the heuristic's GB/s)."""
    group = shape.heads // shape.kv_heads
    base = heuristic_config(shape.batch, shape.max_len, shape.kv_heads, group, shape.head_dim)
    seen: dict[DecodeConfig, float] = {}

    def score(cfg: DecodeConfig) -> float:
        if cfg not in seen:
            try:
                ms = time_pipelined(_ours("unified_max", cfg), *args, iters=iters, reps=3)
                seen[cfg] = shape.kv_bytes() / (ms * 1e-3) / 1e9
            except Exception as e:
                print(f"    {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)
                seen[cfg] = 0.0
            print(f"    tune {shape.name} {cfg} {seen[cfg]:.0f} GB/s", flush=True)
        return seen[cfg]

    best = base
    score(best)
    pairs = shape.batch * shape.kv_heads
    splits = [1, 2, 4] if pairs >= 256 else [2, 4, 8, 16, 32]
    knobs = [("num_splits", splits), ("block_k", [64, 128]), ("num_stages", [2, 3, 4])]
    if group == 1:
        knobs.append(("use_dot", [True, False]))
    for knob, values in knobs:
        for value in values:
            cand = dataclasses.replace(best, **{knob: value})
            if score(cand) > score(best):
                best = cand
    print(
        f"TUNED {shape.name}: {best} {seen[best]:.0f} GB/s (heuristic {seen[base]:.0f})", flush=True
    )
    return best, seen[best], seen[base]


def sweep(shapes=BENCH_SHAPES, iters: int = 10) -> None:
    for shape in shapes:
        tune(shape, make_inputs(shape), iters)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    cli = parser.parse_args()
    if cli.sweep:
        sweep(QUICK_SHAPES if cli.quick else BENCH_SHAPES)
    else:
        try:
            run(quick=cli.quick)
        except Exception:
            traceback.print_exc()
            raise
