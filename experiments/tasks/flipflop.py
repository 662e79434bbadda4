"""Flip-flop language modelling, FFL(p) of Liu et al. 2023 (arXiv 2306.00946)."""

from __future__ import annotations

import numpy as np

from experiments.tasks.base import (
    Batch,
    DataUnavailable,
    FixedTask,
    Task,
    check_choice,
    check_int,
    check_probability,
    next_token_batch,
)

# The tokenisation of the synthseq/flipflop dataset card: {'w':0,'r':1,'i':2,'0':3,'1':4}.
VOCAB = ["w", "r", "i", "0", "1"]
WRITE, READ, IGNORE, ZERO, ONE = range(5)
SPLITS = ("train", "val", "val_dense", "val_sparse")
# Ignore probability p_i of each split (FFL(0.8) in distribution, FFL(0.1) dense, FFL(0.98) sparse).
DEFAULT_P_IGNORE = {"train": 0.8, "val": 0.8, "val_dense": 0.1, "val_sparse": 0.98}
# Split sizes of synthseq/flipflop; the default number of eval examples per split.
HUB_SIZES = {"train": 1_600_000, "val": 16_000, "val_dense": 4_000, "val_sparse": 160_000}
HUB_NAME = "synthseq/flipflop"
SOURCES = ("local", "hub")


def generate(rng: np.random.Generator, n: int, num_pairs: int, p_ignore: float) -> np.ndarray:
    """Draws n FFL(p_ignore) strings of `num_pairs` (instruction, bit) pairs.

    Instructions are i.i.d. with p_i = p_ignore and p_w = p_r = (1 - p_i) / 2, except that the
    first is a write and the last a read. Write and ignore bits are uniform; a read's bit is the
    most recently written bit.

    Returns:
        [n, 2 * num_pairs] int32 token ids, instruction at even positions and bit at odd ones.
    """
    u = rng.random((n, num_pairs))
    instr = np.where(u < p_ignore, IGNORE, np.where(u < (1.0 + p_ignore) / 2, WRITE, READ))
    instr[:, 0] = WRITE
    instr[:, -1] = READ
    bits = rng.integers(0, 2, size=(n, num_pairs))  # [n, P]
    # Index of the latest write at or before each pair; pair 0 is always a write.
    last_write = np.maximum.accumulate(
        np.where(instr == WRITE, np.arange(num_pairs), 0), axis=1
    )  # [n, P]
    bits = np.where(instr == READ, np.take_along_axis(bits, last_write, axis=1), bits)
    tokens = np.empty((n, 2 * num_pairs), dtype=np.int32)
    tokens[:, 0::2] = instr
    tokens[:, 1::2] = bits + ZERO
    return tokens


def read_bits_scored(tokens: np.ndarray) -> np.ndarray:
    """[n, L] bool: True at the bits that follow a read (the only deterministic tokens)."""
    scored = np.zeros(tokens.shape, dtype=bool)
    scored[:, 1::2] = tokens[:, 0::2] == READ
    return scored


class FlipFlop(Task):
    """FFL(p) generated on the fly (the default, `source="local"`).

    Sequences are 2 * num_pairs tokens (512 by default), so inputs and targets have width
    seq_len = 2 * num_pairs - 1 = 511: the last input is the final `r`, whose target bit is
    scored. Only bits after `r` are scored; `token_error` is the error per read and
    `sequence_error` the fraction of sequences with any wrong read. Strings fill their rows,
    so with `pack` a packed row is one string with one segment.
    """

    name = "flipflop"
    vocab = VOCAB
    splits = SPLITS
    token_separator = ""

    def __init__(
        self,
        *,
        num_pairs: int = 256,
        p_train: float = DEFAULT_P_IGNORE["train"],
        p_val: float = DEFAULT_P_IGNORE["val"],
        p_val_dense: float = DEFAULT_P_IGNORE["val_dense"],
        p_val_sparse: float = DEFAULT_P_IGNORE["val_sparse"],
        pack: bool = False,
    ) -> None:
        super().__init__(pack=pack)
        self.num_pairs = check_int("num_pairs", num_pairs, minimum=2)
        self.p_ignore = {
            "train": check_probability("p_train", p_train),
            "val": check_probability("p_val", p_val),
            "val_dense": check_probability("p_val_dense", p_val_dense),
            "val_sparse": check_probability("p_val_sparse", p_val_sparse),
        }

    def seq_len(self, split: str) -> int:
        check_choice("split", split, self.splits)
        return 2 * self.num_pairs - 1

    def num_examples(self, split: str) -> int:
        return HUB_SIZES[check_choice("split", split, self.splits)]

    def _batch(self, split: str, n: int, seed_seq: np.random.SeedSequence) -> Batch:
        tokens = generate(np.random.default_rng(seed_seq), n, self.num_pairs, self.p_ignore[split])
        return next_token_batch(tokens, read_bits_scored(tokens))


class FlipFlopHub(FixedTask):
    """FFL(p) read from the synthseq/flipflop dataset on the Hugging Face hub.

    Same vocabulary, layout and scoring as `FlipFlop`; the splits are the dataset's splits.
    Needs the network (or a datasets cache) at construction time.
    """

    name = "flipflop"
    vocab = VOCAB
    splits = SPLITS
    token_separator = ""

    def __init__(self, *, pack: bool = False) -> None:
        super().__init__(pack=pack)
        try:
            import datasets

            self._data = datasets.load_dataset(HUB_NAME)
        except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataUnavailable(
                f"flipflop source='hub' could not load {HUB_NAME} from the Hugging Face hub "
                f"({type(e).__name__}: {reason}); use source='local' (the default) offline"
            ) from None
        missing = [s for s in self.splits if s not in self._data]
        if missing:
            raise DataUnavailable(f"{HUB_NAME} lacks splits {missing}; found {list(self._data)}")
        self._column = next(
            (c for c in ("text", "sequence", "seq") if c in self._data["train"].column_names),
            self._data["train"].column_names[0],
        )
        self._lut = np.full(256, -1, dtype=np.int32)
        for i, tok in enumerate(VOCAB):
            self._lut[ord(tok)] = i

    def seq_len(self, split: str) -> int:
        check_choice("split", split, self.splits)
        return len(self._data[split][0][self._column]) - 1

    def num_examples(self, split: str) -> int:
        return len(self._data[check_choice("split", split, self.splits)])

    def _rows(self, split: str, indices: np.ndarray) -> Batch:
        texts = self._data[split][[int(i) for i in indices]][self._column]
        chars = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)
        tokens = self._lut[chars].reshape(len(texts), -1)  # [n, L]
        return next_token_batch(tokens, read_bits_scored(tokens))


def make_flipflop(*, source: str = "local", pack: bool = False, **options) -> Task:
    """FFL(p); `source="hub"` loads synthseq/flipflop (fixed 256-pair sequences, so no other
    option but `num_pairs=256` and `pack`), "local" generates."""
    check_choice("source", source, SOURCES)
    if source == "hub":
        if options.get("num_pairs", 256) == 256:
            options.pop("num_pairs", None)
        if options:
            raise ValueError(
                f"flipflop source='hub' (256-pair sequences) takes no options, got {options}"
            )
        return FlipFlopHub(pack=pack)
    return FlipFlop(pack=pack, **options)
