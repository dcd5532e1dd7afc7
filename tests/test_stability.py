"""Update Jacobian, fixed points and stability against closed forms derived in NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import linear_sum_assignment

import fa_jax as fj
from fa_jax import stability as st
from fa_jax.models import init_mlp, mlp


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def linear_net(params, x):
    """Linear network without biases: ``y = x W1 W2`` (one hidden layer, tapped for DFA)."""
    h = fj.tap(x @ params["l1"]["kernel"], name="h")
    return h @ params["l2"]["kernel"]


def assert_same_spectrum(got, want, atol):
    cost = np.abs(np.asarray(got)[:, None] - np.asarray(want)[None, :])
    rows, cols = linear_sum_assignment(cost)
    assert len(rows) == len(want)
    np.testing.assert_allclose(cost[rows, cols], 0.0, atol=atol)


def data(seed, n, d, m, dtype=jnp.float64):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d)
    t = x @ rng.randn(d, m) + 0.3 * rng.randn(n, m)
    return x, t, jnp.asarray(x, dtype), jnp.asarray(t, dtype)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_bp_jacobian_is_the_hessian_and_symmetric(x64):
    params = init_mlp([3, 5, 4, 2], key=jax.random.key(0), dtype=jnp.float64)
    model = mlp("tanh")
    _, _, x, t = data(0, 7, 3, 2)
    update = st.as_update(model, mse, "bp", None, x, t)
    jac = st.update_jacobian(update, params)
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda v: mse(fj.apply(model, unravel(v), x), t)))(flat)
    assert jac.shape == (flat.size, flat.size)
    np.testing.assert_allclose(jac, hessian, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jac, jac.T, atol=1e-12)
    report = st.stability_report(update, params)
    assert report.asymmetry < 1e-12
    assert np.all(np.abs(report.eigenvalues.imag) < 1e-9)


@pytest.mark.parametrize("rule", ["fa", "dfa", "usf", "drtp"])
def test_rule_jacobian_matches_finite_differences_and_is_not_symmetric(rule, x64):
    params = init_mlp([3, 4, 4, 2], key=jax.random.key(1), dtype=jnp.float64)
    model = mlp("tanh")
    _, _, x, t = data(1, 5, 3, 2)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=model, inputs=x, dtype=jnp.float64)
    update = st.as_update(model, mse, rule, feedback, x, t, weight_decay=0.01)
    # First order: the core's update plus λθ.
    _, core = fj.value_and_grad(model, mse, rule)(params, feedback, x, t)
    _, mine = update(params)
    for c, g, p in zip(jax.tree.leaves(core), jax.tree.leaves(mine), jax.tree.leaves(params)):
        np.testing.assert_allclose(g, c + 0.01 * p, rtol=1e-12, atol=1e-14)
    jac = np.asarray(st.update_jacobian(update, params))
    flat, unravel = ravel_pytree(params)
    flat_update = jax.jit(jax.vmap(lambda v: ravel_pytree(update(unravel(v))[1])[0]))
    eps = 1e-6
    steps = eps * np.eye(flat.size)
    fd = (np.asarray(flat_update(flat + steps)) - np.asarray(flat_update(flat - steps))).T / (2 * eps)
    np.testing.assert_allclose(jac, fd, atol=1e-7)
    assert np.linalg.norm(jac - jac.T) > 1e-3 * np.linalg.norm(jac)


def test_finder_reaches_least_squares_and_bp_eigenvalues_are_those_of_the_covariance(x64):
    """One linear layer: ``W* = (XᵀX)⁻¹XᵀT`` and ``J = Σ ⊗ I_m`` with ``Σ = XᵀX/N``."""
    n, d, m = 20, 4, 3
    xn, tn, x, t = data(3, n, d, m)

    def model(params, x):
        return x @ params["kernel"]

    update = st.as_update(model, mse, "bp", None, x, t)
    start = {"kernel": jnp.zeros((d, m), jnp.float64)}
    fp = st.find_fixed_point(update, start, learning_rate=0.3, tol=1e-11, max_steps=20_000)
    assert bool(fp.converged)
    np.testing.assert_allclose(fp.params["kernel"], np.linalg.solve(xn.T @ xn, xn.T @ tn), atol=1e-9)
    # Newton on g = Σ W - XᵀT/N lands on W* in one step.
    newton = st.find_fixed_point(update, start, learning_rate=0.3, tol=1e-11, max_steps=0, newton_steps=3)
    assert bool(newton.converged) and int(newton.steps) == 1
    np.testing.assert_allclose(newton.params["kernel"], fp.params["kernel"], atol=1e-9)
    sigma = xn.T @ xn / n
    want = np.repeat(np.linalg.eigvalsh(sigma), m)
    got = st.jacobian_eigenvalues(update, fp.params)
    assert_same_spectrum(got, want, atol=1e-9)
    report = st.stability_report(update, fp.params)
    assert report.stable and report.max_real == pytest.approx(-want.min(), rel=1e-9)


def test_fa_fixed_point_of_a_realisable_linear_network_and_its_eigenvalues(x64):
    """FA on ``y = x W1 W2``: ``g1 = M B2ᵀ``, ``g2 = W1ᵀ M`` with ``M = Σ W1 W2 - XᵀT/N``.

    With B2 of full rank the fixed points are exactly ``W1 W2 = (XᵀX)⁻¹XᵀT``
    (Lillicrap et al. 2016). At one, ``M = 0`` and in row-major ``vec``
    (``vec(A X C) = (A ⊗ Cᵀ) vec X``) the Jacobian is
    ``[[Σ ⊗ B2 W2ᵀ, Σ W1 ⊗ B2], [W1ᵀΣ ⊗ W2ᵀ, W1ᵀΣW1 ⊗ I]]``.
    """
    n, d, hidden, m = 16, 3, 4, 2
    xn, tn, x, t = data(4, n, d, m)
    rng = np.random.RandomState(5)
    params = {
        "l1": {"kernel": jnp.asarray(rng.uniform(-0.1, 0.1, (d, hidden)))},
        "l2": {"kernel": jnp.asarray(rng.uniform(-0.1, 0.1, (hidden, m)))},
    }
    b2 = rng.uniform(-0.5, 0.5, (hidden, m))
    drawn = fj.init_feedback("fa", params, key=jax.random.key(0), model=linear_net, inputs=x)
    feedback = dataclasses.replace(drawn, weights={"l1/kernel": jnp.asarray(rng.uniform(-0.5, 0.5, (d, hidden))),
                                                   "l2/kernel": jnp.asarray(b2)})
    update = st.as_update(linear_net, mse, "fa", feedback, x, t)
    fp = st.find_fixed_point(update, params, learning_rate=0.2, tol=1e-10, max_steps=200_000)
    assert bool(fp.converged), (fp.update_norm, fp.steps)
    w1, w2 = np.asarray(fp.params["l1"]["kernel"]), np.asarray(fp.params["l2"]["kernel"])
    w_ls = np.linalg.solve(xn.T @ xn, xn.T @ tn)
    np.testing.assert_allclose(w1 @ w2, w_ls, atol=1e-8)
    np.testing.assert_allclose(fp.loss, 0.5 * np.sum((xn @ w_ls - tn) ** 2) / n, rtol=1e-10)

    # Newton polish from a point the rule has not reached yet: a fixed point on the same manifold.
    rough = st.find_fixed_point(update, params, learning_rate=0.2, tol=1e-10, max_steps=300, newton_steps=20)
    assert bool(rough.converged) and int(rough.steps) < 320
    np.testing.assert_allclose(rough.params["l1"]["kernel"] @ rough.params["l2"]["kernel"], w_ls, atol=1e-8)

    sigma = xn.T @ xn / n
    jac = np.block([
        [np.kron(sigma, b2 @ w2.T), np.kron(sigma @ w1, b2)],
        [np.kron(w1.T @ sigma, w2.T), np.kron(w1.T @ sigma @ w1, np.eye(m))],
    ])
    np.testing.assert_allclose(st.update_jacobian(update, fp.params), jac, atol=1e-8)
    want = np.linalg.eigvals(jac)
    assert_same_spectrum(st.jacobian_eigenvalues(update, fp.params), want, atol=1e-7)

    bp_update = st.as_update(linear_net, mse, "bp", None, x, t)
    report = st.stability_report(update, fp.params, bp_update=bp_update, key=jax.random.key(0))
    assert report.max_real == pytest.approx(np.max(-want.real), abs=1e-8)
    assert report.stable  # the finder converged to it, so it cannot be unstable
    # A manifold of fixed points (W1 W2 fixed): d·h + h·m - d·m zero eigenvalues at least.
    assert np.sum(np.abs(want) < 1e-8) >= d * hidden + hidden * m - d * m
    assert 0 < report.linearised_alignment <= 1


def test_dfa_fixed_point_of_a_realisable_linear_task_is_reached_and_stable(x64):
    """``t = x T`` exactly: DFA's update ``(x^T (e B), hᵀe)`` vanishes where ``W1 W2 = T`` and the loss is 0."""
    n, d, hidden, m = 16, 3, 4, 2
    rng = np.random.RandomState(4)
    x = jnp.asarray(rng.randn(n, d))
    target_map = rng.randn(d, m)
    t = x @ target_map
    params = {"l1": {"kernel": jnp.asarray(rng.uniform(-0.1, 0.1, (d, hidden)))},
              "l2": {"kernel": jnp.asarray(rng.uniform(-0.1, 0.1, (hidden, m)))}}
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(0), model=linear_net, inputs=x, dtype=jnp.float64)
    update = st.as_update(linear_net, mse, "dfa", feedback, x, t)
    fp = st.find_fixed_point(update, params, learning_rate=0.2, tol=1e-10, max_steps=20_000)
    assert bool(fp.converged), (fp.update_norm, fp.steps)
    assert float(fp.loss) < 1e-18
    np.testing.assert_allclose(fp.params["l1"]["kernel"] @ fp.params["l2"]["kernel"], target_map, atol=1e-9)
    report = st.stability_report(update, fp.params)
    assert report.stable and report.update_norm < 1e-10
    # The eigenvalues are those of a central finite-difference Jacobian of the update.
    flat, unravel = ravel_pytree(fp.params)
    flat_update = jax.jit(jax.vmap(lambda v: ravel_pytree(update(unravel(v))[1])[0]))
    steps = 1e-6 * np.eye(flat.size)
    fd = (np.asarray(flat_update(flat + steps)) - np.asarray(flat_update(flat - steps))).T / 2e-6
    assert_same_spectrum(report.eigenvalues, np.linalg.eigvals(fd), atol=1e-6)


