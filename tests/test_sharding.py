"""One model trained data-parallel and model-sharded under each rule equals the unsharded step.

A child process forces 4 host devices (tests/sharded_step.py): an MLP step (gradient, Adam, the
rule's feedback update) with the batch sharded over ``data`` (4 ways), then over ``data`` × ``model``
(2 × 2) with every kernel sharded over ``model`` and its feedback laid out like it
(``fa_jax.shard_feedback``).
"""

import json
import os
import subprocess
import sys

import pytest

RULES = ["bp", "fa", "dfa", "usf", "kp"]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def reports():
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_step.py"), *RULES],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rule", RULES)
def test_sharded_steps_equal_the_unsharded_step(reports, rule):
    for layout in ("data", "data+model"):
        report = reports[rule][layout]
        assert report["max_abs_diff"] < 1e-5, (rule, layout, report)
    model_sharded = reports[rule]["data+model"]
    assert "P(None, 'model')" in model_sharded["param_specs"]  # the kernels stayed sharded
    # Stored feedback follows its kernel's sharding, through the rule's update too (KP learns it).
    assert all(spec == "P(None, 'model')" for spec in model_sharded["feedback_specs"])


@pytest.mark.parametrize("rule", RULES)
def test_data_parallel_steps_only_all_reduce_the_gradients(reports, rule):
    """Under data parallelism every rule's step has one (combined) all-reduce: DFA's projection adds none."""
    collectives = reports[rule]["data"]["collectives"]
    assert collectives["all-reduce"] == reports["bp"]["data"]["collectives"]["all-reduce"] >= 1
    assert sum(collectives.values()) == collectives["all-reduce"]
