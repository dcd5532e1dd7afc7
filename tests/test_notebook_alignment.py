"""Execute notebooks/alignment.ipynb at its small size (FA_JAX_SMALL=1) and check its outputs."""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "alignment.ipynb"


def test_alignment_notebook_runs_at_small_size(monkeypatch, tmp_path):
    # The kernel inherits this environment: small size, CPU, this interpreter's bin first on PATH.
    monkeypatch.setenv("FA_JAX_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert "small size (CI)" in text
    assert "fixed point: converged=" in text and "max Re eig(-J)" in text
    assert "width    2" in text and "width   16" in text
    assert "than the most accurate run but accuracy > 1 point lower" in text
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4
