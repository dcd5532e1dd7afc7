"""What an experiment is: a :class:`Task` bundles data, model, loss, metric and optimizer."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import _checks


class Task(NamedTuple):
    """One experiment, as pure functions over a data pytree.

    Attributes:
      name: task name (``"mnist"``...).
      metric: name of the evaluation metric (``"test_accuracy"``, ``"psnr_db"``...).
      higher_is_better: direction of ``metric``.
      data: pytree of arrays (train and evaluation), an explicit argument of the
        jitted training loop so it is not baked into the program as a constant.
      init_params: ``init_params(*, key) -> params``.
      model: ``model(params, inputs) -> outputs``, a plain JAX function; its hidden
        activations are marked with :func:`fa_jax.tap` (where DFA, DRTP and shallow cut).
        The leading dims the output and taps share (2 for a per-token LM loss) are
        found by the engine, never set by the task.
      loss: ``loss(outputs, targets) -> scalar``.
      batch: ``batch(data, key, step) -> (inputs, targets)``; ``key`` is the seed's
        data key, so the data order is a function of the seed.
      evaluate: ``evaluate(params, data) -> scalar`` metric (plain forward).
      optimizer: an optax transformation (it only ever sees ``params``).
      steps, eval_every, seeds: defaults for the runner.
      baselines: reference values printed beside the table (e.g. a unigram model).
      description: one line for ``--help`` and the results file.
      options: the ``make_task`` options that shape the task, normalised (defaults
        filled in, a data path made absolute); part of a checkpoint's run identity
        and of ``results.json``. Runner defaults (steps, eval_every, seeds) are not in it.
    """

    name: str
    metric: str
    higher_is_better: bool
    data: Any
    init_params: Callable
    model: Callable
    loss: Callable
    batch: Callable
    evaluate: Callable
    optimizer: optax.GradientTransformation
    steps: int = 1000
    eval_every: int = 100
    seeds: int = 8
    baselines: dict = {}
    description: str = ""
    options: dict = {}


def sample_rows(n: int, batch_size: int, key: jax.Array, step: jax.Array) -> jax.Array:
    """Row indices of minibatch ``step``: ``(batch_size,)`` uniform draws (with replacement) from ``fold_in(key, step)``.

    Drawing with replacement costs nothing beside a training step; an
    epoch-wise ``random.permutation`` (a sort of all ``n`` rows) cost ~4 ms per
    step on CPU, more than the step itself for the small MLPs here.
    """
    return jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n)


def row_batches(x: str, y: str, n: int, batch_size: int) -> Callable:
    """``batch(data, key, step) -> (data[x][rows], data[y][rows])`` with :func:`sample_rows`."""

    def batch(data, key, step):
        rows = sample_rows(n, batch_size, key, step)
        return data[x][rows], data[y][rows]

    return batch


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over all leading dims; ``labels`` are integer classes."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# ----------------------------------------------------------------------------- option checks (make_task)


def check_positive_float(value: Any, name: str) -> float:
    """A finite real number > 0 (a learning rate, a scale): refused, naming ``name``, otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number, given {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number > 0, given {value}")
    return value


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """An integer in ``[minimum, 2**31)`` (sizes and step counts are int32 inside the programs)."""
    return _checks.check_int(value, name, minimum=minimum, limit=2**31)


def check_sizes(value: Any, name: str) -> tuple[int, ...]:
    """A sequence of positive integers (hidden layer widths)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence of positive integers, given {value!r}")
    return tuple(check_count(v, f"{name}[{i}]") for i, v in enumerate(value))


def check_runner_defaults(*, steps: Any, eval_every: Any, seeds: Any) -> tuple[int, int, int]:
    """``steps`` and ``eval_every`` in ``[1, 2**31)`` with ``eval_every`` dividing ``steps``; ``seeds`` >= 1."""
    steps, eval_every = check_count(steps, "steps"), check_count(eval_every, "eval_every")
    if steps % eval_every:
        raise ValueError(f"steps={steps} must be a multiple of eval_every={eval_every}")
    return steps, eval_every, _checks.check_int(seeds, "seeds", minimum=1, limit=2**32 + 1)


def data_path(value: Any, name: str = "data") -> str | None:
    """``None``, or the absolute, normalised path of an existing file or directory."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name}: expected a path, given {value!r}")
    path = os.path.abspath(os.fspath(value))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: {path!r} does not exist")
    return path