def test_arnoldi_finds_the_extreme_eigenvalues_matrix_free(x64):
    params = init_mlp([4, 6, 3], key=jax.random.key(6), dtype=jnp.float64)
    model = mlp("tanh")
    _, _, x, t = data(6, 9, 4, 3)
    feedback = fj.init_feedback("fa", params, key=jax.random.key(7), model=model, inputs=x, dtype=jnp.float64)
    update = st.as_update(model, mse, "fa", feedback, x, t, weight_decay=0.05)
    dense = st.jacobian_eigenvalues(update, params)
    size = ravel_pytree(params)[0].size
    full = st.arnoldi_eigenvalues(update, params, key=jax.random.key(0), num_iterations=size)
    assert_same_spectrum(full, dense, atol=1e-8)
    top = st.arnoldi_eigenvalues(update, params, key=jax.random.key(0), num_iterations=15)
    largest = dense[np.argmax(np.abs(dense))]
    assert np.min(np.abs(top - largest)) < 1e-6 * abs(largest)
    # Shifting by the top eigenvalue makes the leftmost one the largest in magnitude.
    left = st.arnoldi_eigenvalues(update, params, key=jax.random.key(0), num_iterations=15, shift=largest.real)
    assert np.min(np.abs(left - dense[0])) < 1e-4 * abs(largest)


