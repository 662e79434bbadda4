"""Where CoPE attention's time goes: forward and forward+backward of its pieces, one layer.

    python -m experiments.bench.cope_parts [--batch 64 --seq 512 --heads 4 --head-dim 64 \
        --npos 513] [--out experiments/results/cope_parts]

Defaults are the counting task's layer (bf16 q/k/v). Pieces: plain causal attention (the
floor), the whole CoPE attention, the gates' suffix sums (cumsum, and the same as a bf16x2
triangular matmul), the position-logit interpolation, and the gather inside it with its
scatter-add gradient. Prints a table; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from cope import functional as F
from experiments.bench.common import device_name, time_pipelined


def suffix_sums_matmul(gates: jax.Array) -> jax.Array:
    """Suffix sums over the last axis as two bf16 matmuls (hi + lo split) with a triangular
    ones matrix: float32-accurate to ~2^-16 relative, on tensor cores."""
    s = gates.shape[-1]
    upper = (jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]).astype(jnp.bfloat16)  # [m, j]
    hi = gates.astype(jnp.bfloat16)
    lo = (gates - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    dot = lambda x: jnp.einsum("...m,mj->...j", x, upper, preferred_element_type=jnp.float32)
    return dot(hi) + dot(lo)


def pieces(b: int, t: int, h: int, d: int, n: int) -> dict[str, tuple]:
    """{name: (function to jit, args)}; each function returns a scalar or gradients."""
    keys = jax.random.split(jax.random.key(0), 6)
    q, k, v = (jax.random.normal(keys[i], (b, t, h, d), jnp.bfloat16) for i in range(3))
    table = 0.1 * jax.random.normal(keys[3], (n, d), jnp.float32)
    mask = F.attention_mask(t, t, causal=True)
    gates = jnp.where(mask, jax.random.uniform(keys[4], (b, h, t, t), jnp.float32), 0.0)
    z = jax.random.normal(keys[5], (b, h, t, n), jnp.float32)
    positions = F.cope_positions(gates, n)
    index = jnp.floor(positions).astype(jnp.int32)

    def plain(q, k, v):
        return F.attention(q, k, v, causal=True).astype(jnp.float32).sum()

    def cope(q, k, v, table):
        return F.cope_attention(q, k, v, table, causal=True).astype(jnp.float32).sum()

    def cumsum(g):
        return (F.cope_positions(g, n) ** 2).sum()

    def matmul(g):
        return (suffix_sums_matmul(g) ** 2).sum()

    def interpolate(z, p):
        return (F.interpolate_position_logits(z, p) ** 2).sum()

    def gather(z):
        return (jnp.take_along_axis(z, index, -1) ** 2).sum()

    return {
        "plain causal attention": (plain, (q, k, v), (0, 1, 2)),
        "CoPE attention": (cope, (q, k, v, table), (0, 1, 2, 3)),
        "suffix sums (cumsum)": (cumsum, (gates,), (0,)),
        "suffix sums (bf16x2 matmul)": (matmul, (gates,), (0,)),
        "interpolation (pair gather)": (interpolate, (z, positions), (0, 1)),
        "gather alone / scatter-add grad": (gather, (z,), (0,)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--npos", type=int, default=513)
    parser.add_argument("--out", default=None, help="output prefix for .json")
    args = parser.parse_args(argv)
    shape = f"B{args.batch} T{args.seq} H{args.heads} D{args.head_dim} npos{args.npos}"
    print(f"{device_name()}, jax {jax.__version__}, {shape}")
    print("| piece | forward ms | forward + backward ms |\n|---|---|---|")
    rows = []
    for name, (fn, fn_args, argnums) in pieces(
        args.batch, args.seq, args.heads, args.head_dim, args.npos
    ).items():
        fwd = time_pipelined(jax.jit(fn), *fn_args)
        both = time_pipelined(jax.jit(jax.grad(fn, argnums=argnums)), *fn_args)
        rows.append({"piece": name, "fwd_ms": fwd, "fwd_bwd_ms": both})
        print(f"| {name} | {fwd:.3f} | {both:.3f} |", flush=True)
    if args.out:
        out = Path(args.out).with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": device_name(), "jax": jax.__version__, "shape": shape, "rows": rows}
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
