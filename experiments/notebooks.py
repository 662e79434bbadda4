"""Runs a notebook top to bottom (nbclient) and stores it with its outputs, without volatile
metadata: `python -m experiments.notebooks experiments/notebook.ipynb [--set NAME=VALUE ...]
[--figures PREFIX]` (`--figures` also writes every figure it shows as `<PREFIX>_<n>.png`).

The cell tagged `parameters` holds the notebook's settings; `--set` (or `parameters=`) adds a
cell after it that overrides them, as papermill does.
"""

from __future__ import annotations

import argparse
import ast
import base64
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(
    path: str | Path,
    out: str | Path | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    timeout: int = 600,
) -> tuple[nbformat.NotebookNode, float]:
    """Executes the notebook at `path` in the repository root and returns (the executed
    notebook, seconds taken); writes it to `out` when given. A cell that raises stops the run
    with nbclient's CellExecutionError naming the cell and the error."""
    notebook = nbformat.read(str(path), as_version=4)
    if parameters:
        index = next(
            (i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])),
            None,
        )
        if index is None:
            raise ValueError(f"{path} has no cell tagged 'parameters' to override")
        source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        notebook.cells.insert(index + 1, cell)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timestamps: every run would differ
    notebook.metadata.pop("widgets", None)
    if out is not None:
        nbformat.write(notebook, str(out))
    return notebook, seconds


def save_figures(notebook: nbformat.NotebookNode, prefix: str | Path) -> list[Path]:
    """Writes the notebook's PNG outputs, in order, to `<prefix>_<n>.png` (n from 1)."""
    images = [
        output["data"]["image/png"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    paths = [Path(f"{prefix}_{n}.png") for n in range(1, len(images) + 1)]
    for path, image in zip(paths, images, strict=True):
        path.write_bytes(base64.b64decode(image))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebook")
    parser.add_argument("--out", default=None, help="where to write it (default: in place)")
    parser.add_argument(
        "--set", action="append", default=[], help="NAME=VALUE (a Python literal), repeatable"
    )
    parser.add_argument("--figures", default=None, help="also save its figures as PREFIX_<n>.png")
    args = parser.parse_args(argv)
    parameters = {}
    for assignment in args.set:
        name, sep, text = assignment.partition("=")
        try:
            parameters[name] = ast.literal_eval(text) if sep else None
        except (ValueError, SyntaxError):
            parser.error(f"--set {assignment!r}: the value must be a Python literal")
        if not sep or not name.isidentifier():
            parser.error(f"--set must be NAME=VALUE, got {assignment!r}")
    notebook, seconds = execute(args.notebook, args.out or args.notebook, parameters=parameters)
    print(f"executed {args.notebook} in {seconds:.1f} s", file=sys.stderr)
    if args.figures:
        for path in save_figures(notebook, args.figures):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
