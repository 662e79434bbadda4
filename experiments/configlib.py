"""Loading `configs/<task>.py:<variant>` files and applying `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/counting.py:cope,nvars=3' -> the locked ConfigDict its get_config returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
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
