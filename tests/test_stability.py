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
from fa_jax.experiments import teacher
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
    for c, g, p in zip(jax.tree.leaves(core), jax.tree.leaves(mine), jax.tree.leaves(params), strict=True):
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
    feedback = dataclasses.replace(
        drawn, weights={"l1/kernel": jnp.asarray(rng.uniform(-0.5, 0.5, (d, hidden))), "l2/kernel": jnp.asarray(b2)}
    )
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
    jac = np.block(
        [
            [np.kron(sigma, b2 @ w2.T), np.kron(sigma @ w1, b2)],
            [np.kron(w1.T @ sigma, w2.T), np.kron(w1.T @ sigma @ w1, np.eye(m))],
        ]
    )
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
    params = {
        "l1": {"kernel": jnp.asarray(rng.uniform(-0.1, 0.1, (d, hidden)))},
        "l2": {"kernel": jnp.asarray(rng.uniform(-0.1, 0.1, (hidden, m)))},
    }
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
    update = st.as_update(mlp("tanh"), mse, "bp", None, x, t)
    for kwargs, error, name in [
        (dict(learning_rate=0.0), ValueError, "learning_rate"),
        (dict(learning_rate=-0.1), ValueError, "learning_rate"),
        (dict(learning_rate=True), TypeError, "learning_rate"),
        (dict(max_steps=10.5), TypeError, "max_steps"),
        (dict(max_steps=-1), ValueError, "max_steps"),
        (dict(tol=-1e-3), ValueError, "tol"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(newton_steps=2.0), TypeError, "newton_steps"),
        (dict(residual=3), TypeError, "residual"),
    ]:
        with pytest.raises(error, match=name):
            st.find_fixed_point(update, params, **{"learning_rate": 0.1, **kwargs})
    with pytest.raises(ValueError, match="rule"):
        st.backward_map(mlp("tanh"), "drtp", None, params, x)
    with pytest.raises(ValueError, match="directions"):
        st.perturbation_test(update, params, np.ones((2, 3)), learning_rate=0.1, steps=2)


def test_teacher_student_fixed_point_to_1e8_with_eigenvalues_of_a_finite_difference_jacobian(x64):
    """FA on a realisable teacher–student task reaches ``‖g‖ < 1e-8``; there ``J = B̃ᵀ J_f / N``.

    The eigenvalues from ``jax.jacrev`` through the engine match those of a central-difference
    Jacobian of the update, and the rule's backward map built independently (``jacrev`` of the
    forward under FA and under BP) gives the same matrix: at ``e = 0`` the derivative of ``B̃``
    drops out.
    """
    problem = teacher.teacher_student(
        inputs=3, outputs=2, teacher_hidden=(3,), student_hidden=(5,), train=6, test=4, seed=1, dtype=jnp.float64
    )
    x, t, n = problem.x_train, problem.y_train, problem.x_train.shape[0]
    params = problem.init_params(key=jax.random.key(2))
    feedback = fj.init_feedback("fa", params, key=jax.random.key(3), model=problem.model, inputs=x)
    update = st.as_update(problem.model, teacher.squared_error, "fa", feedback, x, t)
    fp = st.find_fixed_point(
        update,
        params,
        learning_rate=0.5,
        tol=1e-8,
        max_steps=3000,
        newton_steps=10,
        residual=lambda p: problem.model(p, x) - t,
    )
    assert bool(fp.converged) and float(fp.update_norm) < 1e-8, (fp.update_norm, fp.rule_norm, fp.newton)
    assert float(fp.loss) < 1e-15
    flat, unravel = ravel_pytree(fp.params)
    # The point is the rule's: its own steps stay there.
    again = st.find_fixed_point(update, fp.params, learning_rate=0.5, tol=0.0, max_steps=50)
    np.testing.assert_allclose(ravel_pytree(again.params)[0], flat, atol=1e-8)

    report = st.stability_report(update, fp.params)
    flat_update = jax.jit(jax.vmap(lambda v: ravel_pytree(update(unravel(v))[1])[0]))
    steps = 1e-6 * np.eye(flat.size)
    fd = (np.asarray(flat_update(flat + steps)) - np.asarray(flat_update(flat - steps))).T / 2e-6
    assert_same_spectrum(report.eigenvalues, np.linalg.eigvals(fd), atol=1e-6)

    rule_map = np.asarray(st.backward_map(problem.model, "fa", feedback, fp.params, x))
    bp_map = np.asarray(st.backward_map(problem.model, "bp", None, fp.params, x))
    assert rule_map.shape == bp_map.shape == (t.size, flat.size)
    np.testing.assert_allclose(st.update_jacobian(update, fp.params), rule_map.T @ bp_map / n, atol=1e-9)
    # Rank n·m = 12 of 32 parameters: 20 zero eigenvalues, the manifold of zero-loss points.
    assert report.zero_eigenvalues == flat.size - t.size
    assert report.margin > 0 and report.stable  # the rule's own steps converged to it


