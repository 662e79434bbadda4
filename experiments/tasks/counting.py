"""Counting: the CoPE paper's variable-counting task, a port of RAM's scripts/count_data_gen.py."""

from __future__ import annotations

import bisect
import functools
import random
import string

import numpy as np

from experiments.tasks.base import Batch, FixedTask, check_choice, check_int, next_token_batch

SPLITS = ("train", "valid", "test")
VARIABLE_NAMES = string.ascii_lowercase
MAX_VAL = 10
# Statement weights SET 1, DUMMY ("pass;") 50, INCREMENT 7, as cumulative weights for bisect.
SET, DUMMY, INCREMENT = range(3)
CUM_WEIGHTS = (1.0, 51.0, 58.0)
STATEMENT_TRIALS = 100
SAMPLE_TRIALS = 1000
PAD, START = "<pad>", "<sta>"


class GenerationFail(Exception):
    """A statement or sample that the generator rejects and redraws."""


def _statement(rng: random.Random, var_names: str, state: dict[str, int]) -> str:
    """One statement; mutates `state`. Rejections redraw the statement kind, as upstream."""
    for _ in range(STATEMENT_TRIALS):
        op = bisect.bisect(CUM_WEIGHTS, rng.random() * CUM_WEIGHTS[-1], 0, 2)
        if op == SET:
            var = rng.choice(var_names)
            state[var] = 0
            return f"{var} = 0 ;"
        if op == DUMMY:
            return "pass;"
        if not state:  # INCREMENT needs a variable that has been set
            continue
        var = rng.choice(list(state))  # dict order = order of first SET, as upstream
        if state[var] + 1 > MAX_VAL:
            continue
        state[var] += 1
        return f"{var} ++;"
    raise RuntimeError("counting: failed to generate a statement too many times")


def _try_sample(rng: random.Random, nvars: int, max_steps: int) -> dict[str, str]:
    nsteps = rng.randint(3, max_steps)
    state: dict[str, int] = {}
    var_names = VARIABLE_NAMES[:nvars]
    context = " ".join(_statement(rng, var_names, state) for _ in range(nsteps))
    if not state:
        raise GenerationFail
    var = rng.choice(list(state))
    return {"context": context, "question": f"print {var}", "answer": str(state[var])}


def generate_sample(rng: random.Random, nvars: int, max_steps: int) -> dict[str, str]:
    """One sample {context, question, answer}, with the upstream retry logic and RNG call order.

    Drawing from `random.Random(s)` reproduces upstream's output under `random.seed(s)`.
    """
    for _ in range(SAMPLE_TRIALS):
        try:
            return _try_sample(rng, nvars, max_steps)
        except GenerationFail:
            continue
    raise RuntimeError("counting: failed to generate a sample too many times")


def tokenize(text: str) -> list[str]:
    """Upstream SimpleTokenizer: lowercase, split off `. , ?`, split on whitespace."""
    text = text.strip().lower()
    for p in ".,?":
        text = text.replace(p, f" {p}")
    return text.split()


def make_vocab(nvars: int) -> list[str]:
    """Fixed vocabulary: upstream's reserved <pad>=0, <sta>=1, then every token the data can hold.

    Upstream builds the vocabulary in order of appearance; a fixed order only permutes ids.
    """
    keywords = ["=", ";", "pass;", "++;", "print"]
    values = [str(v) for v in range(MAX_VAL + 1)]
    return [PAD, START, *keywords, *VARIABLE_NAMES[:nvars], *values]


def _split_rng(data_seed: int, split_index: int) -> random.Random:
    state = np.random.SeedSequence([data_seed, split_index]).generate_state(4, np.uint32)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


@functools.lru_cache(maxsize=16)
def generate_split(
    nvars: int, max_steps: int, size: int, data_seed: int, split_index: int
) -> tuple[dict[str, str], ...]:
    """The `size` samples of one split; cached, as the generator is sequential Python."""
    rng = _split_rng(data_seed, split_index)
    return tuple(generate_sample(rng, nvars, max_steps) for _ in range(size))


