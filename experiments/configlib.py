"""Loading `configs/<task>.py:<variant>` files, applying `--config.a.b=value` overrides and
checking the training and evaluation fields."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import ml_collections

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/counting.py:cope,nvars=3' -> the locked ConfigDict its get_config returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ValueError(
            f"config file {path!r} has a syntax error at line {error.lineno}: {error.msg}"
        ) from None
    except Exception as error:  # noqa: BLE001 - any failure while running the file is its own
        raise ValueError(
            f"config file {path!r} failed to load ({type(error).__name__}: {error})"
        ) from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(arg) function")
    return module.get_config(arg or None)


def _parse_value(field: str, text: str, current):
    """Parses `text` as the type of the field's current value; raises naming the field."""
    kind = type(current)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        value = ast.literal_eval(text)
        if current is not None and not isinstance(value, kind):
            raise ValueError
        return value
    except (ValueError, SyntaxError):
        raise ValueError(f"config field {field} expects {kind.__name__}, got {text!r}") from None


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies 'train.steps=2000' to `config`; unknown or ill-typed fields raise a ValueError."""
    field, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"config override must be field=value, got {assignment!r}")
    *parents, leaf = field.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ValueError(f"unknown config field {'.'.join(parents[: i + 1])!r}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"unknown config field {field!r}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"config field {field!r} is a group; set one of its fields")
    with config.unlocked() if config.is_locked else _null():
        node[leaf] = _parse_value(field, text, current)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x.y=v` / `--config.x.y v` overrides from the other arguments."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ValueError(f"config override {arg} has no value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def _check(field: str, value, what: str, ok) -> None:
    """One ValueError naming `field` unless `value` is a finite number (an int where `what` says
    so) for which ok(value) holds."""
    kind = int if what.startswith("an integer") else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"config field {field} must be {what}, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks the train.* and eval.* fields before anything is built or written: one ValueError
    naming the first bad field. Model fields are checked by ModelConfig, task options by the
    task."""
    rules = {
        "an integer >= 1": (lambda v: v >= 1, "train.steps", "train.batch_size",
                            "train.keep_checkpoints", "eval.batch_size", "eval.num_examples",
                            "eval.final_num_examples"),
        # An interval of 0 means "at the last step only"; 0 warm-up steps means none.
        "an integer >= 0": (lambda v: v >= 0, "train.warmup_steps", "train.log_every",
                            "train.eval_every", "train.checkpoint_every", "train.seed",
                            "eval.seed"),
        # grad_clip 0: no clipping.
        "a number >= 0": (lambda v: v >= 0, "train.learning_rate", "train.weight_decay",
                          "train.grad_clip"),
        "a number in [0, 1)": (lambda v: 0 <= v < 1, "train.b1", "train.b2"),
        # eps = 0 divides 0 by 0 for every parameter whose gradient is exactly zero.
        "a number > 0": (lambda v: v > 0, "train.eps"),
    }  # fmt: skip
    for what, (ok, *fields) in rules.items():
        for field in fields:
            section, name = field.split(".")
            _check(field, config[section][name], what, ok)
    train = config.train
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"config field train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}"
        )
    if train.schedule not in SCHEDULES:
        raise ValueError(
            f"config field train.schedule must be one of {SCHEDULES}, got {train.schedule!r}"
        )
    if not isinstance(train.fsdp, bool):
        raise ValueError(f"config field train.fsdp must be True or False, got {train.fsdp!r}")
