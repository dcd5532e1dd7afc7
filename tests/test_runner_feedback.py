"""Regressions of issue 11 in the runner: feedback that learns, and tap rules that project per token.

* ``run_sweep(task, "kp")`` used to train plain FA (the sweep never called
  ``update_feedback``, so B never learned). Now B − W shrinks by exactly the
  rule's factor, ``(1 − λ)`` per step (Akrout et al. 2019, eq. 6: B and W get the same
  update ``u``, so ``B − W ← (1 − λ)(B − W)``), while an FA run keeps B bit for bit.
* DRTP on the ``lm`` task used to keep ``batch_dims=1`` (``Task.rule`` copied the task's
  ``batch_dims`` onto DFA and shallow only), so each token's hidden signal mixed in the
  targets of the other positions. Now the engine finds ``batch_dims = 2`` and the runner's
  step equals the core's under ``fj.DRTP(batch_dims=2)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
import reliability_task
from fa_jax._feedback import by_path
from fa_jax.experiments import get_task, run_sweep

STEPS = 24


def _initial(task, rule, seed):
    """``(params, feedback)`` at step 0 of ``seed``, drawn by the core from the runner's key split."""
    init_key, feedback_key, data_key = jax.random.split(jax.random.key(seed), 3)
    params = task.init_params(key=init_key)
    inputs, _ = task.batch(task.data, data_key, jnp.int32(0))
    return params, fj.init_feedback(rule, params, key=feedback_key, model=task.model, inputs=inputs)


def _gap(feedback, params) -> dict[str, float]:
    """``‖B − W‖`` per weight with feedback."""
    weights = by_path(params)
    return {
        p: float(np.linalg.norm(np.asarray(b, np.float64) - np.asarray(weights[p], np.float64)))
        for p, b in feedback.weights.items()
    }


@pytest.mark.parametrize("rule", ["kp", "fa"])
def test_sweep_learns_kolen_pollack_feedback_and_keeps_fa_feedback(rule):
    task = reliability_task.make_task(steps=STEPS, eval_every=STEPS // 2)
    rule = fj.get_rule(rule)
    result = run_sweep(task, rule, [0, 1], strategy="vmap")
    assert np.all(result.diverged_at == -1)
    for i in range(2):
        params0, feedback0 = _initial(task, rule, i)
        final = jax.tree.map(lambda x, i=i: x[i], result.state)
        assert set(final.feedback.weights) == set(feedback0.weights) == {"0/kernel", "1/kernel", "2/kernel"}
        before, after = _gap(feedback0, params0), _gap(final.feedback, final.params)
        for path, b0 in feedback0.weights.items():
            b = np.asarray(final.feedback.weights[path])
            if rule.name == "fa":
                assert b.tobytes() == np.asarray(b0).tobytes(), path  # fixed feedback: bit-identical
                assert after[path] != pytest.approx(before[path], rel=1e-3)  # W moved, B did not
            else:
                assert not np.allclose(b, np.asarray(b0)), path  # B learned
                np.testing.assert_allclose(
                    after[path] / before[path], (1 - rule.decay) ** STEPS, rtol=1e-4, err_msg=path
                )


def test_drtp_on_the_lm_task_projects_each_token():
    task = get_task(
        "lm", d=16, layers=1, heads=2, seq=8, batch_size=4, max_chars=20_000, valid_windows=8, steps=1, eval_every=1
    )
    task = task._replace(optimizer=reliability_task.recording_sgd(1e-2, 1))
    result = run_sweep(task, "drtp", [3], strategy="vmap")
    layout = result.state.feedback.layout
    assert layout.batch_dims == 2 and [t.name for t in layout.taps] == ["block_0"]
    got = by_path(jax.tree.map(lambda h: np.asarray(h)[0, 0], result.state.opt_state.grads))

    init_key, feedback_key, data_key = jax.random.split(jax.random.key(3), 3)
    params = task.init_params(key=init_key)
    inputs, targets = task.batch(task.data, data_key, jnp.int32(0))

    def core(rule):
        feedback = fj.init_feedback(rule, params, key=feedback_key, model=task.model, inputs=inputs)
        grads = jax.jit(fj.value_and_grad(task.model, task.loss, rule))(params, feedback, inputs, targets, step=0)[1]
        return feedback, by_path(grads)

    feedback, want = core(fj.DRTP(batch_dims=2))
    assert feedback.layout == layout
    for path in want:
        np.testing.assert_allclose(got[path], np.asarray(want[path]), rtol=2e-5, atol=1e-7, err_msg=path)
    # The old behaviour (one projection per sequence, mixing its tokens' targets) gives other block gradients.
    _, mixed = core(fj.DRTP(batch_dims=1, mix_batch=True))
    assert not np.allclose(got["blocks/0/qkv/kernel"], np.asarray(mixed["blocks/0/qkv/kernel"]), rtol=1e-3)
    # DFA and shallow find the same per-token layout (the task no longer sets it).
    for name in ("dfa", "shallow"):
        other = fj.init_feedback(name, params, key=feedback_key, model=task.model, inputs=inputs)
        assert other.layout.batch_dims == 2, name
