"""Bad input fails at trace time with a message naming the layer, the expected and the given."""

import jax
import jax.numpy as jnp
import pytest

import fa_jax as fj
from fa_jax.models import init_mlp, mlp

MODEL = mlp("tanh")


def mse(y, t):
    return jnp.mean((y - t) ** 2)


@pytest.fixture
def setup():
    params = init_mlp([4, 6, 5, 3], key=jax.random.key(0))
    return params, jnp.ones((2, 4)), jnp.zeros((2, 3))


def test_unknown_rule_name():
    with pytest.raises(ValueError, match=r"unknown rule 'fba'.*'bp'.*'dfa'.*'fa'"):
        fj.value_and_grad(MODEL, mse, "fba")
    with pytest.raises(TypeError, match="rule must be"):
        fj.get_rule(3)


def test_feedback_for_another_model(setup):
    params, x, t = setup
    other = fj.init_feedback("fa", init_mlp([4, 6, 3], key=jax.random.key(1)), key=jax.random.key(2))
    with pytest.raises(ValueError, match=r"params have layers \['2/bias', '2/kernel'\] that feedback lacks"):
        jax.jit(fj.value_and_grad(MODEL, mse, "fa"))(params, other, x, t)


def test_feedback_with_wrong_shape_names_layer_and_shapes(setup):
    params, x, t = setup
    feedback = fj.init_feedback("fa", params, key=jax.random.key(2))
    feedback.kernels[1]["kernel"] = jnp.ones((5, 6))
    with pytest.raises(ValueError, match=r"layer '1/kernel': expected shape \(6, 5\).*given \(5, 6\)"):
        jax.jit(fj.value_and_grad(MODEL, mse, "fa"))(params, feedback, x, t)


def test_wrong_feedback_kind(setup):
    params, x, t = setup
    dfa_feedback = fj.init_feedback("dfa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    with pytest.raises(ValueError, match="rule 'fa' needs FAFeedback.*got DFAFeedback"):
        fj.value_and_grad(MODEL, mse, "fa")(params, dfa_feedback, x, t)
    with pytest.raises(ValueError, match="rule 'dfa' needs DFAFeedback.*got NoneType"):
        fj.value_and_grad(MODEL, mse, "dfa")(params, None, x, t)


@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf", "kp"])
def test_family_feedback_errors_name_the_rule_asked_for(setup, rule):
    params, x, t = setup
    grad_fn = jax.jit(fj.value_and_grad(MODEL, mse, rule))
    with pytest.raises(ValueError, match=f"rule '{rule}' needs FAFeedback from init_feedback\\('{rule}'.*got NoneType"):
        grad_fn(params, None, x, t, step=0)
    other = fj.init_feedback(rule, init_mlp([4, 6, 3], key=jax.random.key(1)), key=jax.random.key(2))
    with pytest.raises(ValueError, match=f"{rule} feedback does not match params"):
        grad_fn(params, other, x, t, step=0)


def test_drtp_feedback_error_names_drtp(setup):
    params, x, t = setup
    with pytest.raises(ValueError, match=r"rule 'drtp' needs DFAFeedback from init_feedback\('drtp'.*got NoneType"):
        fj.value_and_grad(MODEL, mse, "drtp")(params, None, x, t)


def test_tap_shape_differs_from_feedback(setup):
    params, x, t = setup
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    wider = init_mlp([4, 8, 5, 3], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"tap 'layer_0': expected feature shape \(6,\), given \(8,\)"):
        jax.jit(fj.value_and_grad(MODEL, mse, "dfa"))(wider, feedback, x, t)


def test_model_without_taps_is_not_silently_bp(setup):
    params, x, t = setup

    def untapped(p, inputs, ops):
        h = jnp.tanh(ops.dense(inputs, p[0]["kernel"], p[0]["bias"]))
        h = jnp.tanh(ops.dense(h, p[1]["kernel"], p[1]["bias"]))
        return ops.dense(h, p[2]["kernel"], p[2]["bias"])

    with pytest.raises(ValueError, match="calls ops.tap nowhere"):
        fj.init_feedback("dfa", params, key=jax.random.key(2), model=untapped, inputs=x)
    with pytest.raises(ValueError, match="calls ops.tap nowhere"):
        fj.value_and_grad(untapped, mse, "shallow")(params, None, x, t)


def test_bypassing_ops_under_fa_raises(setup):
    params, x, t = setup

    def raw(p, inputs, ops):
        return jnp.tanh(inputs @ p[0]["kernel"]) @ p[1]["kernel"] @ p[2]["kernel"]

    feedback = fj.init_feedback("fa", params, key=jax.random.key(2))
    with pytest.raises(TypeError, match="kernel '0/kernel' carries FA feedback"):
        fj.value_and_grad(raw, mse, "fa")(params, feedback, x, t)


def test_kernel_without_feedback_under_fa_raises(setup):
    params, x, t = setup
    feedback = fj.init_feedback("fa", params, key=jax.random.key(2), select=lambda path, leaf: leaf.shape == (6, 5))
    with pytest.raises(ValueError, match=r"ops.dense got a kernel of shape \(4, 6\) with no FA feedback"):
        fj.value_and_grad(MODEL, mse, "fa")(params, feedback, x, t)


def test_tap_inside_checkpoint_names_the_tap(setup):
    """A tap inside jax.checkpoint would leak its value out of the inner trace; it is refused by name."""
    params, x, t = setup

    def model(params, x, ops):
        def block(layer, h):
            return ops.tap(jnp.tanh(ops.dense(h, layer["kernel"], layer["bias"])), name="inner")

        h = jax.checkpoint(block)(params[0], x)
        for layer in params[1:-1]:
            h = jnp.tanh(ops.dense(h, layer["kernel"], layer["bias"]))
        return ops.dense(h, params[-1]["kernel"], params[-1]["bias"])

    with pytest.raises(ValueError, match="tap 'inner' ran inside a JAX transformation nested in the model"):
        fj.init_feedback("dfa", params, key=jax.random.key(2), model=model, inputs=x)
