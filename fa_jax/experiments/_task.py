"""What an experiment is: a :class:`Task` bundles data, model, loss, metric and optimizer."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
        The protocol's options live here too (see :func:`protocol_options`): ``split``
        (``"test"``, or ``"validation"`` for choosing hyperparameters), ``recipe`` and
        the ``rule`` a per-rule recipe was resolved for, and the optimizer's
        ``learning_rate``, ``b2``, ``weight_decay`` and ``plateau``.
      report: ``report(params, data) -> {name: scalar}``, extra metrics computed once
        from each seed's final params (e.g. log loss, the AUC of one branch of a
        DeepFM), or ``None``.
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
    baselines: dict = {}  # noqa: RUF012 - a NamedTuple field has no default factory; never mutated
    description: str = ""
    options: dict = {}  # noqa: RUF012 - a NamedTuple field has no default factory; never mutated
    report: Callable | None = None


def sample_rows(n: int, batch_size: int, key: jax.Array, step: jax.Array) -> jax.Array:
    """Row indices of minibatch ``step``: ``(batch_size,)`` uniform draws (with replacement)
    from ``fold_in(key, step)``.

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


# ----------------------------------------------------------------------------- the protocol: splits, recipes, optimizer

#: ``split="test"`` trains on the whole training split and scores the test split (what tables report);
#: ``split="validation"`` holds out part of the training data, trains on the rest and scores the held-out
#: part; its data holds no test array at all, so a choice made on it never sees the test split.
SPLITS = ("test", "validation")
#: Fraction of the training rows (pixels, characters) held out as the validation split.
VALIDATION_FRACTION = 0.1
#: ``"default"``: one optimizer setting for every rule. ``"paper"``: Launay et al. (2020)'s settings per rule.
RECIPES = ("default", "paper")
#: Reduce-on-plateau cuts the step after this many averaged losses without improvement (:func:`make_optimizer`).
PLATEAU_PATIENCE = 2


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, given {split!r}")
    return split


def holdout(n: int, name: str, fraction: float = VALIDATION_FRACTION) -> int:
    """Rows held out for validation from ``n`` training rows: ``round(fraction · n)``, at least 1, fewer than ``n``."""
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"{name}: {n} training rows are too few to hold out a validation split")
    return k


def check_fraction(value: Any, name: str, *, low: float, high: float, high_ok: bool = True) -> float:
    """A finite number in ``(low, high]`` (``(low, high)`` without ``high_ok``)."""
    value = check_nonnegative_float(value, name) if low == 0 else check_positive_float(value, name)
    if not (low < value and (value <= high if high_ok else value < high)):
        raise ValueError(f"{name}: expected a number in ({low}, {high}{']' if high_ok else ')'}, given {value}")
    return value


