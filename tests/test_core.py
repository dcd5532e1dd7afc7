"""Core engine against independent NumPy closed-form updates (tests/reference.py)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fa_jax as fj
import reference
from fa_jax.models import init_mlp, mlp

RULES = ["bp", "fa", "dfa", "shallow"]


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def random_case(seed):
    """A random MLP: depth 1–4 hidden layers, odd widths, a random activation."""
    rng = np.random.RandomState(seed)
    depth = rng.randint(1, 5)
    sizes = [int(rng.randint(2, 12)) for _ in range(depth + 2)]
    activation = ["tanh", "relu", "sigmoid", "linear"][seed % 4]
    batch = int(rng.randint(1, 9))
    key = jax.random.key(seed)
    params = init_mlp(sizes, key=key)
    x = jnp.asarray(rng.randn(batch, sizes[0]), jnp.float32)
    t = jnp.asarray(rng.randn(batch, sizes[-1]), jnp.float32)
    return sizes, activation, params, x, t


def numpy_feedback(rule, feedback, params):
    if rule == "fa":
        return [np.asarray(layer["kernel"]) for layer in fj.materialize_fa(feedback, params)]
    if rule == "dfa":
        return [np.asarray(b) for b in fj.dfa_matrices(feedback)]
    return None


def assert_tree_close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", range(6))
def test_matches_numpy_reference(seed, rule, jit):
    sizes, activation, params, x, t = random_case(seed)
    model = mlp(activation)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(100 + seed), model=model, inputs=x)
    grad_fn = fj.value_and_grad(model, mse, rule)
    loss, grads = (jax.jit(grad_fn) if jit else grad_fn)(params, feedback, x, t)
    want_loss, want = reference.gradients(params, x, t, activation, rule, numpy_feedback(rule, feedback, params))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert_tree_close(grads, want)


@pytest.mark.parametrize("seed", range(3))
def test_bp_is_exactly_jax_value_and_grad(seed):
    _, activation, params, x, t = random_case(seed)
    model = mlp(activation)
    got = fj.value_and_grad(model, mse, "bp")(params, None, x, t)
    want = jax.value_and_grad(lambda p: mse(fj.apply(model, p, x), t))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("seed", range(4))
def test_fa_with_feedback_equal_to_weights_is_bp(seed):
    _, activation, params, x, t = random_case(seed)
    model = mlp(activation)
    feedback = fj.FAFeedback([{"kernel": layer["kernel"], "bias": None} for layer in params])
    loss, grads = fj.value_and_grad(model, mse, "fa")(params, feedback, x, t)
    _, want = reference.gradients(params, x, t, activation, "bp")
    assert_tree_close(grads, want)


@pytest.mark.parametrize("rule", ["dfa", "shallow"])
@pytest.mark.parametrize("seed", range(4))
def test_output_layer_trains_on_exact_gradient(seed, rule):
    _, activation, params, x, t = random_case(seed)
    model = mlp(activation)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(seed), model=model, inputs=x)
    _, grads = fj.value_and_grad(model, mse, rule)(params, feedback, x, t)
    _, bp = fj.value_and_grad(model, mse, "bp")(params, None, x, t)
    np.testing.assert_allclose(grads[-1]["kernel"], bp[-1]["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[-1]["bias"], bp[-1]["bias"], rtol=1e-6, atol=1e-7)


def test_dfa_hidden_gradients_ignore_downstream_weights():
    # A loss linear in y makes e constant, so only the path to the output could
    # carry a dependence on downstream weights: DFA must have none, BP does.
    sizes, params = [6, 9, 8, 7, 3], init_mlp([6, 9, 8, 7, 3], key=jax.random.key(0))
    model = mlp("tanh")
    x = jax.random.normal(jax.random.key(1), (5, 6))
    direction = jax.random.normal(jax.random.key(2), (5, 3))
    linear_loss = lambda y, c: jnp.sum(y * c)
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(3), model=model, inputs=x)
    changed = [dict(layer) for layer in params]
    for layer in changed[1:]:
        layer["kernel"] = 3.0 * layer["kernel"] + 0.5
    for rule, should_change in (("dfa", False), ("bp", True)):
        grad_fn = fj.value_and_grad(model, linear_loss, rule)
        _, before = grad_fn(params, feedback, x, direction)
        _, after = grad_fn(changed, feedback, x, direction)
        same = np.allclose(before[0]["kernel"], after[0]["kernel"], atol=1e-6)
        assert same != should_change, rule


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_vmap_over_seeds_equals_loop(rule):
    _, activation, params, x, t = random_case(2)
    model = mlp(activation)
    grad_fn = fj.value_and_grad(model, mse, rule)

    def one_seed(seed):
        key = jax.random.key(seed)
        p = init_mlp([x.shape[1], 7, 5, t.shape[1]], key=key)
        fb = fj.init_feedback(rule, p, key=jax.random.fold_in(key, 1), model=model, inputs=x)
        return grad_fn(p, fb, x, t)

    seeds = jnp.arange(8)
    batched = jax.jit(jax.vmap(one_seed))(seeds)
    for i in range(8):
        single = one_seed(i)
        for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_bfloat16_is_preserved(rule):
    params = init_mlp([4, 6, 5, 3], key=jax.random.key(0), dtype=jnp.bfloat16)
    x = jnp.ones((2, 4), jnp.bfloat16)
    t = jnp.zeros((2, 3), jnp.bfloat16)
    model = mlp("tanh")
    feedback = fj.init_feedback(rule, params, key=jax.random.key(1), model=model, inputs=x)
    loss, grads = jax.jit(fj.value_and_grad(model, mse, rule))(params, feedback, x, t)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("rule", RULES)
def test_training_loop_inside_lax_scan(rule):
    sizes, activation, params, x, t = random_case(1)
    model = mlp(activation)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(7), model=model, inputs=x)
    grad_fn = fj.value_and_grad(model, mse, rule)
    tx = optax.sgd(0.05)

    def step(carry, _):
        p, opt = carry
        loss, grads = grad_fn(p, feedback, x, t)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    (scanned, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=5))(params)
    looped = params
    for _ in range(5):
        _, grads = reference.gradients(looped, x, t, activation, rule, numpy_feedback(rule, feedback, params))
        looped = jax.tree.map(lambda p, g: p - 0.05 * g, looped, grads)
    assert_tree_close(scanned, jax.tree.map(np.asarray, looped), tol=1e-4)
    assert losses.shape == (5,)


def test_feedback_ops_accept_leading_batch_dims():
    key = jax.random.key(0)
    x = jax.random.normal(key, (2, 3, 5))
    kernel, feedback = jax.random.normal(jax.random.key(1), (2, 5, 4))
    bias = jnp.arange(4.0)
    g = jax.random.normal(jax.random.key(2), (2, 3, 4))
    y, pullback = jax.vjp(lambda x_, k_, b_: fj.feedback_dense(x_, k_, b_, feedback), x, kernel, bias)
    dx, dk, db = pullback(g)
    xn, kn, fn, gn = map(np.asarray, (x, kernel, feedback, g))
    np.testing.assert_allclose(y, xn @ kn + np.arange(4.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gn @ fn.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, xn.reshape(-1, 5).T @ gn.reshape(-1, 4), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, gn.sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", [fj.FA(regenerate=True), fj.DFA(regenerate=True)], ids=["fa", "dfa"])
def test_regenerated_feedback_gives_the_stored_numbers(rule):
    _, activation, params, x, t = random_case(3)
    model = mlp(activation)
    stored_rule = type(rule)()
    key = jax.random.key(11)
    regenerated = fj.init_feedback(rule, params, key=key, model=model, inputs=x)
    stored = fj.init_feedback(stored_rule, params, key=key, model=model, inputs=x)
    assert all(jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in jax.tree.leaves(regenerated))
    got = jax.jit(fj.value_and_grad(model, mse, rule))(params, regenerated, x, t)
    want = jax.jit(fj.value_and_grad(model, mse, stored_rule))(params, stored, x, t)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_jacrev_of_gradient_matches_finite_differences(rule):
    with jax.enable_x64(True):
        params = init_mlp([3, 4, 3, 2], key=jax.random.key(0), dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
        t = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
        model = mlp("tanh")
        feedback = fj.init_feedback(rule, params, key=jax.random.key(3), model=model, inputs=x, dtype=jnp.float64)
        grad_fn = fj.value_and_grad(model, mse, rule)
        flat, unravel = jax.flatten_util.ravel_pytree(params)

        def update(vector):
            return jax.flatten_util.ravel_pytree(grad_fn(unravel(vector), feedback, x, t)[1])[0]

        jacobian = jax.jacrev(update)(flat)
        eps = 1e-6
        numeric = np.stack(
            [(update(flat.at[i].add(eps)) - update(flat.at[i].add(-eps))) / (2 * eps) for i in range(flat.size)],
            axis=1,
        )
        np.testing.assert_allclose(jacobian, numeric, rtol=1e-5, atol=1e-7)
        # Neither update map is a gradient field: its Jacobian is not symmetric.
        assert not np.allclose(jacobian, jacobian.T, atol=1e-6)


def test_layer_ids_are_stable_across_processes():
    code = textwrap.dedent(
        """
        import jax, fa_jax as fj
        from fa_jax.models import init_mlp
        p = init_mlp([3, 4, 2], key=jax.random.key(0))
        fb = fj.init_feedback("fa", p, key=jax.random.key(1))
        print(repr(float(fb.kernels[1]["kernel"].sum())))
        """
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    params = init_mlp([3, 4, 2], key=jax.random.key(0))
    here = fj.init_feedback("fa", params, key=jax.random.key(1))
    assert outputs == {repr(float(here.kernels[1]["kernel"].sum())) + "\n"}


def test_feedback_is_untouched_by_adamw_with_weight_decay():
    _, activation, params, x, t = random_case(0)
    model = mlp(activation)
    feedback = fj.init_feedback("fa", params, key=jax.random.key(5))
    before = jax.tree.map(np.array, feedback)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    grad_fn = jax.jit(fj.value_and_grad(model, mse, "fa"))
    opt = tx.init(params)
    for _ in range(20):
        _, grads = grad_fn(params, feedback, x, t)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(feedback)):
        np.testing.assert_array_equal(b, a)
