"""Conformance, runner entry point: a 2-step ``run_sweep`` under every registered rule takes the core's steps.

For each name in ``fa_jax.RULES`` the sweep (jit + vmap over seeds + ``lax.scan``)
records the gradient of each of its two steps (:func:`reliability_task.recording_sgd`),
and the test recomputes them eagerly with the public core, seed by seed:

* step 0: ``fa_jax.value_and_grad(model, loss, rule)(W₀, F₀, x₀, y₀, step=0)`` with
  ``F₀ = fa_jax.init_feedback(rule, W₀, key=k_fb, model=, inputs=x₀)``;
* step 1: the same at ``W₁ = W₀ + u₀``, ``F₁ = fa_jax.update_feedback(rule, F₀, u₀, W₀)``,
  ``step=1`` (so a runner that skipped Kolen–Pollack's feedback update, or passed
  brSF a wrong step, gives another gradient here);

and the final feedback must be ``update_feedback(rule, F₁, u₁, W₁)``. The keys are
the runner's documented split: ``k_init, k_fb, k_data = split(key(seed), 3)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
import reliability_task
from fa_jax._checks import is_key
from fa_jax._feedback import by_path
from fa_jax.experiments import run_sweep

LEARNING_RATE = 0.5
SEEDS = [0, 5]


def _core_steps(task, rule, seed):
    """The two steps of ``seed`` by the core alone: ``[(loss, grads)] * 2`` and the feedback after each."""
    init_key, feedback_key, data_key = jax.random.split(jax.random.key(seed), 3)
    params = task.init_params(key=init_key)
    inputs, targets = task.batch(task.data, data_key, jnp.int32(0))
    feedback = fj.init_feedback(rule, params, key=feedback_key, model=task.model, inputs=inputs)
    grad_fn = fj.value_and_grad(task.model, task.loss, rule)
    steps, feedbacks = [], [feedback]
    for t in range(2):
        inputs, targets = task.batch(task.data, data_key, jnp.int32(t))
        loss, grads = grad_fn(params, feedback, inputs, targets, step=t)
        updates = jax.tree.map(lambda g: -LEARNING_RATE * g, grads)
        feedback = fj.update_feedback(rule, feedback, updates, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        steps.append((loss, grads))
        feedbacks.append(feedback)
    return steps, feedbacks


# Every registered rule's first step and its 100-step feedback are in tests/test_conformance.py
# (entry point "runner"); here two steps, for the rules whose second step depends on the first:
# learned feedback (kp), the step count (brsf), the targets (drtp), the tap layout (dfa), and the
# test-only rule, which nothing in the runner knows.
@pytest.mark.parametrize("name", ["kp", "brsf", "drtp", "dfa", "scaled_sign"])
def test_two_step_sweep_takes_the_cores_steps(name):
    task = reliability_task.make_task(steps=2, eval_every=2)._replace(
        optimizer=reliability_task.recording_sgd(LEARNING_RATE, 2)
    )
    result = run_sweep(task, name, SEEDS, strategy="vmap")
    assert result.rule == name and np.all(result.diverged_at == -1)
    recorded = result.state.opt_state.grads
    for i, seed in enumerate(SEEDS):
        steps, feedbacks = _core_steps(task, fj.get_rule(name), seed)
        for t, (_, grads) in enumerate(steps):
            got = jax.tree.map(lambda h, i=i, t=t: np.asarray(h)[i, t], recorded)
            for path, want in by_path(grads).items():
                np.testing.assert_allclose(
                    by_path(got)[path],
                    np.asarray(want),
                    rtol=2e-5,
                    atol=1e-6,
                    err_msg=f"rule {name}, seed {seed}, step {t}, {path}",
                )
        # The mean training loss over the interval (steps 0 and 1).
        np.testing.assert_allclose(result.losses[i, 1], np.mean([float(loss) for loss, _ in steps]), rtol=1e-5)
        # The feedback after both steps is the core's: unchanged for fixed rules, learned for KP.
        final = jax.tree.map(lambda x, i=i: x[i], result.state.feedback)
        assert final.layout == feedbacks[-1].layout and final.exact == feedbacks[-1].exact
        for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(feedbacks[-1]), strict=True):
            if is_key(want):
                np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
            else:
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)
    # Hidden layers get a gradient under every rule but shallow (which trains the last block only).
    hidden = np.abs(np.asarray(recorded[0]["kernel"])).max()
    assert (hidden == 0) == (name == "shallow"), (name, hidden)
