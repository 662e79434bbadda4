"""Packed training batches: best-fit rows, segments that are whole examples, every example once
per epoch, purity per (seed, step), evaluation never packed, and training on packed rows."""

from __future__ import annotations

import random

import numpy as np
import pytest

from experiments.tasks import Task, make_task, wikitext
from experiments.tasks.base import best_fit_rows, next_token_batch

COUNTING_SMALL = {"ntrain": 300, "ntest": 40}


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; printed so a failure can be reproduced."""
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    return value


def segments(batch: dict[str, np.ndarray], row: int) -> list[tuple[int, int, int]]:
    """(segment id, start, end) of each run of equal segment ids in `row`."""
    ids = batch["segment_ids"][row]
    cuts = [0, *np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]
    return [(int(ids[a]), a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def split_examples(batch: dict[str, np.ndarray], fill: int) -> dict[str, np.ndarray]:
    """The examples of a packed batch, each alone in a row at the start (padded with `fill`,
    unscored), in row and segment order: what an unpacked batch of them holds."""
    pieces = []
    for row in range(len(batch["inputs"])):
        for _, start, end in segments(batch, row):
            if batch["loss_mask"][row, start:end].any():
                pieces.append((row, start, end))
    width = batch["inputs"].shape[1]
    out = {
        "inputs": np.full((len(pieces), width), fill, np.int32),
        "targets": np.full((len(pieces), width), fill, np.int32),
        "loss_mask": np.zeros((len(pieces), width), bool),
    }
    for i, (row, start, end) in enumerate(pieces):
        for key in out:
            out[key][i, : end - start] = batch[key][row, start:end]
    return out


def padding_fraction(task: Task, batches: list[dict[str, np.ndarray]]) -> float:
    total = sum(b["inputs"].size for b in batches)
    return 1.0 - sum(int(task.example_widths(b).sum()) for b in batches) / total


# ----- best fit ----------------------------------------------------------------------------


def test_best_fit_rows_places_every_item_once_within_the_width(seed):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(8, 40))
    widths = rng.integers(1, width + 1, size=int(rng.integers(1, 200)))
    rows = best_fit_rows(widths, width)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(widths)))
    assert all(widths[r].sum() <= width for r in rows)
    # No two rows could be merged: best fit leaves at most one row at most half full.
    assert sum(widths[r].sum() <= width // 2 for r in rows) <= 1
    # The rows' widths depend on the multiset of widths only.
    shuffled = rng.permutation(len(widths))
    again = best_fit_rows(widths[shuffled], width)
    assert sorted(sorted(widths[shuffled][r]) for r in again) == sorted(
        sorted(widths[r]) for r in rows
    )


@pytest.mark.parametrize("widths", [[0, 3], [5, 9]])
def test_best_fit_rows_refuses_widths_outside_the_row(widths):
    with pytest.raises(ValueError, match=r"widths must lie in 1..8 \(the row width\), got"):
        best_fit_rows(np.array(widths), 8)


# ----- counting: packed rows ---------------------------------------------------------------


def test_packed_counting_rows_hold_whole_examples(seed):
    """Each segment is one training program: its inputs, targets and scored answer exactly as
    the program alone gives them (the last token only a target, so no loss crosses into the
    next segment), then padding with an id of its own; padding falls from ~38% to a few %."""
    task = make_task("counting", pack=True, **COUNTING_SMALL)
    tokens, lengths = task.arrays("train")
    by_content = {tokens[i, : lengths[i]].tobytes(): i for i in range(len(tokens))}
    batch = task.train_batch(seed, int(np.random.default_rng(seed).integers(0, 50)), 16)
    assert batch["segment_ids"].dtype == np.int32 and batch["segment_ids"].shape == (16, 511)
    for row in range(16):
        runs = segments(batch, row)
        assert [s for s, _, _ in runs] == list(range(len(runs)))
        for segment, start, end in runs:
            scored = batch["loss_mask"][row, start:end]
            if not scored.any():  # the padding at the end of the row
                assert (segment, end) == (len(runs) - 1, 511)
                assert (batch["inputs"][row, start:] == task.pad_id).all()
                continue
            whole = np.append(batch["inputs"][row, start:end], batch["targets"][row, end - 1])
            i = by_content[whole.astype(np.uint8).tobytes()]  # a real program, whole
            np.testing.assert_array_equal(
                batch["targets"][row, start:end], tokens[i, 1 : end - start + 1]
            )
            assert np.flatnonzero(scored).tolist() == [end - start - 1]  # its answer
    unpacked = make_task("counting", **COUNTING_SMALL)
    steps = range(10)
    before = padding_fraction(unpacked, [unpacked.train_batch(seed, s, 16) for s in steps])
    after = padding_fraction(task, [task.train_batch(seed, s, 16) for s in steps])
    assert 0.3 < before < 0.45 and after < 0.08, (before, after)


def test_packed_epoch_holds_every_example_once(seed):
    task = make_task("counting", pack=True, ntrain=60, ntest=10)
    rows = task.packed_rows(seed, 0)
    assert sorted(np.concatenate(rows).tolist()) == list(range(60))
    widths = task.train_widths()
    assert all(widths[r].sum() <= 511 for r in rows)
    later = task.packed_rows(seed, 1)
    assert len(later) == len(rows) and sorted(np.concatenate(later).tolist()) == list(range(60))
    assert [r.tolist() for r in later] != [r.tolist() for r in rows]

    # The training stream reads the epochs' rows back to back, one row per step here.
    def answers(batch):
        return batch["targets"][batch["loss_mask"]].tolist()

    read = [answers(task.train_batch(seed, step, 1)) for step in range(len(rows) + 2)]
    assert read == [answers(task._rows("train", r)) for r in [*rows, *later[:2]]]


def test_packed_stream_is_a_pure_function_of_seed_and_step(seed):
    step, batch_size = 7, 24  # 24 rows of a ~190-row epoch; step 7 straddles epochs 0 and 1
    late = make_task("counting", pack=True, **COUNTING_SMALL)
    for s in range(step):
        late.train_batch(seed, s, batch_size)
    fresh = make_task("counting", pack=True, **COUNTING_SMALL).train_batch(seed, step, batch_size)
    again = late.train_batch(seed, step, batch_size)
    assert all(np.array_equal(fresh[k], again[k]) for k in fresh)
    other = late.train_batch(seed + 1, step, batch_size)
    assert not np.array_equal(fresh["inputs"], other["inputs"])


FILLING = {
    "flipflop": {"num_pairs": 12},
    "selective_copy": {"train_blanks": 20},
    "wikitext": {"seq_len": 32},
}


@pytest.mark.parametrize("name", list(FILLING))
def test_examples_that_fill_their_rows_pack_to_the_unpacked_batch(name, seed):
    options = FILLING[name]
    if name == "wikitext":
        data = wikitext.resolve_data_dir("", "wikitext-2")
        if not any((data / f).exists() for f in ("wiki.train.tokens", "wiki.train.tokens.gz")):
            pytest.skip(f"WikiText-2 not found at {data} (set {wikitext.DATA_DIR_ENV})")
    packed = make_task(name, pack=True, **options).train_batch(seed, 3, 6)
    unpacked = make_task(name, **options).train_batch(seed, 3, 6)
    assert set(packed) == {*unpacked, "segment_ids"}
    for key in unpacked:
        np.testing.assert_array_equal(packed[key], unpacked[key])
    assert (packed["segment_ids"] == 0).all()


class VariableLength(Task):
    """A generated task with padding: `ramp` sequences 0, 1, ..., L-1 of random length L."""

    name, splits, pad_id = "ramp", ("train",), 0
    vocab = ["<pad>", *map(str, range(1, 20))]

    def seq_len(self, split: str) -> int:
        return 16

    def _batch(self, split, n, seed_seq):
        rng = np.random.default_rng(seed_seq)
        lengths = rng.integers(3, 18, size=n)  # tokens per sequence: 2..16 inputs
        tokens = np.where(np.arange(17) < lengths[:, None], np.arange(1, 18) % 20, 0)
        return next_token_batch(tokens, tokens > 1)


def test_generated_examples_pack_first_fit_from_the_steps_own_draws(seed):
    task = VariableLength(pack=True)
    batch = task.train_batch(seed, 5, 8)
    assert batch["inputs"].shape == batch["segment_ids"].shape == (8, 16)
    for row in range(8):
        for _, start, end in segments(batch, row):
            inputs = batch["inputs"][row, start:end]
            if batch["loss_mask"][row, start:end].any():  # a whole ramp 1, 2, ...
                np.testing.assert_array_equal(inputs, np.arange(1, end - start + 1))
                np.testing.assert_array_equal(batch["targets"][row, start:end], inputs + 1)
            else:
                assert end == 16 and (inputs == 0).all()
    again = VariableLength(pack=True).train_batch(seed, 5, 8)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    unpacked = VariableLength().train_batch(seed, 5, 8)
    assert padding_fraction(task, [batch]) < padding_fraction(task, [unpacked])


# ----- options and evaluation --------------------------------------------------------------


@pytest.mark.parametrize("name", ["flipflop", "selective_copy", "counting"])
def test_pack_must_be_a_bool(name):
    with pytest.raises(ValueError, match=r"^pack must be True or False, got 'yes'$"):
        make_task(name, pack="yes")


@pytest.mark.parametrize("name", ["flipflop", "selective_copy", "counting"])
def test_evaluation_and_samples_never_pack(name, seed):
    options = COUNTING_SMALL if name == "counting" else {}
    packed, unpacked = make_task(name, pack=True, **options), make_task(name, **options)
    split = packed.splits[1]
    for a, b in zip(
        packed.eval_batches(split, 16, num_examples=40, seed=seed),
        unpacked.eval_batches(split, 16, num_examples=40, seed=seed),
        strict=True,
    ):
        assert set(a) == set(b) == {"inputs", "targets", "loss_mask"}
        assert all(np.array_equal(a[k], b[k]) for k in a)
    a, b = packed.sample(split, 4, seed), unpacked.sample(split, 4, seed)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["counting", "flipflop", "selective_copy"])
def test_the_pack_option_reaches_the_task(name):
    from experiments import steps
    from experiments.configlib import apply_override, load_config

    packed = load_config(f"configs/{name}.py:cope,smoke,pack")
    assert packed.task.options.pack is True and steps.build_task(packed).pack
    plain = load_config(f"configs/{name}.py:cope,smoke")
    assert plain.task.options.pack is False and not steps.build_task(plain).pack
    apply_override(plain, "task.options.pack=true")
    assert steps.build_task(plain).pack
