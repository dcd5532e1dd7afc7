"""Bad input fails at trace time: ``TypeError`` for a wrong kind, ``ValueError`` for a wrong shape or
content, the message naming the argument (or the parameter, tap or layer), the expected and the given."""

import jax
import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unknown_rule_and_wrong_kinds(jit):
    with pytest.raises(ValueError, match=r"rule: unknown rule 'fba'; expected one of \['bp', 'brsf', 'dfa'"):
        fj.value_and_grad(MODEL, mse, "fba")
    with pytest.raises(TypeError, match=r"rule: expected a rule name .* given int"):
        fj.get_rule(3)
    with pytest.raises(TypeError, match="loss: expected a callable"):
        fj.value_and_grad(MODEL, "mse", "fa")
    with pytest.raises(TypeError, match="has_aux: expected True or False"):
        fj.value_and_grad(MODEL, mse, "fa", has_aux=1)


def test_rule_options_are_checked_when_made():
    with pytest.raises(ValueError, match=r"USF\.scale: expected 'xavier' or a number"):
        fj.USF(scale="big")
    with pytest.raises(TypeError, match=r"FA\.init: expected a callable"):
        fj.FA(init=3)
    with pytest.raises(ValueError, match=r"DFA\.taps: expected 'auto', 'layer' or 'marked', given 'macro'"):
        fj.DFA(taps="macro")
    with pytest.raises(ValueError, match=r"DFA\.batch_dims: expected an integer >= 0"):
        fj.DFA(batch_dims=-1)
    with pytest.raises(ValueError, match=r"KolenPollack.decay: expected a number in \[0, 1\]"):
        fj.KolenPollack(decay=-1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_feedback_for_another_model_is_refused(setup, jit):
    params, x, t = setup
    other = init_mlp([4, 6, 3], key=jax.random.key(1))
    feedback = fj.init_feedback("fa", other, key=jax.random.key(2), model=MODEL, inputs=x)
    grad_fn = fj.value_and_grad(MODEL, mse, "fa")
    grad_fn = jax.jit(grad_fn) if jit else grad_fn
    with pytest.raises(
        ValueError, match=r"float32\[5, 3\], given float32\[6, 3\]|needs feedback for the weights \['2/kernel'\]"
    ):
        grad_fn(params, feedback, x, t)


def test_feedback_of_the_wrong_shape_names_the_parameter(setup):
    params, x, t = setup
    feedback = fj.init_feedback("fa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    bad = fj.Feedback({**feedback.weights, "1/kernel": jnp.ones((5, 6))})
    with pytest.raises(
        ValueError, match=r"feedback for '1/kernel': rule 'fa' expected float32\[6, 5\], given float32\[5, 6\]"
    ):
        jax.jit(fj.value_and_grad(MODEL, mse, "fa"))(params, bad, x, t)


@pytest.mark.parametrize("name", ["fa", "usf", "frsf", "brsf", "kp"])
def test_missing_feedback_is_never_silently_bp(setup, name):
    params, x, t = setup
    grad_fn = jax.jit(fj.value_and_grad(MODEL, mse, name))
    with pytest.raises(
        ValueError, match=rf"rule '{name}' needs feedback for the weights \['0/kernel', '1/kernel', '2/kernel'\]"
    ):
        grad_fn(params, None, x, t, step=0)
    dfa = fj.init_feedback("dfa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    with pytest.raises(ValueError, match=rf"rule '{name}' needs feedback"):
        grad_fn(params, dfa, x, t, step=0)
    with pytest.raises(
        TypeError, match=rf"feedback: rule '{name}' expected a Feedback from init_feedback.*given float32\[2, 2\]"
    ):
        grad_fn(params, jnp.ones((2, 2)), x, t, step=0)


@pytest.mark.parametrize("name", ["dfa", "drtp", "shallow"])
def test_a_cutting_rule_needs_its_tap_layout(setup, name):
    params, x, t = setup
    with pytest.raises(ValueError, match=rf"feedback: rule '{name}' cuts the model at taps"):
        fj.value_and_grad(MODEL, mse, name)(params, None, x, t)


def test_taps_that_differ_from_the_feedback(setup):
    params, x, t = setup
    feedback = fj.init_feedback("dfa", params, key=jax.random.key(2), model=MODEL, inputs=x)
    wider = init_mlp([4, 8, 5, 3], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"tap 'layer_0': expected feature shape \(6,\) \(stack \(\)\), given \(8,\)"):
        jax.jit(fj.value_and_grad(MODEL, mse, "dfa"))(wider, feedback, x, t)

    def renamed(p, x):
        h = fj.tap(jnp.tanh(x @ p[0]["kernel"] + p[0]["bias"]), "first")
        h = fj.tap(jnp.tanh(h @ p[1]["kernel"] + p[1]["bias"]), "second")
        return h @ p[2]["kernel"] + p[2]["bias"]

    with pytest.raises(
        ValueError, match=r"expected taps \['layer_0', 'layer_1'\], the model now has \['first', 'second'\]"
    ):
        fj.value_and_grad(renamed, mse, "dfa")(params, feedback, x, t)


def test_a_model_without_taps_under_a_cutting_rule(setup):
    params, x, _ = setup
    linear = init_mlp([4, 3], key=jax.random.key(0))
    with pytest.raises(ValueError, match="the model has no tap for placement 'auto'"):
        fj.init_feedback("dfa", linear, key=jax.random.key(2), model=MODEL, inputs=x)
    with pytest.raises(ValueError, match="no tap for placement 'marked'"):
        fj.init_feedback(
            fj.DFA(taps="marked"),
            params,
            key=jax.random.key(2),
            model=lambda p, x: MODEL(p, x) if False else x @ p[0]["kernel"] @ p[1]["kernel"] @ p[2]["kernel"],
            inputs=x,
        )


def test_tap_names_must_be_unique_and_taps_arrays(setup):
    params, x, _ = setup

    def twice(p, x):
        h = fj.tap(jnp.tanh(x @ p[0]["kernel"]), "h")
        h = fj.tap(jnp.tanh(h @ p[1]["kernel"]), "h")
        return h @ p[2]["kernel"]

    with pytest.raises(ValueError, match="tap name 'h' is used twice"):
        fj.init_feedback("dfa", params, key=jax.random.key(0), model=twice, inputs=x)
    with pytest.raises(TypeError, match=r"tap: h: expected one array, given tuple"):
        fj.tap((x, x))
    with pytest.raises(TypeError, match=r"tap: h: expected a floating-point array, given int32\[3\]"):
        fj.tap(jnp.arange(3))
    with pytest.raises(TypeError, match="tap: name: expected a string"):
        fj.tap(x, name=3)


def test_step_and_targets_are_asked_for(setup):
    params, x, t = setup
    brsf = fj.init_feedback("brsf", params, key=jax.random.key(2), model=MODEL, inputs=x)
    with pytest.raises(ValueError, match=r"step: rule 'brsf' redraws its feedback every step"):
        fj.value_and_grad(MODEL, mse, "brsf")(params, brsf, x, t)
    with pytest.raises(TypeError, match=r"step: expected an integer scalar, given float32\[\]"):
        fj.value_and_grad(MODEL, mse, "brsf")(params, brsf, x, t, step=jnp.float32(1))
    with pytest.raises(ValueError, match=r"step: expected an integer < 2147483648, given 1099511627776"):
        fj.value_and_grad(MODEL, mse, "brsf")(params, brsf, x, t, step=2**40)
    with pytest.raises(ValueError, match=r"inputs: expected at least one sample, given an empty batch float32\[0, 4\]"):
        fj.value_and_grad(MODEL, mse, "bp")(params, None, jnp.ones((0, 4)), jnp.ones((0, 3)))
    drtp = fj.init_feedback("drtp", params, key=jax.random.key(2), model=MODEL, inputs=x)
    run = fj.forward(MODEL, "drtp")
    np.testing.assert_allclose(run(params, drtp, x), MODEL(params, x))  # a forward needs no targets
    with pytest.raises(ValueError, match="targets: rule 'drtp' sends the hidden taps a random projection"):
        jax.grad(lambda p: jnp.sum(run(p, drtp, x)))(params)
    with pytest.raises(ValueError, match=r"targets: DRTP projects the target.*given float32\[2, 1\]"):
        fj.value_and_grad(MODEL, lambda o, t: jnp.sum(o), "drtp")(params, drtp, x, jnp.ones((2, 1)))


def test_keys_dtypes_and_arrays(setup):
    params, x, t = setup
    with pytest.raises(
        TypeError, match=r"key: expected a typed PRNG key from jax.random.key\(seed\), given a raw uint32"
    ):
        fj.init_feedback("fa", params, key=jax.random.PRNGKey(0), model=MODEL, inputs=x)
    with pytest.raises(TypeError, match=r"key: rule 'fa' draws feedback; expected a typed PRNG key"):
        fj.init_feedback("fa", params, model=MODEL, inputs=x)
    assert fj.init_feedback("bp", params, model=MODEL, inputs=x).weights == {}  # BP draws nothing: no key needed
    with pytest.raises(ValueError, match=r"key: expected a single PRNG key of shape \(\)"):
        fj.init_feedback("fa", params, key=jax.random.split(jax.random.key(0), 2), model=MODEL, inputs=x)
    ints = [
        dict(layer, kernel=layer["kernel"].astype(jnp.int32)) if i == 1 else layer for i, layer in enumerate(params)
    ]
    with pytest.raises(TypeError, match=r"params/1/kernel: expected a floating-point array, given int32\[6, 5\]"):
        fj.value_and_grad(MODEL, mse, "bp")(ints, None, x, t)
    with pytest.raises(TypeError, match="inputs: expected a numeric array"):
        fj.value_and_grad(MODEL, mse, "bp")(params, None, np.array([["a"] * 4] * 2), t)
    with pytest.raises(ValueError, match="targets: expected a shape that broadcasts"):
        fj.value_and_grad(MODEL, mse, "bp")(params, None, x, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"exact: \['nope'\] name no parameter"):
        fj.init_feedback("fa", params, key=jax.random.key(0), model=MODEL, inputs=x, exact=["nope"])
    with pytest.raises(TypeError, match="dtype"):
        fj.init_feedback("fa", params, key=jax.random.key(0), model=MODEL, inputs=x, dtype=jnp.int32)


def test_update_feedback_checks_its_arguments(setup):
    params, x, _ = setup
    kp = fj.init_feedback("kp", params, key=jax.random.key(0), model=MODEL, inputs=x)
    with pytest.raises(TypeError, match="feedback: expected a Feedback from init_feedback"):
        fj.update_feedback("kp", kp.weights, params, params)
    with pytest.raises(ValueError, match=r"updates, params: expected entries for the weights \['0/kernel'"):
        fj.update_feedback("kp", kp, {}, params)