def flipped_point(sign, scale=3.0):
    """``y = x W1 W2`` at a zero-loss point (``W1 = A/c``, ``W2 = c C``) with FA feedback ``B2 = sign · W2``.

    ``sign=+1`` is BP's backward map; ``sign=-1`` flips the true map's sign, so the hidden
    layer's update is minus its gradient: with ``c`` large, ``J_f B̃ᵀ = J₂J₂ᵀ - J₁J₁ᵀ`` is
    negative on the errors ``W1`` can produce.
    """
    rng = np.random.RandomState(9)
    x = jnp.asarray(rng.randn(16, 3))
    a, c = rng.randn(3, 4), rng.randn(4, 2)
    t = x @ jnp.asarray(a @ c)
    params = {"l1": {"kernel": jnp.asarray(a / scale)}, "l2": {"kernel": jnp.asarray(c * scale)}}
    drawn = fj.init_feedback("fa", params, key=jax.random.key(0), model=linear_net, inputs=x)
    feedback = dataclasses.replace(
        drawn, weights={"l1/kernel": params["l1"]["kernel"], "l2/kernel": sign * params["l2"]["kernel"]}
    )
    return params, feedback, x, t


def test_perturbation_test_returns_for_a_stable_point_and_leaves_when_the_backward_sign_is_flipped(x64):
    for sign in (+1, -1):
        params, feedback, x, t = flipped_point(sign)
        update = st.as_update(linear_net, mse, "fa", feedback, x, t)
        assert float(jnp.linalg.norm(ravel_pytree(update(params)[1])[0])) < 1e-12  # e = 0: a fixed point
        report = st.stability_report(update, params)
        # Closed form at M = 0 (see the FA test above) with B2 = sign · W2.
        w1, w2 = np.asarray(params["l1"]["kernel"]), np.asarray(params["l2"]["kernel"])
        sigma = np.asarray(x).T @ np.asarray(x) / 16
        jac = np.block(
            [
                [np.kron(sigma, sign * w2 @ w2.T), np.kron(sigma @ w1, sign * w2)],
                [np.kron(w1.T @ sigma, w2.T), np.kron(w1.T @ sigma @ w1, np.eye(2))],
            ]
        )
        assert_same_spectrum(report.eigenvalues, np.linalg.eigvals(jac), atol=1e-8)
        directions, labels = st.perturbation_directions(update, params, key=jax.random.key(1), random=2, eigen=1)
        assert directions.shape == (3, 20) and labels[2].startswith("eigen")
        np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0)
        kicked = st.perturbation_test(
            update, params, directions, epsilon=1e-5, learning_rate=0.5 / report.largest_real, steps=400, labels=labels
        )
        alignment = st.backward_alignment(
            st.backward_map(linear_net, "fa", feedback, params, x),
            st.backward_map(linear_net, "bp", None, params, x),
            params,
        )
        assert alignment.per_layer["l2/kernel"].cosine == pytest.approx(1.0)  # W2's own update is exact
        if sign > 0:  # BP's backward map: J = J_fᵀJ_f / N, a Gauss–Newton matrix
            assert report.margin > 0 and report.stable
            assert kicked.returned.all() and not kicked.left.any(), kicked
            assert alignment.symmetric_min > 0 and alignment.gradient_min == pytest.approx(1.0)
            assert alignment.per_layer["l1/kernel"].cosine == pytest.approx(1.0)
        else:
            assert report.margin < 0 and not report.stable
            assert kicked.left[2] and kicked.left.any() and not kicked.returned.any(), kicked
            assert alignment.symmetric_min < 0 and alignment.gradient_min < 0
            assert alignment.per_layer["l1/kernel"].cosine == pytest.approx(-1.0)
        assert kicked.history.shape == (3, 51) and np.all(kicked.distance > 0)


def test_teacher_tasks_are_realisable_at_finite_weights_and_train_from_the_runner(capsys):
    from fa_jax.experiments import cli, get_task, run_single

    problem = teacher.teacher_student(train=8, test=16)
    student = teacher.embed(problem.teacher, (12, 12))  # the teacher inside the wider student
    assert [layer["kernel"].shape for layer in student] == [(6, 12), (12, 12), (12, 2)]
    assert float(teacher.squared_error(problem.model(student, problem.x_test), problem.y_test)) < 1e-12
    linear = teacher.lillicrap(train=4, test=8)
    w = linear.init_params(key=jax.random.key(0))
    assert [p["kernel"].shape for p in w] == [(30, 20), (20, 10)] and float(jnp.max(jnp.abs(w[0]["kernel"]))) <= 0.01
    exact = [{"kernel": linear.teacher}, {"kernel": jnp.eye(10)}]  # W0 W1 = T: 30-10-10 realises it
    assert float(teacher.squared_error(teacher.linear_net(exact, linear.x_test), linear.y_test)) < 1e-10
    task = get_task("teacher", dataset="student", steps=60, eval_every=30)
    metrics = np.asarray(run_single(task, "fa", 0).metrics)
    assert task.metric == "test_squared_error" and not task.higher_is_better
    assert metrics[-1] < 0.8 * metrics[0], metrics
    with pytest.raises(ValueError, match="dataset"):
        get_task("teacher", dataset="cifar")
    assert cli.main(["list"]) == 0 and "teacher" in capsys.readouterr().out.split()
