"""Tests for experiments.tasks: shapes, determinism, task invariants, metrics and bad options."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from experiments.tasks import ErrorCounts, finalize, make_task
from experiments.tasks.counting import MAX_VAL

# Small fixed datasets keep counting fast; the generator itself is the upstream one.
COUNTING_SMALL = {"ntrain": 300, "ntest": 100}
TASK_OPTIONS = {
    "flipflop": {},
    "selective_copy": {},
    "counting": COUNTING_SMALL,
}
ALL_SPLITS = [
    (name, split) for name, opts in TASK_OPTIONS.items() for split in make_task(name, **opts).splits
]


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; printed so a failure can be reproduced."""
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    return value


def full_tokens(batch: dict[str, np.ndarray]) -> np.ndarray:
    """[n, T + 1]: the whole sequences a next-token batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


# ----- generic -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,split", ALL_SPLITS)
def test_shapes_dtypes_and_shift(name, split, seed):
    task = make_task(name, **TASK_OPTIONS[name])
    batch = task.sample(split, 5, seed)
    assert set(batch) == {"inputs", "targets", "loss_mask"}
    shape = (5, task.seq_len(split))
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.bool_)]:
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < task.vocab_size
    assert batch["loss_mask"].any(axis=1).all()
    assert task.seq_len(split) <= task.max_seq_len


def test_seq_lens():
    assert {make_task("flipflop").seq_len(s) for s in make_task("flipflop").splits} == {511}
    sc = make_task("selective_copy")
    assert [sc.seq_len(s) for s in sc.splits] == [288, 288, 160, 544]
    assert sc.max_seq_len == 544
    assert make_task("counting").max_seq_len == 511
    assert make_task("flipflop", num_pairs=8).seq_len("val") == 15


@pytest.mark.parametrize("name,split", ALL_SPLITS)
def test_sample_deterministic_per_split_and_seed(name, split, seed):
    task = make_task(name, **TASK_OPTIONS[name])
    a, b = task.sample(split, 8, seed), make_task(name, **TASK_OPTIONS[name]).sample(split, 8, seed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], task.sample(split, 8, seed + 1)["inputs"])


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_streams_are_pure_and_independent(name, seed):
    task = make_task(name, **TASK_OPTIONS[name])
    b3 = task.train_batch(seed, 3, 16)
    np.testing.assert_array_equal(
        b3["inputs"], make_task(name, **TASK_OPTIONS[name]).train_batch(seed, 3, 16)["inputs"]
    )
    assert not np.array_equal(b3["inputs"], task.train_batch(seed, 4, 16)["inputs"])
    assert not np.array_equal(b3["inputs"], task.train_batch(seed + 1, 3, 16)["inputs"])
    assert not np.array_equal(b3["inputs"], task.sample("train", 16, seed)["inputs"])
    # Splits with the same distribution still draw different examples.
    train, val = task.splits[0], task.splits[1]
    assert not np.array_equal(
        task.sample(train, 16, seed)["inputs"], task.sample(val, 16, seed)["inputs"]
    )


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_decode_encode_round_trip(name, seed):
    task = make_task(name, **TASK_OPTIONS[name])
    tokens = full_tokens(task.sample(task.splits[-1], 4, seed))
    for row in tokens:
        real = row if task.pad_id is None else row[row != task.pad_id]
        np.testing.assert_array_equal(task.encode(task.decode(row)), real)


def test_decode_examples():
    assert make_task("flipflop").decode([0, 3, 2, 4, 1, 3]) == "w0i1r0"
    assert make_task("selective_copy").decode([0, 16, 1, 17, 0, 1]) == "A_B|AB"
    counting = make_task("counting", nvars=1)
    ids = counting.encode("a = 0 ; pass; a ++; print a 1")
    assert counting.decode([*ids, 0, 0]) == "a = 0 ; pass; a ++; print a 1"


# ----- metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_metrics_counts(name, seed):
    task = make_task(name, **TASK_OPTIONS[name])
    batch = task.sample(task.splits[0], 6, seed)
    targets, mask = batch["targets"], batch["loss_mask"]
    perfect = task.metrics(targets, batch)
    assert perfect["token_errors"] == 0 and perfect["sequence_errors"] == 0
    assert perfect["tokens"] == mask.sum() and perfect["sequences"] == 6

    wrong_unscored = np.where(mask, targets, (targets + 1) % task.vocab_size)
    assert task.metrics(wrong_unscored, batch)["token_errors"] == 0

    preds = targets.copy()
    rows, cols = np.nonzero(mask)
    preds[rows[0], cols[0]] = (preds[rows[0], cols[0]] + 1) % task.vocab_size
    preds[rows[-1], cols[-1]] = (preds[rows[-1], cols[-1]] + 1) % task.vocab_size
    m = task.metrics(preds, batch)
    assert (m["token_errors"], m["sequence_errors"]) == (2, 2 if rows[0] != rows[-1] else 1)
    assert m["token_error"] == pytest.approx(2 / mask.sum())
    assert m["sequence_error"] == pytest.approx(m["sequence_errors"] / 6)

    logits = np.eye(task.vocab_size, dtype=np.float32)[preds]  # [n, T, V]
    assert task.metrics(logits, batch) == m


def test_finalize_sums_batches(seed):
    task = make_task("selective_copy", train_blanks=8)
    batches = [task.sample("train", 4, seed + i) for i in range(3)]
    rng = np.random.default_rng(seed)
    preds = [np.where(rng.random(b["targets"].shape) < 0.05, 0, b["targets"]) for b in batches]
    total = finalize(task.metrics(p, b) for p, b in zip(preds, batches, strict=True))
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert total == task.metrics(np.concatenate(preds), joined)
    counts = sum(
        (task.error_counts(p, b) for p, b in zip(preds, batches, strict=True)), ErrorCounts()
    )
    assert counts.as_dict() == total


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_eval_batches_fill_last_batch(name):
    task = make_task(name, **TASK_OPTIONS[name])
    split = task.splits[-1]
    batches = list(task.eval_batches(split, 16, num_examples=40))
    assert len(batches) == 3
    assert all(b["inputs"].shape == (16, task.seq_len(split)) for b in batches)
    assert (
        batches[-1]["loss_mask"][8:].sum() == 0 and batches[-1]["loss_mask"][:8].any(axis=1).all()
    )
    total = finalize(task.metrics(b["targets"], b) for b in batches)
    assert total["sequences"] == 40 and total["sequence_errors"] == 0


# ----- flip-flop ---------------------------------------------------------------------------


def last_written_bits(tokens: np.ndarray) -> np.ndarray:
    """Loop reference: the bit a read must return, at each instruction position of one row."""
    expected, current = [], None
    for instr, bit in zip(tokens[0::2], tokens[1::2], strict=True):
        if instr == 0:  # w
            current = bit
        expected.append(current if instr == 1 else bit)
    return np.array(expected)


@pytest.mark.parametrize("split", ["train", "val_dense", "val_sparse"])
def test_flipflop_invariants(split, seed):
    task = make_task("flipflop")
    batch = task.sample(split, 32, seed)
    tokens = full_tokens(batch)  # [n, 512]
    assert tokens.shape == (32, 512)
    instr, bits = tokens[:, 0::2], tokens[:, 1::2]
    assert np.isin(instr, [0, 1, 2]).all() and np.isin(bits, [3, 4]).all()
    assert (instr[:, 0] == 0).all() and (instr[:, -1] == 1).all()
    for row in tokens:
        np.testing.assert_array_equal(row[1::2], last_written_bits(row))
    # Scored exactly where the input is `r`, i.e. the target is the bit after a read.
    np.testing.assert_array_equal(batch["loss_mask"], batch["inputs"] == task.vocab.index("r"))
    assert task.decode(tokens[0])[:2] in ("w0", "w1") and task.decode(tokens[0])[-2] == "r"


@pytest.mark.parametrize(
    "split,p_ignore", [("train", 0.8), ("val", 0.8), ("val_dense", 0.1), ("val_sparse", 0.98)]
)
def test_flipflop_instruction_frequencies(split, p_ignore, seed):
    task = make_task("flipflop")
    instr = full_tokens(task.sample(split, 256, seed))[:, 2:-2:2]  # without the fixed ends
    freq = np.bincount(instr.ravel(), minlength=3) / instr.size  # w, r, i
    assert freq[2] == pytest.approx(p_ignore, abs=0.01)
    assert freq[0] == pytest.approx((1 - p_ignore) / 2, abs=0.01)
    assert freq[1] == pytest.approx((1 - p_ignore) / 2, abs=0.01)
    bits = full_tokens(task.sample(split, 64, seed))[:, 1::2]
    assert (bits == 4).mean() == pytest.approx(0.5, abs=0.03)


def test_flipflop_options():
    task = make_task("flipflop", num_pairs=16, p_val=0.0, p_val_sparse=1.0)
    dense = full_tokens(task.sample("val", 50, 0))[:, 2:-2:2]
    assert not (dense == 2).any()
    sparse = full_tokens(task.sample("val_sparse", 50, 0))[:, 0::2]
    assert (sparse[:, 1:-1] == 2).all()
    assert task.seq_len("train") == 31


def test_flipflop_hub_offline_fails_with_one_line(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
    }
    code = (
        "from experiments.tasks import make_task\n"
        "try:\n"
        "    make_task('flipflop', source='hub')\n"
        "except ValueError as e:  # DataUnavailable\n"
        "    print('ERROR:' + str(e))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=60
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, out.stdout + out.stderr
    message = lines[0]
    assert "synthseq/flipflop" in message and "source='local'" in message
    assert "\n" not in message


# ----- selective copy ----------------------------------------------------------------------


@pytest.mark.parametrize("split,blanks", [("train", 256), ("val_dense", 128), ("val_sparse", 512)])
def test_selective_copy_invariants(split, blanks, seed):
    task = make_task("selective_copy")
    batch = task.sample(split, 32, seed)
    tokens = full_tokens(batch)  # [n, 16 + blanks + 1 + 16]
    assert tokens.shape == (32, 16 + blanks + 1 + 16)
    region, separator, copy = tokens[:, : 16 + blanks], tokens[:, 16 + blanks], tokens[:, -16:]
    assert (separator == task.separator_id).all()
    assert (copy < 16).all()
    assert ((region == task.blank_id).sum(axis=1) == blanks).all()
    for row_region, row_copy in zip(region, copy, strict=True):
        np.testing.assert_array_equal(row_region[row_region != task.blank_id], row_copy)
    # Scored: exactly the 16 positions whose target is a copied token.
    expected_mask = np.zeros(batch["loss_mask"].shape, dtype=bool)
    expected_mask[:, -16:] = True
    np.testing.assert_array_equal(batch["loss_mask"], expected_mask)
    assert (batch["inputs"][:, -16] == task.separator_id).all()
    # Data tokens are spread over the whole region, and every symbol occurs.
    positions = np.nonzero(region != task.blank_id)[1]
    assert positions.min() < blanks // 4 and positions.max() > 3 * blanks // 4
    assert set(np.unique(copy)) == set(range(16))


# ----- counting ----------------------------------------------------------------------------


def interpret(words: list[str]) -> tuple[str, int, Counter]:
    """Independent interpreter for a counting program `... print x`: (variable, value, kinds)."""
    values: dict[str, int] = {}
    kinds: Counter = Counter()
    i = 0
    while words[i] != "print":
        if words[i] == "pass;":
            kinds["pass"] += 1
            i += 1
        elif words[i + 1] == "++;":
            assert words[i] in values, "increment of an unset variable"
            values[words[i]] += 1
            kinds["increment"] += 1
            i += 2
        else:
            assert words[i + 1 : i + 4] == ["=", "0", ";"], words[i : i + 4]
            values[words[i]] = 0
            kinds["set"] += 1
            i += 4
    assert i == len(words) - 2
    return words[i + 1], values[words[i + 1]], kinds


@pytest.mark.parametrize("nvars", [1, 3, 5])
def test_counting_answers_and_statement_mix(nvars):
    task = make_task("counting", nvars=nvars, **COUNTING_SMALL)
    kinds: Counter = Counter()
    nsteps = []
    for sample in task.examples("test"):
        var, value, sample_kinds = interpret(f"{sample['context']} {sample['question']}".split())
        assert sample["answer"] == str(value) and 0 <= value <= MAX_VAL
        assert var in "abcde"[:nvars]
        kinds += sample_kinds
        nsteps.append(sum(sample_kinds.values()))
    assert 3 <= min(nsteps) and max(nsteps) <= 512
    assert np.mean(nsteps) == pytest.approx(257.5, rel=0.15)
    # Weights SET 1 : pass 50 : increment 7. SET and pass are never rejected, so their ratio is
    # exact; increments are rejected (and the kind redrawn) when none is set or the value is
    # 10, which with ~7 increments per SET happens often: about 2/3 of them survive.
    assert kinds["set"] / kinds["pass"] == pytest.approx(1 / 50, rel=0.2)
    assert 0.5 * 7 / 50 < kinds["increment"] / kinds["pass"] < 0.8 * 7 / 50


def test_counting_tokens_truncation_and_mask():
    task = make_task("counting", nvars=3, **COUNTING_SMALL)
    tokens, lengths = task.arrays("test")
    assert tokens.shape == (100, 512) and lengths.max() <= 512
    truncated = 0
    batch = next(task.eval_batches("test", 100))
    for row, sample in enumerate(task.examples("test")):
        words = task.tokenize(" ".join(sample.values()))
        truncated += len(words) > 512
        assert task.decode(tokens[row]).split() == words[-512:]
        assert (tokens[row, lengths[row] :] == task.pad_id).all()
        # The only scored position is the last real input; its target is the answer.
        assert np.nonzero(batch["loss_mask"][row])[0].tolist() == [lengths[row] - 2]
        assert task.vocab[batch["targets"][row, lengths[row] - 2]] == sample["answer"]
        assert task.vocab[batch["inputs"][row, lengths[row] - 3]] == "print"
    assert truncated > 0  # ~16% of samples exceed 512 tokens with max_steps 512
    assert set(np.unique(tokens)) <= set(range(task.vocab_size))
    assert task.vocab[0] == "<pad>" and task.pad_id == 0


def test_counting_fixed_splits_and_sample():
    task = make_task("counting", **COUNTING_SMALL)
    assert task.splits == ("train", "valid", "test")
    assert [task.num_examples(s) for s in task.splits] == [300, 100, 100]
    assert [make_task("counting").num_examples(s) for s in task.splits] == [10_000, 1000, 1000]
    rows = {r.tobytes() for r in task.arrays("test")[0]}
    batch = task.sample("test", 20, 0)
    assert all(r.tobytes() in rows for r in full_tokens(batch).astype(np.uint8))
    assert len({r.tobytes() for r in batch["inputs"]}) == 20  # drawn without replacement
    other = make_task("counting", data_seed=1, **COUNTING_SMALL)
    assert task.examples("test") != other.examples("test")
    assert task.examples("test") != task.examples("valid")


def test_counting_train_stream_epochs(seed):
    task = make_task("counting", ntrain=60, ntest=10)
    all_rows = sorted(r.tobytes() for r in task.arrays("train")[0][:, :511])
    epoch0 = [task.train_batch(seed, step, 20)["inputs"] for step in range(3)]
    assert sorted(r.astype(np.uint8).tobytes() for b in epoch0 for r in b) == all_rows
    epoch1 = [task.train_batch(seed, step, 20)["inputs"] for step in range(3, 6)]
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    # A batch that straddles two epochs (B=25: rows 50..74) is still a pure function of step.
    np.testing.assert_array_equal(
        task.train_batch(seed, 2, 25)["inputs"], task.train_batch(seed, 2, 25)["inputs"]
    )


def test_counting_eval_covers_split_in_order():
    task = make_task("counting", **COUNTING_SMALL)
    batches = list(task.eval_batches("valid", 32))
    assert len(batches) == 4
    inputs = np.concatenate([b["inputs"] for b in batches])[:100]
    np.testing.assert_array_equal(inputs, task.arrays("valid")[0][:, :511])
    assert finalize(task.metrics(b["targets"], b) for b in batches)["sequences"] == 100


# ----- bad options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: make_task("copy"), r"unknown task 'copy'; allowed: 'flipflop', 'selective_copy'"),
        (lambda: make_task("flipflop", p=0.5), r"unknown option\(s\) \['p'\].*allowed: source"),
        (lambda: make_task("flipflop", p_train=1.5), r"p_train must be a probability in \[0, 1\]"),
        (lambda: make_task("flipflop", p_val_sparse=-0.1), r"p_val_sparse .* got -0.1"),
        (lambda: make_task("flipflop", source="web"), r"unknown source 'web'; allowed: 'local'"),
        (lambda: make_task("flipflop", source="hub", num_pairs=8), r"takes no options"),
        (lambda: make_task("counting", nvars=0), r"nvars must be an integer in 1..26.*got 0"),
        (lambda: make_task("counting", nvars=27), r"nvars .* got 27"),
        (lambda: make_task("counting", nvars=2.5), r"nvars .* got 2.5"),
        (lambda: make_task("selective_copy", num_symbols=27), r"num_symbols must be <= 26"),
        (lambda: make_task("selective_copy", train_blanks=-1), r"train_blanks must be an integer"),
        (lambda: make_task("flipflop").sample("test", 4, 0), r"unknown split 'test'; allowed:"),
        (lambda: make_task("counting").sample("val", 4, 0), r"split 'val'; allowed: 'train'"),
        (lambda: make_task("flipflop").sample("train", 0, 0), r"n must be an integer >= 1, got 0"),
        (lambda: make_task("selective_copy").sample("val", -3, 0), r"n must be .* got -3"),
        (lambda: make_task("flipflop").sample("val", 2, -1), r"seed must be an integer >= 0"),
        (lambda: make_task("flipflop").train_batch(0, -1, 8), r"step must be an integer >= 0"),
        (lambda: make_task("flipflop").train_batch(0, 0, 0), r"batch_size must be an integer"),
        (lambda: make_task("flipflop").encode("w2"), r"unknown tokens \['2'\]"),
    ],
)
def test_bad_options_raise_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_predictions_shape():
    task = make_task("flipflop", num_pairs=4)
    batch = task.sample("val", 2, 0)
    with pytest.raises(ValueError, match=r"predictions must have shape \(2, 7\)"):
        task.metrics(batch["targets"][:, :-1], batch)


def test_flipflop_hub_path_with_a_stand_in_dataset(monkeypatch, seed):
    """The hub code path (row access, char encoding, scoring) on a local stand-in dataset."""
    datasets = pytest.importorskip("datasets")
    local = make_task("flipflop", num_pairs=8)
    texts = {
        split: [local.decode(row) for row in full_tokens(local.sample(split, 30, seed))]
        for split in local.splits
    }
    stand_in = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"text": t}) for split, t in texts.items()}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: stand_in)
    task = make_task("flipflop", source="hub")
    assert task.seq_len("val_sparse") == 15 and task.num_examples("val") == 30
    batch = task.sample("val_dense", 7, seed)
    assert batch["inputs"].shape == (7, 15) and batch["inputs"].dtype == np.int32
    assert {task.decode(r) for r in full_tokens(batch)} <= set(texts["val_dense"])
    np.testing.assert_array_equal(batch["loss_mask"], batch["inputs"] == 1)
    epoch = np.concatenate([task.train_batch(seed, step, 10)["inputs"] for step in range(3)])
    assert sorted(task.decode(r) for r in epoch) == sorted(t[:-1] for t in texts["train"])
    decoded = [task.decode(r) for b in task.eval_batches("val", 8) for r in full_tokens(b)]
    assert decoded[:30] == texts["val"]


@pytest.mark.parametrize("name", ["flipflop", "selective_copy"])
def test_generated_batches_are_fast(name):
    task = make_task(name)
    times = []
    for step in range(3):
        start = time.perf_counter()
        task.sample("val_sparse", 64, step)
        task.train_batch(0, step, 64)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.1, times


def test_flipflop_config_reaches_the_hub_source(monkeypatch):
    """`configs/flipflop.py:<variant>,source=hub` builds the hub task (256-pair sequences)."""
    from experiments import steps
    from experiments.configlib import load_config
    from experiments.tasks import flipflop

    built = []
    monkeypatch.setattr(
        flipflop, "FlipFlopHub", lambda **options: built.append("hub") or "hub task"
    )
    config = load_config("configs/flipflop.py:cope,source=hub")
    assert config.task.options.source == "hub" and steps.build_task(config) == "hub task"
    assert built == ["hub"]
    with pytest.raises(ValueError, match="256-pair sequences.*takes no options.*num_pairs"):
        steps.build_task(load_config("configs/flipflop.py:cope,smoke,source=hub"))
