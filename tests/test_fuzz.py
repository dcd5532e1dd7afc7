"""Fuzz the public API with random shapes, dtypes, keys and rule names.

Each example corrupts at most one argument. A clean example must run and give
finite numbers with the right shapes; a corrupted one must fail with a
``ValueError`` or ``TypeError`` whose message names the corrupted argument,
raised while tracing (never from inside XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fa_jax
from fa_jax import models

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
RULES = sorted(fa_jax.RULES)
BAD_DTYPES = [jnp.int32, jnp.uint8, jnp.bool_]


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def expect_named(error: Exception, names: tuple[str, ...]) -> None:
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    assert any(name in message for name in names), f"message names none of {names}: {message}"
    # A trace-time error comes from our checks, not from XLA's compiler or runtime.
    assert "XlaRuntimeError" not in type(error).__name__


def corrupt_key(kind: str):
    return {
        "raw": jax.random.PRNGKey(0),
        "int": 3,
        "float": jnp.ones(()),
        "batch": jax.random.split(jax.random.key(0), 2),
        "none": None,
    }[kind]


CORRUPTIONS = [
    "none",
    "rule",
    "sizes",
    "key",
    "dtype",
    "params_dtype",
    "inputs_shape",
    "inputs_dtype",
    "targets_shape",
    "feedback_model",
    "feedback_kind",
    "feedback_key",
    "activation",
]
scenarios = st.fixed_dictionaries(
    {
        "rule": st.sampled_from(RULES),
        "sizes": st.lists(st.integers(1, 5), min_size=2, max_size=4),
        "batch": st.integers(1, 4),
        "jit": st.booleans(),
        "detail": st.integers(0, 1000),
    }
)


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
@settings(SETTINGS, max_examples=3)
@given(case=scenarios)
def test_fuzz_training_api(corrupt, case):
    case = {**case, "corrupt": corrupt}
    rng = np.random.default_rng(case["detail"])
    rule, sizes, batch, corrupt = case["rule"], list(case["sizes"]), case["batch"], case["corrupt"]
    key, init_dtype, activation = jax.random.key(case["detail"]), jnp.float32, "tanh"
    expected: tuple[str, ...] = ()
    if corrupt == "rule":
        rule, expected = str(rng.choice(["FA ", "dfa2", "", "backprop", "42"])), ("rule",)
    elif corrupt == "sizes":
        sizes, expected = [[], [3], [3, 0], [3, -2, 1], [2.0, 3], [True, 2]][rng.integers(6)], ("sizes",)
    elif corrupt == "key":
        key, expected = corrupt_key(str(rng.choice(["raw", "int", "float", "batch", "none"]))), ("key",)
    elif corrupt == "dtype":
        init_dtype, expected = BAD_DTYPES[rng.integers(len(BAD_DTYPES))], ("dtype",)
    elif corrupt == "activation":
        activation, expected = str(rng.choice(["softmax", "", "Tanh"])), ("activation",)

    def run():
        model = models.mlp(activation)
        params = models.init_mlp(sizes, key=key, dtype=init_dtype)
        inputs = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
        targets = jnp.asarray(rng.normal(size=(batch, sizes[-1])), jnp.float32)
        feedback_key = (
            corrupt_key(str(rng.choice(["raw", "int", "batch"]))) if corrupt == "feedback_key" else jax.random.key(7)
        )
        feedback = fa_jax.init_feedback(rule, params, key=feedback_key, model=model, inputs=inputs)
        if corrupt == "params_dtype":
            leaves, tree = jax.tree.flatten(params)
            index = int(rng.integers(len(leaves)))
            leaves[index] = leaves[index].astype(BAD_DTYPES[rng.integers(len(BAD_DTYPES))])
            params = jax.tree.unflatten(tree, leaves)
        elif corrupt == "inputs_shape":
            wrong = [(batch, sizes[0] + 1), (), (2, batch, sizes[0] + 2)]
            inputs = jnp.ones(wrong[rng.integers(3)], jnp.float32)
        elif corrupt == "inputs_dtype":
            inputs = np.array([["a"] * sizes[0]] * batch)
        elif corrupt == "targets_shape":
            if batch == 1 and sizes[-1] == 1:  # (1, 1) outputs broadcast against any 2-d target
                targets = np.array([["label"]])
            else:
                targets = jnp.ones((batch + (batch > 1), sizes[-1] + (sizes[-1] > 1)), jnp.float32)
        elif corrupt == "feedback_model" and rule in ("fa", "dfa"):
            other = models.init_mlp([sizes[0], sizes[1] + 1, *sizes[1:]], key=jax.random.key(1))
            feedback = fa_jax.init_feedback(rule, other, key=jax.random.key(7), model=model, inputs=inputs)
        elif corrupt == "feedback_kind" and rule in ("fa", "dfa"):
            other_rule = "dfa" if rule == "fa" else "fa"
            feedback = [
                None,
                jnp.ones((2, 2)),
                fa_jax.init_feedback(other_rule, params, key=key, model=model, inputs=inputs),
            ][rng.integers(3)]
        grad_fn = fa_jax.value_and_grad(model, mse, rule)
        if case["jit"]:
            grad_fn = jax.jit(grad_fn)
        return params, grad_fn(params, feedback, inputs, targets, step=1)

    names = {
        "params_dtype": ("params",),
        "inputs_shape": ("inputs",),
        "inputs_dtype": ("inputs",),
        "targets_shape": ("targets",),
        "feedback_model": ("feedback",),
        "feedback_kind": ("feedback",),
        "feedback_key": ("key",),
    }
    expected = expected or names.get(corrupt, ())
    if corrupt in ("feedback_model", "feedback_kind") and rule not in ("fa", "dfa"):
        expected = ()  # only FA's and DFA's feedback is corrupted here
    no_taps = isinstance(sizes, list) and len(sizes) == 2  # no hidden layer: nothing for a cutting rule to tap
    if (
        no_taps
        and fa_jax.get_rule(rule if rule in fa_jax.RULES else "bp").cuts
        and corrupt not in ("rule", "sizes", "key", "dtype", "activation")
    ):
        expected = (*expected, "tap")

    try:
        params, (loss, grads) = run()
    except Exception as error:  # the point is to classify every failure
        event(f"{corrupt} -> {type(error).__name__}")
        assert expected, f"clean example failed: {type(error).__name__}: {error}"
        expect_named(error, expected)
        return
    event(f"{corrupt} -> ran")
    assert not expected, f"corrupted {corrupt!r} was accepted"
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype


@pytest.mark.parametrize("rule", ["bpp", "", "FA-", None, 3, ["fa"]])
def test_unknown_rules_name_the_rule(rule):
    for call in (
        lambda: fa_jax.get_rule(rule),
        lambda: fa_jax.value_and_grad(models.mlp(), mse, rule),
        lambda: fa_jax.init_feedback(
            rule,
            models.init_mlp([2, 2], key=jax.random.key(0)),
            key=jax.random.key(0),
            model=models.mlp(),
            inputs=jnp.ones((1, 2)),
        ),
    ):
        with pytest.raises((ValueError, TypeError), match="rule"):
            call()
