"""A tiny task for the reliability tests, and a child-process entry point that can die on cue.

``python tests/reliability_task.py MODE STEP -- run tiny ...`` runs the real
command line (``fa_jax.cli.main``) on this task and SIGKILLs itself:

* ``after STEP``: right after the first chunk that ends at or past ``STEP``
  (after its checkpoint, if that chunk saves one);
* ``saving STEP``: in the middle of writing the first checkpoint at or past
  ``STEP``: every file is written to orbax's temporary directory, the rename
  that commits it has not happened;
* ``none 0``: never.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import apply
from fa_jax.experiments._task import Task, accuracy, cross_entropy, sample_rows
from fa_jax.models import init_mlp, mlp

SIZES = (6, 8, 8, 3)
N_TRAIN, BATCH = 48, 8


def make_task(*, steps: int = 48, eval_every: int = 4, seeds: int = 3, optimizer: str = "adam", **_) -> Task:
    """6-8-8-3 tanh MLP on a fixed random linear-teacher problem (64 points)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, SIZES[0])).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(SIZES[0], SIZES[-1])), axis=1).astype(np.int32)
    data = {"x_train": jnp.asarray(x[:N_TRAIN]), "y_train": jnp.asarray(y[:N_TRAIN]),
            "x_test": jnp.asarray(x[N_TRAIN:]), "y_test": jnp.asarray(y[N_TRAIN:])}
    net = mlp("tanh")

    def batch(data, key, step):
        rows = sample_rows(N_TRAIN, BATCH, key, step)
        return data["x_train"][rows], data["y_train"][rows]

    def evaluate(params, data):
        return accuracy(apply(net, params, data["x_test"]), data["y_test"])

    # inject_hyperparams keeps the learning rate in the optimizer state, so a test can set it per seed.
    opt = optax.adam(1e-2) if optimizer == "adam" else optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
    return Task(
        name="tiny", metric="test_accuracy", higher_is_better=True, data=data,
        init_params=lambda *, key: init_mlp(SIZES, key=key), model=net, loss=cross_entropy, batch=batch,
        evaluate=evaluate, optimizer=opt, steps=steps, eval_every=eval_every, seeds=seeds,
        description=f"tiny {'-'.join(map(str, SIZES))} tanh MLP, {optimizer}",
    )


def _install_kill(mode: str, at: int) -> None:
    from fa_jax.experiments import checkpoint

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    original = checkpoint.Checkpointer.maybe_save

    def maybe_save(self, step, state, *, final=False):
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
    from fa_jax import cli
    from fa_jax.experiments import TASKS

    TASKS["tiny"] = "reliability_task"
    if mode != "none":
        _install_kill(mode, int(at))
    sys.exit(cli.main(argv))
