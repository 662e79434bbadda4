"""WikiText language modelling (Merity et al. 2016): word-level or byte-level BPE token streams."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.tasks.base import (
    Batch,
    DataUnavailable,
    Task,
    check_choice,
    check_int,
    mask_rows,
)

SPLITS = ("train", "valid", "test")
DATASETS = ("wikitext-2", "wikitext-103")
SOURCES = ("local", "hub")
TOKENIZERS = ("word", "bpe")
HUB_NAME = "Salesforce/wikitext"
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
EOS = "<eos>"
UNK = "<unk>"
BPE_EOS = "<|endoftext|>"
DATA_DIR_ENV = "COPE_WIKITEXT_DIR"
CACHE_DIR_ENV = "COPE_CACHE_DIR"
# <repo>/../shared/data/wikitext: where CI and the team machines keep the offline copy.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext"


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str, dataset: str) -> Path:
    """The local data directory: `data_dir`, else $COPE_WIKITEXT_DIR, else the shared copy.

    The default is `<repo>/../shared/data/wikitext/<dataset>`, resolved from this file (not the
    working directory) so tests and CLIs find it from anywhere.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return SHARED_DATA / dataset


def resolve_cache_dir(cache_dir: str) -> Path:
    """Where trained tokenizers go when the data directory is read-only (or absent, for the hub).

    `cache_dir`, else $COPE_CACHE_DIR, else ~/.cache/cope-jax.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path.home() / ".cache" / "cope-jax"


def local_files(directory: Path) -> dict[str, Path]:
    """{split: path} of wiki.<split>.tokens (or .tokens.gz) in `directory`.

    Raises:
        DataUnavailable: naming the directory, the missing files, the config field and the
            environment variable to set.
    """
    found, missing = {}, []
    for split in SPLITS:
        candidates = [directory / f"wiki.{split}.tokens", directory / f"wiki.{split}.tokens.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"wiki.{split}.tokens[.gz]")
        else:
            found[split] = path
    if missing:
        raise DataUnavailable(
            f"wikitext source='local': {', '.join(missing)} not found in {directory}; point the "
            f"config field task.options.data_dir or the environment variable {DATA_DIR_ENV} at "
            "the directory holding wiki.{train,valid,test}.tokens[.gz] (CI uses "
            "../shared/data/wikitext/wikitext-2), or use source='hub' when online"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Loading text (Hugging Face datasets)
# ---------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    """A text file's lines (gzip when it ends in .gz), line breaks kept, as `datasets` reads."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # universal newlines, split on "\n" only
        return f.readlines()


def hub_config_name(dataset: str, tokenizer: str) -> str:
    """The Salesforce/wikitext config: tokenized (`-v1`) for words, raw (`-raw-v1`) for BPE."""
    return f"{dataset}-raw-v1" if tokenizer == "bpe" else f"{dataset}-v1"


def load_lines(source: str, dataset: str, data_dir: str, tokenizer: str) -> dict[str, list[str]]:
    """{split: lines} of WikiText, one paragraph or heading per line, via `datasets`.

    Local files are read with `datasets`' text builder when the library is installed, else
    directly (the same lines, kept line breaks included: a GPU image without `datasets` still
    trains on local files).

    Raises:
        DataUnavailable: local files missing, or the hub unreachable; one line saying which of
            `data_dir` / the network to fix.
    """
    if source == "local":
        files = local_files(resolve_data_dir(data_dir, dataset))
        try:
            import datasets
        except ImportError:
            return {split: read_lines(files[split]) for split in SPLITS}
        data = datasets.load_dataset(
            "text", keep_linebreaks=True, data_files={s: str(p) for s, p in files.items()}
        )
        return {split: data[split]["text"] for split in SPLITS}
    try:
        import datasets
    except ImportError:
        raise DataUnavailable(
            "wikitext source='hub' needs the `datasets` package (pip install datasets), or use "
            f"source='local' with task.options.data_dir or {DATA_DIR_ENV}"
        ) from None
    config = hub_config_name(dataset, tokenizer)
    try:
        data = datasets.load_dataset(HUB_NAME, config)
        return {split: data[HUB_SPLITS[split]]["text"] for split in SPLITS}
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataUnavailable(
            f"wikitext source='hub' could not load {HUB_NAME} ({config}) from the Hugging Face "
            f"hub ({type(e).__name__}: {reason}); check the network (and HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE), or use source='local' with task.options.data_dir or "
            f"{DATA_DIR_ENV} pointing at wiki.{{train,valid,test}}.tokens[.gz]"
        ) from None


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def word_tokens(line: str) -> list[str]:
    """A line's words plus `<eos>`: the classic (pytorch word_language_model) WikiText setup."""
    return [*line.split(), EOS]


