"""Alignment metrics against NumPy closed forms and the known limits (cos 1, angle 0, about 90°)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
import reference
from fa_jax import alignment as al
from fa_jax.models import init_mlp, mlp

RULES = ["bp", "fa", "dfa", "shallow"]


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def case(seed, sizes=(5, 7, 6, 3), batch=6, activation="tanh"):
    rng = np.random.RandomState(seed)
    params = init_mlp(list(sizes), key=jax.random.key(seed))
    x = jnp.asarray(rng.randn(batch, sizes[0]), jnp.float32)
    t = jnp.asarray(rng.randn(batch, sizes[-1]), jnp.float32)
    return params, x, t, mlp(activation)


def numpy_signals(params, x, t, activation, rule, feedback):
    """Error signal reaching each hidden activation h_l (before f'), from the papers' equations."""
    params = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    hs, pre = reference.forward(params, np.asarray(x, np.float64), activation)
    _, fprime = reference.ACTIVATION[activation]
    e = (hs[-1] - np.asarray(t, np.float64)) / x.shape[0]
    delta, signals = e, [None] * (len(params) - 1)
    for l in range(len(params) - 2, -1, -1):
        if rule == "bp":
            signals[l] = delta @ params[l + 1]["kernel"].T
        elif rule == "fa":
            signals[l] = delta @ feedback[l + 1].T
        elif rule == "dfa":
            signals[l] = e @ feedback[l]
        delta = signals[l] * fprime(pre[l])
    return signals


def numpy_cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def feedback_list(rule, feedback, params):
    if rule == "fa":
        return [np.asarray(layer["kernel"], np.float64) for layer in fj.materialize_fa(feedback, params)]
    if rule == "dfa":
        return [np.asarray(b, np.float64) for b in fj.dfa_matrices(feedback)]
    return None


@pytest.mark.parametrize("seed,jit", [(0, False), (1, True)], ids=["seed0-eager", "seed1-jit"])
@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_metrics_match_numpy(seed, rule, jit):
    params, x, t, model = case(seed)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(10 + seed), model=model, inputs=x)
    grad_fn = al.value_and_grad_with_alignment(model, mse, rule)
    if jit:
        grad_fn = jax.jit(grad_fn, static_argnames="measure")
    (loss, metrics), grads = grad_fn(params, feedback, x, t)
    B = feedback_list(rule, feedback, params)
    _, want = reference.gradients(params, x, t, "tanh", rule, B)
    _, bp = reference.gradients(params, x, t, "tanh", "bp")
    for index, (layer, bp_layer) in enumerate(zip(want, bp)):
        for name in ("kernel", "bias"):
            got = metrics.gradient[f"{index}/{name}"]
            np.testing.assert_allclose(got.cosine, numpy_cos(layer[name], bp_layer[name]), atol=2e-5)
            np.testing.assert_allclose(
                got.norm_ratio, np.linalg.norm(layer[name]) / np.linalg.norm(bp_layer[name]), rtol=1e-4
            )
            np.testing.assert_allclose(np.cos(np.radians(got.angle)), got.cosine, atol=1e-5)
    total = numpy_cos(np.concatenate([g.ravel() for l in want for g in l.values()]),
                      np.concatenate([g.ravel() for l in bp for g in l.values()]))
    np.testing.assert_allclose(metrics.total.cosine, total, atol=2e-5)
    rule_signals = numpy_signals(params, x, t, "tanh", rule, B)
    bp_signals = numpy_signals(params, x, t, "tanh", "bp", None)
    for index, (a, b) in enumerate(zip(rule_signals, bp_signals)):
        per_sample = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        got = metrics.delta[f"layer_{index}"]
        np.testing.assert_allclose(got.mean, per_sample.mean(), atol=2e-5)
        np.testing.assert_allclose(got.std, per_sample.std(), atol=2e-5)
    # The rule's gradients are the core's, unchanged by measuring.
    _, core = fj.value_and_grad(model, mse, rule)(params, feedback, x, t)
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(core)):
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_tap_signals_match_numpy(rule):
    params, x, t, model = case(3, sizes=(4, 9, 8, 2), batch=5)
    feedback = fj.init_feedback(rule, params, key=jax.random.key(7), model=model, inputs=x)
    got = al.tap_signals(model, mse, rule, params, feedback, x, t)
    want = numpy_signals(params, x, t, "tanh", rule, feedback_list(rule, feedback, params))
    assert list(got) == ["layer_0", "layer_1"]
    for g, w in zip(got.values(), want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bp_against_bp_gives_cosine_one(jit):
    params, x, t, model = case(4)
    grad_fn = al.value_and_grad_with_alignment(model, mse, "bp")
    if jit:
        grad_fn = jax.jit(grad_fn, static_argnames="measure")
    (_, metrics), _ = grad_fn(params, None, x, t)
    for c in list(metrics.gradient.values()) + [metrics.total]:
        np.testing.assert_allclose(c.cosine, 1.0, atol=1e-6)
        np.testing.assert_allclose(c.angle, 0.0, atol=1e-2)
        np.testing.assert_allclose(c.norm_ratio, 1.0, rtol=1e-6)
    for d in metrics.delta.values():
        np.testing.assert_allclose(d.mean, 1.0, atol=1e-6)
        np.testing.assert_allclose(d.std, 0.0, atol=1e-6)
    assert metrics.weight is None


def test_fa_with_feedback_equal_to_weights_gives_angle_zero():
    params, x, t, model = case(5)
    feedback = fj.FAFeedback([{"kernel": layer["kernel"], "bias": None} for layer in params])
    (_, metrics), _ = al.value_and_grad_with_alignment(model, mse, "fa")(params, feedback, x, t)
    for c in list(metrics.gradient.values()) + [metrics.total]:
        np.testing.assert_allclose(c.angle, 0.0, atol=1e-2)
        np.testing.assert_allclose(c.norm_ratio, 1.0, rtol=1e-5)
    for c in metrics.weight.values():
        np.testing.assert_allclose(c.angle, 0.0, atol=1e-2)
        np.testing.assert_allclose(c.norm_ratio, 1.0, rtol=1e-6)
    assert set(metrics.weight) == {"0/kernel", "1/kernel", "2/kernel"}
    for d in metrics.delta.values():
        np.testing.assert_allclose(d.mean, 1.0, atol=1e-5)


def test_fresh_random_feedback_on_a_wide_layer_is_near_ninety_degrees():
    width = 256
    params, x, t, model = case(6, sizes=(32, width, width, 10), batch=64)
    fa = fj.init_feedback("fa", params, key=jax.random.key(1))
    weights = al.fa_weight_alignment(params, fa)
    # vec W and vec B are independent with 256² entries: cos ~ N(0, 1/256²), i.e. 90° ± 0.2°.
    np.testing.assert_allclose(weights["1/kernel"].angle, 90.0, atol=1.0)
    np.testing.assert_allclose(weights["1/kernel"].norm_ratio, 1.0, atol=0.05)  # B drawn like W
    dfa = fj.init_feedback("dfa", params, key=jax.random.key(2), model=model, inputs=x)
    for c in al.dfa_weight_alignment(dfa, al.dense_kernels(params)).values():
        np.testing.assert_allclose(c.angle, 90.0, atol=6.0)
    # Per-sample DFA signals at init are unrelated to BP's: mean cosine about 0.
    (_, metrics), _ = al.value_and_grad_with_alignment(model, mse, "dfa")(params, dfa, x, t)
    for d in metrics.delta.values():
        assert abs(float(d.mean)) < 0.1


def test_dfa_weight_alignment_matches_numpy_product():
    params, x, t, model = case(7, sizes=(3, 6, 5, 4, 2))
    dfa = fj.init_feedback("dfa", params, key=jax.random.key(3), model=model, inputs=x)
    got = al.dfa_weight_alignment(dfa, al.dense_kernels(params))
    W = [np.asarray(layer["kernel"], np.float64) for layer in params]
    B = feedback_list("dfa", dfa, params)
    for index, name in enumerate(["layer_0", "layer_1", "layer_2"]):
        downstream = np.linalg.multi_dot(W[index + 1:]) if len(W[index + 1:]) > 1 else W[-1]
        np.testing.assert_allclose(got[name].cosine, numpy_cos(B[index], downstream.T), atol=1e-5)
    with pytest.raises(ValueError, match="one kernel per tap"):
        al.dfa_weight_alignment(dfa, al.dense_kernels(params)[1:])


def test_measure_false_costs_no_bp_reference_and_returns_none():
    params, x, t, model = case(8)
    feedback = fj.init_feedback("fa", params, key=jax.random.key(0))
    grad_fn = al.value_and_grad_with_alignment(model, mse, "fa")
    (loss, metrics), grads = grad_fn(params, feedback, x, t, measure=False)
    assert metrics is None
    cheap = jax.make_jaxpr(lambda p: grad_fn(p, feedback, x, t, measure=False))(params)
    full = jax.make_jaxpr(lambda p: grad_fn(p, feedback, x, t))(params)
    core = jax.make_jaxpr(lambda p: fj.value_and_grad(model, mse, "fa")(p, feedback, x, t))(params)
    count = lambda jaxpr: str(jaxpr).count("dot_general")  # noqa: E731
    assert count(cheap) == count(core) < count(full)


def test_shallow_hidden_alignment_is_undefined_not_silently_zero():
    params, x, t, model = case(9)
    (_, metrics), _ = al.value_and_grad_with_alignment(model, mse, "shallow")(params, None, x, t)
    assert np.isnan(metrics.gradient["0/kernel"].cosine)
    np.testing.assert_allclose(metrics.gradient["2/kernel"].cosine, 1.0, atol=1e-6)
    assert all(np.isnan(d.mean) for d in metrics.delta.values())


def test_vmap_over_seeds_equals_single_runs():
    params, x, t, model = case(10)
    grad_fn = al.value_and_grad_with_alignment(model, mse, "fa")

    def one(seed):
        feedback = fj.init_feedback("fa", params, key=jax.random.key(seed))
        return grad_fn(params, feedback, x, t)[0][1].total.cosine

    batched = jax.vmap(one)(jnp.arange(3))
    np.testing.assert_allclose(batched, [jax.jit(one)(s) for s in range(3)], rtol=1e-5)


def test_cosine_of_odd_dtypes_and_bad_input():
    a = jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)
    c = al.cosine(a, 2 * a)
    np.testing.assert_allclose(c.cosine, 1.0, atol=1e-3)
    np.testing.assert_allclose(c.norm_ratio, 0.5, rtol=1e-2)
    np.testing.assert_allclose(al.cosine(jnp.array([1.0, 0]), jnp.array([0.0, 1])).angle, 90.0, atol=1e-5)
    np.testing.assert_allclose(al.cosine(jnp.array([1.0, 0]), jnp.array([-1.0, 0])).angle, 180.0, atol=1e-5)
    assert np.isnan(al.cosine(jnp.zeros(3), jnp.ones(3)).cosine)
    with pytest.raises(ValueError, match="structure"):
        al.gradient_alignment({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="tap 'h'"):
        al.delta_alignment({"h": jnp.ones((2, 3))}, {"h": jnp.ones((2, 4))})
