"""Shared experiment config: model, optimiser, evaluation; variants after ':' pick the encoding.

A config string is `<file>.py:<variant>[,<option>...]`, e.g. `configs/counting.py:cope,nvars=3`.
Variants: abs, sin, rope, rel, cope, nope, cope_rope, cope_rel. Options common to every task:
`smoke` (tiny, about a minute on CPU), `cpu` (small, a few minutes on 2 CPU cores),
`seed=<int>`, `steps=<int>`, `fsdp`, `pallas` (flash-attention kernel for attention), `pack`
(training rows packed with several examples each, `task.options.pack`). A task file adds its own
options (e.g. counting's `nvars`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from cope.model import ModelConfig

# The layout of the ConfigDicts below; config.json records it, and a run written by another
# layout is refused by name rather than read with fields that mean something else.
LAYOUT = 2
# ModelConfig fields that come from the task, not from the config.
TASK_MODEL_FIELDS = ("vocab_size", "max_len")

VARIANTS = {
    "abs": "absolute",
    "sin": "sinusoidal",
    "rope": "rope",
    "rel": "relative",
    "cope": "cope",
    "nope": "none",
    "cope_rope": "cope+rope",
    "cope_rel": "cope+relative",
}


def parse_arg(arg: str | None, task_options: dict) -> tuple[str, dict]:
    """'cope,nvars=3,smoke' -> ('cope', {'nvars': 3, 'smoke': True}); bad parts raise."""
    parts = [p for p in (arg or "cope").split(",") if p]
    variant, options = parts[0], {}
    if variant not in VARIANTS:
        raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    known = {
        "smoke": bool,
        "cpu": bool,
        "fsdp": bool,
        "pallas": bool,
        "seed": int,
        "steps": int,
        "pack": bool,
    } | task_options
    for part in parts[1:]:
        name, _, value = part.partition("=")
        if name not in known:
            raise ValueError(f"config option {name!r} unknown; known options: {sorted(known)}")
        kind = known[name]
        if kind is bool:
            options[name] = value.lower() not in ("0", "false", "no") if value else True
        else:
            try:
                options[name] = kind(value)
            except ValueError:
                raise ValueError(
                    f"config option {name} expects {kind.__name__}, got {value!r}"
                ) from None
    return variant, options


def base_config(task: str, variant: str) -> ml_collections.ConfigDict:
    """The paper's synthetic-task setup (the official counting run.sh), before task overrides."""
    c = ml_collections.ConfigDict()
    c.layout = LAYOUT
    c.task = ml_collections.ConfigDict(
        dict(name=task, options=ml_collections.ConfigDict(dict(pack=False)))
    )
    c.variant = variant
    # Every ModelConfig field but the two the task sets (vocab_size, max_len), at ModelConfig's
    # defaults (None included) unless the paper's setup differs.
    c.model = ml_collections.ConfigDict(
        {
            field.name: field.default
            for field in dataclasses.fields(ModelConfig)
            if field.name not in TASK_MODEL_FIELDS
        }
    )
    c.model.update(dropout=0.1, dtype="bfloat16", encoding=VARIANTS[variant])
    c.train = ml_collections.ConfigDict(
        dict(
            seed=1,
            steps=10_000,
            batch_size=64,
            optimizer="adam",
            learning_rate=7e-5,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            warmup_steps=0,
            schedule="constant",
            grad_clip=0.0,
            log_every=100,
            eval_every=1000,
            checkpoint_every=1000,
            keep_checkpoints=3,
            fsdp=False,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            batch_size=256,
            num_examples=1024,  # per split for the periodic evaluations
            final_num_examples=4096,  # per split for the final evaluation (results.json)
            seed=0,
        )
    )
    return c


def apply_common_options(c: ml_collections.ConfigDict, options: dict) -> None:
    """Applies smoke/cpu/seed/steps/fsdp/pallas; task files handle their own options first."""
    if options.get("cpu"):
        c.model.update(num_layers=2, d_model=64, num_heads=2, dropout=0.0, dtype="float32")
        c.train.update(batch_size=32, log_every=50, eval_every=500, checkpoint_every=500)
        c.eval.update(batch_size=128, num_examples=256, final_num_examples=1024)
    if options.get("smoke"):
        c.model.update(num_layers=1, d_model=32, num_heads=2, dtype="float32")
        c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, checkpoint_every=10)
        c.eval.update(batch_size=32, num_examples=32, final_num_examples=64)
    if "seed" in options:
        c.train.seed = options["seed"]
    if "steps" in options:
        c.train.steps = options["steps"]
    if options.get("fsdp"):
        c.train.fsdp = True
    if options.get("pallas"):
        c.model.attention_impl = "pallas"
    if options.get("pack"):
        c.task.options.pack = True