def check_nonnegative_float(value: Any, name: str) -> float:
    """A finite real number >= 0 (a weight decay)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number >= 0, given {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a finite number >= 0, given {value}")
    return value


def protocol_options(
    task: str,
    *,
    recipe: Any,
    rule: Any,
    learning_rate: Any,
    b2: Any,
    weight_decay: Any,
    plateau: Any,
    eval_every: int,
    default: dict,
    paper: dict | None = None,
) -> dict:
    """The optimizer options of a task, normalised, with those left ``None`` taken from its recipe.

    Args:
      task: the task's name (for messages).
      recipe: ``"default"`` (``default`` for every rule) or ``"paper"`` (``paper``, which needs ``rule``).
      rule: a rule name or object; only read by ``recipe="paper"``, which asks the rule whether it
        cuts at taps (``rule.cuts``: DFA, DRTP, shallow), never its type.
      learning_rate: Adam's step size (> 0).
      b2: Adam's β2, in ``(0, 1)``.
      weight_decay: λ ≥ 0 of an L2 penalty added to the gradient before Adam (``g + λW``, as
        PyTorch's ``Adam(weight_decay=λ)``, which Kipf & Welling's GCN and Launay et al. used).
      plateau: reduce-on-plateau factor in ``(0, 1]``; ``1`` is off.
      eval_every: the task's eval interval: reduce-on-plateau averages the training loss over it.
      default: ``{"learning_rate", "b2", "weight_decay", "plateau"}`` of the default recipe.
      paper: ``{"cuts": {...}, "other": {...}}`` overrides of ``default`` for rules that cut at
        taps and for the others; ``None`` if the task has no per-rule recipe.

    Returns:
      ``{"recipe", "rule", "learning_rate", "b2", "weight_decay", "plateau"}`` (``rule`` is
      ``None`` under the default recipe, which does not depend on it), plus ``"plateau_every"``
      and ``"plateau_patience"`` when reduce-on-plateau is on.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, given {recipe!r}")
    settings = dict(default)
    rule_name = None
    if recipe == "paper":
        if paper is None:
            raise ValueError(f"recipe: task {task!r} has no per-rule 'paper' recipe (only 'default')")
        if rule is None:
            raise ValueError("rule: recipe 'paper' sets options per rule; give rule= (e.g. rule='dfa')")
        import fa_jax

        resolved = fa_jax.get_rule(rule)
        rule_name = resolved.name
        settings.update(paper["cuts" if resolved.cuts else "other"])
    given = {"learning_rate": learning_rate, "b2": b2, "weight_decay": weight_decay, "plateau": plateau}
    settings.update({k: v for k, v in given.items() if v is not None})
    out = {
        "recipe": recipe,
        "rule": rule_name,
        "learning_rate": check_positive_float(settings["learning_rate"], "learning_rate"),
        "b2": check_fraction(settings["b2"], "b2", low=0.0, high=1.0, high_ok=False),
        "weight_decay": check_nonnegative_float(settings["weight_decay"], "weight_decay"),
        "plateau": check_fraction(settings["plateau"], "plateau", low=0.0, high=1.0),
    }
    if out["plateau"] < 1:
        out["plateau_every"], out["plateau_patience"] = int(eval_every), PLATEAU_PATIENCE
    return out


def make_optimizer(options: dict) -> optax.GradientTransformation:
    """Adam from :func:`protocol_options`' output.

    ``g + λW`` (L2, when ``weight_decay`` λ > 0) → Adam(``learning_rate``, β1 0.9, ``b2``) →
    reduce-on-plateau (when ``plateau`` < 1): the updates are scaled by ``plateau`` each
    time the training loss, averaged over ``plateau_every`` steps, has not improved
    (relative tolerance 1e-4) for ``plateau_patience`` such averages (optax.contrib's
    ``reduce_on_plateau``; the runner passes every step's loss as its ``value``).
    With the defaults this is exactly ``optax.adam(learning_rate)``.
    """
    tx = optax.adam(options["learning_rate"], b2=options["b2"])
    if options["weight_decay"] > 0:
        tx = optax.chain(optax.add_decayed_weights(options["weight_decay"]), tx)
    if options["plateau"] < 1:
        from optax.contrib import reduce_on_plateau

        tx = optax.chain(
            tx,
            reduce_on_plateau(
                factor=options["plateau"],
                patience=options["plateau_patience"],
                accumulation_size=options["plateau_every"],
            ),
        )
    return tx


def describe_optimizer(options: dict) -> str:
    """``"Adam 0.001"``, plus ``β2``, weight decay and reduce-on-plateau when they differ from the defaults."""
    text = f"Adam {options['learning_rate']:g}"
    extra = []
    if options["b2"] != 0.999:
        extra.append(f"β2 {options['b2']:g}")
    if options["weight_decay"] > 0:
        extra.append(f"weight decay {options['weight_decay']:g}")
    if options["plateau"] < 1:
        extra.append(
            f"reduce-on-plateau ×{options['plateau']:g} after {options['plateau_patience']}×"
            f"{options['plateau_every']} steps without improvement"
        )
    if options.get("rule") is not None:
        extra.append(f"recipe {options['recipe']!r} for {options['rule']}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def metric_name(metric: str, split: str) -> str:
    """``"test_accuracy"`` under ``split="test"``, ``"validation_accuracy"`` under ``"validation"``."""
    base = metric[len("test_") :] if metric.startswith("test_") else metric
    return metric if split == "test" else f"validation_{base}"
