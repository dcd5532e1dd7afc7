"""The fair protocol: options chosen per rule on a validation split that holds no test data, the choice recorded;
optimizer options (β2, weight decay, reduce-on-plateau) and the paper's per-rule recipes; GAT and micro taps."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fa_jax as fj
import reliability_task
from fa_jax.experiments import data as datasets
from fa_jax.experiments import get_task, protocol, run_sweep
from fa_jax.experiments import sweep as sweeps
from fa_jax.experiments._task import make_optimizer, protocol_options
from fa_jax.experiments.cli import main

TINY_DIGITS = dict(dataset="digits", hidden=(16,), steps=20, eval_every=10, batch_size=32)


def test_the_grid_is_chosen_on_validation_only_and_the_best_validation_point_wins():
    calls = []

    def build(**options):
        calls.append(dict(options))
        return reliability_task.make_split_task(poison_test=True, **options)

    grid = {"learning_rate": [1e-3, 3e-2, 0.3]}
    selection = protocol.select(build, "dfa", grid, seeds=2, strategy="vmap")
    assert calls == [{"split": "validation", "learning_rate": v} for v in grid["learning_rate"]]  # never the test split
    means = [p.mean for p in selection.points]
    assert np.isfinite(means).all() and len(set(means)) == 3  # the poisoned test rows were never scored
    assert selection.chosen == {"learning_rate": grid["learning_rate"][int(np.argmax(means))]}
    assert selection.metric == "validation_accuracy" and selection.seeds == [0, 1]
    assert selection.to_json()["chosen"] == selection.chosen


def test_mnist_validation_split_is_the_end_of_the_training_rows_and_holds_no_test_array():
    valid, test = get_task("mnist", split="validation", **TINY_DIGITS), get_task("mnist", **TINY_DIGITS)
    assert set(valid.data) == {"x_train", "y_train", "x_valid", "y_valid"} and "x_test" in test.data
    held = len(valid.data["x_valid"])
    assert held == round(0.1 * len(test.data["x_train"]))
    np.testing.assert_array_equal(valid.data["x_valid"], test.data["x_train"][-held:])
    np.testing.assert_array_equal(valid.data["x_train"], test.data["x_train"][:-held])
    assert valid.metric == "validation_accuracy" and test.metric == "test_accuracy"


@pytest.mark.parametrize(
    "name, options",
    [
        ("field", dict(size=16, frequencies=8, hidden=(8,))),
        ("lm", dict(d=8, layers=1, heads=2, seq=8, max_chars=20_000, valid_windows=4)),
        ("graph", dict(hidden=8)),
    ],
)
def test_every_validation_split_keeps_the_test_data_out(name, options):
    valid, test = get_task(name, split="validation", **options), get_task(name, **options)
    assert valid.options["split"] == "validation" and valid.metric.startswith("validation_")
    if name == "field":  # held-out pixels are not fitted
        fitted = {tuple(r) for r in np.asarray(valid.data["x"]).round(5).tolist()}
        assert not fitted & {tuple(r) for r in np.asarray(valid.data["x_valid"]).round(5).tolist()}
        assert len(valid.data["y"]) + len(valid.data["y_valid"]) == len(test.data["y"])
    elif name == "lm":  # training and scored text both come from the training text, which ends before the test text
        text = datasets.load_text(max_chars=20_000)
        held = round(0.1 * len(text.train))
        np.testing.assert_array_equal(valid.data["train"], text.train[:-held])  # the test text is text.valid
        starts = np.linspace(0, held - 9, 4).astype(int)
        np.testing.assert_array_equal(valid.data["scored"], [text.train[-held:][s : s + 9] for s in starts])
    else:  # graph: test nodes carry no label in the validation data, and validation nodes are never test nodes
        scored_valid, scored_test = np.asarray(valid.data["scored"]) > 0, np.asarray(test.data["scored"]) > 0
        assert not (scored_valid & scored_test).any() and scored_valid.sum() == valid.options["valid_nodes"]
        assert np.all(np.asarray(valid.data["y"])[scored_test] == -1)


def test_ranking_puts_diverged_and_nan_points_last_and_keeps_the_first_of_equals():
    def point(mean, diverged=None):
        return protocol.Point({"learning_rate": mean}, mean, 0.0, 1, diverged or {})

    points = [point(0.5), point(0.9, {0: 3}), point(float("nan")), point(0.7), point(0.7)]
    best = min(points, key=lambda p: protocol._rank(p, True))
    assert best is points[3]
    best = min(points, key=lambda p: protocol._rank(p, False))
    assert best is points[0]
    with pytest.raises(ValueError, match="values repeat"):
        protocol.grid_points({"learning_rate": [1e-3, 1e-3]})


def test_a_task_without_a_validation_split_is_refused():
    with pytest.raises(ValueError, match="did not record split='validation'"):
        protocol.select(reliability_task.make_task, "bp", {"learning_rate": [1e-3]}, seeds=1)


def test_cli_records_the_chosen_learning_rate_in_the_table_and_the_json(tmp_path, capsys):
    argv = [
        "run",
        "graph",
        "--rules",
        "dfa",
        "--seeds",
        "2",
        "--steps",
        "20",
        "--lr-grid",
        "1e-3,3e-2",
        "--strategy",
        "vmap",
        "--quiet",
        "--no-plot",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "results.json").read_text())
    entry = payload["rules"]["dfa"]
    selection = entry["selection"]
    chosen = selection["chosen"]["learning_rate"]
    means = {p["learning_rate"]: p["mean"] for p in selection["points"]}
    assert chosen == max(means, key=means.get) and entry["learning_rate"] == chosen
    assert entry["task_options"]["learning_rate"] == chosen and entry["task_options"]["split"] == "test"
    assert selection["metric"] == "validation_accuracy" and payload["metric"] == "test_accuracy"
    assert f"dfa: chose learning_rate={chosen:g} on the validation split" in printed
    assert f"lr {chosen:g}" in printed[printed.index("rule ") :]  # the table's settings column
    assert "--lr-grid 0.001,0.03 --grid-seeds 2" in payload["command"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lr", "dfa=-1"], "--lr 'dfa=-1': 'dfa=-1': expected a finite number > 0"),
        (["--lr", "kp=1e-3"], "rule 'kp' is not among --rules dfa"),
        (["--lr", "1e-3,2e-3"], "two values for every rule"),
        (["--b2", "1"], "--b2 '1': '1': expected a number in (0, 1)"),
        (["--lr", "1e-3", "--lr-grid", "1e-3,3e-3"], "--lr and --lr-grid both set the learning rate"),
        (["--lr-grid", "1e-3,1e-3"], "--lr-grid '1e-3,1e-3': values repeat"),
        (["--grid-seeds", "2"], "--grid-seeds needs --lr-grid or --wd-grid"),
        (["--recipe", "paper"], "recipe: task 'mnist' has no per-rule 'paper' recipe"),
        (["--recipe", "fancy"], "--recipe 'fancy': expected default or paper"),
        (["--taps", "micro"], "task 'mnist' does not take"),
        (["--threshold", "3"], "--threshold 3 binarises the ratings of --data"),
    ],
)
def test_protocol_flag_errors_are_one_line(extra, needle, capsys, monkeypatch):
    monkeypatch.setattr(sweeps, "prepare_sweep", lambda *a, **k: pytest.fail("prepared a refused run"))
    assert main(["run", "mnist", "--dataset", "digits", "--rules", "dfa", "--quiet", "--no-plot", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fa-jax: error:") and needle in err, err


def test_lr_grid_on_a_task_without_a_validation_split_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sweeps, "prepare_sweep", lambda *a, **k: pytest.fail("prepared a refused run"))
    assert main(["run", "teacher", "--rules", "fa", "--lr-grid", "1e-3,3e-3", "--quiet", "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split" in err, err


# ----------------------------------------------------------------------------- optimizer options and recipes


def test_optimizer_options_match_their_closed_forms():
    params, grads = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.5, 0.25])}
    base = dict(
        recipe="default",
        rule=None,
        learning_rate=None,
        b2=None,
        weight_decay=None,
        plateau=None,
        eval_every=1,
        default={"learning_rate": 0.1, "b2": 0.999, "weight_decay": 0.0, "plateau": 1.0},
    )
    plain = make_optimizer(protocol_options("t", **base))
    reference = optax.adam(0.1)
    np.testing.assert_array_equal(
        plain.update(grads, plain.init(params), params)[0]["w"],
        reference.update(grads, reference.init(params), params)[0]["w"],
    )
    # Weight decay λ adds λW to the gradient before Adam; β2 enters Adam's second moment.
    tx = make_optimizer(protocol_options("t", **{**base, "weight_decay": 0.1, "b2": 0.9}))
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
    g = grads["w"] + 0.1 * params["w"]
    m, v = (1 - 0.9) * g * (1 + 0.9), (1 - 0.9) * g**2 * (1 + 0.9)
    expected = -0.1 * (m / (1 - 0.9**2)) / (jnp.sqrt(v / (1 - 0.9**2)) + 1e-8)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
    # Reduce-on-plateau: a loss that stops improving halves the step after `patience` averaged intervals.
    options = protocol_options("t", **{**base, "plateau": 0.5})
    assert options["plateau_every"] == 1 and options["plateau_patience"] == 2
    tx = optax.with_extra_args_support(make_optimizer(options))
    state = tx.init(params)
    steps = []
    for loss in (1.0, 1.0, 1.0, 1.0):
        updates, state = tx.update(grads, state, params, value=jnp.float32(loss))
        steps.append(float(jnp.abs(updates["w"][0])))
    assert steps[-1] == pytest.approx(steps[0] * 0.5, rel=1e-3) and steps[1] == pytest.approx(steps[0], rel=1e-3)


def test_paper_recipes_are_per_rule_and_a_task_built_for_one_rule_refuses_another():
    dfa = get_task("lm", recipe="paper", rule="dfa", max_chars=20_000)
    bp = get_task("lm", recipe="paper", rule="bp", max_chars=20_000)
    assert (dfa.options["b2"], dfa.options["plateau"], dfa.options["learning_rate"]) == (0.999, 0.5, 1e-3)
    assert (bp.options["b2"], bp.options["plateau"], bp.options["learning_rate"]) == (0.98, 1.0, 3e-3)
    assert dfa.options["rule"] == "dfa" and "recipe 'paper' for dfa" in dfa.description
    assert get_task("lm", recipe="paper", rule="shallow", max_chars=20_000).options["b2"] == 0.999  # it cuts at taps
    assert (
        get_task("lm", recipe="paper", rule="dfa", learning_rate=2e-4, max_chars=20_000).options["learning_rate"]
        == 2e-4
    )
    graph = get_task("graph", recipe="paper", rule=fj.DFA())
    assert (graph.options["learning_rate"], graph.options["weight_decay"]) == (5e-3, 1e-4)
    assert get_task("graph", recipe="paper", rule="fa").options["weight_decay"] == 5e-4
    assert get_task("graph").options["rule"] is None  # the default recipe does not depend on the rule
    with pytest.raises(ValueError, match="rule: recipe 'paper' sets options per rule"):
        get_task("graph", recipe="paper")
    with pytest.raises(ValueError, match="built with recipe 'paper' for rule 'dfa'; training it under 'bp'"):
        sweeps.make_trainer(dfa, "bp", 1)


def test_gat_and_micro_taps_train_under_dfa_with_the_recipes_optimizer():
    gat = get_task("graph", model="gat", hidden=16, heads=4, steps=20, eval_every=10, recipe="paper", rule="dfa")
    params = gat.init_params(key=jax.random.key(0))
    inputs, _ = gat.batch(gat.data, None, 0)
    plan = str(fj.plan(gat.model, params, inputs, fj.FA()))
    assert "0/src" in plan and "0/dst" in plan and "feedback (dense)" in plan  # attention vectors are weight products
    result = run_sweep(gat, "dfa", 1, strategy="vmap")
    assert np.isfinite(result.metrics).all() and result.metrics[0, -1] > result.metrics[0, 0] + 0.05
    lm = get_task(
        "lm",
        d=8,
        layers=2,
        heads=2,
        seq=8,
        taps="micro",
        max_chars=20_000,
        valid_windows=4,
        steps=20,
        eval_every=10,
        recipe="paper",
        rule="dfa",
    )
    params = lm.init_params(key=jax.random.key(0))
    inputs, _ = lm.batch(lm.data, jax.random.key(0), 0)
    taps = [t.name for t in fj.plan(lm.model, params, inputs, fj.DFA()).taps]  # the plan's tap listing, in order
    assert taps == [f"block_{i}_{where}" for i in (0, 1) for where in ("attention", "mlp")]
    result = run_sweep(lm, "dfa", 1, strategy="vmap")  # reduce-on-plateau reads each step's loss
    assert np.isfinite(result.metrics).all() and result.metrics[0, -1] < result.metrics[0, 0]
