"""The analysis library: load_run (params only), Run.evaluate/attention/generate, the tables
over seeds beside the paper, the plots, sweep --seeds, results.json's provenance."""

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import analysis, paper, plots, rundir, steps, sweep
from experiments.checkpointing import Checkpoints, abstract_like
from experiments.configlib import apply_override, load_config
from experiments.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]
SPEC = "configs/flipflop.py:{},smoke"
OVERRIDES = ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"]


def config_for(variant: str, seed: int):
    config = load_config(str(ROOT / SPEC.format(variant)))
    for override in [*OVERRIDES, f"train.seed={seed}"]:
        apply_override(config, override)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny flip-flop runs named as `sweep --seeds` names them: CoPE seeds 1 and 2, abs seed 1."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for variant, seed in (("cope", 1), ("cope", 2), ("abs", 1)):
        name = f"{sweep.run_name(SPEC.format(variant))}_seed{seed}"
        train_and_evaluate(config_for(variant, seed), root / name, progress=False)
        dirs[name] = root / name
    return dirs


def test_load_run_restores_the_trained_parameters_without_the_optimizer(runs):
    workdir = runs["flipflop_cope_smoke_seed1"]
    run = analysis.load_run(workdir)
    assert (run.step, run.encoding, run.seed, run.task_name) == (4, "cope", 1, "flipflop")
    assert run.finished and run.results["final"] and [r["step"] for r in run.evaluations()]
    config = run.config
    ts = steps.init_train_state(config, steps.build_model_config(config, run.task))
    checkpoints = Checkpoints(workdir / "checkpoints", keep=3)
    _, full, _ = checkpoints.restore_latest(abstract_like(ts.state, ts.shardings))
    checkpoints.close()
    trained = nnx.state(nnx.merge(ts.graphdef, ts.rng_state, full)[0], nnx.Param)
    loaded = nnx.state(run.model, nnx.Param)
    assert jax.tree.structure(trained) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.tree.leaves(run.state.state)) == len(jax.tree.leaves(loaded))  # no optimizer


def test_run_evaluate_repeats_the_final_evaluation(runs):
    run = analysis.load_run(runs["flipflop_abs_smoke_seed1"])
    again = run.evaluate()
    final = run.results["final"]
    assert again.keys() == final.keys()
    for split, metrics in final.items():
        for key, value in metrics.items():
            if key.endswith("s") and isinstance(value, int):  # counts: exactly
                assert again[split][key] == value, (split, key)
            else:
                assert math.isclose(again[split][key], value, rel_tol=1e-6), (split, key)
    one = run.evaluate("val_sparse", num_examples=8)
    assert list(one) == ["val_sparse"] and one["val_sparse"]["sequences"] == 8
    with pytest.raises(ValueError, match="split must be one of .*, got 'test'"):
        run.evaluate("test")
    with pytest.raises(ValueError, match="num_examples must be an integer >= 1, got 0"):
        run.evaluate(num_examples=0)


def test_attention_gives_probabilities_gates_and_positions_per_layer_and_head(runs):
    run = analysis.load_run(runs["flipflop_cope_smoke_seed2"])
    batch = run.sample("val", n=2, seed=int(np.random.default_rng().integers(1 << 30)))
    layers = run.attention(batch)
    b, t = batch["inputs"].shape
    heads = run.model_config.num_heads
    assert len(layers) == run.model_config.num_layers
    for parts in layers:
        assert set(parts) == {"logits", "probs", "gates", "positions"}
        for value in parts.values():
            assert value.shape == (b, heads, t, t) and value.dtype == np.float32
        causal = np.tril(np.ones((t, t), bool))
        assert np.all(np.isfinite(parts["logits"]) == causal)
        np.testing.assert_allclose(parts["probs"].sum(-1), 1.0, rtol=1e-5)
        # p_ij = sum of g_im for m = j..i (clamped at npos - 1): a suffix sum over the keys.
        gates = np.where(causal, parts["gates"], 0.0)
        suffix = np.flip(np.cumsum(np.flip(gates, -1), -1), -1)
        want = np.minimum(suffix, run.model_config.cope_npos - 1)
        np.testing.assert_allclose(
            np.where(causal, parts["positions"], 0), np.where(causal, want, 0), rtol=1e-5, atol=1e-6
        )


def test_generate_continues_a_prompt_with_the_models_greedy_choice(runs):
    run = analysis.load_run(runs["flipflop_cope_smoke_seed1"])
    prompt = "w1i0r1w0i1r"
    out = run.generate([prompt], max_new_tokens=1)
    ids, _ = run.tokens(prompt)
    logits = run.model(ids)
    assert int(out.tokens[0, 0]) == int(np.argmax(logits[0, -1]))
    assert run.decode(ids[0]) == prompt and len(run.decode(out.tokens[0])) == 1


def test_load_run_errors_are_one_line(runs, tmp_path):
    source = runs["flipflop_cope_smoke_seed1"]

    def copy(name):
        shutil.copytree(source, tmp_path / name)
        return tmp_path / name

    unfinished = copy("unfinished")
    (unfinished / "results.json").unlink()
    corrupt = copy("corrupt")
    (corrupt / "config.json").write_text("{not json")
    older = copy("older")
    saved = json.loads((older / "config.json").read_text())
    del saved["layout"]
    saved["model"]["npos"] = 0
    (older / "config.json").write_text(json.dumps(saved))
    bare = copy("bare")
    shutil.rmtree(bare / "checkpoints")
    cases = [
        (tmp_path / "missing", "is not a run directory (it does not exist)"),
        (unfinished, "is unfinished (trained 4 of 4 steps, no results.json"),
        (corrupt, "config.json is not valid JSON"),
        (older, "written by an older config layout (no layout field; this code reads layout 2"),
        (bare, "has no checkpoints/ to load a model from"),
    ]
    for workdir, message in cases:
        with pytest.raises(rundir.RunDirError) as error:
            analysis.load_run(workdir)
        assert message in str(error.value) and "\n" not in str(error.value)
    assert analysis.load_run(unfinished, unfinished_ok=True).results is None
    with pytest.raises(ValueError, match="holds a run written by an older config layout"):
        train_and_evaluate(config_for("cope", 1), older, progress=False)


