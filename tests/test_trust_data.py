"""Data validated at load: every malformed ``--data`` file of the mnist and graph loaders is refused in one
line naming the file, the array and the problem, with exit status 2, before anything is trained; pixel
scales are detected and stated; unlabelled graph nodes are masked out of training and scoring."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from fa_jax.experiments import get_task
from fa_jax.experiments import sweep as sweeps
from fa_jax.experiments.cli import main

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (40, 8, 8), dtype=np.uint8)
Y = np.arange(40) % 10


def _mnist(**change):
    arrays = {"x_train": X[:30], "y_train": Y[:30], "x_test": X[30:], "y_test": Y[30:]}
    for key, value in change.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value

    def write(path):
        np.savez(path, **arrays)

    return write


def _floats(array, at=None, value=np.nan):
    out = np.asarray(array, np.float32).copy()
    if at is not None:
        out.reshape(-1)[at] = value
    return out


def _raw(content: bytes):
    def write(path):
        with open(path, "wb") as f:
            f.write(content)

    return write


def _truncated(writer):
    def write(path):
        writer(path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    return write


def _damaged_member(path):
    _mnist()(path)
    with open(path, "r+b") as f:  # a byte inside x_train's data: the zip's CRC no longer matches
        f.seek(os.path.getsize(path) // 3)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0xFF]))


def _npy(path):
    with open(path, "wb") as f:
        np.save(f, X)


def _object_labels(path):
    np.savez(path, x_train=X[:30], y_train=np.array(list(Y[:30]), dtype=object), x_test=X[30:], y_test=Y[30:])


def _idx(array):
    return (
        struct.pack(">HBB", 0, 0x08, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )


def _idx_dir(**change):
    parts = {
        "train-images-idx3-ubyte": _idx(X[:30]),
        "train-labels-idx1-ubyte": _idx(Y[:30]),
        "t10k-images-idx3-ubyte": _idx(X[30:]),
        "t10k-labels-idx1-ubyte": _idx(Y[30:]),
    }
    parts.update(change)

    def write(path):
        os.makedirs(path)
        for stem, content in parts.items():
            with gzip.open(os.path.join(path, stem + ".gz"), "wb") as f:
                f.write(content)

    return write


def _graph(nodes=60, **change):
    import scipy.sparse as sp

    ring = sp.csr_matrix(
        (np.ones(nodes, np.float32), (np.arange(nodes), (np.arange(nodes) + 1) % nodes)), shape=(nodes, nodes)
    )
    arrays = {
        "adj_data": ring.data,
        "adj_indices": ring.indices,
        "adj_indptr": ring.indptr,
        "adj_shape": np.array(ring.shape),
        "features": RNG.normal(size=(nodes, 3)).astype(np.float32),
        "labels": np.arange(nodes) % 2,
    }
    for key, value in change.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value

    def write(path):
        np.savez(path, **arrays)

    return write


MALFORMED = {
    # mnist, .npz
    "short-y_train": ("mnist", _mnist(y_train=Y[:15]), "y_train: 15 labels for 30 rows"),
    "short-y_test": ("mnist", _mnist(y_test=Y[30:35]), "y_test: 5 labels for 10 rows"),
    "label-minus-one": (
        "mnist",
        _mnist(y_train=np.where(np.arange(30) == 3, -1, Y[:30])),
        "y_train: 1 labels outside 0..9 (e.g. -1 at row 3)",
    ),
    "float-labels": (
        "mnist",
        _mnist(y_train=_floats(Y[:30], 4, 2.5)),
        "y_train: float labels such as 2.5 are not class numbers",
    ),
    "labels-10-to-19": ("mnist", _mnist(y_train=Y[:30] + 10), "y_train: 30 labels outside 0..9 (e.g. 10"),
    "nan-labels": ("mnist", _mnist(y_test=_floats(Y[30:], 0)), "y_test: 1 values are NaN or Inf (first at row 0)"),
    "nan-test-pixels": (
        "mnist",
        _mnist(x_test=_floats(X[30:] / 255.0, 70)),
        "x_test: 1 values are NaN or Inf (first at index (1, 0, 6))",
    ),
    "inf-train-pixels": ("mnist", _mnist(x_train=_floats(X[:30], 5, np.inf)), "x_train: 1 values are NaN or Inf"),
    "empty-file": ("mnist", _raw(b""), "is empty (0 bytes), expected a .npz archive"),
    "truncated-npz": ("mnist", _truncated(_mnist()), ".npz"),
    "damaged-member": (
        "mnist",
        _damaged_member,
        "x_train: unreadable, the archive is truncated or damaged (Bad CRC-32",
    ),
    "text-file": ("mnist", _raw(b"x_train,y_train\n1,2\n"), "is not a .npz archive (not a zip file"),
    "npy-not-npz": ("mnist", _npy, "holds a single .npy array, expected a .npz archive"),
    "missing-y_test": ("mnist", _mnist(y_test=None), "lacks arrays ['y_test']"),
    "one-class": (
        "mnist",
        _mnist(y_train=np.full(30, 3)),
        "y_train: every label is 3; training needs at least two classes",
    ),
    "no-rows": ("mnist", _mnist(x_train=X[:0], y_train=Y[:0]), "x_train: has no examples (0 rows)"),
    "no-pixels": (
        "mnist",
        _mnist(x_train=np.zeros((30, 0)), x_test=np.zeros((10, 0))),
        "x_train: has no pixels per example",
    ),
    "negative-pixels": (
        "mnist",
        _mnist(x_train=_floats(X[:30] / 128.0 - 1.0)),
        "x_train: values in [-1, 0.992188] fit neither",
    ),
    "pixels-above-255": (
        "mnist",
        _mnist(x_test=X[30:].astype(np.int32) * 4),
        "x_test: values in [0, 1020] fit neither",
    ),
    "mixed-scales": (
        "mnist",
        _mnist(x_train=_floats(X[:30] / 255.0)),
        "x_test: pixels on the 0–255 scale, x_train's on the 0–1 scale",
    ),
    "other-image-size": (
        "mnist",
        _mnist(x_test=X[30:, :7, :7]),
        "x_test: examples of shape (7, 7), x_train's are (8, 8)",
    ),
    "object-labels": ("mnist", _object_labels, "y_train: holds Python objects (dtype object)"),
    "one-hot-labels": (
        "mnist",
        _mnist(y_train=np.eye(10)[Y[:30]]),
        "y_train: expected a 1-d array of class labels, given shape (30, 10) (one-hot?",
    ),
    "flat-pixels": ("mnist", _mnist(x_train=X[:30].reshape(-1)), "x_train: expected (examples, pixels...)"),
    "string-pixels": (
        "mnist",
        _mnist(x_train=np.full((30, 64), "a")),
        "x_train: expected numeric pixels, given dtype <U1",
    ),
    # mnist, a directory of IDX files
    "idx-truncated": (
        "mnist-dir",
        _idx_dir(**{"train-images-idx3-ubyte": _idx(X[:30])[:-100]}),
        "train-images-idx3-ubyte.gz: x_train: truncated: its header promises 1920 bytes of data",
    ),
    "idx-label-count": (
        "mnist-dir",
        _idx_dir(**{"t10k-labels-idx1-ubyte": _idx(Y[30:39])}),
        "t10k-labels-idx1-ubyte.gz: labels: 9 labels for the 10 images",
    ),
    "idx-bad-magic": (
        "mnist-dir",
        _idx_dir(**{"train-labels-idx1-ubyte": b"\x01\x02" + _idx(Y[:30])[2:]}),
        "train-labels-idx1-ubyte.gz: y_train: not an IDX file",
    ),
    "idx-not-gzip": ("mnist-dir", _idx_dir(), None),  # replaced below by a plain file named .gz
    # graph
    "feature-rows": (
        "graph",
        _graph(features=np.ones((61, 3), np.float32)),
        "features: 61 feature rows for a graph of 60 nodes",
    ),
    "label-count": ("graph", _graph(labels=np.arange(59) % 2), "labels: 59 labels for 60 rows"),
    "one-class-graph": ("graph", _graph(labels=np.zeros(60, int)), "labels: every labelled node is class 0"),
    "no-labelled-node": ("graph", _graph(labels=np.full(60, -1)), "labels: no labelled node"),
    "label-minus-two": (
        "graph",
        _graph(labels=np.where(np.arange(60) == 7, -2, np.arange(60) % 2)),
        "labels: 1 labels below -1 (e.g. -2 at row 7); -1 marks an unlabelled node",
    ),
    "float-graph-labels": (
        "graph",
        _graph(labels=np.where(np.arange(60) == 2, 0.5, np.arange(60) % 2)),
        "labels: float labels such as 0.5",
    ),
    "nan-features": (
        "graph",
        _graph(features=_floats(np.ones((60, 3)), 10)),
        "features: 1 values are NaN or Inf (first at index (3, 1))",
    ),
    "adjacency-not-square": (
        "graph",
        _graph(adj_shape=np.array([60, 61])),
        "adj_shape: the adjacency matrix must be square, given 60 x 61",
    ),
    "adjacency-index-out-of-range": (
        "graph",
        _graph(adj_indices=np.full(60, 99, np.int32)),
        "adj_indices: column indices outside 0..59",
    ),
    "adjacency-row-pointer": (
        "graph",
        _graph(adj_indptr=np.arange(60)),
        "adj_indptr: 60 entries for 60 rows (expected 61)",
    ),
    "missing-labels": ("graph", _graph(labels=None), "lacks arrays ['labels']"),
    "features-1d": ("graph", _graph(features=np.ones(60)), "features: expected a 2-d numeric (nodes, features) array"),
    "truncated-graph": ("graph", _truncated(_graph()), ".npz"),
    "every-labelled-node-trains": (
        "graph",
        _graph(nodes=30, labels=np.arange(30) % 2),
        "labels: every labelled node is used for training, none is left to score",
    ),
}


def _write_case(tmp_path, name):
    task, writer, needle = MALFORMED[name]
    path = str(tmp_path / (name if task == "mnist-dir" else name + ".npz"))
    writer(path)
    if name == "idx-not-gzip":
        with open(os.path.join(path, "train-images-idx3-ubyte.gz"), "wb") as f:
            f.write(_idx(X[:30]))  # plain bytes under a .gz name
        needle = "train-images-idx3-ubyte.gz: x_train: unreadable (Not a gzipped file"
    return ("mnist" if task == "mnist-dir" else task), path, needle


@pytest.fixture
def untrainable(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a sweep was prepared for data that should have been refused")

    monkeypatch.setattr(sweeps, "prepare_sweep", refuse)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_data_is_one_line_and_exit_2_before_training(name, tmp_path, capsys, untrainable):
    task, path, needle = _write_case(tmp_path, name)
    out = tmp_path / "out"
    status = main(
        [
            "run",
            task,
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
            str(out),
        ]
    )
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2, (status, err)
    assert len(err.splitlines()) == 1 and err.startswith("fa-jax: error: "), err
    assert needle in err, err
    assert os.path.basename(path) in err  # the file is named
    assert "Traceback" not in err and not out.exists() and captured.out == ""  # nothing trained, nothing written


def test_at_least_twenty_malformed_files_across_both_loaders():
    assert sum(task.startswith("mnist") for task, _, _ in MALFORMED.values()) >= 20
    assert sum(task == "graph" for task, _, _ in MALFORMED.values()) >= 10


def test_pixel_scale_is_detected_and_stated(tmp_path):
    """Pixels already in [0, 1] are used as they are (the loader used to divide them by 255 again)."""
    unit = X / np.float32(255)
    _mnist(x_train=unit[:30].astype(np.float32), x_test=unit[30:].astype(np.float32))(tmp_path / "unit.npz")
    _mnist()(tmp_path / "bytes.npz")
    as_floats = get_task("mnist", data=str(tmp_path / "unit.npz"), hidden=(8,), steps=2, eval_every=2)
    as_bytes = get_task("mnist", data=str(tmp_path / "bytes.npz"), hidden=(8,), steps=2, eval_every=2)
    np.testing.assert_allclose(np.asarray(as_floats.data["x_train"]), unit[:30].reshape(30, -1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(as_bytes.data["x_train"]), unit[:30].reshape(30, -1), rtol=1e-6)
    assert "pixels already in [0, 1] (float32), used as is" in as_floats.description
    assert "pixels 0–255 (uint8) divided by 255" in as_bytes.description
    assert as_floats.options["data"] == str(tmp_path / "unit.npz")  # absolute, for the run identity


def test_unlabelled_graph_nodes_are_masked_never_trained_on_nor_scored(tmp_path):
    labels = np.where(np.arange(90) % 3 == 0, -1, np.arange(90) % 2)  # a third unlabelled
    _graph(nodes=90, labels=labels)(tmp_path / "g.npz")
    task = get_task("graph", data=str(tmp_path / "g.npz"), hidden=4, steps=2, eval_every=2)
    train, test = np.asarray(task.data["train"]), np.asarray(task.data["scored"])
    unlabelled = labels < 0
    assert not train[unlabelled].any() and not test[unlabelled].any()
    # Every other labelled node is scored, but for the validation nodes (held apart for choosing options).
    assert test[~unlabelled].sum() == (~unlabelled).sum() - train.sum() - task.options["valid_nodes"] > 0
    _, targets = task.batch(task.data, None, 0)
    assert np.all(np.asarray(targets)[unlabelled] == -1)  # masked out of the loss
    assert "30 unlabelled" in task.description
    # A model that always says class 0 scores the share of class 0 among the scored (labelled, held-out) nodes.
    always_zero = [
        {"kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
        {"kernel": np.zeros((4, 2), np.float32), "bias": np.array([1.0, 0.0], np.float32)},
    ]
    scored = test > 0
    assert float(task.evaluate(always_zero, task.data)) == pytest.approx(np.mean(labels[scored] == 0))
