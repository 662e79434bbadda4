"""The notebook runs top to bottom (nbclient) on tiny CPU runs; any cell that raises fails."""

import time
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from experiments.notebooks import execute  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_notebook_executes_every_cell(tmp_path):
    start = time.perf_counter()
    # CoPE alone (2 seeds) keeps CI fast; the stored notebook also has absolute PE.
    parameters = {"RUNS": str(tmp_path / "runs"), "VARIANTS": ["cope"]}
    notebook, seconds = execute(ROOT / "experiments" / "notebook.ipynb", parameters=parameters)
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
    figures = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(figures) >= 6  # errors, curves, positions, probs and two benchmarks
    table = next(
        output["data"]["text/markdown"]
        for cell in notebook.cells
        if "analysis.paper_table(runs)" in cell.source
        for output in cell.outputs
        if "text/markdown" in output.get("data", {})
    )
    assert "| cope | 2 |" in table and "±" in table and "(paper 4.9)" in table
    print(f"notebook: {seconds:.1f} s executing, {time.perf_counter() - start:.1f} s in all")
