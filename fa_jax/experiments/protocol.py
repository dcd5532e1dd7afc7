"""A fair comparison: hyperparameters chosen per rule on a validation split, reported on the test split.

Launay et al. (2020) tuned DFA apart from BP (a lower learning rate, another Adam β2,
reduce-on-plateau, less weight decay); comparing every rule at BP's learning rate says
as much about the learning rate as about the rule. :func:`select` runs a grid of task
options (``learning_rate``, ``weight_decay``, …) for one rule on the task's validation
split, ``build(split="validation", **point)``, whose data holds no test array, and picks
the point with the best mean validation metric over seeds. The caller then trains
``build(**chosen)`` (the test split) and reports that: the test split never enters the
choice.

A point where any seed diverged ranks below every point where none did; among the
rest the best mean wins, ties going to the earlier point of the grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

import fa_jax
from fa_jax.experiments._task import Task


class Point(NamedTuple):
    """One grid point's validation result: ``values`` (the options), mean ± std over healthy seeds."""

    values: dict
    mean: float
    std: float
    healthy: int
    diverged: dict


class Selection(NamedTuple):
    """The choice for one rule: ``chosen`` options, every ``Point`` tried, the validation ``metric``."""

    rule: str
    metric: str
    higher_is_better: bool
    chosen: dict
    points: list
    seeds: list
    steps: int

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "seeds": list(self.seeds),
            "steps": self.steps,
            "chosen": dict(self.chosen),
            "points": [
                {
                    **p.values,
                    "mean": p.mean,
                    "std": p.std,
                    "healthy_seeds": p.healthy,
                    "diverged": {str(k): v for k, v in p.diverged.items()},
                }
                for p in self.points
            ],
        }


def grid_points(grid: dict[str, Sequence[Any]]) -> list[dict]:
    """Every combination of ``grid``'s values, the first option varying slowest.

    Raises:
      TypeError, ValueError: ``grid`` is not a non-empty dict of non-empty value lists.
    """
    if not isinstance(grid, dict) or not grid:
        raise TypeError(f"grid: expected a dict of option -> values, given {grid!r}")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
            raise ValueError(f"grid[{name!r}]: expected a non-empty list of values, given {values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"grid[{name!r}]: values repeat: {list(values)}")
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


def validation_task(build: Callable[..., Task], point: dict) -> Task:
    """``build(split="validation", **point)``, checked to be a validation task.

    Raises:
      ValueError: the task takes no ``split`` option, or ignored it (its options do not say
        ``split="validation"``): its metric could be the test metric.
    """
    try:
        task = build(split="validation", **point)
    except TypeError as err:
        if "split" in str(err):
            raise ValueError(
                f"this task has no validation split (its make_task takes no split=), so "
                f"hyperparameters cannot be chosen apart from its test data ({err})"
            ) from None
        raise
    if (getattr(task, "options", None) or {}).get("split") != "validation":
        raise ValueError(
            f"task {task.name!r} did not record split='validation' in its options; it cannot be "
            "trusted to keep its test data out of the choice"
        )
    return task


def _rank(point: Point, higher_is_better: bool) -> tuple:
    mean = point.mean if math.isfinite(point.mean) else (-math.inf if higher_is_better else math.inf)
    return (len(point.diverged) > 0, -mean if higher_is_better else mean)


def select(
    build: Callable[..., Task],
    rule: str | fa_jax.Rule,
    grid: dict[str, Sequence[Any]],
    *,
    seeds: int | Sequence[int],
    steps: int | None = None,
    strategy: str = "auto",
    mesh: Any = None,
    on_point: Callable[[Point], None] | None = None,
) -> Selection:
    """Choose ``rule``'s options from ``grid`` on the validation split.

    Args:
      build: ``build(**options) -> Task``, e.g. ``functools.partial(get_task, "mnist", dataset="digits")``;
        called with ``split="validation"`` and one grid point at a time (never with the test split).
      rule: the rule whose options are chosen.
      grid: ``{option: values}``, e.g. ``{"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3]}``; every
        combination is tried (see :func:`grid_points`).
      seeds: a count or seed values, as in :func:`fa_jax.experiments.run_sweep`.
      steps: training steps of every validation run (default: the task's).
      on_point: called with each :class:`Point` when it is done (progress lines).

    Returns:
      The :class:`Selection`; train ``build(**selection.chosen)`` for the test figure.
    """
    from fa_jax.experiments.sweep import run_sweep

    rule = fa_jax.get_rule(rule)
    points, first = [], None
    for values in grid_points(grid):
        task = validation_task(build, values)
        first = first or task
        result = run_sweep(task, rule, seeds, steps=steps, strategy=strategy, mesh=mesh)
        summary = result.summary()
        point = Point(dict(values), summary.mean, summary.std, summary.healthy, summary.diverged)
        points.append(point)
        if on_point is not None:
            on_point(point)
        seed_values = [int(s) for s in np.asarray(result.seeds)]
        steps_run = int(result.steps[-1])
    assert first is not None, "grid_points yields at least one point"
    best = min(points, key=lambda p: _rank(p, first.higher_is_better))  # min keeps the earliest of equals
    return Selection(rule.name, first.metric, first.higher_is_better, dict(best.values), points, seed_values, steps_run)
