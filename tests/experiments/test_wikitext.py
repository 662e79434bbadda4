"""WikiText task, configs and context extrapolation, on the local WikiText-2 copy (../shared)."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cope.model import Transformer
from experiments import extrapolate, steps, train
from experiments.configlib import apply_override, load_config
from experiments.tasks import make_task
from experiments.tasks import wikitext as wt

ROOT = Path(__file__).resolve().parents[2]
DATA = wt.resolve_data_dir("", "wikitext-2")
VARIANTS = ["abs", "rel", "rope", "cope", "cope_rel", "cope_rope"]

pytestmark = pytest.mark.skipif(
    not (DATA / "wiki.train.tokens.gz").exists() and not (DATA / "wiki.train.tokens").exists(),
    reason=f"WikiText-2 not found at {DATA} (set {wt.DATA_DIR_ENV})",
)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; printed so a failure can be reproduced."""
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    return value


def read_lines(split: str) -> list[str]:
    with gzip.open(DATA / f"wiki.{split}.tokens.gz", "rt", encoding="utf-8") as f:
        return f.readlines()


def scored_targets(task, split: str, batch_size: int, **kwargs) -> np.ndarray:
    """All scored targets of `eval_batches`, in order; checks shapes and the shift on the way."""
    out = []
    for batch in task.eval_batches(split, batch_size, **kwargs):
        assert batch["inputs"].shape == (batch_size, task.seq_len(split))
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        out.append(batch["targets"][batch["loss_mask"]])  # row-major: window order
    return np.concatenate(out)


# ----- data and windows ----------------------------------------------------------------------


def test_word_level_vocabulary_and_token_counts():
    task = make_task("wikitext")
    assert task.vocab_size == 33_278 and {"<unk>", "<eos>"} <= set(task.vocab)
    counts = {split: task.num_tokens(split) for split in task.splits}
    assert counts == {"train": 2_088_628, "valid": 217_646, "test": 245_569}
    lines = {"valid": 3_760, "test": 4_358, "train": 36_718}
    eos = task.vocab.index("<eos>")
    for split, n in lines.items():
        stream = task.streams[split]
        assert stream.dtype == np.int32 and not stream.flags.writeable
        assert (stream == eos).sum() == n and stream[-1] == eos
    valid = read_lines("valid")
    words = " ".join(w for line in valid[:50] for w in [*line.split(), "<eos>"])
    assert task.decode(task.streams["valid"][: len(words.split())]) == words


def test_training_windows_are_the_shifted_stream(seed):
    task = make_task("wikitext", seq_len=64)
    batch = task.train_batch(seed, 3, 8)
    assert {k: v.shape for k, v in batch.items()} == {k: (8, 64) for k in batch}
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].all()
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    stream = task.streams["train"]
    for row, target in zip(batch["inputs"], batch["targets"], strict=True):
        full = np.append(row, target[-1])
        starts = np.flatnonzero(stream[: len(stream) - 64] == full[0])
        starts = starts[(stream[starts + 1] == full[1]) & (stream[starts + 2] == full[2])]
        assert any(np.array_equal(stream[s : s + 65], full) for s in starts)


def test_train_stream_is_a_pure_function_of_seed_and_step(seed):
    a, b = make_task("wikitext", seq_len=32), make_task("wikitext", seq_len=32, eval_stride=8)
    first = a.train_batch(seed, 7, 4)
    for key, value in b.train_batch(seed, 7, 4).items():
        np.testing.assert_array_equal(first[key], value)
    assert not np.array_equal(first["inputs"], a.train_batch(seed, 8, 4)["inputs"])
    assert not np.array_equal(first["inputs"], a.train_batch(seed + 1, 7, 4)["inputs"])


@pytest.mark.parametrize("seq_len,stride", [(64, 0), (64, 16), (50, 7), (32, 32)])
def test_eval_scores_every_token_of_a_split_exactly_once(seq_len, stride):
    task = make_task("wikitext", seq_len=seq_len, eval_stride=stride)
    stream = task.streams["valid"]
    np.testing.assert_array_equal(scored_targets(task, "valid", 37), stream[1:])
    step = stride or seq_len
    assert task.num_examples("valid") == 1 + math.ceil((len(stream) - 1 - seq_len) / step)
    batches = list(task.eval_batches("valid", 37))
    last = batches[-1]
    fill = len(batches) * 37 - task.num_examples("valid")
    assert fill == 0 or not last["loss_mask"][-fill:].any()
    if stride:  # after the first window only the last `stride` positions are scored
        mask = np.concatenate([b["loss_mask"] for b in batches])[1 : task.num_examples("valid")]
        assert not mask[:, : seq_len - stride].any()