def test_finder_reports_non_convergence_honestly(x64):
    _, _, x, t = data(8, 10, 3, 2)
    params = init_mlp([3, 4, 2], key=jax.random.key(8), dtype=jnp.float64)
    update = st.as_update(mlp("tanh"), mse, "bp", None, x, t)
    fp = st.find_fixed_point(update, params, learning_rate=0.1, tol=1e-12, max_steps=5)
    assert not bool(fp.converged) and int(fp.steps) == 5 and float(fp.update_norm) >= 1e-12
    # Newton polish never returns a point with a larger update than where it started.
    polished = st.find_fixed_point(update, params, learning_rate=0.1, tol=1e-12, max_steps=5, newton_steps=3)
    assert float(polished.update_norm) <= float(fp.update_norm) and int(polished.steps) >= 5
    value, grads = update(fp.params)
    np.testing.assert_allclose(fp.loss, value)
    np.testing.assert_allclose(fp.update_norm, np.linalg.norm(ravel_pytree(grads)[0]))


def test_bad_arguments_raise_naming_them():
    params = init_mlp([3, 2], key=jax.random.key(0))
    x, t = jnp.ones((4, 3)), jnp.ones((4, 2))
    with pytest.raises(ValueError, match="weight_decay"):
        st.as_update(mlp("tanh"), mse, "bp", None, x, t, weight_decay=-1.0)
    brsf = fj.init_feedback("brsf", params, key=jax.random.key(0), model=mlp("tanh"), inputs=x)
    with pytest.raises(ValueError, match="step"):
        st.as_update(mlp("tanh"), mse, "brsf", brsf, x, t)(params)
    value, _ = st.as_update(mlp("tanh"), mse, "brsf", brsf, x, t, step=2)(params)
    assert np.isfinite(value)
