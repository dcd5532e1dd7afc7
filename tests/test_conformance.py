"""One suite over every registered rule and every entry point, like optax's common optimizer test.

For each rule in ``fa_jax.RULES`` (the test-only ``scaled_sign`` of tests/scaled_sign.py
included) and each way of running it, the same MLP gives:

* gradients equal to the rule's NumPy closed form (tests/closed_forms.py), eager and jitted;
* after 100 steps of adamw with weight decay, fixed feedback bit-identical to the drawn one,
  and learned feedback changed exactly as its law says (Kolen–Pollack: ``B − W`` shrinks by
  ``1 − decay`` per step, whatever the optimizer does).

Entry points: the functional core, NNX (stateful ``nnx.value_and_grad``, and the pure
``split`` path), Linen, the optax transform, and the experiment runner (``run_sweep``).
Every feedback is brought to the closed form's layout (``"<layer>/kernel"``) by path.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fa_jax as fj
import fa_jax.linen
import fa_jax.nnx
import reliability_task
from closed_forms import CLOSED_FORMS
from fa_jax.experiments import run_sweep
from fa_jax.models import init_mlp, mlp
from fa_jax.transform import rule_gradients

SIZES = (5, 7, 6, 3)
STEP = 3
RULES = sorted(fj.RULES)


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def problem():
    params = init_mlp(SIZES, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, SIZES[0]))
    t = jax.nn.one_hot(jnp.array([0, 2, 1, 2]), SIZES[-1])
    return params, x, t


def as_layers(weights_by_path: dict, names: list[str]) -> dict:
    """``{"<i>/kernel": leaf}`` from a feedback keyed by the entry point's own parameter paths."""
    return {
        f"{i}/kernel": weights_by_path[f"{name}/kernel"]
        for i, name in enumerate(names)
        if f"{name}/kernel" in weights_by_path
    }


def in_closed_form_layout(feedback: fj.Feedback, names: list[str]) -> fj.Feedback:
    return fj.Feedback(as_layers(feedback.weights, names), feedback.taps, feedback.layout, feedback.exact)


# --------------------------------------------------------------------------- the entry points
# Each gives (loss, grads as [{"kernel", "bias"}] per layer, feedback in the closed form's layout),
# and a training run: (feedback and params before, after) in the same layout.


def tx():
    return optax.adamw(1e-2, weight_decay=0.1)


def scan_training(grad_fn, rule, params, feedback, x, t, steps):
    """``steps`` of adamw under ``rule`` in one ``lax.scan``: the params and the feedback after them."""
    opt = tx()

    @jax.jit
    def step(carry, i):
        p, s, fb = carry
        _, grads = grad_fn(p, fb, x, t, step=i)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s, fj.update_feedback(rule, fb, updates, p)), None

    (after, _, fb_after), _ = jax.lax.scan(step, (params, opt.init(params), feedback), jnp.arange(steps))
    return after, fb_after


class Core:
    jits = (False, True)

    @staticmethod
    def grads(rule, params, x, t, jit):
        feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=mlp(), inputs=x)
        grad_fn = fj.value_and_grad(mlp(), mse, rule)
        loss, grads = (jax.jit(grad_fn) if jit else grad_fn)(params, feedback, x, t, step=STEP)
        return loss, grads, feedback

    @staticmethod
    def train(rule, params, x, t, steps):
        feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=mlp(), inputs=x)
        after, fb_after = scan_training(fj.value_and_grad(mlp(), mse, rule), rule, params, feedback, x, t, steps)
        return feedback, fb_after, params, after


