"""Regression tasks whose minima lie at finite weights: teacher–student and Lillicrap's linear task.

A fixed point of an error-driven rule (FA, DFA, the sign rules) is where its
update vanishes. With softmax cross-entropy the minima lie at infinity, so none is
reached; with the squared error on a *realisable* task the loss reaches 0 at
finite weights, where the output error ``e = y - t`` is 0 and every such rule's
update vanishes: these are the points Chu & Bacho 2023 analyse.

* ``dataset="student"`` (default): a random teacher network of the student's
  architecture (a tanh MLP, taps after each hidden layer) labels Gaussian inputs;
  the student is the same network, wider (over-parameterised), so it can
  represent the teacher exactly (pad the teacher with zero units).
* ``dataset="linear"``: Lillicrap et al. 2016's linear task: a linear network
  30-20-10 without biases learns ``y = T x`` with ``x ~ N(0, I)``,
  ``W ~ U[±0.01]``, SGD with learning rate ``1e-3``, one sample a step; the paper
  draws the feedback ``B ~ U[±0.5]`` (:func:`lillicrap_feedback`; a rule drawn
  by name, as the CLI does, keeps its own default).

Metric: the squared error ``½‖y - t‖²`` per sample on held-out inputs (lower is better).
:func:`teacher_student` and :func:`lillicrap` give the problem itself (data,
model, initial weights) for fixed-point work in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import _checks, apply, tap
from fa_jax.experiments._task import Task
from fa_jax.models import init_mlp, mlp

DATASETS = ("student", "linear")


class Problem(NamedTuple):
    """A realisable regression problem.

    Attributes:
      x_train, y_train: the fixed training batch ``(N, d)``, ``(N, m)`` (fixed points are of this batch).
      x_test, y_test: held-out inputs and their exact targets.
      model: ``model(params, x)``; hidden activations tapped (``layer_0``, ...).
      init_params: ``init_params(*, key, dtype=jnp.float32) -> params`` of the student.
      teacher: the teacher's params (student's architecture, narrower), or the map ``T`` ``(d, m)``.
      name: a one-line description.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    model: Callable
    init_params: Callable
    teacher: Any
    name: str


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``½ Σ (y - t)² / N``: the mean over samples of half the squared error (the paper's loss)."""
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def _check_sizes(sizes: Sequence[int], name: str, minimum: int = 2) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < minimum:
        raise ValueError(f"{name}: expected a sequence of at least {minimum} widths, given {sizes!r}")
    for index, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name}[{index}]: expected an integer >= 1, given {size!r}")
    return tuple(int(s) for s in sizes)


def teacher_student(
    *,
    inputs: int = 6,
    outputs: int = 2,
    teacher_hidden: Sequence[int] = (4, 4),
    student_hidden: Sequence[int] = (12, 12),
    train: int = 32,
    test: int = 1000,
    seed: int = 0,
    dtype: Any = jnp.float32,
) -> Problem:
    """A tanh teacher ``inputs-teacher_hidden-outputs`` labels ``x ~ N(0, I)``; the student is
    ``inputs-student_hidden-outputs``.

    The teacher has LeCun-normal kernels and biases ``N(0, 0.1²)`` (drawn from
    ``key(seed)``); each student layer is at least as wide as the teacher's, so a zero
    training loss is reachable at finite weights. With ``train · outputs`` below the
    student's parameter count the zero-loss points form a manifold (the update
    Jacobian there has that many zero eigenvalues).
    """
    teacher_hidden = _check_sizes(teacher_hidden, "teacher_hidden", 1)
    student_hidden = _check_sizes(student_hidden, "student_hidden", 1)
    if len(teacher_hidden) != len(student_hidden) or any(
        s < t for s, t in zip(student_hidden, teacher_hidden, strict=True)
    ):
        raise ValueError(
            f"student_hidden: expected one width per teacher layer, each >= the teacher's {teacher_hidden}, "
            f"given {student_hidden}"
        )
    for name, value in (("inputs", inputs), ("outputs", outputs), ("train", train), ("test", test)):
        _checks.check_int(value, name, minimum=1)
    keys = jax.random.split(jax.random.key(seed), 3)
    sizes = (inputs, *teacher_hidden, outputs)
    teacher = init_mlp(sizes, key=keys[0], dtype=dtype)
    bias_keys = jax.random.split(keys[1], len(teacher))
    teacher = [
        dict(layer, bias=0.1 * jax.random.normal(k, layer["bias"].shape, dtype))
        for layer, k in zip(teacher, bias_keys, strict=True)
    ]
    net = mlp("tanh")
    x = jax.random.normal(keys[2], (train + test, inputs), dtype)
    y = net(teacher, x)
    student = (inputs, *student_hidden, outputs)

    def init_params(*, key, dtype=dtype):
        return init_mlp(student, key=key, dtype=dtype)

    return Problem(
        x[:train],
        y[:train],
        x[train:],
        y[train:],
        net,
        init_params,
        teacher,
        f"teacher-student tanh, teacher {'-'.join(map(str, sizes))}, student {'-'.join(map(str, student))}, "
        f"{train} training samples",
    )


