"""Synthetic tasks (flip-flop, selective copy, counting) behind one `make_task(name, **options)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from experiments.tasks.base import Batch, ErrorCounts, FixedTask, Task, error_counts, finalize
from experiments.tasks.counting import Counting
from experiments.tasks.flipflop import FlipFlop, FlipFlopHub, make_flipflop
from experiments.tasks.selective_copy import SelectiveCopy
from experiments.tasks.wikitext import WikiText

TASKS: dict[str, Callable[..., Task]] = {
    "flipflop": make_flipflop,
    "selective_copy": SelectiveCopy,
    "counting": Counting,
    "wikitext": WikiText,
}
# Options each task accepts (flipflop also takes `source`).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "flipflop": ("source", *inspect.signature(FlipFlop).parameters),
    "selective_copy": tuple(inspect.signature(SelectiveCopy).parameters),
    "counting": tuple(inspect.signature(Counting).parameters),
    "wikitext": tuple(inspect.signature(WikiText).parameters),
}


def make_task(name: str, **options: Any) -> Task:
    """Builds a task by name.

    Args:
        name: "flipflop", "selective_copy", "counting" or "wikitext".
        **options: task options, see FlipFlop (plus source="local"|"hub"), SelectiveCopy,
            Counting and WikiText. Unknown names or options raise a one-line ValueError.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(repr(t) for t in TASKS)}")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(_OPTIONS[name])
        raise ValueError(f"unknown option(s) {unknown} for task {name!r}; allowed: {allowed}")
    return TASKS[name](**options)


__all__ = [
    "TASKS",
    "Batch",
    "Counting",
    "ErrorCounts",
    "FixedTask",
    "FlipFlop",
    "FlipFlopHub",
    "SelectiveCopy",
    "Task",
    "WikiText",
    "error_counts",
    "finalize",
    "make_task",
]
