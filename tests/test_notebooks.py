"""The walk-through notebooks in docs/notebooks run top to bottom without an error (each asserts its own
hand-computed numbers), and they are committed with their outputs cleared."""

from __future__ import annotations

from pathlib import Path

import nbclient  # the `test` extra installs nbclient, nbformat and ipykernel: a missing one is an error, not a skip
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))


def test_the_four_walk_throughs_exist():
    assert {p.name for p in NOTEBOOKS} >= {"lora.ipynb", "dora.ipynb", "nf4_qlora.ipynb", "ties_dare.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell (its traceback names the cell)
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