def embed(teacher: list[dict], student_hidden: Sequence[int]) -> list[dict]:
    """Student params computing the teacher's function exactly: its units first, zeros after.

    Padding unit ``j`` of a hidden layer has zero weights in and out and a zero
    bias, so ``tanh(0) = 0`` and nothing downstream sees it. This is the
    realisability of :func:`teacher_student`: a zero-loss point at finite weights.
    """
    student_hidden = _check_sizes(student_hidden, "student_hidden", 1)
    widths = [layer["kernel"].shape[1] for layer in teacher[:-1]]
    if len(widths) != len(student_hidden) or any(s < t for s, t in zip(student_hidden, widths, strict=True)):
        raise ValueError(
            f"student_hidden: expected one width per teacher layer, each >= {widths}, given {student_hidden}"
        )
    out, fan_in = [], teacher[0]["kernel"].shape[0]
    for layer, width in zip(teacher, [*student_hidden, teacher[-1]["kernel"].shape[1]], strict=True):
        kernel = jnp.zeros((fan_in, width), layer["kernel"].dtype)
        kernel = kernel.at[: layer["kernel"].shape[0], : layer["kernel"].shape[1]].set(layer["kernel"])
        bias = jnp.zeros((width,), layer["bias"].dtype).at[: layer["bias"].shape[0]].set(layer["bias"])
        out.append({"kernel": kernel, "bias": bias})
        fan_in = width
    return out


def linear_net(params: list[dict], x: jax.Array) -> jax.Array:
    """``y = x W₀ W₁ …`` without biases, each hidden activation tapped (``layer_0``, ...)."""
    *hidden, last = params
    for index, layer in enumerate(hidden):
        x = tap(x @ layer["kernel"], name=f"layer_{index}")
    return x @ last["kernel"]


def uniform(scale: float) -> Callable:
    """An initializer ``U[-scale, scale)``: ``init(key, shape, dtype)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def lillicrap_feedback(rule: str = "fa"):
    """Lillicrap et al. 2016's feedback, ``B ~ U[±0.5]``: ``FA(init=U[±0.5])`` (or DFA's projection)."""
    from fa_jax import rules

    if rule == "fa":
        return rules.FA(init=uniform(0.5))
    if rule == "dfa":
        return rules.DFA(init=uniform(0.5))
    raise ValueError(f"rule: expected 'fa' or 'dfa', given {rule!r}")


def lillicrap(
    *, sizes: Sequence[int] = (30, 20, 10), train: int = 200, test: int = 1000, seed: int = 0, dtype: Any = jnp.float32
) -> Problem:
    """Lillicrap et al. 2016's linear task: ``T ~ U[±1]`` ``(d, m)``, ``x ~ N(0, I)``, ``y = x T``; ``W ~ U[±0.01]``.

    The training batch is what fixed points are computed on (the online stream of
    the paper is :func:`make_task`'s); with ``train >= d`` the fixed points of FA
    are exactly the points where ``W₀ W₁ … = T`` (Lillicrap et al., Supplementary).
    """
    sizes = _check_sizes(sizes, "sizes")
    keys = jax.random.split(jax.random.key(seed), 2)
    target_map = jax.random.uniform(keys[0], (sizes[0], sizes[-1]), dtype, -1.0, 1.0)
    x = jax.random.normal(keys[1], (train + test, sizes[0]), dtype)
    y = x @ target_map

    def init_params(*, key, dtype=dtype):
        init = uniform(0.01)
        return [
            {"kernel": init(k, (a, b), dtype)}
            for k, a, b in zip(jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:], strict=True)
        ]

    return Problem(
        x[:train],
        y[:train],
        x[train:],
        y[train:],
        linear_net,
        init_params,
        target_map,
        f"Lillicrap linear {'-'.join(map(str, sizes))} (no biases), W ~ U[±0.01], {train} training samples",
    )


def make_task(
    *,
    dataset: str = "student",
    model: str | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    seeds: int = 8,
    train: int | None = None,
) -> Task:
    """The task for the runner: ``student`` (SGD 0.05 on the 32-sample training batch) or ``linear``.

    ``linear`` draws a fresh sample every step (batch 1, SGD ``1e-3``: the paper's
    online setting). ``model`` may only be ``"mlp"`` (the task fixes its network).
    """
    if model not in (None, "mlp"):
        raise ValueError(f"model: the teacher task fixes its network; expected 'mlp' or nothing, given {model!r}")
    if dataset == "student":
        problem = teacher_student() if train is None else teacher_student(train=train)
        size = batch_size or problem.x_train.shape[0]
        learning_rate = 0.05 if learning_rate is None else learning_rate
        steps, eval_every = steps or 2000, eval_every or 200
        n = problem.x_train.shape[0]

        def batch(data, key, step):
            if size >= n:
                return data["x_train"], data["y_train"]
            rows = jax.random.randint(jax.random.fold_in(key, step), (size,), 0, n)
            return data["x_train"][rows], data["y_train"][rows]

    elif dataset == "linear":
        problem = lillicrap() if train is None else lillicrap(train=train)
        size = batch_size or 1
        learning_rate = 1e-3 if learning_rate is None else learning_rate
        steps, eval_every = steps or 5000, eval_every or 500
        target_map = problem.teacher

        def batch(data, key, step):
            x = jax.random.normal(jax.random.fold_in(key, step), (size, target_map.shape[0]))
            return x, x @ data["T"]

    else:
        raise ValueError(f"dataset: unknown teacher task {dataset!r}; expected one of {DATASETS}")
    data = {"x_train": problem.x_train, "y_train": problem.y_train, "x_test": problem.x_test, "y_test": problem.y_test}
    if dataset == "linear":
        data["T"] = problem.teacher
    net = problem.model

    def evaluate(params, data):
        return squared_error(apply(net, params, data["x_test"]), data["y_test"])

    return Task(
        name=f"teacher_{dataset}",
        metric="test_squared_error",
        higher_is_better=False,
        data=data,
        init_params=lambda *, key: problem.init_params(key=key),
        model=net,
        loss=squared_error,
        batch=batch,
        evaluate=evaluate,
        optimizer=optax.sgd(learning_rate),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        baselines={"predict-0": float(squared_error(jnp.zeros_like(problem.y_test), problem.y_test))},
        description=f"{problem.name}, SGD {learning_rate}, batch {size}",
    )