def test_eval_prefix_and_longer_eval_windows():
    task = make_task("wikitext", seq_len=32, eval_seq_len=80)
    assert task.seq_len("train") == 32 and task.seq_len("valid") == 80 and task.max_seq_len == 80
    got = scored_targets(task, "test", 16, num_examples=5)
    np.testing.assert_array_equal(got, task.streams["test"][1 : 1 + 5 * 80])
    with pytest.raises(ValueError, match="num_examples must be <="):
        next(task.eval_batches("test", 16, num_examples=10**7))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(tokenizer="chars"), "unknown tokenizer"),
        (dict(dataset="wikitext-3"), "unknown dataset"),
        (dict(seq_len=32, eval_stride=64), "eval_stride must be <="),
        (dict(spam=1), "unknown option"),
    ],
)
def test_bad_options_raise_one_line_value_error(options, match):
    with pytest.raises(ValueError, match=match) as info:
        make_task("wikitext", **options)
    assert "\n" not in str(info.value)


# ----- tokenizers and data errors ------------------------------------------------------------


def test_bpe_trains_on_a_slice_round_trips_and_is_cached(tmp_path):
    pytest.importorskip("tokenizers")
    lines = read_lines("train")[:400]
    tokenizer = wt.train_bpe(lines, 320)
    assert tokenizer.get_vocab_size() == 320
    text = "".join(read_lines("valid")[:20]) + "naïve café — 東京 \t tabs\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode())
    # Read-only data dir (or none): cached under cache_dir; a writable data dir: cached there.
    cached = wt.load_or_train_bpe(lines, 320, None, tmp_path / "cache")
    assert cached.to_str() == tokenizer.to_str()
    assert list((tmp_path / "cache" / "tokenizers").glob("bpe-320-400-*.json"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    wt.load_or_train_bpe(lines, 320, data_dir, tmp_path / "cache2")
    assert list((data_dir / "tokenizers").glob("*.json")) and not (tmp_path / "cache2").exists()
    assert not wt.is_writable(tmp_path / "missing")


def test_bpe_task_streams_decode_to_the_split(tmp_path):
    pytest.importorskip("tokenizers")
    task = make_task(
        "wikitext",
        tokenizer="bpe",
        bpe_vocab_size=300,
        bpe_train_lines=300,
        cache_dir=str(tmp_path),
    )
    assert task.vocab_size == 300
    assert task.decode(task.streams["valid"]) == "".join(read_lines("valid"))
    assert not list(DATA.glob("tokenizers"))  # the read-only shared copy stays untouched
    text = "The tower is 324 metres tall .\n"
    assert task.decode(task.encode(text)) == text


def test_missing_data_dir_names_the_field_and_the_env_var(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="data_dir") as info:
        make_task("wikitext", data_dir=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert wt.DATA_DIR_ENV in message and "nowhere" in message and "\n" not in message
    monkeypatch.setenv(wt.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(wt.DataUnavailable, match=str(tmp_path)):
        make_task("wikitext")


def test_hub_offline_fails_with_one_line(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "PYTHONPATH": str(ROOT),
    }
    code = (
        "from experiments.tasks import make_task\n"
        "try:\n"
        "    make_task('wikitext', source='hub', dataset='wikitext-103', tokenizer='bpe')\n"
        "except ValueError as e:\n"
        "    print('ERROR:' + str(e))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "wikitext-103-raw-v1" in lines[0] and "network" in lines[0]
    assert "source='local'" in lines[0] and wt.DATA_DIR_ENV in lines[0]


# ----- configs, training, extrapolation ------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_variant_builds(variant):
    stand_in = types.SimpleNamespace(vocab_size=50_257, max_seq_len=1024)
    big = steps.build_model_config(
        load_config(f"{ROOT}/configs/wikitext.py:{variant},size=gpt2_small"), stand_in
    )
    assert (big.num_layers, big.d_model, big.num_heads, big.max_len) == (12, 768, 12, 1024)
    assert big.mlp == "gelu" and not big.post_norm and big.tie_embeddings and big.npos == 64
    if variant == "abs":  # exactly GPT-2 small, the paper's 124.4M
        model = nnx.eval_shape(lambda: Transformer(big, rngs=nnx.Rngs(0)))
        assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 124_439_808
    config = load_config(f"{ROOT}/configs/wikitext.py:{variant}")
    assert config.task.options.tokenizer == "word" and config.train.optimizer == "adamw"
    task = steps.build_task(config)
    small = steps.build_model_config(config, task)
    assert (small.num_layers, small.d_model, small.vocab_size, small.max_len) == (
        6,
        512,
        33_278,
        512,
    )
    smoke = load_config(f"{ROOT}/configs/wikitext.py:{variant},smoke")
    assert steps.build_task(smoke).seq_len("valid") == 32
    # The final evaluation covers the whole of valid and test.
    assert config.eval.final_num_examples >= max(task.num_examples(s) for s in ("valid", "test"))


def test_config_options():
    config = load_config(
        f"{ROOT}/configs/wikitext.py:rel,size=gpt2_small,source=local,dataset=wikitext-2,stride=256"
    )
    assert config.task.options.source == "local" and config.task.options.eval_stride == 256
    with pytest.raises(ValueError, match="size"):
        load_config(f"{ROOT}/configs/wikitext.py:cope,size=huge")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Smoke training runs (CoPE and absolute PE), shared by the tests below."""
    runs = {}
    for variant in ("cope", "abs"):
        config = load_config(f"{ROOT}/configs/wikitext.py:{variant},smoke")
        apply_override(config, "train.steps=6")
        workdir = tmp_path_factory.mktemp(f"wikitext_{variant}")
        runs[variant] = train.train_and_evaluate(config, workdir, progress=False), workdir
    return runs


def test_smoke_training_reports_finite_perplexity(smoke_runs):
    results, workdir = smoke_runs["cope"]
    assert results["task"] == "wikitext" and results["in_distribution_split"] == "valid"
    for split in ("train", "valid", "test"):
        m = results["final"][split]
        assert np.isfinite(m["perplexity"]) and m["perplexity"] > 1.0
        assert math.isclose(m["perplexity"], math.exp(m["loss"]), rel_tol=1e-9)
        assert m["tokens"] == 32 * 32  # final_num_examples windows of 32, all scored
    assert json.loads((workdir / "results.json").read_text())["final"] == results["final"]


def test_extrapolation_reports_perplexity_per_length(smoke_runs, tmp_path):
    _, cope_dir = smoke_runs["cope"]
    _, abs_dir = smoke_runs["abs"]
    factors = (1.0, 1.5, 2.0, 2.5)
    cope = extrapolate.extrapolate_run(cope_dir, factors=factors, num_examples=3)
    assert [e["eval_seq_len"] for e in cope["lengths"]] == [32, 48, 64, 80]
    for entry in cope["lengths"]:
        assert np.isfinite(entry["perplexity"]) and entry["tokens"] == 3 * entry["eval_seq_len"]
    absolute = extrapolate.extrapolate_run(abs_dir, factors=factors, num_examples=3)
    assert np.isfinite(absolute["lengths"][0]["perplexity"])
    for entry in absolute["lengths"][1:]:
        assert "perplexity" not in entry and "absolute position table" in entry["error"]
    paths = extrapolate.write_outputs([cope, absolute], tmp_path / "extrapolation")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.exists() for p in paths)
    table = paths[1].read_text()
    assert "| cope | cope | 32 |" in table and "past the absolute table" in table
    assert json.loads(paths[0].read_text())[1]["variant"] == "abs"


def test_extrapolate_cli(smoke_runs, tmp_path):
    _, cope_dir = smoke_runs["cope"]
    code = extrapolate.main(
        [
            "--workdir",
            str(cope_dir),
            "--lengths",
            "1,2",
            "--num_examples",
            "2",
            "--out",
            str(tmp_path / "ex"),
            "--no-png",
        ]
    )
    assert code == 0
    runs = json.loads((tmp_path / "ex.json").read_text())
    assert [e["eval_seq_len"] for e in runs[0]["lengths"]] == [32, 64]
    assert (cope_dir / "extrapolation.json").exists()


def test_local_lines_without_datasets_equal_the_datasets_text_builder(tmp_path, monkeypatch):
    """The fallback reader gives exactly what `datasets` gives, odd line breaks included."""
    pytest.importorskip("datasets")
    from experiments.tasks import wikitext

    files = {}
    text = " = Title = \n\nA line\twith tab \x0c form feed\r\nold mac\rend\u2028sep\n last"
    for split in wikitext.SPLITS:
        files[split] = tmp_path / f"wiki.{split}.tokens.gz"
        with gzip.open(files[split], "wt", encoding="utf-8", newline="") as f:
            f.write(f"{split}: {text}")
    with_datasets = wikitext.load_lines("local", "wikitext-2", str(tmp_path), "word")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    without = wikitext.load_lines("local", "wikitext-2", str(tmp_path), "word")
    assert without == with_datasets
    assert len(without["train"]) == 6


@pytest.mark.parametrize("lengths", ["1.0,abc", "0,1", ","])
def test_extrapolate_bad_lengths_is_one_error_naming_the_flag(tmp_path, capsys, lengths):
    from experiments import extrapolate

    assert extrapolate.main(["--workdir", str(tmp_path), "--lengths", lengths]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lengths must be") and lengths in err[0]