@functools.lru_cache(maxsize=16)
def encode_split(
    nvars: int, max_steps: int, size: int, data_seed: int, split_index: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one split, left-truncated to `block_size` and right-padded.

    Returns:
        tokens [size, block_size] uint8 (pad = 0) and lengths [size] int32 (after truncation).
    """
    vocab = {tok: i for i, tok in enumerate(make_vocab(nvars))}
    samples = generate_split(nvars, max_steps, size, data_seed, split_index)
    tokens = np.zeros((size, block_size), dtype=np.uint8)
    lengths = np.zeros(size, dtype=np.int32)
    for row, s in enumerate(samples):
        words = tokenize(s["context"]) + tokenize(s["question"]) + tokenize(s["answer"])
        ids = [vocab[w] for w in words[-block_size:]]  # upstream collator: x[-max_len:]
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
    tokens.setflags(write=False)
    lengths.setflags(write=False)
    return tokens, lengths


class Counting(FixedTask):
    """Counting with `nvars` variables, generated exactly as RAM's count_data_gen.py.

    Data: each split is a fixed set (train 10k, valid 1k, test 1k by default) generated once
    from (data_seed, split index) with Python's `random` in upstream's call order, and cached
    in memory. Each sample is `context question answer` (e.g. `a = 0 ; pass; a ++; print a 1`)
    in whitespace tokens, truncated from the left to `block_size` (512) tokens as upstream's
    collator does, then right-padded with `<pad>` (id 0, `pad_id`). No BOS, as upstream.

    Batches: inputs = tokens[:-1], targets = tokens[1:], so seq_len = block_size - 1 = 511, the
    most inputs upstream's model ever sees. Only the answer is scored (one position per row,
    the last real input); padding is never scored. token_error == sequence_error == upstream's
    `answer/error`. The train stream is epochs of the 10k set, see `FixedTask`.

    With `pack`, training rows hold several programs each (best fit over the training set,
    about 1.6 per row), which cuts the padding of the default set from about 38% to about 2%.
    """

    name = "counting"
    splits = SPLITS
    token_separator = " "
    pad_id = 0

    def __init__(
        self,
        *,
        nvars: int = 3,
        max_steps: int = 512,
        block_size: int = 512,
        ntrain: int = 10_000,
        ntest: int = 1_000,
        data_seed: int = 0,
        pack: bool = False,
    ) -> None:
        if isinstance(nvars, bool) or not isinstance(nvars, int | np.integer) or not 0 < nvars < 27:
            raise ValueError(
                f"nvars must be an integer in 1..26 (the paper uses 1, 3, 5), got {nvars!r}"
            )
        self.nvars = int(nvars)
        self.max_steps = check_int("max_steps", max_steps, minimum=3)
        self.block_size = check_int("block_size", block_size, minimum=2)
        self.sizes = {
            "train": check_int("ntrain", ntrain, minimum=1),
            "valid": check_int("ntest", ntest, minimum=1),
            "test": check_int("ntest", ntest, minimum=1),
        }
        self.data_seed = check_int("data_seed", data_seed, minimum=0)
        self.vocab = make_vocab(nvars)
        super().__init__(pack=pack)

    def seq_len(self, split: str) -> int:
        check_choice("split", split, self.splits)
        return self.block_size - 1

    def num_examples(self, split: str) -> int:
        return self.sizes[check_choice("split", split, self.splits)]

    def examples(self, split: str) -> tuple[dict[str, str], ...]:
        """The raw samples {context, question, answer} of `split`, in upstream's jsonl format."""
        index = self._split_index(split)
        return generate_split(self.nvars, self.max_steps, self.sizes[split], self.data_seed, index)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """tokens [size, block_size] uint8 and lengths [size] of `split` (read-only, cached)."""
        index = self._split_index(split)
        return encode_split(
            self.nvars, self.max_steps, self.sizes[split], self.data_seed, index, self.block_size
        )

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)

    def _rows(self, split: str, indices: np.ndarray) -> Batch:
        tokens, lengths = self.arrays(split)
        tokens, lengths = tokens[indices].astype(np.int32), lengths[indices]  # [n, L], [n]
        scored = np.zeros(tokens.shape, dtype=bool)
        scored[np.arange(len(indices)), lengths - 1] = True  # the answer, always the last token
        return next_token_batch(tokens, scored)
