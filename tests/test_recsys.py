"""The recsys task: the click generator, AUC, the MovieLens loader and its refusals, how each rule reaches the
embeddings and the FM branch, and `python -m fa_jax run recsys` on a small ratings file."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
from fa_jax.experiments import data as datasets
from fa_jax.experiments import get_task
from fa_jax.experiments import sweep as sweeps
from fa_jax.experiments.cli import main
from fa_jax.experiments.recsys import auc, branches, init_params, log_loss, network

generate = datasets.make_clicks.__wrapped__  # the generator itself, not the memoised loader


def test_generator_is_deterministic_and_controls_the_positive_rate():
    a = generate(train=3000, test=1000, seed=3)
    b = generate(train=3000, test=1000, seed=3)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
    c = generate(train=3000, test=1000, seed=4)
    assert not np.array_equal(a.x_train, c.x_train) and not np.array_equal(a.y_train, c.y_train)
    for rate in (0.1, 0.4):
        clicks = generate(train=4000, test=1000, positive_rate=rate)
        assert abs(np.mean(np.concatenate([clicks.y_train, clicks.y_test])) - rate) < 0.03
        assert abs(clicks.p_test.mean() - rate) < 0.03  # the bias is set for the rate, labels drawn from it
    # Rows: field f lives in its own block of the table; the 2,000-value field is hashed into 1,024 rows.
    assert a.table == (1024, 500, 200, 100, 50, 20, 10, 5)
    offsets = np.concatenate([[0], np.cumsum(a.table)])
    for f in range(len(a.table)):
        assert offsets[f] <= a.x_train[:, f].min() and a.x_train[:, f].max() < offsets[f + 1]
    # The third-order term carries what a FM cannot: the oracle scores clearly better than its FM part alone.
    fm_part = generate(train=3000, test=1000, seed=3, triple=0.0)
    assert (
        auc(jnp.asarray(a.p_test), jnp.asarray(a.y_test))
        > auc(jnp.asarray(fm_part.p_test), jnp.asarray(a.y_test)) + 0.02
    )


def test_hash_fields_keeps_small_fields_and_hashes_large_ones():
    values = np.array([[0, 0], [1, 2], [7, 2], [1, 0]])
    rows, table = datasets.hash_fields(values, (8, 3), buckets=4)
    assert table == (4, 3)
    np.testing.assert_array_equal(rows[:, 1], 4 + values[:, 1])  # 3 values <= 4 buckets: one row each, after field 0
    expected = ((values[:, 0].astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(4)
    np.testing.assert_array_equal(rows[:, 0], expected.astype(np.int32))


def test_auc_perfect_reversed_constant_and_against_ranks_with_ties():
    labels = jnp.array([0, 1, 0, 1, 1, 0, 0, 1], jnp.float32)
    assert float(auc(labels * 3.0 + 0.1, labels)) == 1.0  # a perfect scorer
    assert float(auc(-labels, labels)) == 0.0
    assert float(auc(jnp.zeros(8), labels)) == 0.5  # every score tied
    rng = np.random.default_rng(0)
    scores, y = rng.integers(0, 5, 200).astype(np.float32), rng.integers(0, 2, 200)
    # Closed form: the probability that a positive outranks a negative, ties counting half.
    pos, neg = scores[y == 1], scores[y == 0]
    expected = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert float(auc(jnp.asarray(scores), jnp.asarray(y))) == pytest.approx(expected, abs=1e-6)
    logits, targets = jnp.array([0.3, -2.0, 1.5]), jnp.array([1.0, 0.0, 0.0])
    expected = -np.mean(
        [np.log(1 / (1 + np.exp(-0.3))), np.log(1 - 1 / (1 + np.exp(2.0))), np.log(1 - 1 / (1 + np.exp(-1.5)))]
    )
    assert float(log_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- how each rule reaches the embeddings


def _grads(model, rule, params, rows, labels):
    rule = fj.get_rule(rule)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(1), model=model, inputs=rows)
    return jax.jit(fj.value_and_grad(model, log_loss, rule))(params, feedback, rows, labels)[1]


def test_fm_branch_trains_exactly_under_every_rule_and_shallow_leaves_the_tower_and_its_embeddings():
    rng = np.random.default_rng(0)
    rows, labels = (
        jnp.asarray(rng.integers(0, 40, (16, 4)), jnp.int32),
        jnp.asarray(rng.integers(0, 2, 16), jnp.float32),
    )
    params = init_params(40, 4, "deepfm", embed=3, hidden=(8,), cross=0, key=jax.random.key(0))
    assert [layer["kernel"].shape for layer in params["tower"]] == [(12, 8), (8, 1)]
    model = network("deepfm")
    bp = _grads(model, "bp", params, rows, labels)
    fm_only = lambda p, x: p["bias"] + branches("deepfm")(p, x)["fm"]  # the FM branch's own gradient
    fm_grads = jax.grad(
        lambda p: log_loss(fm_only(p, rows) + jax.lax.stop_gradient(branches("deepfm")(p, rows)["tower"]), labels)
    )(params)
    grads = {rule: _grads(model, rule, params, rows, labels) for rule in ("fa", "dfa", "shallow")}
    for g in grads.values():
        np.testing.assert_allclose(g["linear"], bp["linear"], atol=1e-7)  # a lookup: exact
        np.testing.assert_allclose(g["tower"][-1]["kernel"], bp["tower"][-1]["kernel"], atol=1e-7)  # the head
    shallow, dfa = grads["shallow"], grads["dfa"]
    # Shallow: the tower's hidden layer is frozen and the embeddings learn from the FM branch alone.
    assert not np.any(shallow["tower"][0]["kernel"])
    np.testing.assert_allclose(shallow["embedding"], fm_grads["embedding"], atol=1e-7)
    # DFA: its tap signal crosses the first tower layer into the embeddings.
    assert np.abs(dfa["embedding"] - fm_grads["embedding"]).max() > 1e-6
    # The tower-only model under shallow: no signal reaches the embeddings at all.
    tower = init_params(40, 4, "tower", embed=3, hidden=(8,), cross=0, key=jax.random.key(0))
    assert not np.any(_grads(network("tower"), "shallow", tower, rows, labels)["embedding"])


# ----------------------------------------------------------------------------- MovieLens-style ratings


def _ratings(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _movielens(n=40, separator="\t"):
    rng = np.random.default_rng(0)
    users, items, stars = rng.integers(1, 7, n), rng.integers(100, 112, n), rng.integers(1, 6, n)
    lines = [
        separator.join(map(str, (u, i, r, 880000000 + k)))
        for k, (u, i, r) in enumerate(zip(users, items, stars, strict=True))
    ]
    return lines, users, items, stars


def test_movielens_loader_reads_every_layout_and_binarises_at_the_threshold(tmp_path):
    lines, users, items, stars = _movielens()
    tab = datasets.load_ratings(_ratings(tmp_path / "u.data", lines))
    colons = datasets.load_ratings(_ratings(tmp_path / "ratings.dat", [line.replace("\t", "::") for line in lines]))
    csv = datasets.load_ratings(
        _ratings(
            tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp"] + [line.replace("\t", ",") for line in lines]
        )
    )
    assert tab.fields == ("user", "item") and tab.table == (len(set(users)), len(set(items)))
    assert len(tab.y_train) == 32 and len(tab.y_test) == 8  # 20% test
    labels = np.concatenate([tab.y_train, tab.y_test])
    assert labels.sum() == (stars >= 4).sum()  # rating >= 4 stars is a positive
    for other in (colons, csv):
        for a, b in zip(tab[:4], other[:4], strict=True):
            np.testing.assert_array_equal(a, b)
    # Rows of the shuffled split are the (user, item) of the file, renumbered densely in sorted order.
    pairs = {
        (int(np.searchsorted(np.unique(users), u)), len(set(users)) + int(np.searchsorted(np.unique(items), i)))
        for u, i in zip(users, items, strict=True)
    }
    assert {tuple(r) for r in np.concatenate([tab.x_train, tab.x_test]).tolist()} <= pairs
    strict = datasets.load_ratings(_ratings(tmp_path / "u5.data", lines), threshold=5)
    assert np.concatenate([strict.y_train, strict.y_test]).sum() == (stars >= 5).sum()


MALFORMED = {
    "fields": (["1\t2\t5\t881250949", "1\t3\t4"], "line 2: expected 4 fields (user item rating timestamp), found 3"),
    "user": (["1\t2\t5\t881250949", "x1\t3\t4\t881250949"], "line 2: user 'x1' is not a non-negative integer"),
    "negative item": (["1\t-2\t5\t881250949"], "line 1: item '-2' is not a non-negative integer"),
    "rating": (["1\t2\tfive\t881250949"], "line 1: rating 'five' is not a number"),
    "nan rating": (["1\t2\tnan\t881250949"], "line 1: rating 'nan' is not finite"),
    "timestamp": (["1\t2\t5\t2024-01-01"], "line 1: timestamp '2024-01-01' is not a non-negative integer"),
    "few": ([f"1\t{i}\t{1 + i % 5}\t0" for i in range(5)], "5 ratings, too few"),
    "one class": ([f"1\t{i}\t5\t0" for i in range(20)], "ratings: every rating (5..5) is at or above the threshold 4"),
    "empty": ([""], "holds no ratings (empty file)"),
}


@pytest.fixture
def untrainable(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a sweep was prepared for data that should have been refused")

    monkeypatch.setattr(sweeps, "prepare_sweep", refuse)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_ratings_are_one_line_and_exit_2_before_training(name, tmp_path, capsys, untrainable):
    lines, needle = MALFORMED[name]
    path = _ratings(tmp_path / "ratings.dat", lines)
    status = main(
        [
            "run",
            "recsys",
            "--data",
            path,
            "--rules",
            "bp",
            "--seeds",
            "1",
            "--steps",
            "2",
            "--quiet",
            "--no-plot",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("fa-jax: error: "), err
    assert needle in err and path in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and captured.out == ""


def test_binary_and_directory_ratings_are_refused_in_one_line(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"\x80\x81\x00\xff" * 10)
    with pytest.raises(datasets.DataError, match=r"bin\.dat: not UTF-8 text"):
        datasets.load_ratings(str(tmp_path / "bin.dat"))
    with pytest.raises(datasets.DataError, match="is a directory"):
        datasets.load_ratings(str(tmp_path))


def test_run_recsys_on_a_ratings_file_prints_auc_per_rule(tmp_path, capsys):
    lines, *_ = _movielens(n=400)
    path = _ratings(tmp_path / "u.data", lines)
    argv = [
        "run",
        "recsys",
        "--data",
        path,
        "--rules",
        "dfa",
        "--seeds",
        "2",
        "--steps",
        "20",
        "--strategy",
        "vmap",
        "--quiet",
        "--no-plot",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("rule ") :]
    assert "test_auc" in table and "fm_branch_auc" in table and "tower_branch_auc" in table
    assert table.count("±") == 4 and "dfa " in table  # AUC, log loss and each branch's AUC
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["metric"] == "test_auc" and payload["task_options"]["threshold"] == 4.0
    for rule in ("dfa",):
        entry = payload["rules"][rule]
        assert 0.0 <= entry["mean"] <= 1.0 and set(entry["report"]) == {"log_loss", "fm_branch_auc", "tower_branch_auc"}
        assert len(entry["report"]["log_loss"]["final"]) == 2
    assert os.path.basename(path) in payload["description"]


def test_generated_task_builds_with_an_oracle_baseline_and_a_validation_split():
    task = get_task("recsys", train=2000, test=500, steps=20, eval_every=10)
    assert 0.6 < task.baselines["oracle"] < 1.0 and task.metric == "test_auc"
    valid = get_task("recsys", train=2000, test=500, steps=20, eval_every=10, split="validation")
    clicks = datasets.make_clicks(train=2000, test=500)
    np.testing.assert_array_equal(np.asarray(valid.data["x_scored"]), clicks.x_train[-200:])  # the last 10% of training
    np.testing.assert_array_equal(np.asarray(valid.data["x_train"]), clicks.x_train[:-200])
    assert valid.metric == "validation_auc" and "oracle" not in valid.baselines
