"""Execute notebooks/alignment.ipynb at its small size (FA_JAX_SMALL=1) and check its outputs."""

import os
import pathlib
import re
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
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "small size (CI)" in text
    # Section 1: the rule reaches the fixed point; BP's backward map is stable there, the flipped one is not.
    assert "fixed point: converged=True" in text
    rows = {name: line for line in text.splitlines() for name in ("B₁ = W₁", "B₁ = -W₁") if name in line}
    assert "kicks: returned" in rows["B₁ = W₁"] and float(re.search(r"margin ([-+]\S+)", rows["B₁ = W₁"])[1]) > 0
    assert "kicks: left" in rows["B₁ = -W₁"] and float(re.search(r"margin ([-+]\S+)", rows["B₁ = -W₁"])[1]) < 0
    # The fixed points of both tasks, then sections 2b-2d and 3 ran and reported.
    assert len(re.findall(r"fa: 1/1 seeds reach ‖g‖ < 1e-8", text)) == 2
    assert "margin sign vs the eigen-direction kick:" in text
    # Metrics beside the aggregate: per-layer cosines, the norm ratio, the BP reference's norm.
    assert "‖FA‖/‖BP‖" in text and "‖∇L_BP‖" in text and "kernel cos/ratio" in text and "per layer" in text
    assert "width    2" in text and "width    8" in text and "4x longer" in text and "B scaled x10" in text
    assert "total time" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 7
