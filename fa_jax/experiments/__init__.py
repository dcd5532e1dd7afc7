"""Experiments: tasks at CPU scale and vmapped, sharded seed sweeps (see README "Experiments").

Each task lives in its own module with ``make_task(**options) -> Task``;
:func:`get_task` builds one by name.
"""

from __future__ import annotations

import importlib

from fa_jax.experiments._task import Task
from fa_jax.experiments.sweep import (
    SweepResult,
    Trainer,
    TrainState,
    choose_strategy,
    make_trainer,
    run_single,
    run_sweep,
    seed_mesh,
)

#: Task name -> module holding its ``make_task``.
TASKS = {
    "mnist": "fa_jax.experiments.mnist",
    "field": "fa_jax.experiments.field",
    "lm": "fa_jax.experiments.lm",
    "graph": "fa_jax.experiments.graph",
    "recsys": "fa_jax.experiments.recsys",
    "teacher": "fa_jax.experiments.teacher",
}


def get_task(name: str, **options) -> Task:
    """Build task ``name`` with ``options`` passed to its module's ``make_task``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).make_task(**options)


__all__ = [
    "Task",
    "TASKS",
    "get_task",
    "TrainState",
    "Trainer",
    "SweepResult",
    "make_trainer",
    "run_single",
    "run_sweep",
    "seed_mesh",
    "choose_strategy",
]
