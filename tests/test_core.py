"""The functional core against independent NumPy closed forms, for every registered rule."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fa_jax as fj
from closed_forms import CLOSED_FORMS
from fa_jax.models import init_mlp, mlp

NAMES = sorted(CLOSED_FORMS)


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def random_case(seed, dtype=jnp.float32):
    """A random MLP: 1–3 hidden layers, odd widths, a random activation, one-hot targets."""
    rng = np.random.RandomState(seed)
    depth = rng.randint(1, 4)
    sizes = [int(rng.randint(2, 12)) for _ in range(depth + 2)]
    activation = ["tanh", "relu", "sigmoid", "linear"][seed % 4]
    batch = int(rng.randint(1, 9))
    params = init_mlp(sizes, key=jax.random.key(seed), dtype=dtype)
    x = jnp.asarray(rng.randn(batch, sizes[0]), dtype)
    t = jax.nn.one_hot(rng.randint(0, sizes[-1], batch), sizes[-1], dtype=dtype)
    return activation, params, x, t


def assert_tree_close(got, want, tol=2e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(2))
def test_every_rule_matches_its_closed_form(seed, name, jit):
    activation, params, x, t = random_case(seed)
    rule, model = fj.get_rule(name), mlp(activation)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(100 + seed), model=model, inputs=x)
    grad_fn = fj.value_and_grad(model, mse, rule)
    loss, grads = (jax.jit(grad_fn) if jit else grad_fn)(params, feedback, x, t, step=5)
    want_loss, want = CLOSED_FORMS[name](rule, params, feedback, x, t, activation, 5)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert_tree_close(grads, want)


@pytest.mark.parametrize(
    "rule",
    [
        fj.USF(scale=0.3),
        fj.FRSF(regenerate=True),
        fj.FA(regenerate=True),
        fj.DFA(regenerate=True),
        fj.DFA(shared_prefix=True, init=fj.tinydfa_uniform()),
        fj.DRTP(regenerate=True),
        fj.DRTP(shared_prefix=True),
        # B and M drawn in 4-row tiles inside the backward (kernels of 6, 9 and 7 rows: ragged last tiles)
        fj.FA(init=fj.Tiled(rows=4), regenerate=True),
        fj.FRSF(init=fj.Tiled(rows=4), regenerate=True),
        fj.BRSF(init=fj.Tiled(rows=4)),
    ],
    ids=lambda rule: (
        rule.name
        + "".join(  # stable across processes (xdist): no function addresses
            f"-{k}={getattr(v, '__name__', type(v).__name__ if callable(v) else v)}"
            for k, v in rule.config().items()
            if v != type(rule).__dataclass_fields__[k].default
        )
    ),
)
def test_rule_options_match_their_closed_form(rule):
    params = init_mlp([6, 9, 7, 4], key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (5, 6))
    t = jax.nn.one_hot(jnp.arange(5) % 4, 4)
    model = mlp("tanh")
    feedback = fj.init_feedback(rule, params, key=jax.random.key(3), model=model, inputs=x)
    loss, grads = jax.jit(fj.value_and_grad(model, mse, rule))(params, feedback, x, t, step=7)
    want_loss, want = CLOSED_FORMS[rule.name](rule, params, feedback, x, t, "tanh", 7)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert_tree_close(grads, want)


@pytest.mark.parametrize("seed", range(3))
def test_bp_is_exactly_jax_value_and_grad(seed):
    activation, params, x, t = random_case(seed)
    model = mlp(activation)
    got = fj.value_and_grad(model, mse, "bp")(params, None, x, t)
    want = jax.value_and_grad(lambda p: mse(model(p, x), t))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", ["fa", "kp"])
@pytest.mark.parametrize("seed", range(3))
def test_feedback_equal_to_the_weights_is_bp(seed, name):
    activation, params, x, t = random_case(seed)
    model = mlp(activation)
    feedback = fj.init_feedback(name, params, key=jax.random.key(seed), model=model, inputs=x)
    as_weights = fj.Feedback({path: fj._feedback.by_path(params)[path] for path in feedback.weights})
    _, grads = fj.value_and_grad(model, mse, name)(params, as_weights, x, t)
    _, bp = fj.value_and_grad(model, mse, "bp")(params, None, x, t)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(bp), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dfa", "drtp", "shallow"])
def test_output_layer_trains_on_its_exact_gradient(name):
    activation, params, x, t = random_case(1)
    model = mlp(activation)
    feedback = fj.init_feedback(name, params, key=jax.random.key(4), model=model, inputs=x)
    _, grads = fj.value_and_grad(model, mse, name)(params, feedback, x, t)
    _, bp = fj.value_and_grad(model, mse, "bp")(params, None, x, t)
    np.testing.assert_allclose(grads[-1]["kernel"], bp[-1]["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[-1]["bias"], bp[-1]["bias"], rtol=1e-6, atol=1e-7)


def test_dfa_hidden_gradients_ignore_downstream_weights():
    # A loss linear in y makes e constant, so only a path back through the downstream
    # weights could make the first layer's update depend on them: DFA has none, BP does.
    params = init_mlp([6, 9, 8, 7, 3], key=jax.random.key(0))
    model = mlp("tanh")
    x = jax.random.normal(jax.random.key(1), (5, 6))
    direction = jax.random.normal(jax.random.key(2), (5, 3))
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(3), model=model, inputs=x)
    changed = [dict(layer) for layer in params]
    for layer in changed[1:]:
        layer["kernel"] = 3.0 * layer["kernel"] + 0.5
    for rule, should_change in (("dfa", False), ("bp", True)):
        grad_fn = jax.jit(fj.value_and_grad(model, lambda y, c: jnp.sum(y * c), rule))
        with pytest.warns(UserWarning, match="linear in the model outputs") if rule == "dfa" else _nothing():
            _, before = grad_fn(params, feedback, x, direction)
            _, after = grad_fn(changed, feedback, x, direction)
        assert np.allclose(before[0]["kernel"], after[0]["kernel"], atol=1e-6) != should_change, rule


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_seeds_equals_single_runs(name):
    activation, params, x, t = random_case(2)
    model = mlp(activation)
    grad_fn = fj.value_and_grad(model, mse, name)
    sizes = [params[0]["kernel"].shape[0], 7, 5, t.shape[1]]

    def one_seed(seed):
        key = jax.random.key(seed)
        p = init_mlp(sizes, key=key)
        feedback = fj.init_feedback(name, p, key=jax.random.fold_in(key, 1), model=model, inputs=x)
        return grad_fn(p, feedback, x, t, step=seed)

    seeds = jnp.arange(3)
    batched = jax.jit(jax.vmap(one_seed))(seeds)
    for i in range(3):
        single = jax.jit(one_seed)(seeds[i])
        for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_is_preserved(name):
    params = init_mlp([4, 6, 5, 3], key=jax.random.key(0), dtype=jnp.bfloat16)
    x = jnp.ones((2, 4), jnp.bfloat16)
    t = jax.nn.one_hot(jnp.array([0, 2]), 3, dtype=jnp.bfloat16)
    model = mlp("tanh")
    feedback = fj.init_feedback(name, params, key=jax.random.key(1), model=model, inputs=x)
    _, grads = jax.jit(fj.value_and_grad(model, mse, name))(params, feedback, x, t, step=1)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["fa", "dfa", "usf"])
def test_training_loop_inside_lax_scan_follows_the_closed_form(name):
    activation, params, x, t = random_case(1)
    rule, model = fj.get_rule(name), mlp(activation)
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
        _, grads = CLOSED_FORMS[name](rule, looped, feedback, x, t, activation, None)
        looped = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - 0.05 * g, looped, grads)
    assert_tree_close(scanned, looped, tol=1e-4)
    assert losses.shape == (5,)


@pytest.mark.parametrize(
    "pair",
    [
        ("fa", fj.FA(regenerate=True)),
        ("dfa", fj.DFA(regenerate=True)),
        ("frsf", fj.FRSF(regenerate=True)),
        ("drtp", fj.DRTP(regenerate=True)),
    ],
    ids=lambda p: p[0],
)
def test_regenerated_feedback_gives_the_stored_numbers(pair):
    stored_name, rule = pair
    activation, params, x, t = random_case(3)
    model = mlp(activation)
    key = jax.random.key(11)
    regenerated = fj.init_feedback(rule, params, key=key, model=model, inputs=x)
    stored = fj.init_feedback(stored_name, params, key=key, model=model, inputs=x)
    leaves = jax.tree.leaves(regenerated)
    assert leaves and all(jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in leaves)
    got = jax.jit(fj.value_and_grad(model, mse, rule))(params, regenerated, x, t)
    want = jax.jit(fj.value_and_grad(model, mse, stored_name))(params, stored, x, t)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", ["fa", "dfa", "usf", "drtp", "shallow"])
def test_jacrev_of_the_update_matches_finite_differences(name):
    with jax.enable_x64(True):
        params = init_mlp([3, 4, 3, 2], key=jax.random.key(0), dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
        t = jax.nn.one_hot(jnp.arange(5) % 2, 2, dtype=jnp.float64)
        model = mlp("tanh")
        feedback = fj.init_feedback(name, params, key=jax.random.key(3), model=model, inputs=x, dtype=jnp.float64)
        grad_fn = fj.value_and_grad(model, mse, name)
        flat, unravel = jax.flatten_util.ravel_pytree(params)

        @jax.jit
        def update(vector):
            return jax.flatten_util.ravel_pytree(grad_fn(unravel(vector), feedback, x, t)[1])[0]

        jacobian = jax.jacrev(update)(flat)
        eps = 1e-6
        numeric = np.stack(
            [(update(flat.at[i].add(eps)) - update(flat.at[i].add(-eps))) / (2 * eps) for i in range(flat.size)],
            axis=1,
        )
        np.testing.assert_allclose(jacobian, numeric, rtol=1e-5, atol=1e-7)
        # None of these update maps is a gradient field: the Jacobian is not symmetric.
        assert not np.allclose(jacobian, jacobian.T, atol=1e-6)


def test_layer_keys_are_stable_across_processes():
    code = textwrap.dedent(
        """
        import jax, fa_jax as fj
        from fa_jax.models import init_mlp, mlp
        p = init_mlp([3, 4, 2], key=jax.random.key(0))
        fb = fj.init_feedback("fa", p, key=jax.random.key(1), model=mlp(), inputs=jax.numpy.ones((1, 3)))
        print(repr(float(fb.weights["1/kernel"].sum())))
        """
    )
    outputs = {
        subprocess.run(
            # The same XLA flags as this process: compiler options may change the last bits.
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    params = init_mlp([3, 4, 2], key=jax.random.key(0))
    here = fj.init_feedback("fa", params, key=jax.random.key(1), model=mlp(), inputs=jnp.ones((1, 3)))
    assert outputs == {repr(float(here.weights["1/kernel"].sum())) + "\n"}
    # B of a kernel is fold_in(key, crc32(path)) drawn like the kernel: the documented key scheme.
    want = fj.FA().init(fj.layer_key(jax.random.key(1), "1/kernel"), (4, 2), jnp.float32)
    np.testing.assert_array_equal(here.weights["1/kernel"], want)
