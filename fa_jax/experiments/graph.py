"""Node classification: a 2-layer GCN (Kipf & Welling 2017) on a contextual stochastic block model.

``Z = Â · tap(tanh(Â X W₁)) · W₂`` with ``Â = D^{-1/2}(A + I)D^{-1/2}``. Full-batch
training on the labelled nodes (20 per class); metric: accuracy on the other
nodes. The graph is :func:`fa_jax.experiments.data.make_csbm` (generated, seed 0), or a
Planetoid-style ``.npz`` (e.g. Cora) from ``--data``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import apply, tap
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import Task, check_count, check_positive_float, check_runner_defaults, data_path
from fa_jax.models import init_mlp


def normalized_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """``D^{-1/2}(A + I)D^{-1/2}``, ``(n, n)``."""
    a = adjacency + np.eye(len(adjacency), dtype=adjacency.dtype)
    inv_sqrt = 1.0 / np.sqrt(a.sum(1))
    return (a * inv_sqrt[:, None] * inv_sqrt[None, :]).astype(np.float32)


def gcn(params, inputs):
    """``inputs = (Â (n, n), X (n, d))`` → logits ``(n, classes)``; the hidden layer is tapped.

    ``Z = Â · tap(tanh(Â (X W₁ + b₁))) · W₂ + Â b₂`` (Kipf & Welling 2017, eq. 9, with biases).
    """
    adjacency, x = inputs
    first, second = params
    h = tap(jnp.tanh(adjacency @ (x @ first["kernel"] + first["bias"])), name="gcn_0")
    return adjacency @ (h @ second["kernel"] + second["bias"])


def make_task(*, data: str | None = None, hidden: int = 64, learning_rate: float = 1e-2, steps: int = 200,
              eval_every: int = 20, seeds: int = 8, train_per_class: int = 20) -> Task:
    """The graph task: GCN ``d-64-classes`` with tanh, Adam 1e-2, full batch.

    ``data``: a Planetoid-style ``.npz`` (see :func:`fa_jax.experiments.data.load_planetoid`;
    nodes labelled ``-1`` are never trained on nor scored); default the generated CSBM.

    Raises:
      TypeError, ValueError: a bad option, named.
      fa_jax.experiments.data.DataError: ``data`` is not a usable graph (one line).
    """
    hidden = check_count(hidden, "hidden")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    train_per_class = check_count(train_per_class, "train_per_class")
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    data = data_path(data)
    if data is not None:
        graph = datasets.load_planetoid(data, train_per_class=train_per_class)
    else:
        graph = datasets.make_csbm(train_per_class=train_per_class)
    if not graph.test_mask.any():
        raise datasets.DataError(f"{data or graph.name}: labels: every labelled node is used for training, none is left "
                                 f"to score; label more nodes or lower train_per_class={train_per_class} (a get_task option)")
    arrays = {
        "adjacency": jnp.asarray(normalized_adjacency(graph.adjacency)), "x": jnp.asarray(graph.features),
        "y": jnp.asarray(graph.labels), "train": jnp.asarray(graph.train_mask, jnp.float32),
        "test": jnp.asarray(graph.test_mask, jnp.float32),
    }
    sizes = (graph.features.shape[1], hidden, graph.num_classes)

    def masked_loss(logits, labels):
        """Mean cross-entropy over the labelled nodes; ``labels (n,)`` is ``-1`` at every unlabelled node."""
        mask = (labels >= 0).astype(logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return jnp.sum(ce * mask) / jnp.sum(mask)

    def batch(data, key, step):  # full batch: the seed sets init and feedback only
        # Unlabelled nodes carry label -1: masked out of the loss, and a zero one-hot for DRTP's target.
        return (data["adjacency"], data["x"]), jnp.where(data["train"] > 0, data["y"], -1)

    def evaluate(params, data):
        logits = apply(gcn, params, (data["adjacency"], data["x"]))
        correct = (jnp.argmax(logits, -1) == data["y"]) * data["test"]
        return jnp.sum(correct) / jnp.sum(data["test"])

    n = len(graph.labels)
    return Task(
        name="graph", metric="test_accuracy", higher_is_better=True, data=arrays,
        init_params=lambda *, key: init_mlp(sizes, key=key), model=gcn, loss=masked_loss, batch=batch,
        evaluate=evaluate, optimizer=optax.adam(learning_rate), steps=steps, eval_every=eval_every, seeds=seeds,
        description=f"{graph.name} ({n} nodes, {int(graph.adjacency.sum()) // 2} edges, {graph.num_classes} classes, "
        f"{int(graph.train_mask.sum())} training / {int(graph.test_mask.sum())} test nodes"
        + (f", {int((graph.labels < 0).sum())} unlabelled" if (graph.labels < 0).any() else "")
        + f"), GCN {'-'.join(map(str, sizes))}, Adam {learning_rate}, full batch",
        options={"data": data, "hidden": hidden, "learning_rate": learning_rate, "train_per_class": train_per_class},
    )