class Transform:
    jits = (False, True)

    @staticmethod
    def grads(rule, params, x, t, jit):
        feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=mlp(), inputs=x)
        rule_tx = rule_gradients(fj.value_and_grad(mlp(), mse, rule))

        def update(p, fb):
            grads, state = rule_tx.update(p, rule_tx.init(p), p, feedback=fb, inputs=x, targets=t, step=STEP)
            return state.loss, grads

        loss, grads = (jax.jit(update) if jit else update)(params, feedback)
        return loss, grads, feedback

    @staticmethod
    def train(rule, params, x, t, steps):
        feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=mlp(), inputs=x)
        chain = optax.chain(rule_gradients(fj.value_and_grad(mlp(), mse, rule)), tx())

        @jax.jit
        def step(carry, i):
            p, s, fb = carry
            updates, s = chain.update(p, s, p, feedback=fb, inputs=x, targets=t, step=i)
            return (optax.apply_updates(p, updates), s, fj.update_feedback(rule, fb, updates, p)), None

        (after, _, fb_after), _ = jax.lax.scan(step, (params, chain.init(params), feedback), jnp.arange(steps))
        return feedback, fb_after, params, after


class NNXMLP(nnx.Module):
    def __init__(self, params):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(*layer["kernel"].shape, rngs=rngs) for layer in params])
        for linear, layer in zip(self.layers, params, strict=True):
            linear.kernel.set_value(layer["kernel"])
            linear.bias.set_value(layer["bias"])

    def __call__(self, x):
        *hidden, last = self.layers
        for layer in hidden:
            x = jnp.tanh(layer(x))
        return last(x)


NNX_NAMES = [f"layers/{i}" for i in range(len(SIZES) - 1)]


def nnx_grads_as_layers(grads):
    flat = fj._feedback.by_path(nnx.to_pure_dict(grads))
    return [{"kernel": flat[f"{n}/kernel"], "bias": flat[f"{n}/bias"]} for n in NNX_NAMES]


def nnx_model(rule, params, x):
    return fa_jax.nnx.convert(NNXMLP(params), rule, key=jax.random.key(2), inputs=x)


def nnx_feedback(model):
    """The converted model's feedback in the closed form's layout (BP converts nothing: no feedback)."""
    feedback = model.fa_feedback.get_value() if hasattr(model, "fa_feedback") else fj.Feedback()
    return in_closed_form_layout(feedback, NNX_NAMES)


