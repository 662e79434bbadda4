"""The CoPE paper's reported numbers (arXiv 2405.18719): the one copy every table and plot reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Test error (%) on the reads, Table 2: in distribution (val, FFL(0.8)) and OOD (val_sparse,
# FFL(0.98)).
FLIPFLOP = {
    "absolute": {"val": 6.8, "val_sparse": 21.7},
    "rope": {"val": 1.8, "val_sparse": 20.3},
    "cope": {"val": 0.0, "val_sparse": 4.9},
}
# Selective copy, Table 2: error (%) in distribution, OOD dense, OOD sparse.
SELECTIVE_COPY = {
    "absolute": {"val": 16.9, "val_dense": 25.6, "val_sparse": 85.2},
    "rope": {"val": 40.1, "val_dense": 100.0, "val_sparse": 100.0},
    "cope": {"val": 0.0, "val_dense": 0.0, "val_sparse": 0.0},
}
# Counting, Table 3: test error (%) by number of variables, mean of 3 seeds.
COUNTING = {
    "absolute": {1: 5.3, 3: 67.6, 5: 71.5},
    "relative": {1: 1.1, 3: 17.8, 5: 22.4},
    "cope": {1: 0.0, 3: 1.2, 5: 7.4},
}
# WikiText-103, GPT-2 small at T=1024 with npos 64, Table 4: perplexity on valid and test.
WIKITEXT103 = {
    "absolute": {"valid": 23.96, "test": 24.87},
    "relative": {"valid": 22.90, "test": 23.81},
    "cope": {"valid": 22.55, "test": 23.46},
    "cope+relative": {"valid": 22.31, "test": 23.23},
}
# Fig. 3, read off the plot: valid perplexity at evaluation length T' of models trained at
# T=1024 on WikiText-103.
WIKITEXT103_EXTRAPOLATION = {
    "relative": {1024: 22.90, 1536: 22.31, 2048: 22.09, 2560: 21.96},
    "cope": {1024: 22.55, 1536: 21.96, 2048: 21.70, 2560: 21.56},
}

# What the numbers of each task measure: error in percent, or perplexity.
METRIC = {
    "flipflop": "token_error",
    "selective_copy": "token_error",
    "counting": "token_error",
    "wikitext": "perplexity",
}
SOURCE = {
    "flipflop": "Table 2",
    "selective_copy": "Table 2",
    "counting": "Table 3",
    "wikitext": "Table 4 (WikiText-103, GPT-2 small)",
}


def reported(task: str, encoding: str, options: Mapping[str, Any]) -> dict[str, float]:
    """The paper's number for each split of a `task` run with `encoding` ({} when it reports
    none): errors in percent, perplexities as they are. `options` are the run's task options
    (counting's `nvars` picks the column; WikiText numbers exist for WikiText-103 only)."""
    if task == "flipflop":
        return dict(FLIPFLOP.get(encoding, {}))
    if task == "selective_copy":
        return dict(SELECTIVE_COPY.get(encoding, {}))
    if task == "counting":
        value = COUNTING.get(encoding, {}).get(options.get("nvars"))
        return {} if value is None else {"test": value}
    if task == "wikitext" and options.get("dataset") == "wikitext-103":
        return dict(WIKITEXT103.get(encoding, {}))
    return {}


def as_metric(task: str, metrics: Mapping[str, float]) -> float:
    """The number of one split's metrics (an evaluation's dict) in the paper's unit."""
    if METRIC[task] == "perplexity":
        return float(metrics["perplexity"])
    return 100.0 * float(metrics["token_error"])
