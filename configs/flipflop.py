"""Flip-flop language modelling (Liu et al. 2023), the CoPE paper's Table 2.

    python -m experiments.train --config configs/flipflop.py:cope --workdir runs/flipflop_cope

Paper setting: 4 layers, 256 wide, 4 heads, 10k steps, FFL(0.8) training, error on the reads of
`val` (in-distribution) and `val_sparse` FFL(0.98) (OOD); the paper's errors are
`experiments.paper.FLIPFLOP`. The optimiser is not given in the paper:
Adam 3e-4 with 500 warm-up steps and cosine decay, batch 64, dropout 0.1 is our choice.
Option `pairs=<int>` shortens the sequences (256 pairs = 512 tokens by default); `source=hub`
trains and evaluates on the hub's synthseq/flipflop (needs `datasets` and network) instead of
the local generator.
"""

from configs.base import apply_common_options, base_config, parse_arg


def get_config(arg: str | None = None):
    variant, options = parse_arg(arg, {"pairs": int, "source": str})
    c = base_config("flipflop", variant)
    c.task.options.source = options.get("source", "local")
    c.task.options.num_pairs = options.get("pairs", 256)
    c.train.update(learning_rate=3e-4, warmup_steps=500, schedule="cosine", grad_clip=1.0)
    c.eval.update(final_num_examples=16384)
    if options.get("cpu"):
        c.task.options.num_pairs = options.get("pairs", 64)
        c.train.update(steps=1500, learning_rate=1e-3, warmup_steps=100)
    apply_common_options(c, options)
    if options.get("smoke"):
        c.task.options.num_pairs = options.get("pairs", 16)
    c.lock()
    return c
