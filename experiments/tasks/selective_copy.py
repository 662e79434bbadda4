"""Selective copy (after Gu & Dao 2023, Mamba): copy the non-blank tokens after a separator."""

from __future__ import annotations

import string

import numpy as np

from experiments.tasks.base import Batch, Task, check_choice, check_int, next_token_batch

SPLITS = ("train", "val", "val_dense", "val_sparse")
# Blanks per sequence: 256 in distribution, fewer (dense) and more (sparse) out of distribution.
DEFAULT_BLANKS = {"train": 256, "val": 256, "val_dense": 128, "val_sparse": 512}
BLANK = "_"
SEPARATOR = "|"
MAX_SYMBOLS = len(string.ascii_uppercase)


class SelectiveCopy(Task):
    """Selective copy with `num_tokens` data tokens drawn from `num_symbols` symbols.

    A sequence is `num_tokens` data tokens (uniform over the symbols, repeats allowed) placed at
    uniformly random distinct positions among `blanks[split]` blanks, then one separator `|`,
    then the data tokens again in order: e.g. `_A__C_B|ACB`. Only the copy is scored: with
    next-token inputs the scored positions are the last `num_tokens` (the separator and the
    copy minus its last token as inputs). seq_len = 2 * num_tokens + blanks (288 for train).
    `sequence_error` (any wrong copied token) is the headline metric, `token_error` per token.
    Sequences fill their rows, so with `pack` a packed row is one sequence with one segment.
    """

    name = "selective_copy"
    splits = SPLITS
    token_separator = ""

    def __init__(
        self,
        *,
        num_tokens: int = 16,
        num_symbols: int = 16,
        train_blanks: int = DEFAULT_BLANKS["train"],
        val_blanks: int = DEFAULT_BLANKS["val"],
        dense_blanks: int = DEFAULT_BLANKS["val_dense"],
        sparse_blanks: int = DEFAULT_BLANKS["val_sparse"],
        eval_examples: int = 1024,
        pack: bool = False,
    ) -> None:
        self.num_tokens = check_int("num_tokens", num_tokens, minimum=1)
        self.num_symbols = check_int("num_symbols", num_symbols, minimum=1)
        if self.num_symbols > MAX_SYMBOLS:
            raise ValueError(f"num_symbols must be <= {MAX_SYMBOLS}, got {num_symbols!r}")
        self.blanks = {
            "train": check_int("train_blanks", train_blanks, minimum=0),
            "val": check_int("val_blanks", val_blanks, minimum=0),
            "val_dense": check_int("dense_blanks", dense_blanks, minimum=0),
            "val_sparse": check_int("sparse_blanks", sparse_blanks, minimum=0),
        }
        self.eval_examples = check_int("eval_examples", eval_examples, minimum=1)
        self.vocab = [*string.ascii_uppercase[: self.num_symbols], BLANK, SEPARATOR]
        self.blank_id = self.num_symbols
        self.separator_id = self.num_symbols + 1
        super().__init__(pack=pack)

    def seq_len(self, split: str) -> int:
        return 2 * self.num_tokens + self.blanks[check_choice("split", split, self.splits)]

    def num_examples(self, split: str) -> int:
        check_choice("split", split, self.splits)
        return self.eval_examples

    def _batch(self, split: str, n: int, seed_seq: np.random.SeedSequence) -> Batch:
        rng = np.random.default_rng(seed_seq)
        k = self.num_tokens
        width = k + self.blanks[split]  # the region holding data tokens and blanks
        data = rng.integers(0, self.num_symbols, size=(n, k), dtype=np.int32)  # [n, k]
        # k distinct uniformly random positions per row, in increasing order.
        keys = rng.random((n, width))
        positions = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)  # [n, k]
        region = np.full((n, width), self.blank_id, dtype=np.int32)
        np.put_along_axis(region, positions, data, axis=1)
        separator = np.full((n, 1), self.separator_id, dtype=np.int32)
        tokens = np.concatenate([region, separator, data], axis=1)  # [n, 2k + blanks + 1]
        scored = np.zeros(tokens.shape, dtype=bool)
        scored[:, -k:] = True
        return next_token_batch(tokens, scored)
