"""CoPE attention benchmark: our fused kernel vs CoPE in XLA (with and without remat) and our plain
flash kernel at the same shape; ms and the compiled executable's peak temporary bytes.

Run: `python -m experiments.bench_kernels cope` (GPU); `--quick` for a CPU smoke run (interpret
mode). A configuration that runs out of memory is recorded as such, and one the kernel does not
cover (`why_unsupported`) as "not available".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cope import functional as F
from experiments.bench.common import Record, default_out, device_name, time_pipelined
from pallas_kernels.cope_attention import cope_attention, why_unsupported
from pallas_kernels.cope_attention.shapes import BENCH, BENCH_QUICK, CopeShape
from pallas_kernels.flash_attention import flash_attention

warnings.filterwarnings("ignore", category=DeprecationWarning)

KERNEL = "cope_attention"
OURS = "ours"
XLA, XLA_REMAT, FLASH = "cope-xla", "cope-xla remat", "flash"
IMPLS = (XLA, XLA_REMAT, OURS, FLASH)
PASSES = ("fwd", "fwd+bwd")
OK, OOM, UNAVAILABLE, WRONG, ERROR = "ok", "out of memory", "not available", "wrong", "error"
# Our kernel's output (and gradients) must match CoPE-XLA to this relative norm error (bf16).
TOLERANCE = {"fwd": 2e-2, "fwd+bwd": 5e-2}
CHECK_LEN = 512  # tokens of the problem (or of one sequence's causal prefix) checked
SAMPLE_MS = 200.0  # aim for about this much device time per timed repetition


@dataclasses.dataclass
class CopeRecord(Record):
    """A `Record` with the query length, the compiled executable's temporary bytes and a status
    (ok, out of memory, not available, wrong, error)."""

    T: int | None = None
    temp_bytes: int | None = None
    status: str = OK

    def to_json(self) -> dict:
        d = super().to_json()
        return {**d, "T": self.T, "temp_bytes": self.temp_bytes, "status": self.status}


def _inputs(shape: CopeShape, seed: int):
    """q, do [B, T, H, D] and k, v [B, S, K, D] bf16, and the [N, D] float32 position table."""
    kq, kk, kv, ke, kd = jax.random.split(jax.random.key(seed), 5)
    q_dims = (shape.batch, shape.q_len, shape.heads, shape.head_dim)
    kv_dims = (shape.batch, shape.s, shape.k, shape.head_dim)
    q, do = (jax.random.normal(key, q_dims, jnp.bfloat16) for key in (kq, kd))
    k, v = (jax.random.normal(key, kv_dims, jnp.bfloat16) for key in (kk, kv))
    pos_emb = jax.random.normal(ke, (shape.npos, shape.head_dim), jnp.float32)
    return q, k, v, pos_emb * shape.head_dim**-0.5, do


def _impl(name: str, shape: CopeShape, pass_: str) -> Callable | str:
    """fn(q, k, v, pos_emb) -> out for `name`, or why it cannot run here."""
    if name == XLA:
        return functools.partial(F.cope_attention, causal=True)
    if name == XLA_REMAT:
        if pass_ == "fwd":
            return "remat changes only the backward pass"
        return jax.checkpoint(functools.partial(F.cope_attention, causal=True))
    if name == FLASH:
        return lambda q, k, v, pos_emb: flash_attention(q, k, v, causal=True)
    q, k, v, pos_emb, _ = jax.eval_shape(lambda: _inputs(shape, seed=0))
    reason = why_unsupported(q, k, v, pos_emb)
    return functools.partial(cope_attention, causal=True) if reason is None else reason


def _fwd_bwd(fn: Callable, argnums: tuple[int, ...]) -> Callable:
    """(q, k, v, pos_emb, do) -> the gradients of Σ out·do with respect to `argnums`."""

    def loss(q, k, v, pos_emb, do):
        return jnp.sum(fn(q, k, v, pos_emb).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.grad(loss, argnums=argnums)


def _argnums(name: str) -> tuple[int, ...]:
    return (0, 1, 2) if name == FLASH else (0, 1, 2, 3)


def _program(name: str, fn: Callable, pass_: str) -> tuple[Callable, Callable]:
    """(program, args picker): what is compiled and timed, and its arguments from `_inputs`."""
    if pass_ == "fwd":
        return fn, lambda x: x[:4]
    return _fwd_bwd(fn, _argnums(name)), lambda x: x


def _relative_error(got, want) -> float:
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        errs.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)))
    return max(errs)


def _check(program: Callable, compiled, args, shape: CopeShape, pass_: str) -> str | None:
    """Our kernel against CoPE-XLA: a message when the relative error exceeds the tolerance.

    Small problems (B·T <= CHECK_LEN) are checked as timed, with the compiled program; larger
    ones on one sequence (its first CHECK_LEN queries when T = S, a causal prefix), so that
    CoPE-XLA fits in memory.
    """
    xla, pick = _program(XLA, _impl(XLA, shape, pass_), pass_)
    if shape.batch * shape.q_len <= CHECK_LEN:
        checked, got = shape, compiled(*args)
    else:
        checked = dataclasses.replace(shape, batch=1)
        if shape.kv_len is None:
            checked = dataclasses.replace(checked, q_len=min(shape.q_len, CHECK_LEN))
        args = pick(_inputs(checked, seed=1))
        got = jax.jit(program)(*args)
    err = _relative_error(got, jax.jit(xla)(*args))
    if not err <= TOLERANCE[pass_]:
        return (
            f"relative error {err:.3g} vs CoPE-XLA on {checked.name} (tolerance {TOLERANCE[pass_]})"
        )
    return None


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _first_line(error: Exception) -> str:
    lines = [ln for ln in str(error).splitlines() if ln.strip() and "For simplicity" not in ln]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def measure(name: str, shape: CopeShape, pass_: str, iters: int, device: str) -> CopeRecord:
    """Compiles, checks and times one (impl, shape, pass); never raises for a failing impl."""
    rec = CopeRecord(
        kernel=KERNEL,
        impl=name,
        shape=shape.name,
        causal=True,
        pass_=pass_,
        ms=None,
        device=device,
        T=shape.q_len,
    )
    fn = _impl(name, shape, pass_)
    if isinstance(fn, str):
        rec.status, rec.error = UNAVAILABLE, fn
        return rec
    try:
        program, pick = _program(name, fn, pass_)
        args = pick(_inputs(shape, seed=int(np.random.default_rng().integers(2**31))))
        compiled = jax.jit(program).lower(*args).compile()
        memory = compiled.memory_analysis()
        rec.temp_bytes = None if memory is None else int(memory.temp_size_in_bytes)
        if name == OURS:
            rec.error = _check(program, compiled, args, shape, pass_)
            if rec.error is not None:
                rec.status = WRONG
                return rec
        once = time_pipelined(compiled, *args, iters=1, reps=1)
        calls = max(1, min(iters, math.ceil(SAMPLE_MS / max(once, 1e-3))))
        rec.ms = time_pipelined(compiled, *args, iters=calls)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not stop the run
        rec.status, rec.error = (OOM if _is_oom(e) else ERROR), _first_line(e)
    return rec


def _ms(rec: CopeRecord | None) -> str:
    if rec is None:
        return ""
    if rec.ms is None:
        return {OOM: "OOM", UNAVAILABLE: "n/a", WRONG: "wrong"}.get(rec.status, "err")
    return f"{rec.ms:.3f}" if rec.ms < 10 else f"{rec.ms:.1f}"


def _bytes(rec: CopeRecord | None) -> str:
    if rec is None or rec.temp_bytes is None:
        return ""
    n, unit = float(rec.temp_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"


def _ratio(num: CopeRecord | None, den: CopeRecord | None) -> str:
    if num is None or den is None or not num.ms or not den.ms:
        return "n/a"
    return f"{num.ms / den.ms:.2f}×"


def table(records: list[CopeRecord]) -> str:
    """Markdown: per (shape, pass) each impl's ms and temporaries, and our speed ratios."""
    header = ["shape", "pass", *(f"{i} ms" for i in IMPLS), *(f"{i} temp" for i in IMPLS)]
    header += ["best CoPE-XLA / ours", "ours / flash"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in dict.fromkeys((r.shape, r.pass_) for r in records):
        row = {r.impl: r for r in records if (r.shape, r.pass_) == key}
        xla = [row[i] for i in (XLA, XLA_REMAT) if i in row and row[i].ms]
        best_xla = min(xla, key=lambda r: r.ms) if xla else None
        cells = [key[0], key[1]]
        cells += [_ms(row.get(i)) for i in IMPLS] + [_bytes(row.get(i)) for i in IMPLS]
        cells += [_ratio(best_xla, row.get(OURS)), _ratio(row.get(OURS), row.get(FLASH))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _chart(records: list[CopeRecord], path: Path, title: str) -> None:
    """ms (top) and temporary bytes (bottom), one panel per pass, log scale, OOM marked."""
    from matplotlib.figure import Figure

    shapes = list(dict.fromkeys(r.shape for r in records))
    fig = Figure(figsize=(max(10, 2.2 * len(shapes)), 7))
    axes = fig.subplots(2, len(PASSES), squeeze=False)
    width = 0.8 / len(IMPLS)
    for col, pass_ in enumerate(PASSES):
        for row, (metric, ylabel) in enumerate((("ms", "ms"), ("temp_bytes", "temp bytes"))):
            ax = axes[row][col]
            for i, impl in enumerate(IMPLS):
                for j, shape in enumerate(shapes):
                    r = next(
                        (r for r in records if (r.impl, r.shape, r.pass_) == (impl, shape, pass_)),
                        None,
                    )
                    x = j + i * width
                    value = None if r is None else getattr(r, metric)
                    if r is not None and r.status == OOM and metric == "ms":
                        ax.text(
                            x, 0.02, "OOM", transform=ax.get_xaxis_transform(), rotation=90,
                            fontsize=6, ha="center", va="bottom",
                        )  # fmt: skip
                    if value:
                        ax.bar(x, value, width, color=f"C{i}", label=impl if j == 0 else None)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{pass_}", fontsize=9)
            ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, shapes, fontsize=6)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(records: list[CopeRecord], out: str | Path, iters: int) -> str:
    """`<out>.json` (records), `<out>.md` (table, failures, method), `<out>.png`; the table."""
    prefix = Path(out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps([r.to_json() for r in records], indent=1))
    text = table(records)
    device = records[0].device if records else "?"
    title = f"CoPE attention, causal, bf16 q/k/v, float32 table ({device}, jax {jax.__version__})"
    notes = [
        f"- {r.impl} {r.shape} {r.pass_}: {r.status}: {r.error}"
        for r in records
        if r.error and r.status != UNAVAILABLE
    ]
    missing = sorted({f"{r.impl}: {r.error}" for r in records if r.status == UNAVAILABLE})
    md = [f"# {title}", "", text, ""]
    if notes:
        md += ["Failures:", "", *notes, ""]
    if missing:
        md += ["Not run: " + "; ".join(missing) + ".", ""]
    md += [
        "Shapes (`pallas_kernels.cope_attention.shapes.BENCH`): H12 D64 N64 at 16k tokens "
        "per call (B = 16384 / T), the counting task's layer (B64 T511 H4 D64 N513) and "
        "GPT-2 small's (B8 T1024 H12 D64 N64). Impls: `cope-xla` = "
        "`cope.functional.cope_attention` under jit, `cope-xla remat` = the "
        "same inside `jax.checkpoint` (fwd+bwd only), `ours` = `pallas_kernels.cope_attention`, "
        "`flash` = `pallas_kernels.flash_attention` (no position term: the floor). fwd+bwd = "
        "gradients of Σ out·do with respect to q, k, v and the table (flash: q, k, v). ms = "
        "median of 5 repetitions of back-to-back calls (one sync each, about "
        f"{SAMPLE_MS:.0f} ms per repetition, at most {iters} calls); temp = "
        "`temp_size_in_bytes` of the compiled executable's memory analysis. Our kernel is "
        f"checked against CoPE-XLA before timing (relative error <= {TOLERANCE}; the whole "
        f"problem when B·T <= {CHECK_LEN}, else one sequence's first {CHECK_LEN} queries).",
        "",
    ]
    prefix.with_suffix(".md").write_text("\n".join(md))
    _chart(records, prefix.with_suffix(".png"), title)
    return text


def run(out: str | None = None, iters: int = 20, quick: bool = False) -> list[CopeRecord]:
    device = device_name()
    shapes = BENCH_QUICK if quick else BENCH
    iters = min(iters, 3) if quick else iters
    records = []
    for shape in shapes:
        for pass_ in PASSES:
            for name in IMPLS:
                rec = measure(name, shape, pass_, iters, device)
                if rec.status == UNAVAILABLE and name == XLA_REMAT:
                    continue
                status = f"{rec.ms:10.3f} ms" if rec.ms is not None else rec.status
                temp = _bytes(rec)
                print(
                    f"{shape.name:26s} {pass_:7s} {name:15s} {status:>14s} "
                    f"{temp:>11s} {rec.error or ''}",
                    flush=True,
                )
                records.append(rec)
    out = default_out("cope", quick) if out is None else out
    print(write_outputs(records, out, iters))
    print(f"wrote {Path(out).with_suffix('.json')} (.md, .png)")
    return records
