"""The experiment notebooks execute top to bottom (small size via FA_JAX_NOTEBOOK_SMALL)."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize(
    "name, expected", [("quickstart.ipynb", ["bp", "fa", "dfa"]), ("seed_sweep.ipynb", ["bp", "dfa", "shallow"])]
)
def test_notebook_runs(name, expected, monkeypatch):
    monkeypatch.setenv("FA_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    errors = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    for rule in expected:
        assert f"{rule} " in text, text
