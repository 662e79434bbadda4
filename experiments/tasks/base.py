"""The Task interface shared by all synthetic tasks: batches, seeding, eval streams and metrics."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]

# Purpose tags mixed into every SeedSequence so that `sample`, the training stream and the
# evaluation stream of the same (seed, split) never share random numbers.
SAMPLE_STREAM = 0
TRAIN_STREAM = 1
EVAL_STREAM = 2
PACK_STREAM = 3  # the order of a packed epoch's rows


class DataUnavailable(ValueError):
    """A task's data (local files or the Hugging Face hub) could not be read; the message says
    what to fix. A ValueError, so the CLIs print it as one line."""


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Returns `value` as an int, or raises a one-line ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_probability(name: str, value: Any) -> float:
    """Returns `value` as a float in [0, 1], or raises a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Returns `value` if it is one of `allowed`, else raises a one-line ValueError."""
    if value not in allowed:
        allowed_text = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"unknown {name} {value!r}; allowed: {allowed_text}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Returns `value` as a bool, or raises a one-line ValueError naming the option."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def next_token_batch(tokens: np.ndarray, scored: np.ndarray) -> Batch:
    """Builds a next-token batch from full sequences.

    Args:
        tokens: [n, L] int, whole sequences.
        scored: [n, L] bool, True at the tokens that are trained on and scored (as targets).

    Returns:
        dict(inputs=[n, L-1] int32, targets=[n, L-1] int32, loss_mask=[n, L-1] bool), where
        targets[:, t] = tokens[:, t + 1] and loss_mask[:, t] = scored[:, t + 1].
    """
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1], dtype=np.int32),
        "targets": np.ascontiguousarray(tokens[:, 1:], dtype=np.int32),
        "loss_mask": np.ascontiguousarray(scored[:, 1:], dtype=bool),
    }


def best_fit_rows(widths: np.ndarray, width: int) -> list[np.ndarray]:
    """Packs items into rows of `width` positions by best fit decreasing.

    Items are placed longest first (ties in index order), each into the open row it leaves with
    the least room, or into a new row when none has room. Every decision depends on the sorted
    widths alone, so any reordering of the same widths gives rows of the same widths.

    Args:
        widths: [n] int in 1..width, the positions each item fills.
        width: the row width T.

    Returns:
        The rows, each an int64 array of item indices in the order placed.
    """
    widths = np.asarray(widths, np.int64)
    if widths.size and (widths.min() < 1 or widths.max() > width):
        raise ValueError(
            f"widths must lie in 1..{width} (the row width), got {widths.min()}..{widths.max()}"
        )
    ranked = np.argsort(-widths, kind="stable")
    full = ranked[widths[ranked] == width]  # fill a row alone; placed without the search
    rows: list[list[int]] = []  # the others
    # Open rows by their room: rows_with_room[c] lists the rows with exactly c positions left.
    rows_with_room: list[list[int]] = [[] for _ in range(width)]
    room_count = np.zeros(width, np.int64)  # [T] len(rows_with_room[c])
    for i in ranked[len(full) :]:
        w = int(widths[i])
        fitting = np.flatnonzero(room_count[w:])
        if fitting.size:
            room = w + int(fitting[0])
            row = rows_with_room[room].pop()
            room_count[room] -= 1
            rows[row].append(int(i))
        else:
            room, row = width, len(rows)
            rows.append([int(i)])
        if room > w:
            rows_with_room[room - w].append(row)
            room_count[room - w] += 1
    return [*full[:, None], *(np.asarray(r, np.int64) for r in rows)]


def pack_examples(
    examples: Batch, widths: np.ndarray, rows: Sequence[np.ndarray], fill: int
) -> Batch:
    """Lays examples side by side in rows, each example its own segment.

    Example i keeps its first widths[i] inputs, targets and loss_mask, so every target of a
    segment is a token of that segment's example (an example's last token is a target only,
    never an input): no loss crosses from one example into the next. The rest of a row is
    padding (inputs and targets `fill`, nothing scored) with a segment id of its own.

    Args:
        examples: [n, T] next-token batch, one example per row.
        widths: [n] int, the positions each example fills (the rest of its row is padding).
        rows: the packed rows, each an int array of indices into `examples`.
        fill: the token id of padding.

    Returns:
        dict(inputs, targets, loss_mask, segment_ids) of shape [len(rows), T]; segment_ids
        int32 counts 0, 1, ... along a row, one id per example and one for the padding.
    """
    n, width = len(rows), examples["inputs"].shape[1]
    packed = {
        "inputs": np.full((n, width), fill, np.int32),
        "targets": np.full((n, width), fill, np.int32),
        "loss_mask": np.zeros((n, width), bool),
        "segment_ids": np.empty((n, width), np.int32),
    }
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members):
            end = start + int(widths[i])
            if end > width:
                raise ValueError(f"row {r} holds {end} positions, more than the width {width}")
            for key in ("inputs", "targets", "loss_mask"):
                packed[key][r, start:end] = examples[key][i, : end - start]
            packed["segment_ids"][r, start:end] = segment
            start = end
        packed["segment_ids"][r, start:] = len(members)
    return packed


@dataclasses.dataclass(frozen=True)
class ErrorCounts:
    """Summable error counts; add the counts of several eval batches, then read `rates()`.

    `tokens` counts scored positions and `sequences` counts rows with at least one scored
    position (rows of padding, e.g. filling the last eval batch, count for nothing).
    """

    token_errors: int = 0
    tokens: int = 0
    sequence_errors: int = 0
    sequences: int = 0

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            self.token_errors + other.token_errors,
            self.tokens + other.tokens,
            self.sequence_errors + other.sequence_errors,
            self.sequences + other.sequences,
        )

    def rates(self) -> dict[str, float]:
        """Error fractions in [0, 1] (NaN when nothing was scored)."""
        return {
            "token_error": self.token_errors / self.tokens if self.tokens else float("nan"),
            "sequence_error": (
                self.sequence_errors / self.sequences if self.sequences else float("nan")
            ),
        }

    def as_dict(self) -> dict[str, float]:
        """Counts and rates in one flat dict (the format `Task.metrics` returns)."""
        return {**dataclasses.asdict(self), **self.rates()}


COUNT_KEYS = tuple(f.name for f in dataclasses.fields(ErrorCounts))


def finalize(metrics: Iterable[dict[str, float] | ErrorCounts]) -> dict[str, float]:
    """Sums the counts of several `Task.metrics` dicts (or ErrorCounts) and recomputes rates."""
    total = ErrorCounts()
    for m in metrics:
        if isinstance(m, dict):
            m = ErrorCounts(**{k: int(m[k]) for k in COUNT_KEYS})
        total = total + m
    return total.as_dict()


def error_counts(predictions: Any, batch: Batch) -> ErrorCounts:
    """Counts wrong scored tokens and rows with any wrong scored token.

    Args:
        predictions: [n, T] int predicted ids, or [n, T, V] logits (argmax is taken).
        batch: a batch from `Task.sample` and friends; uses `targets` and `loss_mask` [n, T].
    """
    predictions = np.asarray(predictions)
    if predictions.ndim == 3:
        predictions = predictions.argmax(axis=-1)
    targets, mask = batch["targets"], batch["loss_mask"]
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions must have shape {targets.shape} (or [..., vocab] logits), "
            f"got {predictions.shape}"
        )
    wrong = (predictions != targets) & mask  # [n, T]
    return ErrorCounts(
        token_errors=int(wrong.sum()),
        tokens=int(mask.sum()),
        sequence_errors=int(wrong.any(axis=1).sum()),
        sequences=int(mask.any(axis=1).sum()),
    )


class Task:
    """A synthetic next-token task.

    Subclasses set `name`, `vocab`, `splits` (training split first) and `token_separator`
    (how `decode` joins tokens), and implement `seq_len` and `_batch`. Every batch is
    dict(inputs, targets, loss_mask) of shape [n, seq_len(split)]: int32, int32, bool.

    With `pack`, training batches are packed: each row holds as many examples as fit, one
    segment each, and carries `segment_ids` [n, T] int32 (see `pack_examples`); the model keeps
    attention and positions within a segment, so a packed example trains as it would alone.
    `sample` and `eval_batches` never pack.

    Randomness: every call derives a fresh `np.random.SeedSequence` from
    (seed, split index, stream tag, counter), so batches are pure functions of their
    arguments and different splits, steps and purposes draw independent numbers.
    """

    name: str
    vocab: list[str]
    splits: tuple[str, ...]
    token_separator: str = ""
    pad_id: int | None = None

    def __init__(self, *, pack: bool = False) -> None:
        self.pack = check_bool("pack", pack)
        self._token_ids = {tok: i for i, tok in enumerate(self.vocab)}

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def train_split(self) -> str:
        return self.splits[0]

    def seq_len(self, split: str) -> int:
        """Width T of the inputs/targets/loss_mask arrays of `split`."""
        raise NotImplementedError

    @property
    def max_seq_len(self) -> int:
        """The longest `seq_len` over all splits (size absolute position tables with this)."""
        return max(self.seq_len(s) for s in self.splits)

    def num_examples(self, split: str) -> int:
        """Default number of examples `eval_batches` covers for `split`."""
        raise NotImplementedError

    def example_widths(self, batch: Batch) -> np.ndarray:
        """[n] int: the positions each row's example fills, up to the last whose target is one
        of its tokens; the rest of the row is padding.

        Only a task with a `pad_id` pads (its rows end in pad targets; the example's last token,
        an input there, predicts padding); in the others every example fills its row.
        """
        n, width = batch["targets"].shape
        if self.pad_id is None:
            return np.full(n, width, np.int64)
        real = batch["targets"] != self.pad_id  # [n, T]
        return np.where(real.any(axis=1), width - np.argmax(real[:, ::-1], axis=1), 0)

    # ----- batches ---------------------------------------------------------------------------

    def _batch(self, split: str, n: int, seed_seq: np.random.SeedSequence) -> Batch:
        """Returns n examples of `split` drawn with `seed_seq`."""
        raise NotImplementedError

    def _split_index(self, split: str) -> int:
        return self.splits.index(check_choice("split", split, self.splits))

    def sample(self, split: str, n: int, seed: int) -> Batch:
        """Draws n examples of `split`; a pure function of (split, n, seed).

        Returns:
            dict(inputs=[n, T] int32, targets=[n, T] int32, loss_mask=[n, T] bool) with
            T = seq_len(split); targets[:, t] is the token that follows inputs[:, t].
        """
        index = self._split_index(split)
        n = check_int("n", n, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        return self._batch(split, n, np.random.SeedSequence([seed, index, SAMPLE_STREAM]))

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        """The training batch of `step`: a pure function of (seed, step, batch_size).

        A run resumed at step s sees exactly the batches s, s+1, ... it would have seen. With
        `pack` the batch is `batch_size` packed rows; see `_packed_train_batch`.
        """
        seed = check_int("seed", seed, minimum=0)
        step = check_int("step", step, minimum=0)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if self.pack:
            return self._packed_train_batch(seed, step, batch_size)
        seed_seq = np.random.SeedSequence([seed, 0, TRAIN_STREAM, step])
        return self._batch(self.train_split, batch_size, seed_seq)

    def _packed_train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        """`batch_size` rows packed first fit with examples generated for this step alone.

        Chunks of `batch_size` examples are drawn from (seed, step, chunk), chunk 0 being the
        unpacked batch's; each example goes into the first row with room, until one fits in
        none (it is dropped). Examples that fill their rows give the unpacked batch itself.
        """
        room = np.full(batch_size, self.seq_len(self.train_split))  # [B] positions left per row
        chunks: list[Batch] = []
        widths: list[np.ndarray] = []
        placed: list[list[int]] = [[] for _ in range(batch_size)]  # indices into the chunks
        full = False
        while not full and room.max() > 0:
            counter = [step] if not chunks else [step, len(chunks)]
            seed_seq = np.random.SeedSequence([seed, 0, TRAIN_STREAM, *counter])
            chunks.append(self._batch(self.train_split, batch_size, seed_seq))
            widths.append(np.maximum(self.example_widths(chunks[-1]), 1))
            for i, w in enumerate(widths[-1]):
                fitting = np.flatnonzero(room >= w)
                if not fitting.size:
                    full = True
                    break
                room[fitting[0]] -= w
                placed[fitting[0]].append((len(chunks) - 1) * batch_size + i)
        examples = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        rows = [np.asarray(p, np.int64) for p in placed]
        return pack_examples(examples, np.concatenate(widths), rows, fill=self.pad_id or 0)

    def eval_batches(
        self, split: str, batch_size: int, *, num_examples: int | None = None, seed: int = 0
    ) -> Iterator[Batch]:
        """Yields batches of exactly `batch_size` rows covering `num_examples` examples.

        The last batch is filled up with rows whose loss_mask is all False, so every batch has
        the same shape (one compilation) and the fill rows count for nothing in `metrics`.
        Batch i is drawn from (seed, split, i); the set depends on batch_size.
        """
        index = self._split_index(split)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        if num_examples is None:
            num_examples = self.num_examples(split)
        num_examples = check_int("num_examples", num_examples, minimum=1)
        for i, start in enumerate(range(0, num_examples, batch_size)):
            seed_seq = np.random.SeedSequence([seed, index, EVAL_STREAM, i])
            batch = self._batch(split, batch_size, seed_seq)
            yield mask_rows(batch, min(batch_size, num_examples - start))

    # ----- text ------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; padding is dropped."""
        ids = np.asarray(ids).reshape(-1)
        return self.token_separator.join(
            self.vocab[int(i)] for i in ids if self.pad_id is None or int(i) != self.pad_id
        )

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings (the inverse of the join in `decode`)."""
        if self.token_separator:
            return text.split()
        return list(text)

    def encode(self, text: str) -> np.ndarray:
        """Text -> [L] int32 token ids; unknown tokens raise ValueError."""
        tokens = self.tokenize(text)
        unknown = sorted({t for t in tokens if t not in self._token_ids})
        if unknown:
            raise ValueError(f"unknown tokens {unknown} for task {self.name!r}")
        return np.array([self._token_ids[t] for t in tokens], dtype=np.int32)

    # ----- metrics ---------------------------------------------------------------------------

    def error_counts(self, predictions: Any, batch: Batch) -> ErrorCounts:
        """Summable counts of wrong scored tokens / sequences; see `ErrorCounts`."""
        return error_counts(predictions, batch)

    def metrics(self, predictions: Any, batch: Batch) -> dict[str, float]:
        """Counts and error rates for one batch.

        Args:
            predictions: [n, T] int predicted ids (or [n, T, V] logits).
            batch: the batch the predictions are for.

        Returns:
            dict with token_errors, tokens, sequence_errors, sequences (sum these over batches,
            or pass the dicts to `finalize`) and token_error, sequence_error (fractions).
        """
        return self.error_counts(predictions, batch).as_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, splits={self.splits})"


def mask_rows(batch: Batch, keep: int) -> Batch:
    """Clears the loss_mask of rows >= keep, turning them into filler rows that score nothing."""
    if keep >= batch["inputs"].shape[0]:
        return batch
    out = {k: v.copy() for k, v in batch.items()}
    out["loss_mask"][keep:] = False
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """[size] the order in which epoch `epoch` of a fixed training set is read (cached)."""
    seed_seq = np.random.SeedSequence([seed, 0, TRAIN_STREAM, epoch])
    order = np.random.default_rng(seed_seq).permutation(size)
    order.setflags(write=False)
    return order


class FixedTask(Task):
    """A task whose splits are fixed example sets (a generated dataset or a downloaded one).

    Subclasses implement `num_examples(split)` and `_rows(split, indices)`. Then:
    - `sample(split, n, seed)` draws n distinct rows (with replacement only if n > size);
    - `train_batch(seed, step, B)` reads the training set as back-to-back epochs, each a
      permutation drawn from (seed, epoch): rows step*B .. step*B+B-1 of that endless stream,
      so one epoch is size/B steps and a resumed run continues mid-epoch exactly; with `pack`
      the stream is of packed rows instead, each epoch every example once (`packed_rows`);
    - `eval_batches` walks the split in order (every row once; the last batch is filled).
    """

    _packing: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    _epoch_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None

    def _rows(self, split: str, indices: np.ndarray) -> Batch:
        """The batch made of rows `indices` ([n] int) of `split`."""
        raise NotImplementedError

    def _batch(self, split: str, n: int, seed_seq: np.random.SeedSequence) -> Batch:
        size = self.num_examples(split)
        rng = np.random.default_rng(seed_seq)
        return self._rows(split, rng.choice(size, size=n, replace=n > size))

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        seed = check_int("seed", seed, minimum=0)
        step = check_int("step", step, minimum=0)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if self.pack:
            return self._packed_train_batch(seed, step, batch_size)
        size = self.num_examples(self.train_split)
        stream = step * batch_size + np.arange(batch_size, dtype=np.int64)  # [B]
        epochs, offsets = np.divmod(stream, size)
        indices = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = epoch_order(seed, int(epoch), size)[offsets[here]]
        return self._rows(self.train_split, indices)

    def train_widths(self) -> np.ndarray:
        """[size] int: the input positions each training example fills (`example_widths`)."""
        size, width = self.num_examples(self.train_split), self.seq_len(self.train_split)
        if self.pad_id is None:
            return np.full(size, width, np.int64)
        chunks = np.array_split(np.arange(size), max(1, size // 4096))
        return np.concatenate(
            [self.example_widths(self._rows(self.train_split, c)) for c in chunks]
        )

    def _packing_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(widths [size], members [size], starts [R + 1]): the training set packed once by
        `best_fit_rows`; row r holds members[starts[r] : starts[r + 1]], positions in the
        examples' width order (longest first)."""
        if self._packing is None:
            widths = np.maximum(self.train_widths(), 1)
            rows = best_fit_rows(np.sort(widths)[::-1], self.seq_len(self.train_split))
            starts = np.cumsum([0, *map(len, rows)])
            self._packing = (widths, np.concatenate(rows), starts)
        return self._packing

    def _epoch_packing(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the example at each width-order position [size], the order of the rows [R]) of
        epoch `epoch`; the last two are cached, as one batch reads at most two epochs."""
        if self._epoch_cache is None:
            self._epoch_cache = {}
        if (seed, epoch) not in self._epoch_cache:
            widths, _, starts = self._packing_plan()
            order = epoch_order(seed, epoch, len(widths))
            ranked = order[np.argsort(-widths[order], kind="stable")]
            row_order = np.random.default_rng(
                np.random.SeedSequence([seed, 0, PACK_STREAM, epoch])
            ).permutation(len(starts) - 1)
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
            self._epoch_cache[seed, epoch] = (ranked, row_order)
        return self._epoch_cache[seed, epoch]

    def packed_rows(self, seed: int, epoch: int) -> list[np.ndarray]:
        """The rows of epoch `epoch` of the packed training stream, as example indices.

        The plan's rows are filled with this epoch's examples: the ones of each width in the
        epoch's order (`epoch_order`), the rows read in a permutation drawn from (seed, epoch).
        So every epoch holds every example exactly once, in the same number of rows, and no
        two examples are partners in every epoch.
        """
        _, members, starts = self._packing_plan()
        ranked, row_order = self._epoch_packing(seed, epoch)
        return [ranked[members[starts[r] : starts[r + 1]]] for r in row_order]

    def _packed_train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        """Rows step*B .. step*B+B-1 of the endless stream of packed epochs (`packed_rows`)."""
        widths, members, starts = self._packing_plan()
        stream = step * batch_size + np.arange(batch_size, dtype=np.int64)  # [B]
        rows = []
        for epoch, offset in zip(*np.divmod(stream, len(starts) - 1), strict=True):
            ranked, row_order = self._epoch_packing(seed, int(epoch))
            r = row_order[offset]
            rows.append(ranked[members[starts[r] : starts[r + 1]]])
        indices = np.concatenate(rows)
        bounds = np.cumsum([0, *map(len, rows)])
        local = [np.arange(bounds[j], bounds[j + 1]) for j in range(batch_size)]
        examples = self._rows(self.train_split, indices)
        return pack_examples(examples, widths[indices], local, fill=self.pad_id or 0)

    def eval_batches(
        self, split: str, batch_size: int, *, num_examples: int | None = None, seed: int = 0
    ) -> Iterator[Batch]:
        """Yields the first `num_examples` rows of `split` (default: all) in order.

        Batches have exactly `batch_size` rows; the last one is filled with rows whose
        loss_mask is all False. `seed` is unused (the order is fixed).
        """
        self._split_index(split)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        size = self.num_examples(split)
        if num_examples is None:
            num_examples = size
        num_examples = check_int("num_examples", num_examples, minimum=1)
        if num_examples > size:
            raise ValueError(
                f"num_examples must be <= {size} for split {split!r}, got {num_examples}"
            )
        for start in range(0, num_examples, batch_size):
            keep = min(batch_size, num_examples - start)
            indices = np.arange(start, start + batch_size) % num_examples
            yield mask_rows(self._rows(split, indices), keep)
