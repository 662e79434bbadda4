"""Counting task, exactly the official CoPE code's run (facebookresearch/RAM projects/cope).

    python -m experiments.train --config configs/counting.py:cope,nvars=3 --workdir runs/count3

4 layers, 256 wide, 4 heads, post-norm, ReLU, tied embeddings, dropout 0.1, Adam lr 7e-5 with no
schedule and no clipping, batch 64, 100 epochs of the 10k training samples (15,625 steps), loss
on the answer token only, CoPE npos 513 (block 512 + 1), position term divided by sqrt(d).
The paper's test errors by number of variables: `experiments.paper.COUNTING`.
"""

from configs.base import apply_common_options, base_config, parse_arg


def get_config(arg: str | None = None):
    variant, options = parse_arg(arg, {"nvars": int, "epochs": int})
    c = base_config("counting", variant)
    c.task.options.nvars = options.get("nvars", 3)
    epochs = options.get("epochs", 100)
    c.train.update(steps=-(-epochs * 10_000 // 64), eval_every=1563, checkpoint_every=1563)
    c.eval.update(num_examples=1000, final_num_examples=1000)
    c.model.npos = 513  # the official block_size + 1 (the model sees at most 511 inputs)
    if options.get("cpu"):
        c.task.options.update(ntrain=2000, ntest=200)
        c.train.update(steps=1000, learning_rate=1e-3)
    apply_common_options(c, options)
    if options.get("smoke"):
        c.task.options.update(ntrain=64, ntest=32, max_steps=40, block_size=64)
    c.lock()
    return c