def build_word_vocab(lines: Sequence[str]) -> list[str]:
    """Word types of `lines` in first-occurrence order (with `<eos>`, and `<unk>` ensured)."""
    index: dict[str, int] = {}
    for line in lines:
        for word in word_tokens(line):
            index.setdefault(word, len(index))
    if UNK not in index:
        index[UNK] = len(index)
    return list(index)


def encode_words(lines: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """[N] int32 word ids of `lines` with `<eos>` per line; unknown words become `<unk>`."""
    lookup = {word: i for i, word in enumerate(vocab)}
    unk = lookup[UNK]
    ids = (lookup.get(word, unk) for line in lines for word in word_tokens(line))
    return np.fromiter(ids, dtype=np.int32)


def bpe_line(line: str) -> str:
    """A line as BPE text: its words and one trailing newline (which marks the line end)."""
    return line.rstrip("\n") + "\n"


def train_bpe(lines: Sequence[str], vocab_size: int):
    """Trains a byte-level BPE tokenizer (HF `tokenizers`, GPT-2 style) on `lines`.

    Byte-level means every string round-trips: decode(encode(text)) == text, no unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((bpe_line(s) for s in lines), trainer, length=len(lines))
    return tokenizer


def encode_bpe(lines: Sequence[str], tokenizer, chunk: int = 10_000) -> np.ndarray:
    """[N] int32 BPE ids of `lines` (each ending in its newline), encoded in parallel chunks."""
    parts = []
    for start in range(0, len(lines), chunk):
        texts = [bpe_line(s) for s in lines[start : start + chunk]]
        parts.extend(np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(texts))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def bpe_cache_path(directory: Path, lines: Sequence[str], vocab_size: int) -> Path:
    """The tokenizer file for (training text, vocabulary size); the text's hash is in the name."""
    digest = hashlib.blake2b(digest_size=8)
    for line in lines:
        digest.update(line.encode("utf-8"))
    return directory / "tokenizers" / f"bpe-{vocab_size}-{len(lines)}-{digest.hexdigest()}.json"


def is_writable(directory: Path) -> bool:
    """True when `directory` is meant to be written: accessible AND with a write bit in its mode.

    The mode check keeps root (for whom os.access is always True) out of read-only data copies.
    """
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return os.access(directory, os.W_OK) and bool(
        mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    )


def load_or_train_bpe(
    lines: Sequence[str], vocab_size: int, data_dir: Path | None, cache_dir: Path
):
    """The cached BPE tokenizer for `lines`, trained and saved on first use.

    It is cached in `<data_dir>/tokenizers/` when the data directory is writable, else in
    `<cache_dir>/tokenizers/` (the shared data is read-only; the hub has no data directory).
    """
    from tokenizers import Tokenizer

    writable = data_dir is not None and is_writable(data_dir)
    for directory in ([data_dir] if writable else []) + [cache_dir]:
        path = bpe_cache_path(directory, lines, vocab_size)
        if path.is_file():
            return Tokenizer.from_file(str(path))
    tokenizer = train_bpe(lines, vocab_size)
    path = bpe_cache_path(data_dir if writable else cache_dir, lines, vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
        print(
            f"wikitext: trained byte-level BPE ({tokenizer.get_vocab_size()} tokens), "
            f"cached at {path}",
            file=sys.stderr,
        )
    except OSError as e:
        print(
            f"wikitext: could not cache the BPE tokenizer at {path} ({e}); set "
            f"task.options.cache_dir or {CACHE_DIR_ENV}",
            file=sys.stderr,
        )
    return tokenizer


@functools.lru_cache(maxsize=4)
def load_streams(
    source: str,
    dataset: str,
    data_dir: str,
    tokenizer: str,
    bpe_vocab_size: int,
    bpe_train_lines: int,
    cache_dir: str,
) -> tuple[Any, dict[str, np.ndarray]]:
    """(vocabulary or BPE tokenizer, {split: [N] int32 read-only token stream}), cached.

    Tasks that differ only in window lengths or strides share one tokenized copy.
    """
    lines = load_lines(source, dataset, data_dir, tokenizer)
    if tokenizer == "word":
        vocab = build_word_vocab(lines["train"])
        streams = {split: encode_words(lines[split], vocab) for split in SPLITS}
        vocab_or_tokenizer = vocab
    else:
        train_lines = lines["train"][:bpe_train_lines] if bpe_train_lines else lines["train"]
        local_dir = resolve_data_dir(data_dir, dataset) if source == "local" else None
        vocab_or_tokenizer = load_or_train_bpe(
            train_lines, bpe_vocab_size, local_dir, resolve_cache_dir(cache_dir)
        )
        streams = {split: encode_bpe(lines[split], vocab_or_tokenizer) for split in SPLITS}
    for stream in streams.values():
        stream.setflags(write=False)
    return vocab_or_tokenizer, streams


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def eval_windows(num_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation windows over a stream of `num_tokens` tokens: (starts [W], first [W]).

    Window w reads inputs stream[starts[w] : starts[w] + seq_len] and predicts the next token at
    each position; it scores positions t >= first[w] (and targets inside the stream). Windows
    start every `stride` tokens; each scores only the targets the previous window did not, so
    every target stream[1:] is scored exactly once. stride == seq_len gives non-overlapping
    windows (every position scored); a smaller stride gives each scored token at least
    seq_len - stride tokens of context (the sliding-window evaluation).
    """
    targets = num_tokens - 1
    if targets < 1:
        raise ValueError(f"a stream of {num_tokens} tokens has nothing to predict")
    count = 1 + max(0, -(-(targets - seq_len) // stride))
    starts = np.arange(count, dtype=np.int64) * stride
    first = np.where(starts == 0, 0, seq_len - stride).astype(np.int64)
    return starts, first


class WikiText(Task):
    """Next-token prediction on a WikiText token stream cut into windows of `seq_len`.

    Args:
        dataset: "wikitext-2" or "wikitext-103".
        source: "local" reads wiki.{train,valid,test}.tokens[.gz] from `data_dir` (else
            $COPE_WIKITEXT_DIR, else <repo>/../shared/data/wikitext/<dataset>); "hub" loads
            Salesforce/wikitext (`<dataset>-v1` for words, `<dataset>-raw-v1` for BPE).
        data_dir: local data directory ("" = the default above).
        tokenizer: "word" (the dataset's vocabulary, `<eos>` per line; 33,278 types for
            WikiText-2) or "bpe" (byte-level BPE trained on the training split, cached).
        seq_len: training window length T.
        eval_seq_len: window length of valid/test (0 = seq_len); longer windows test context
            extrapolation (experiments/extrapolate.py).
        eval_stride: evaluation stride (0 = eval length, i.e. non-overlapping windows).
        bpe_vocab_size: BPE vocabulary size (GPT-2's is 50,257).
        bpe_train_lines: train the BPE on the first this many training lines (0 = all).
        cache_dir: where the BPE tokenizer is cached when the data directory is read-only
            ("" = $COPE_CACHE_DIR, else ~/.cache/cope-jax).
        pack: packed training batches (see `Task`); windows fill their rows, so each packed row
            is one window with one segment.

    Training batches are windows at uniformly random offsets of the training stream, drawn from
    (seed, step), so the stream is a pure function of the step. `eval_batches` walks a split's
    windows in order; the loss mask marks each target once, so the perplexity that
    experiments.train reports is the perplexity of the whole split (when `num_examples` covers
    all windows). The first token of a split is context only.

    The word vocabulary is the training split's types in first-occurrence order (as pytorch's
    word_language_model builds it). Locally only the tokenized files exist, so a local BPE is
    trained on text with `<unk>` in it; the hub's raw configs have none.
    """

    name = "wikitext"
    splits = SPLITS

    def __init__(
        self,
        *,
        dataset: str = "wikitext-2",
        source: str = "local",
        data_dir: str = "",
        tokenizer: str = "word",
        seq_len: int = 512,
        eval_seq_len: int = 0,
        eval_stride: int = 0,
        bpe_vocab_size: int = 50_257,
        bpe_train_lines: int = 0,
        cache_dir: str = "",
        pack: bool = False,
    ) -> None:
        self.dataset = check_choice("dataset", dataset, DATASETS)
        self.source = check_choice("source", source, SOURCES)
        self.tokenizer_name = check_choice("tokenizer", tokenizer, TOKENIZERS)
        self.train_len = check_int("seq_len", seq_len, minimum=1)
        eval_seq_len = check_int("eval_seq_len", eval_seq_len, minimum=0)
        self.eval_len = eval_seq_len or self.train_len
        eval_stride = check_int("eval_stride", eval_stride, minimum=0)
        self.stride = eval_stride or self.eval_len
        if self.stride > self.eval_len:
            raise ValueError(
                f"eval_stride must be <= the eval length {self.eval_len}, got {eval_stride}"
            )
        bpe_vocab_size = check_int("bpe_vocab_size", bpe_vocab_size, minimum=257)
        bpe_train_lines = check_int("bpe_train_lines", bpe_train_lines, minimum=0)
        # Resolved here so that the stream cache is keyed by the real location, not by "".
        self.data_dir = resolve_data_dir(str(data_dir), dataset) if source == "local" else None
        vocab, self.streams = load_streams(
            self.source,
            self.dataset,
            str(self.data_dir or ""),
            self.tokenizer_name,
            bpe_vocab_size,
            bpe_train_lines,
            str(resolve_cache_dir(str(cache_dir))),
        )
        if self.tokenizer_name == "word":
            self.tokenizer, self.vocab, self.token_separator = None, vocab, " "
        else:
            self.tokenizer = vocab
            by_id = sorted(vocab.get_vocab().items(), key=lambda item: item[1])
            self.vocab, self.token_separator = [token for token, _ in by_id], ""
        super().__init__(pack=pack)
        for split in SPLITS:
            if len(self.streams[split]) <= self.seq_len(split):
                raise ValueError(
                    f"split {split!r} has {len(self.streams[split])} tokens, too few "
                    f"for windows of {self.seq_len(split)}"
                )
        self._windows = {
            split: eval_windows(
                len(self.streams[split]), self.seq_len(split), self.stride_of(split)
            )
            for split in SPLITS
        }

    # ----- sizes -----------------------------------------------------------------------------

    def seq_len(self, split: str) -> int:
        check_choice("split", split, self.splits)
        return self.train_len if split == self.train_split else self.eval_len

    def stride_of(self, split: str) -> int:
        """Evaluation stride of `split` (the training split is read in non-overlapping windows)."""
        check_choice("split", split, self.splits)
        return self.train_len if split == self.train_split else self.stride

    def num_tokens(self, split: str) -> int:
        """Length of the split's token stream."""
        return len(self.streams[check_choice("split", split, self.splits)])

    def num_examples(self, split: str) -> int:
        """Number of evaluation windows that cover the whole split."""
        return len(self._windows[check_choice("split", split, self.splits)][0])

    # ----- batches ---------------------------------------------------------------------------

    def windows(self, split: str, starts: np.ndarray, first: np.ndarray | None = None) -> Batch:
        """The batch of windows starting at `starts` ([n] int) of `split`'s stream.

        Positions before `first` ([n], default 0) and targets past the stream end are unscored;
        inputs past the end are filled with token 0 (a causal model never sees them from a
        scored position).
        """
        stream, width = self.streams[split], self.seq_len(split)
        index = np.asarray(starts, np.int64)[:, None] + np.arange(width + 1)  # [n, T + 1]
        inside = index < len(stream)
        tokens = np.where(inside, stream[np.minimum(index, len(stream) - 1)], 0)
        scored = inside[:, 1:].copy()
        if first is not None:
            scored &= np.arange(width)[None, :] >= np.asarray(first)[:, None]
        return {
            "inputs": np.ascontiguousarray(tokens[:, :-1], dtype=np.int32),
            "targets": np.ascontiguousarray(tokens[:, 1:], dtype=np.int32),
            "loss_mask": scored,
        }

    def _batch(self, split: str, n: int, seed_seq: np.random.SeedSequence) -> Batch:
        """n full windows at uniformly random offsets (the training stream, `sample`)."""
        high = len(self.streams[split]) - self.seq_len(split)  # last start with a full window
        starts = np.random.default_rng(seed_seq).integers(0, high, size=n)
        return self.windows(split, starts)

    def eval_batches(
        self, split: str, batch_size: int, *, num_examples: int | None = None, seed: int = 0
    ) -> Iterator[Batch]:
        """Yields the first `num_examples` evaluation windows of `split` (default: all), in order.

        Batches have exactly `batch_size` rows; the last one is filled with rows whose loss_mask
        is all False. With all windows, every target token of the split is scored exactly once.
        `seed` is unused (the order is fixed).
        """
        self._split_index(split)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        starts, first = self._windows[split]
        if num_examples is None:
            num_examples = len(starts)
        num_examples = check_int("num_examples", num_examples, minimum=1)
        if num_examples > len(starts):
            raise ValueError(
                f"num_examples must be <= {len(starts)} for split {split!r}, got {num_examples}"
            )
        for begin in range(0, num_examples, batch_size):
            rows = np.arange(begin, begin + batch_size) % num_examples
            yield mask_rows(
                self.windows(split, starts[rows], first[rows]),
                min(batch_size, num_examples - begin),
            )

    # ----- text ------------------------------------------------------------------------------

    def decode(self, ids: Any) -> str:
        """Token ids -> text (words joined by spaces, or the BPE's byte-exact text)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        return " ".join(self.vocab[i] for i in ids)

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings (words, or BPE pieces in byte-level notation)."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text).tokens
        return text.split()

    def encode(self, text: str) -> np.ndarray:
        """Text -> [L] int32 ids; unknown words become `<unk>` (word level)."""
        if self.tokenizer is not None:
            return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)
        unk = self._token_ids[UNK]
        return np.array([self._token_ids.get(w, unk) for w in text.split()], dtype=np.int32)

    def __repr__(self) -> str:
        return (
            f"WikiText({self.dataset}, {self.source}, {self.tokenizer_name}, "
            f"vocab_size={self.vocab_size}, seq_len={self.train_len}, "
            f"eval_seq_len={self.eval_len}, stride={self.stride})"
        )