def test_paper_table_is_mean_and_std_over_seeds_beside_the_paper(runs):
    loaded = [rundir.read_run(path) for path in runs.values()]
    table = analysis.paper_table(loaded)
    assert table.columns == ("encoding", "seeds", "val", "val_dense", "val_sparse")
    assert [row[:2] for row in table.rows] == [("cope", 2), ("absolute", 1)]
    errors = [100 * r.results["final"]["val_sparse"]["token_error"] for r in loaded[:2]]
    cell = table.cells[("cope", "val_sparse")]
    assert math.isclose(cell.mean, np.mean(errors))
    assert math.isclose(cell.std, np.std(errors, ddof=1))
    assert cell.paper == paper.FLIPFLOP["cope"]["val_sparse"] and cell.n == 2
    assert table.cells[("absolute", "val")].std is None
    assert table.cells[("cope", "val_dense")].paper is None  # the paper reports no dense split
    assert f"{cell.mean:.2f} ± {cell.std:.2f} (paper 4.9)" in table.markdown()
    rows = analysis.compare(loaded)
    assert [row[:3] for row in rows.rows] == [
        ("flipflop_cope_smoke_seed1", "cope", 1),
        ("flipflop_cope_smoke_seed2", "cope", 2),
        ("flipflop_abs_smoke_seed1", "absolute", 1),
    ]


def test_paper_table_bad_input_is_one_line(runs, tmp_path):
    loaded = [rundir.read_run(path) for path in runs.values()]
    counting = dict(loaded[0].results, task="counting")
    other = rundir.RunRecord(
        tmp_path / "count", load_config(str(ROOT / "configs/counting.py:cope,smoke")), [],
        counting, [],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^paper_table needs runs of one task, got flipflop "
                       r"\(flipflop_cope_smoke_seed1, .*\); counting \(count\)$"):  # fmt: skip
        analysis.paper_table([*loaded, other])
    with pytest.raises(ValueError, match="two cope runs have the same seed"):
        analysis.paper_table([loaded[0], loaded[0]])
    changed = rundir.RunRecord(**{**loaded[1].__dict__, "config": config_for("cope", 2)})
    apply_override(changed.config, "model.d_model=64")
    with pytest.raises(ValueError, match="also differ in model/d_model"):
        analysis.paper_table([loaded[0], changed])
    with pytest.raises(ValueError, match="needs at least one run"):
        analysis.paper_table([])


def test_plots_return_figures(runs, tmp_path):
    loaded = [analysis.load_run(path) for path in runs.values()]
    curves = plots.learning_curves(loaded)
    assert len(curves.axes) == 4  # loss and three evaluated splits
    assert len(curves.axes[0].lines) == 3 and len(curves.axes[1].lines) == 3
    bars = plots.errors_beside_paper(analysis.paper_table(loaded))
    assert len(bars.axes[0].patches) == 2 * 3  # two encodings x three splits
    layers = loaded[0].attention(loaded[0].sample(n=1))
    maps = plots.attention_maps(layers, "positions", heads=[1])
    assert len(maps.axes) == 2 and maps.axes[0].get_title() == "layer 0 head 1: positions"
    with pytest.raises(ValueError, match="key must be one of"):
        plots.attention_maps(layers, "position")
    records = plots.load_benchmark(ROOT / "experiments/results/bench_decode_h100.json")
    chart = plots.benchmark_bars(records, "gbps", "decode")
    impls = {r["impl"] for r in records}
    keys = {(r["shape"], r.get("causal"), r["pass"]) for r in records}
    assert len(chart.axes[0].patches) == len(impls) * len(keys)
    with pytest.raises(ValueError, match="is not a kernel benchmark's records"):
        plots.load_benchmark(ROOT / "experiments/results/cope_parts_h100.json")
    curves.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_sweep_seeds_skips_finished_seeds_and_reports_mean_and_std(runs, capsys):
    root = next(iter(runs.values())).parent
    args = ["--root", str(root), "--config", str(ROOT / SPEC.format("cope"))]
    args += [f"--override={o}" for o in OVERRIDES]
    assert sweep.main([*args, "--seeds", "1,2"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, not rerun") == 2 and "started" not in out
    summary = (root / "summary.md").read_text()
    assert "## Over seeds 1, 2" in summary and "| cope | 2 |" in summary and " ± " in summary
    assert sweep.main([*args, "--seeds", "1,x"]) == 2
    assert "--seeds must be comma-separated integers >= 0, got '1,x'" in capsys.readouterr().err


def test_results_record_the_config_commit_versions_and_command(runs):
    workdir = runs["flipflop_abs_smoke_seed1"]
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"] == json.loads((workdir / "config.json").read_text())
    assert results["seed"] == 1 and results["config"]["task"]["options"]["num_pairs"] == 16
    assert set(results["versions"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}
    assert results["versions"]["jax"] == jax.__version__
    commit = results["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    assert isinstance(results["command"], str) and results["command"]
