"""What an experiment is: a :class:`Task` bundles data, model, loss, metric and optimizer."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


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
