"""WikiText language modelling, the CoPE paper's Table 4 and Fig. 3 (context extrapolation).

    python -m experiments.train --config configs/wikitext.py:cope --workdir runs/wt2_cope
    python -m experiments.train --config configs/wikitext.py:cope,size=gpt2_small \
        --workdir runs/wt103_cope
    python -m experiments.extrapolate --workdir runs/wt2_cope --lengths 1.0,1.5,2.0,2.5

Variants: abs, rel (relative, capped beyond T: the paper's "Relative-capped"), rope, cope,
cope_rel, cope_rope (any of configs/base.py's VARIANTS works). Sizes (`size=`):
- `small` (default): 6 layers, 512 wide, 8 heads, T=512, CoPE npos 64, pre-norm, GELU, tied
  embeddings, word-level WikiText-2 (33,278 types) from ../shared/data/wikitext/wikitext-2;
  2,000 steps of 32 x 512 tokens (about 16 epochs), minutes on one H100. Our own setting, for a
  quick comparison of encodings; no paper numbers exist for it.
- `gpt2_small`: the paper's shape (cope.model.GPT2_SMALL: 12 layers, 768 wide, 12 heads,
  T=1024, npos 64, pre-norm, GELU, tied embeddings) on WikiText-103 from the hub
  (`wikitext-103-raw-v1`) with a byte-level BPE of 50,257 tokens trained on its training split.
  The paper used GPT-2's own BPE, so perplexities are comparable in kind, not digit for digit.
  Offline, `source=local,dataset=wikitext-2` trains the same model on the local WikiText-2.
Options: `tok=word|bpe`, `source=local|hub`, `dataset=wikitext-2|wikitext-103`, `seq_len=`,
`stride=` (evaluation stride, default non-overlapping), plus base's smoke/cpu/seed/steps/...

The paper's perplexities (Table 4, WikiText-103, GPT-2 small, T=1024) and its Fig. 3
extrapolation curves: `experiments.paper.WIKITEXT103` and `WIKITEXT103_EXTRAPOLATION`.

The paper gives no optimiser settings. Ours: AdamW (b2 0.95, weight decay 0.1), linear warm-up
then cosine decay to 10%, global-norm clipping 1.0, dropout 0.1, bf16 compute.
"""

from configs.base import TASK_MODEL_FIELDS, apply_common_options, base_config, parse_arg
from cope.model import GPT2_SMALL

SIZES = ("small", "gpt2_small")


def get_config(arg: str | None = None):
    variant, options = parse_arg(
        arg, {"size": str, "tok": str, "source": str, "dataset": str, "seq_len": int, "stride": int}
    )
    size = options.get("size", "small")
    if size not in SIZES:
        raise ValueError(f"config option size must be one of {SIZES}, got {size!r}")
    c = base_config("wikitext", variant)
    c.task.options.update(
        dataset="wikitext-2",
        source="local",
        data_dir="",
        tokenizer="word",
        seq_len=512,
        eval_seq_len=0,
        eval_stride=0,
        bpe_vocab_size=50_257,
        bpe_train_lines=0,
        cache_dir="",
    )
    c.model.update(
        num_layers=6,
        d_model=512,
        num_heads=8,
        npos=64,
        post_norm=False,
        mlp="gelu",
        tie_embeddings=True,
        dropout=0.1,
    )
    c.train.update(
        optimizer="adamw",
        learning_rate=1e-3,
        b2=0.95,
        weight_decay=0.1,
        warmup_steps=200,
        schedule="cosine",
        grad_clip=1.0,
        steps=2000,
        batch_size=32,
        log_every=50,
        eval_every=250,
        checkpoint_every=500,
    )
    # Periodic evaluations read the first 64 windows of each split; the final one reads up to
    # 8192, i.e. all of valid and test (426 / 480 windows here) for the whole-split perplexity.
    c.eval.update(batch_size=32, num_examples=64, final_num_examples=8192)
    if size == "gpt2_small":
        c.task.options.update(dataset="wikitext-103", source="hub", tokenizer="bpe", seq_len=1024)
        # The window length sets max_len (the task's seq_len below).
        c.model.update({k: v for k, v in GPT2_SMALL.items() if k not in TASK_MODEL_FIELDS})
        c.train.update(
            learning_rate=6e-4,
            warmup_steps=2000,
            steps=50_000,
            batch_size=32,
            eval_every=2500,
            checkpoint_every=2500,
            log_every=100,
        )
        c.eval.update(batch_size=16)
    if "tok" in options:
        c.task.options.tokenizer = options["tok"]
    for name in ("source", "dataset", "seq_len"):
        if name in options:
            c.task.options[name] = options[name]
    if "stride" in options:
        c.task.options.eval_stride = options["stride"]
    if options.get("cpu"):
        c.task.options.seq_len = options.get("seq_len", 128)
        c.train.update(steps=500, learning_rate=1e-3, warmup_steps=50)
    apply_common_options(c, options)
    if options.get("smoke"):
        c.task.options.seq_len = options.get("seq_len", 32)
        c.model.npos = 16
        c.train.update(warmup_steps=2)
        c.eval.update(batch_size=16, num_examples=16, final_num_examples=32)
        if c.task.options.tokenizer == "bpe":  # a small BPE on a slice keeps CI fast
            c.task.options.update(bpe_vocab_size=512, bpe_train_lines=2000)
    c.lock()
    return c
