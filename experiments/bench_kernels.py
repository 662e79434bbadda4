"""Kernel microbenchmarks: `python -m experiments.bench_kernels {attention,cope,decode,generate}`.

Results go to runs/bench/bench_<bench>_<device>[_quick].{json,md,png} unless --out names a
prefix; committed results in experiments/results/ change only when --out names them.
"""

import argparse
import importlib

BENCHES = {
    "attention": "experiments.bench.attention",
    "cope": "experiments.bench.cope",
    "decode": "experiments.bench.decode",
    "generate": "experiments.bench.generate",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument(
        "--out",
        default=None,
        help="output prefix for .json/.md/.png (default: runs/bench/bench_<bench>_<device>"
        "[_quick], never experiments/results/ unless named here)",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a CPU smoke run")
    args = parser.parse_args(argv)
    module = importlib.import_module(BENCHES[args.bench])
    module.run(out=args.out, iters=args.iters, quick=args.quick)


if __name__ == "__main__":
    main()