class NNXStateful:
    jits = (False, True)

    @staticmethod
    def grads(rule, params, x, t, jit):
        model = nnx_model(rule, params, x)

        def loss_and_grads(m):
            return nnx.value_and_grad(lambda m: mse(fa_jax.nnx.call(m, x, step=STEP, targets=t), t))(m)

        loss, grads = (nnx.jit(loss_and_grads) if jit else loss_and_grads)(model)
        return loss, nnx_grads_as_layers(grads), nnx_feedback(model)

    @staticmethod
    def train(rule, params, x, t, steps):
        model = nnx_model(rule, params, x)
        before = nnx_feedback(model)
        optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, i):
            grads = nnx.grad(lambda m: mse(fa_jax.nnx.call(m, x, step=i, targets=t), t))(model)
            fa_jax.nnx.optimizer_update(optimizer, model, grads)

        for i in range(steps):
            step(model, optimizer, i)
        after = [{"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()} for layer in model.layers]
        return before, nnx_feedback(model), params, after


class NNXPure:
    jits = (False, True)

    @staticmethod
    def grads(rule, params, x, t, jit):
        graphdef, p, state = fa_jax.nnx.split(nnx_model(rule, params, x))
        grad_fn = fa_jax.nnx.value_and_grad(graphdef, mse)
        loss, grads = (jax.jit(grad_fn) if jit else grad_fn)(p, state, x, t, step=STEP)
        return loss, nnx_grads_as_layers(grads), nnx_feedback(nnx.merge(graphdef, p, state))

    @staticmethod
    def train(rule, params, x, t, steps):
        graphdef, p, state = fa_jax.nnx.split(nnx_model(rule, params, x))
        grad_fn, opt = fa_jax.nnx.value_and_grad(graphdef, mse), tx()
        before = nnx_feedback(nnx.merge(graphdef, p, state))

        @jax.jit
        def step(p, s, state, i):
            _, grads = grad_fn(p, state, x, t, step=i)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, fa_jax.nnx.update_feedback(rule, state, updates, p)

        s = opt.init(p)
        for i in range(steps):
            p, s, state = step(p, s, state, i)
        model = nnx.merge(graphdef, p, state)
        after = [{"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()} for layer in model.layers]
        return before, nnx_feedback(model), params, after


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in SIZES[1:-1]:
            x = jnp.tanh(nn.Dense(width)(x))
        return nn.Dense(SIZES[-1])(x)


LINEN_NAMES = [f"Dense_{i}" for i in range(len(SIZES) - 1)]


def linen_params(params):
    return {name: dict(layer) for name, layer in zip(LINEN_NAMES, params, strict=True)}


class Linen:
    jits = (False, True)

    @staticmethod
    def grads(rule, params, x, t, jit):
        adapted = fa_jax.linen.adapt(LinenMLP(), rule)
        p = linen_params(params)
        feedback = adapted.init_feedback({"params": p}, x, key=jax.random.key(2))
        grad_fn = adapted.value_and_grad(mse)
        loss, grads = (jax.jit(grad_fn) if jit else grad_fn)(p, feedback, x, t, step=STEP)
        return loss, [grads[n] for n in LINEN_NAMES], in_closed_form_layout(feedback, LINEN_NAMES)

    @staticmethod
    def train(rule, params, x, t, steps):
        adapted = fa_jax.linen.adapt(LinenMLP(), rule)
        p = linen_params(params)
        feedback = adapted.init_feedback({"params": p}, x, key=jax.random.key(2))
        after, fb_after = scan_training(adapted.value_and_grad(mse), rule, p, feedback, x, t, steps)
        return (
            in_closed_form_layout(feedback, LINEN_NAMES),
            in_closed_form_layout(fb_after, LINEN_NAMES),
            params,
            [after[n] for n in LINEN_NAMES],
        )


def runner_task(optimizer, steps):
    """The runner's tiny task with the closed form's loss: MSE against one-hot labels."""
    task = reliability_task.make_task(steps=steps, eval_every=steps)
    return task._replace(
        loss=lambda outputs, labels: mse(outputs, jax.nn.one_hot(labels, outputs.shape[-1])),
        optimizer=optimizer,
        init_params=lambda *, key: init_mlp(reliability_task.SIZES, key=key),
    )


def runner_start(task, rule, seed=0):
    """The documented seed split and the first batch: what the runner trains from."""
    init_key, feedback_key, data_key = jax.random.split(jax.random.key(seed), 3)
    params = task.init_params(key=init_key)
    x, labels = task.batch(task.data, data_key, jnp.int32(0))
    feedback = fj.init_feedback(rule, params, key=feedback_key, model=task.model, inputs=x)
    return params, x, jax.nn.one_hot(labels, reliability_task.SIZES[-1]), feedback


def recording(inner, steps):
    """``inner`` (adamw) that also keeps the gradient of each step: one sweep serves both runner checks."""
    record = reliability_task.recording_sgd(0.0, steps)

    def init(params):
        return inner.init(params), record.init(params)

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state[0], params)
        return updates, (inner_state, record.update(grads, state[1])[1])

    return optax.GradientTransformation(init, update)


def runner_run(rule, steps):
    """One sweep (jit, vmap over seeds, lax.scan): the first step's gradients and the feedback after ``steps``."""
    task = runner_task(recording(tx(), 1), steps)
    result = run_sweep(task, rule, [0], strategy="vmap")
    params, x, t, feedback = runner_start(task, rule)
    grads = jax.tree.map(lambda g: g[0, 0], result.state.opt_state[1].grads)
    final = (jax.tree.map(lambda a: a[0], result.state.feedback), jax.tree.map(lambda a: a[0], result.state.params))
    return (params, x, t, feedback), grads, final


ENTRY_POINTS = {"core": Core, "transform": Transform, "nnx": NNXStateful, "nnx_pure": NNXPure, "linen": Linen}
CASES = [(rule, entry, jit) for rule in RULES for entry, cls in ENTRY_POINTS.items() for jit in cls.jits]


@pytest.mark.parametrize("rule, entry, jit", CASES, ids=[f"{r}-{e}-{'jit' if j else 'eager'}" for r, e, j in CASES])
def test_gradients_are_the_rules_closed_form(rule, entry, jit):
    rule = fj.get_rule(rule)
    params, x, t = problem()
    loss, grads, feedback = ENTRY_POINTS[entry].grads(rule, params, x, t, jit)
    want_loss, want = CLOSED_FORMS[rule.name](rule, params, feedback, x, t, "tanh", STEP)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    got = [{"kernel": np.asarray(g["kernel"], np.float64), "bias": np.asarray(g["bias"], np.float64)} for g in grads]
    chex.assert_trees_all_close(got, want, rtol=5e-5, atol=2e-6)


def learns(rule, params, x) -> bool:
    """Asked of the rule: does its feedback change after a step?"""
    feedback = fj.init_feedback(rule, params, key=jax.random.key(2), model=mlp(), inputs=x)
    return fj.update_feedback(rule, feedback, jax.tree.map(jnp.ones_like, params), params) is not feedback


def kolen_pollack_law(rule, before, after, params, trained, steps):
    """``B − W ← (1 − decay)(B − W)`` every step, whatever the optimizer did to W."""
    for i, (w0, w1) in enumerate(zip(params, trained, strict=True)):
        gap0 = np.asarray(before.weights[f"{i}/kernel"]) - np.asarray(w0["kernel"])
        gap = np.asarray(after.weights[f"{i}/kernel"]) - np.asarray(w1["kernel"])
        np.testing.assert_allclose(gap, gap0 * (1 - rule.decay) ** steps, rtol=1e-4, atol=1e-6)


LEARNED_LAWS = {"kp": kolen_pollack_law}
TRAINING = [(rule, entry) for rule in RULES for entry in ENTRY_POINTS]


@pytest.mark.parametrize("rule, entry", TRAINING, ids=[f"{r}-{e}" for r, e in TRAINING])
def test_feedback_after_100_steps_of_adamw_with_weight_decay(rule, entry):
    rule = fj.get_rule(rule)
    params, x, t = problem()
    before, after, start, trained = ENTRY_POINTS[entry].train(rule, params, x, t, 100)
    assert any(not np.allclose(a["kernel"], b["kernel"]) for a, b in zip(start, trained, strict=True))  # it trained
    check_feedback_law(rule, params, x, before, after, start, trained, 100)


def check_feedback_law(rule, params, x, before, after, start, trained, steps):
    """Fixed feedback bit-identical; learned feedback as its law says."""
    if not learns(rule, params, x):
        assert jax.tree.structure(after) == jax.tree.structure(before)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
            if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return
    assert rule.name in LEARNED_LAWS, f"rule {rule.name!r} learns its feedback: add its law to LEARNED_LAWS"
    LEARNED_LAWS[rule.name](rule, before, after, start, trained, steps)


@pytest.mark.parametrize("rule", RULES)
def test_the_runner_trains_each_rule_as_its_closed_form_and_law_say(rule):
    """The runner entry point: a 100-step sweep whose first gradient is the closed form, then the feedback law."""
    rule = fj.get_rule(rule)
    (params, x, t, feedback), grads, (fb_after, trained) = runner_run(rule, 100)
    _, want = CLOSED_FORMS[rule.name](rule, params, feedback, x, t, "tanh", 0)
    got = [{"kernel": np.asarray(g["kernel"], np.float64), "bias": np.asarray(g["bias"], np.float64)} for g in grads]
    chex.assert_trees_all_close(got, want, rtol=5e-5, atol=2e-6)
    assert any(not np.allclose(a["kernel"], b["kernel"]) for a, b in zip(params, trained, strict=True))
    check_feedback_law(rule, params, x, feedback, fb_after, params, trained, 100)
