"""Smoke runs of the benchmarks (``--quick``): they run, print a table and write JSON with every row.

Speed and memory figures are not asserted here (they belong to the full runs); only
that each script produces them, finite, for every variant.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(script: str, out: str) -> dict:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout
    with open(out) as f:
        return json.load(f)


def test_memory_benchmark_quick(tmp_path):
    report = run_quick("memory.py", str(tmp_path / "memory.json"))
    rows = report["rows"]
    assert {"bp/none", "fa/stored", "fa/tiled8_regenerated_rbg", "frsf/regenerated_rbg", "dfa/regenerated"} <= set(rows)
    for row in rows.values():
        assert row["peak_bytes"] == row["resident_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    assert rows["fa/stored"]["feedback_bytes"] > 0 and rows["fa/tiled8_regenerated_rbg"]["feedback_bytes"] < 100
    assert all(math.isfinite(row["time_over_stored"]) for name, row in rows.items() if name.startswith("fa/"))
    assert report["checks"]["fa/tiled8_regenerated_rbg"]["saved_bytes"] > 0


def test_step_time_benchmark_quick(tmp_path):
    report = run_quick("step_time.py", str(tmp_path / "step_time.json"))
    rows = report["rows"]
    assert {"bp", "fa", "dfa", "usf", "frsf", "brsf", "kp", "drtp", "shallow", "dfa_hand_fused"} <= set(rows)
    assert all(math.isfinite(row["median_ratio_to_bp"]) and row["median_ratio_to_bp"] > 0 for row in rows.values())
