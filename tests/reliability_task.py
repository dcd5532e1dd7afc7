"""A tiny task for the reliability and runner tests, and a child-process entry point that can die on cue.

:func:`recording_sgd` is plain SGD that also keeps every gradient it was given
in its state, so a test can read a sweep's gradients back and compare them with
the core's ``fa_jax.value_and_grad``.

``python tests/reliability_task.py MODE STEP -- run tiny ...`` runs the real
command line (``fa_jax.experiments.cli.main``) on this task and SIGKILLs itself:

* ``after STEP``: right after the first chunk that ends at or past ``STEP``
  (after its checkpoint, if that chunk saves one);
* ``saving STEP``: in the middle of writing the first checkpoint at or past
  ``STEP``: every file is written to orbax's temporary directory, the rename
  that commits it has not happened;
* ``pause STEP``: after the first chunk that ends at or past ``STEP`` (and its
  checkpoint), write ``<checkpoint dir>.paused`` and sleep until a signal comes
  (the lock stays held: a second run, or a SIGINT, can be tried against it);
* ``none 0``: never.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import apply
from fa_jax.experiments._task import Task, accuracy, cross_entropy, sample_rows
from fa_jax.models import init_mlp, mlp

SIZES = (6, 8, 8, 3)
N_TRAIN, BATCH = 48, 8


def make_task(
    *,
    steps: int = 48,
    eval_every: int = 4,
    seeds: int = 3,
    optimizer: str = "adam",
    learning_rate: float | None = None,
    **_,
) -> Task:
    """6-8-8-3 tanh MLP on a fixed random linear-teacher problem (64 points)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, SIZES[0])).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(SIZES[0], SIZES[-1])), axis=1).astype(np.int32)
    data = {
        "x_train": jnp.asarray(x[:N_TRAIN]),
        "y_train": jnp.asarray(y[:N_TRAIN]),
        "x_test": jnp.asarray(x[N_TRAIN:]),
        "y_test": jnp.asarray(y[N_TRAIN:]),
    }
    net = mlp("tanh")

    def batch(data, key, step):
        rows = sample_rows(N_TRAIN, BATCH, key, step)
        return data["x_train"][rows], data["y_train"][rows]

    def evaluate(params, data):
        return accuracy(apply(net, params, data["x_test"]), data["y_test"])

    # inject_hyperparams keeps the learning rate in the optimizer state, so a test can set it per seed.
    if optimizer == "adam":
        opt = optax.adam(1e-2 if learning_rate is None else learning_rate)
    else:
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05 if learning_rate is None else learning_rate)
    return Task(
        name="tiny",
        metric="test_accuracy",
        higher_is_better=True,
        data=data,
        init_params=lambda *, key: init_mlp(SIZES, key=key),
        model=net,
        loss=cross_entropy,
        batch=batch,
        evaluate=evaluate,
        optimizer=opt,
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        description=f"tiny {'-'.join(map(str, SIZES))} tanh MLP, {optimizer}",
        options={"optimizer": optimizer, "learning_rate": learning_rate},
    )


def make_split_task(
    *,
    split: str = "test",
    learning_rate: float = 1e-2,
    steps: int = 16,
    eval_every: int = 8,
    seeds: int = 2,
    poison_test: bool = False,
) -> Task:
    """The tiny task with a validation split, for the protocol's tests.

    ``split="validation"``: trains on training rows 0-39 and scores rows 40-47 (no test row in its
    data); ``"test"``: trains on rows 0-47 and scores the 16 test rows (NaN everywhere with
    ``poison_test``, so a choice that read them could not be made).
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, SIZES[0])).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(SIZES[0], SIZES[-1])), axis=1).astype(np.int32)
    if split == "validation":
        train, scored = slice(0, 40), slice(40, N_TRAIN)
    else:
        train, scored = slice(0, N_TRAIN), slice(N_TRAIN, None)
    x_scored = np.full_like(x[scored], np.nan) if poison_test and split == "test" else x[scored]
    data = {
        "x_train": jnp.asarray(x[train]),
        "y_train": jnp.asarray(y[train]),
        "x_scored": jnp.asarray(x_scored),
        "y_scored": jnp.asarray(y[scored]),
    }
    n, net = len(y[train]), mlp("tanh")

    def batch(data, key, step):
        rows = sample_rows(n, BATCH, key, step)
        return data["x_train"][rows], data["y_train"][rows]

    def evaluate(params, data):
        return accuracy(apply(net, params, data["x_scored"]), data["y_scored"])

    return Task(
        name="tiny_split",
        metric=f"{split}_accuracy",
        higher_is_better=True,
        data=data,
        init_params=lambda *, key: init_mlp(SIZES, key=key),
        model=net,
        loss=cross_entropy,
        batch=batch,
        evaluate=evaluate,
        optimizer=optax.adam(learning_rate),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        description=f"tiny {'-'.join(map(str, SIZES))} tanh MLP, Adam {learning_rate}, {split} split",
        options={"split": split, "learning_rate": learning_rate, "poison_test": poison_test},
    )


class Recorded(NamedTuple):
    """State of :func:`recording_sgd`: steps done, and the gradient of each step ``(steps, *param shape)``."""

    count: jax.Array
    grads: Any


def recording_sgd(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """``u = -learning_rate · g``, with ``g`` of step ``t`` stored at ``state.grads[t]`` (the first ``steps`` steps)."""

    def init(params):
        return Recorded(jnp.int32(0), jax.tree.map(lambda p: jnp.zeros((steps, *p.shape), p.dtype), params))

    def update(grads, state, params=None):
        del params
        kept = jax.tree.map(
            lambda h, g: h.at[state.count].set(g, mode="drop"), state.grads, grads
        )  # past `steps`: kept as is
        return jax.tree.map(lambda g: -learning_rate * g, grads), Recorded(state.count + 1, kept)

    return optax.GradientTransformation(init, update)


def _install_kill(mode: str, at: int) -> None:
    from fa_jax.experiments import checkpoint

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    original = checkpoint.Checkpointer.maybe_save

    def maybe_save(self, step, state, *, final=False):
        if mode == "pause" and step >= at:
            saved = original(self, step, state, final=final)
            with open(os.path.dirname(self.directory) + ".paused", "w") as f:
                f.write(str(step))
            time.sleep(300)  # a SIGINT raises KeyboardInterrupt here
            return saved
        if mode == "saving" and step >= at and (final or step % self.every == 0):
            from orbax.checkpoint._src.path import atomicity

            # Dies after the data files are in the temporary directory, before the commit rename.
            atomicity.AtomicRenameTemporaryPath.finalize = die
        saved = original(self, step, state, final=final)
        if mode == "after" and step >= at:
            die()
        return saved

    checkpoint.Checkpointer.maybe_save = maybe_save


if __name__ == "__main__":
    mode, at, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: reliability_task.py MODE STEP -- CLI ARGS"
    jax.config.update("jax_platforms", "cpu")
    from fa_jax.experiments import TASKS, cli

    TASKS["tiny"] = "reliability_task"
    if mode != "none":
        _install_kill(mode, int(at))
    sys.exit(cli.main(argv))
