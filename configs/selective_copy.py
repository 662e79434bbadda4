"""Selective copy (Gu & Dao 2023 style), the CoPE paper's Table 2.

    python -m experiments.train --config configs/selective_copy.py:cope --workdir runs/sc_cope

16 data tokens among 256 blanks (train/val), 128 (val_dense) and 512 (val_sparse); the paper's
errors are `experiments.paper.SELECTIVE_COPY`.
Model 4 layers / 256 / 4 heads; optimiser (not in the paper) Adam 3e-4, cosine, our choice.
"""

from configs.base import apply_common_options, base_config, parse_arg


def get_config(arg: str | None = None):
    variant, options = parse_arg(arg, {})
    c = base_config("selective_copy", variant)
    c.train.update(learning_rate=3e-4, warmup_steps=500, schedule="cosine", grad_clip=1.0)
    if options.get("cpu"):
        c.task.options.update(train_blanks=32, val_blanks=32, dense_blanks=16, sparse_blanks=64)
        c.train.update(steps=1500, learning_rate=1e-3, warmup_steps=100)
    apply_common_options(c, options)
    if options.get("smoke"):
        c.task.options.update(
            train_blanks=16, val_blanks=16, dense_blanks=8, sparse_blanks=32, num_tokens=4
        )
    c.lock()
    return c
