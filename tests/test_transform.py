"""fa_jax.transform.rule_gradients: the rule as the first element of an optax chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fa_jax
from fa_jax.models import init_mlp, mlp
from fa_jax.transform import RuleState, rule_gradients

SIZES = (5, 7, 6, 3)


def mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


def problem(seed, rule):
    kp, kf, kx, kt = jax.random.split(jax.random.key(seed), 4)
    params = init_mlp(SIZES, key=kp)
    x, t = jax.random.normal(kx, (16, SIZES[0])), jax.random.normal(kt, (16, SIZES[-1]))
    feedback = fa_jax.init_feedback(rule, params, key=kf, model=mlp("tanh"), inputs=x)
    return params, feedback, x, t


def chain(*head):
    return optax.chain(*head, optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1))


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_transform_equals_value_and_grad_then_chain(rule):
    params, feedback, x, t = problem(0, rule)
    grad_fn = fa_jax.value_and_grad(mlp("tanh"), mse, rule)
    tx, reference = chain(rule_gradients(grad_fn)), chain()
    p1, s1 = params, tx.init(params)
    p2, s2 = params, reference.init(params)
    step = jax.jit(lambda p, s: tx.update(p, s, p, feedback=feedback, inputs=x, targets=t))
    for _ in range(3):
        updates, s1 = step(p1, s1)
        p1 = optax.apply_updates(p1, updates)
        loss, grads = grad_fn(p2, feedback, x, t)
        updates, s2 = reference.update(grads, s2, p2)
        p2 = optax.apply_updates(p2, updates)
    np.testing.assert_allclose(s1[0].loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_incoming_updates_are_replaced_and_state_starts_nan():
    params, feedback, x, t = problem(1, "fa")
    grad_fn = fa_jax.value_and_grad(mlp("tanh"), mse, "fa")
    tx = rule_gradients(grad_fn)
    state = tx.init(params)
    assert isinstance(state, RuleState) and np.isnan(state.loss)
    junk = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    updates, state = tx.update(junk, state, params, feedback=feedback, inputs=x, targets=t)
    want_loss, want = grad_fn(params, feedback, x, t)
    np.testing.assert_allclose(state.loss, want_loss)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_vmap_over_8_seeds_equals_single_runs():
    rule = "dfa"
    grad_fn = fa_jax.value_and_grad(mlp("tanh"), mse, rule)
    tx = optax.chain(rule_gradients(grad_fn), optax.sgd(0.1))

    def run(params, feedback, x, t):
        state = tx.init(params)
        updates, state = tx.update(params, state, params, feedback=feedback, inputs=x, targets=t)
        return state[0].loss, optax.apply_updates(params, updates)

    problems = jax.vmap(lambda seed: problem(seed, rule))(jnp.arange(8))
    losses, params = jax.jit(jax.vmap(run))(*problems)
    # seed 3's problem on its own (the core's tests cover vmapped init == single init)
    loss, single = jax.jit(run)(*jax.tree.map(lambda a: a[3], problems))
    np.testing.assert_allclose(losses[3], loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a[3], b, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(np.asarray(losses), 6))) == 8


def test_errors_are_clear():
    params, feedback, x, t = problem(0, "fa")
    tx = rule_gradients(fa_jax.value_and_grad(mlp("tanh"), mse, "fa"))
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state, None, feedback=feedback, inputs=x, targets=t)
    with pytest.raises(ValueError, match=r"inputs=\.\.\. and targets="):
        tx.update(params, state, params, feedback=feedback)
