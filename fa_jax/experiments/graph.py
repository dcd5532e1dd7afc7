"""Node classification: a 2-layer GCN (Kipf & Welling 2017) or GAT (Veličković et al. 2018) on a graph.

GCN: ``Z = Â · tap(tanh(Â X W₁)) · W₂`` with ``Â = D^{-1/2}(A + I)D^{-1/2}``. GAT: two
graph-attention layers, the first with 8 heads (ELU, tapped), the second with one
(Launay et al. 2020 trained GAT under DFA with 8 heads and no dropout). Full-batch
training on the labelled training nodes (20 per class, Planetoid style); ``valid_nodes``
other labelled nodes are the validation split, every remaining labelled node is the
test split. Metric: test accuracy. The graph is :func:`fa_jax.experiments.data.make_csbm`
(generated, seed 0), or a Planetoid-style ``.npz`` (e.g. Cora) from ``--data``.

``recipe="paper"``: Launay et al. tuned graphs per rule on Cora and found DFA needs a
lower learning rate and less weight decay (1e-4 against BP's 5e-4): rules that cut at
taps get Adam 5e-3 with weight decay 1e-4, the others Adam 1e-2 with 5e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import apply, tap
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import (
    Task,
    check_count,
    check_runner_defaults,
    check_split,
    data_path,
    describe_optimizer,
    make_optimizer,
    metric_name,
    protocol_options,
)
from fa_jax.models import init_mlp

MODELS = ("gcn", "gat")
#: The default recipe: Adam 1e-2, no weight decay, for every rule.
DEFAULTS = {"learning_rate": 1e-2, "b2": 0.999, "weight_decay": 0.0, "plateau": 1.0}
#: ``recipe="paper"`` (Launay et al. 2020: DFA with a lower learning rate and weight decay 1e-4 against 5e-4).
PAPER = {"other": {"learning_rate": 1e-2, "weight_decay": 5e-4}, "cuts": {"learning_rate": 5e-3, "weight_decay": 1e-4}}


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


def init_gat(d: int, hidden: int, classes: int, heads: int, *, key) -> list[dict]:
    """Two layers: ``kernel (d, hidden)``, attention vectors ``src``/``dst (heads, hidden/heads)``, ``bias (hidden,)``;
    then ``kernel (hidden, classes)``, ``src``/``dst (1, classes)``, ``bias (classes,)``. Glorot-uniform kernels."""
    keys = jax.random.split(key, 6)
    glorot = jax.nn.initializers.glorot_uniform()
    layers = []
    for (k_w, k_s, k_d), (n_in, n_out, h) in zip(
        (keys[:3], keys[3:]), ((d, hidden, heads), (hidden, classes, 1)), strict=True
    ):
        layers.append(
            {
                "kernel": glorot(k_w, (n_in, n_out)),
                "src": glorot(k_s, (h, n_out // h)),
                "dst": glorot(k_d, (h, n_out // h)),
                "bias": jnp.zeros((n_out,)),
            }
        )
    return layers


def gat_layer(layer: dict, x: jax.Array, mask: jax.Array) -> jax.Array:
    """One graph-attention layer (Veličković et al. 2018, eqs. 1-4): ``x (n, d_in)`` → ``(n, heads·f)``.

    ``h = x W`` split into heads ``(n, heads, f)``; ``e_ij = LeakyReLU_0.2(a_srcᵀ h_i + a_dstᵀ h_j)``
    for ``j`` among ``i``'s neighbours and ``i`` itself (``mask (n, n)`` = A + I > 0), ``α_ij`` its
    softmax over ``j``; output ``Σ_j α_ij h_j`` per head, heads concatenated, plus the bias.
    """
    heads, f = layer["src"].shape
    h = (x @ layer["kernel"]).reshape(x.shape[0], heads, f)
    source = jnp.einsum("nhf,hf->nh", h, layer["src"])
    target = jnp.einsum("nhf,hf->nh", h, layer["dst"])
    scores = jax.nn.leaky_relu(source[:, None, :] + target[None, :, :], 0.2)  # (i, j, heads)
    attention = jax.nn.softmax(jnp.where(mask[:, :, None] > 0, scores, -1e9), axis=1)
    return jnp.einsum("ijh,jhf->ihf", attention, h).reshape(x.shape[0], heads * f) + layer["bias"]


def gat(params, inputs):
    """``inputs = (mask (n, n), X (n, d))`` → logits ``(n, classes)``: ``gat(tap(ELU(gat(X))))``,
    the hidden layer tapped."""
    mask, x = inputs
    first, second = params
    h = tap(jax.nn.elu(gat_layer(first, x, mask)), name="gat_0")
    return gat_layer(second, h, mask)


def make_task(
    *,
    data: str | None = None,
    model: str = "gcn",
    hidden: int = 64,
    heads: int = 8,
    learning_rate: float | None = None,
    b2: float | None = None,
    weight_decay: float | None = None,
    plateau: float | None = None,
    recipe: str = "default",
    rule=None,
    split: str = "test",
    steps: int = 200,
    eval_every: int = 20,
    seeds: int = 8,
    train_per_class: int = 20,
    valid_nodes: int | None = None,
) -> Task:
    """The graph task: GCN ``d-64-classes`` with tanh (or ``model="gat"``, 8 heads), Adam 1e-2, full batch.

    ``data``: a Planetoid-style ``.npz`` (see :func:`fa_jax.experiments.data.load_planetoid`;
    nodes labelled ``-1`` are never trained on nor scored); default the generated CSBM.
    ``valid_nodes`` labelled non-training nodes (drawn with ``RandomState(1)``; default 100, or
    half of them on a graph with fewer than 200) form the validation split and are never
    scored as test nodes. Under ``split="validation"`` the
    data holds the labels of the training and validation nodes only (every test node
    reads ``-1``); the graph and every node's features are inputs in both (transductive).

    Raises:
      TypeError, ValueError: a bad option, named.
      fa_jax.experiments.data.DataError: ``data`` is not a usable graph (one line).
    """
    hidden = check_count(hidden, "hidden")
    heads = check_count(heads, "heads")
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected one of {MODELS}")
    if model == "gat" and hidden % heads:
        raise ValueError(f"heads: {heads} heads must divide hidden={hidden}")
    train_per_class = check_count(train_per_class, "train_per_class")
    if valid_nodes is not None:
        valid_nodes = check_count(valid_nodes, "valid_nodes", minimum=0)
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    split = check_split(split)
    optimizer = protocol_options(
        "graph",
        recipe=recipe,
        rule=rule,
        learning_rate=learning_rate,
        b2=b2,
        weight_decay=weight_decay,
        plateau=plateau,
        eval_every=eval_every,
        default=DEFAULTS,
        paper=PAPER,
    )
    data = data_path(data)
    if data is not None:
        graph = datasets.load_planetoid(data, train_per_class=train_per_class)
    else:
        graph = datasets.make_csbm(train_per_class=train_per_class)
    candidates = np.flatnonzero(graph.test_mask)  # labelled, not training
    if not len(candidates):
        raise datasets.DataError(
            f"{data or graph.name}: labels: every labelled node is used for training, none is left "
            f"to score; label more nodes or lower train_per_class={train_per_class} (a get_task option)"
        )
    if valid_nodes is None:
        valid_nodes = min(100, len(candidates) // 2)
    if split == "validation" and valid_nodes == 0:
        raise ValueError("valid_nodes: split='validation' needs at least one validation node, given valid_nodes=0")
    if len(candidates) <= valid_nodes:
        raise datasets.DataError(
            f"{data or graph.name}: labels: {len(candidates)} labelled nodes are left after the "
            f"training nodes, too few for valid_nodes={valid_nodes} validation nodes and a test "
            f"set; label more nodes or lower valid_nodes or train_per_class={train_per_class} "
            "(get_task options)"
        )
    valid_mask = np.zeros_like(graph.test_mask)
    valid_mask[np.random.RandomState(1).choice(candidates, valid_nodes, replace=False)] = True
    test_mask = graph.test_mask & ~valid_mask
    n = len(graph.labels)
    if model == "gat":
        available = datasets.host_available_bytes()
        if available is not None and 8 * 4 * n * n * heads > available:  # scores, softmax and their cotangents
            raise ValueError(
                f"model: GAT's dense attention over {n} nodes and {heads} heads needs about "
                f"{8 * 4 * n * n * heads / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available"
            )
        structure = (graph.adjacency + np.eye(n, dtype=np.float32) > 0).astype(np.float32)
    else:
        structure = normalized_adjacency(graph.adjacency)
    scored_mask = test_mask if split == "test" else valid_mask
    known = graph.train_mask | scored_mask  # labels present in the data; a validation task never holds test labels
    arrays = {
        "adjacency": jnp.asarray(structure),
        "x": jnp.asarray(graph.features),
        "y": jnp.asarray(np.where(known, graph.labels, -1).astype(np.int32)),
        "train": jnp.asarray(graph.train_mask, jnp.float32),
        "scored": jnp.asarray(scored_mask, jnp.float32),
    }
    sizes = (graph.features.shape[1], hidden, graph.num_classes)
    net = gcn if model == "gcn" else gat
    if model == "gcn":
        init = lambda *, key: init_mlp(sizes, key=key)
    else:
        init = lambda *, key: init_gat(*sizes, heads, key=key)

    def masked_loss(logits, labels):
        """Mean cross-entropy over the labelled nodes; ``labels (n,)`` is ``-1`` at every unlabelled node."""
        mask = (labels >= 0).astype(logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return jnp.sum(ce * mask) / jnp.sum(mask)

    def batch(data, key, step):  # full batch: the seed sets init and feedback only
        # Nodes outside training carry label -1: masked out of the loss, and a zero one-hot for DRTP's target.
        return (data["adjacency"], data["x"]), jnp.where(data["train"] > 0, data["y"], -1)

    def evaluate(params, data):
        logits = apply(net, params, (data["adjacency"], data["x"]))
        correct = (jnp.argmax(logits, -1) == data["y"]) * data["scored"]
        return jnp.sum(correct) / jnp.sum(data["scored"])

    shape = (
        f"GCN {'-'.join(map(str, sizes))}"
        if model == "gcn"
        else (f"GAT {sizes[0]}-{heads}x{hidden // heads}-{sizes[2]}")
    )
    return Task(
        name="graph",
        metric=metric_name("test_accuracy", split),
        higher_is_better=True,
        data=arrays,
        init_params=init,
        model=net,
        loss=masked_loss,
        batch=batch,
        evaluate=evaluate,
        optimizer=make_optimizer(optimizer),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        description=f"{graph.name} ({n} nodes, {int(graph.adjacency.sum()) // 2} edges, {graph.num_classes} classes, "
        f"{int(graph.train_mask.sum())} training / {valid_nodes} validation / {int(test_mask.sum())} test nodes"
        + (f", {int((graph.labels < 0).sum())} unlabelled" if (graph.labels < 0).any() else "")
        + f"; scoring the {split} nodes), {shape}, {describe_optimizer(optimizer)}, full batch",
        options={
            "data": data,
            "model": model,
            "hidden": hidden,
            "heads": heads if model == "gat" else None,
            "train_per_class": train_per_class,
            "valid_nodes": valid_nodes,
            "split": split,
            **optimizer,
        },
    )
