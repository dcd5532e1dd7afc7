"""Click-through prediction: FM, DeepFM and Deep & Cross on categorical click data.

The recommender-system models of Launay et al. (2020), at CPU scale. Data: clicks
generated offline by :func:`fa_jax.experiments.data.make_clicks` (8 categorical fields
hashed into one embedding table, a latent-factor ground truth with pairwise and
higher-order interactions, positive rate 0.25; 200,000 training / 10,000 test rows), or a
MovieLens-style ratings file from ``--data`` (:func:`fa_jax.experiments.data.load_ratings`:
fields user and item, ``rating >= 4`` is a positive). Metric: test AUC; the final log
loss and the AUC of each branch of a two-branch model are reported beside it.

Models (``e_f`` is field ``f``'s embedding row, ``x₀ = [e_1; …; e_F]``):

* ``fm`` (Rendle 2010): ``b + Σ_f w_f + Σ_{f<g} ⟨e_f, e_g⟩``;
* ``deepfm`` (Guo et al. 2017): FM + ``tower(x₀)``, the tower an MLP whose hidden layers are tapped;
* ``tower``: DeepFM without its FM branch, ``b + tower(x₀)`` (the tower-only baseline);
* ``dcn`` (Deep & Cross, Wang et al. 2017): cross layers ``x_{l+1} = x₀ ⊙ (x_l w_l) + b_l + x_l``
  (each tapped) beside the tower, a linear head on ``[x_L; h_tower]``.

How each rule's signal reaches the parameters (``fj.plan`` shows it):

* Embedding and linear tables are looked up (``gather``), never a weight product, so
  every rule gives them the exact gradient of whatever reaches the looked-up rows.
* The FM branch has no weight product and no tap: the output error reaches it, and
  through it the embeddings, exactly, under every rule. A FM alone therefore trains
  the same under BP, FA, DFA and shallow.
* The tower and the cross layers are weight products with tapped outputs. Under DFA each
  tap receives ``e B_l`` and that signal flows through its own layer to the layer's
  input; the first tower layer's and every cross layer's input is ``x₀``, so DFA's signal
  reaches the embeddings there. Under FA the tower's error flows back through fixed
  random matrices to ``x₀``. Under shallow the taps receive nothing: the tower (and the
  cross layers) keep their random initial weights, only the head trains, and the
  embeddings learn only from the FM branch (DeepFM) or not at all (tower, DCN).

So a DeepFM whose FM branch carries the score can hide an untrained tower: the
``fm_branch_auc`` and ``tower_branch_auc`` columns score each branch of the trained
model alone, and ``--model fm`` / ``--model tower`` train each branch on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    check_sizes,
    check_split,
    data_path,
    describe_optimizer,
    holdout,
    make_optimizer,
    metric_name,
    protocol_options,
    sample_rows,
)

MODELS = ("deepfm", "fm", "tower", "dcn")
#: The default recipe: Adam 3e-3 for every rule.
DEFAULTS = {"learning_rate": 3e-3, "b2": 0.999, "weight_decay": 0.0, "plateau": 1.0}
#: The two branches of each two-branch model, as scored by ``report``.
BRANCHES = {"deepfm": ("fm", "tower"), "dcn": ("cross", "tower")}


def auc(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Area under the ROC curve of ``scores (n,)`` for binary ``labels (n,)`` (Mann–Whitney U).

    ``AUC = (Σ_{positives} rank − P(P + 1)/2) / (P · N)`` with 1-based ranks of the scores,
    tied scores sharing their mean rank (so a constant scorer gets 0.5). NaN when the
    labels hold one class only.
    """
    scores, labels = jnp.ravel(scores), jnp.ravel(labels).astype(scores.dtype)
    ordered = jnp.sort(scores)
    below = jnp.searchsorted(ordered, scores, side="left")
    upto = jnp.searchsorted(ordered, scores, side="right")
    ranks = (below + upto + 1) / 2.0  # mean 1-based rank of each score's tie group
    positives = jnp.sum(labels)
    negatives = labels.shape[0] - positives
    return (jnp.sum(ranks * labels) - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``logits (n,)`` against labels ``(n,)`` in {0, 1} (nats)."""
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()


def init_params(
    table: int, fields: int, model: str, *, embed: int, hidden: Sequence[int], cross: int, key: jax.Array
) -> dict:
    """Params: ``embedding (table, embed)`` ~ N(0, 0.1²), ``linear (table,)`` zeros, ``bias ()``; a
    ``tower`` (``[{kernel, bias}]``, He-normal kernels, ``hidden`` widths then 1) unless ``fm``;
    ``fm`` only: no tower; ``dcn``: ``cross`` layers ``{w (F·embed,), b (F·embed,)}`` and a linear
    ``head`` ``{cross (F·embed,), tower (hidden[-1],)}`` in place of the tower's last layer."""
    keys = jax.random.split(key, 4 + len(hidden) + cross)  # embedding, head, tower layers (hidden + 1), cross layers
    width = fields * embed
    params: dict[str, Any] = {
        "embedding": 0.1 * jax.random.normal(keys[0], (table, embed)),
        "bias": jnp.zeros(()),
    }
    if model in ("fm", "deepfm"):
        params["linear"] = jnp.zeros((table,))
    if model == "fm":
        return params
    he = jax.nn.initializers.he_normal()
    sizes = (width, *hidden) + ((1,) if model != "dcn" else ())
    params["tower"] = [
        {"kernel": he(k, (a, b)), "bias": jnp.zeros((b,))}
        for k, a, b in zip(keys[3 : 3 + len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
    ]
    if model == "dcn":
        glorot = jax.nn.initializers.glorot_normal()
        params["cross"] = [
            {"w": glorot(k, (width, 1))[:, 0], "b": jnp.zeros((width,))} for k in keys[4 + len(hidden) :]
        ]
        head = 0.01 * jax.random.normal(keys[1], (width + hidden[-1],))
        params["head"] = {"cross": head[:width], "tower": head[width:]}
    return params


def branches(model: str):
    """``branches(params, x (n, fields) int) -> {name: logit part (n,)}``; the model's logit is
    their sum plus the bias."""

    def fm_part(params, e, rows):
        total = e.sum(1)
        pairs = 0.5 * (jnp.sum(total**2, -1) - jnp.sum(e**2, (1, 2)))  # Σ_{f<g} ⟨e_f, e_g⟩ in O(F·k)
        return params["linear"][rows].sum(1) + pairs

    def tower_part(params, x0, *, last: bool):
        h = x0
        layers = params["tower"]
        for index, layer in enumerate(layers[:-1] if last else layers):
            h = tap(jax.nn.relu(h @ layer["kernel"] + layer["bias"]), name=f"tower_{index}")
        return (h @ layers[-1]["kernel"] + layers[-1]["bias"])[:, 0] if last else h

    def parts(params, rows):
        e = params["embedding"][rows]  # (n, F, k)
        x0 = e.reshape(e.shape[0], -1)
        if model == "fm":
            return {"fm": fm_part(params, e, rows)}
        if model == "deepfm":
            return {"fm": fm_part(params, e, rows), "tower": tower_part(params, x0, last=True)}
        if model == "tower":
            return {"tower": tower_part(params, x0, last=True)}
        x = x0
        for index, layer in enumerate(params["cross"]):
            x = tap(x0 * (x @ layer["w"])[:, None] + layer["b"] + x, name=f"cross_{index}")
        h = tower_part(params, x0, last=False)
        return {"cross": x @ params["head"]["cross"], "tower": h @ params["head"]["tower"]}

    return parts


def network(model: str):
    """``model(params, x (n, fields) int32) -> logits (n,)``: the sum of :func:`branches` plus the bias."""
    parts = branches(model)

    def forward(params, rows):
        return params["bias"] + sum(parts(params, rows).values())

    return forward


def load(data: str | None, *, threshold: float, train: int, test: int, buckets: int) -> datasets.Clicks:
    if data is not None:
        return datasets.load_ratings(data, threshold=threshold, buckets=buckets)
    return datasets.make_clicks(train=train, test=test, buckets=buckets)


def make_task(
    *,
    data: str | None = None,
    threshold: float = datasets.RATING_THRESHOLD,
    model: str = "deepfm",
    embed: int = 8,
    hidden: Sequence[int] = (64, 64),
    cross: int = 2,
    buckets: int = 1024,
    train: int = 200_000,
    test: int = 10_000,
    batch_size: int = 512,
    learning_rate: float | None = None,
    b2: float | None = None,
    weight_decay: float | None = None,
    plateau: float | None = None,
    recipe: str = "default",
    rule=None,
    split: str = "test",
    steps: int = 1000,
    eval_every: int = 100,
    seeds: int = 4,
) -> Task:
    """The recsys task: DeepFM (embeddings 8, tower 64-64 ReLU) on generated clicks, Adam 3e-3, batch 512, 1000 steps.

    ``data``: a MovieLens-style ratings file (binarised at ``threshold``, default 4 stars);
    default the generated clicks (``train`` and ``test`` rows). ``buckets``: table rows of a
    field with more values than that (hashed). ``split="validation"`` trains on the first
    90% of the training rows and scores the last 10% (the test rows are not in its data).
    Optimizer options: see :func:`fa_jax.experiments._task.protocol_options` (default recipe only).

    Raises:
      TypeError, ValueError: a bad option, named.
      fa_jax.experiments.data.DataError: ``data`` is not a usable ratings file (one line).
    """
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected one of {MODELS}")
    embed, cross, buckets = (
        check_count(embed, "embed"),
        check_count(cross, "cross", minimum=0),
        check_count(buckets, "buckets"),
    )
    hidden = check_sizes(hidden, "hidden")
    if model != "fm" and not hidden:
        raise ValueError(f"hidden: model {model!r} needs at least one tower layer, given ()")
    train, test = check_count(train, "train", minimum=20), check_count(test, "test", minimum=10)
    batch_size = check_count(batch_size, "batch_size")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise TypeError(f"threshold: expected a finite number of stars, given {threshold!r}")
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    split = check_split(split)
    optimizer = protocol_options(
        "recsys",
        recipe=recipe,
        rule=rule,
        learning_rate=learning_rate,
        b2=b2,
        weight_decay=weight_decay,
        plateau=plateau,
        eval_every=eval_every,
        default=DEFAULTS,
    )
    data = data_path(data)
    clicks = load(data, threshold=float(threshold), train=train, test=test, buckets=buckets)
    x_train, y_train, x_eval, y_eval = clicks.x_train, clicks.y_train, clicks.x_test, clicks.y_test
    truth = clicks.p_test
    if split == "validation":  # the last 10% of the training rows; the test rows never enter
        held = holdout(len(x_train), "split='validation'")
        x_train, y_train, x_eval, y_eval = x_train[:-held], y_train[:-held], x_train[-held:], y_train[-held:]
        truth = None
    if y_eval.all() or not y_eval.any():
        raise datasets.DataError(f"{data or clicks.name}: the {split} split holds one class only; AUC needs both")
    arrays = {
        "x_train": jnp.asarray(x_train),
        "y_train": jnp.asarray(y_train),
        "x_scored": jnp.asarray(x_eval),
        "y_scored": jnp.asarray(y_eval),
    }
    fields, table = x_train.shape[1], sum(clicks.table)
    net, parts = network(model), branches(model)
    n_train = len(y_train)

    def batch(data, key, step):
        rows = sample_rows(n_train, batch_size, key, step)
        return data["x_train"][rows], data["y_train"][rows]

    def evaluate(params, data):
        return auc(apply(net, params, data["x_scored"]), data["y_scored"])

    def report(params, data):
        out = {"log_loss": log_loss(apply(net, params, data["x_scored"]), data["y_scored"])}
        if model in BRANCHES:
            for name, part in parts(params, data["x_scored"]).items():
                out[f"{name}_branch_auc"] = auc(part, data["y_scored"])
        return out

    baselines = {}
    if truth is not None:
        baselines["oracle"] = float(auc(jnp.asarray(truth), jnp.asarray(y_eval)))  # the generator's own probability
    shape = {
        "fm": f"FM (embeddings {embed})",
        "tower": f"tower {fields * embed}-{'-'.join(map(str, hidden))}-1",
        "deepfm": f"DeepFM (embeddings {embed}, tower {'-'.join(map(str, hidden))})",
        "dcn": f"Deep & Cross ({cross} cross layers, tower {'-'.join(map(str, hidden))})",
    }[model]
    scored = f"{len(y_eval)} test" if split == "test" else f"{len(y_eval)} validation (held out of training)"
    return Task(
        name="recsys",
        metric=metric_name("test_auc", split),
        higher_is_better=True,
        data=arrays,
        init_params=lambda *, key: init_params(table, fields, model, embed=embed, hidden=hidden, cross=cross, key=key),
        model=net,
        loss=log_loss,
        batch=batch,
        evaluate=evaluate,
        optimizer=make_optimizer(optimizer),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        baselines=baselines,
        report=report,
        description=f"{clicks.name}: {clicks.detail}; {n_train} train / {scored} rows, {shape}, "
        f"{describe_optimizer(optimizer)}, batch {batch_size}",
        options={
            "data": data,
            "threshold": float(threshold) if data is not None else None,
            "model": model,
            "embed": embed,
            "hidden": list(hidden),
            "cross": cross if model == "dcn" else None,
            "buckets": buckets,
            "train": train if data is None else None,
            "test": test if data is None else None,
            "batch_size": batch_size,
            "split": split,
            **optimizer,
        },
    )
