"""From the compiled program: what each rule's step computes, against hand-written steps.

The engine re-reads the model's program; these tests check that XLA then runs the same dots
and FLOPs as a step written by hand for that rule (a ``custom_vjp`` FA layer, a DFA step via
``jax.vjp`` with cut taps, BP), that DFA builds no ``g Wᵀ`` product and one projection GEMM, and
that shallow computes only the forward and the last block's backward.
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import pytest

import fa_jax as fj
from fa_jax.models import init_mlp, mlp

SIZES = [11, 23, 19, 17, 7]  # distinct widths, so dot shapes identify the product
BATCH = 5
MODEL = mlp("tanh")


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2)


def problem():
    params = init_mlp(SIZES, key=jax.random.key(0))
    return params, jnp.ones((BATCH, SIZES[0])), jnp.ones((BATCH, SIZES[-1]))


def compiled(fn, *args):
    """``(Counter of ((lhs, rhs), result) dot shapes, flops)`` of the optimized program."""
    program = jax.jit(fn).lower(*args).compile()
    text = program.as_text()
    shape_of = dict(re.findall(r"(%[\w.\-]+) = f32\[([\d,]*)\]", text))
    dots = Counter()
    for line in text.splitlines():
        match = re.search(r"(%[\w.\-]+) = f32\[([\d,]*)\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
        if match:
            _, result, lhs, rhs = match.groups()
            dots[(tuple(sorted((shape_of[lhs], shape_of[rhs]))), result)] += 1
    cost = program.cost_analysis()
    return dots, float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def engine_step(rule):
    params, x, t = problem()
    feedback = fj.init_feedback(rule, params, key=jax.random.key(1), model=MODEL, inputs=x)
    return compiled(fj.value_and_grad(MODEL, mse, rule), params, feedback, x, t), feedback


# --- hand-written steps, independent of the engine -------------------------------------------


@jax.custom_vjp
def fa_dense(x, w, b):
    return x @ w


fa_dense.defvjp(lambda x, w, b: (x @ w, (x, b)), lambda r, g: (g @ r[1].T, r[0].T @ g, None))


def hand_fa(params, feedback, x, t):
    def loss(p):
        h = x
        for i, layer in enumerate(p):
            a = fa_dense(h, layer["kernel"], feedback[i]) + layer["bias"]
            h = a if i == len(p) - 1 else jnp.tanh(a)
        return mse(h, t)

    return jax.value_and_grad(loss)(params)


def hand_dfa(params, projection, x, t):
    """Nøkland's DFA via ``jax.vjp``: taps cut by stop_gradient, ``(e, [e B_l])`` as cotangents."""

    def forward(p):
        h, taps = x, []
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
            taps.append(h)
            h = jax.lax.stop_gradient(h)
        return h @ p[-1]["kernel"] + p[-1]["bias"], taps

    (y, taps), pullback = jax.vjp(forward, params)
    e = y - t
    signal = e @ projection
    bounds = [sum(tap.shape[1] for tap in taps[: i + 1]) for i in range(len(taps) - 1)]
    splits = jnp.split(signal, bounds, axis=1)
    (grads,) = pullback((e, splits))
    return mse(y, t), grads


def hand_shallow(params, x, t):
    def loss(last, h):
        return mse(h @ last["kernel"] + last["bias"], t)

    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    value, last = jax.value_and_grad(loss)(params[-1], h)
    return value, [jax.tree.map(jnp.zeros_like, layer) for layer in params[:-1]] + [last]


def test_engine_steps_equal_hand_written_steps():
    params, x, t = problem()
    (bp_dots, bp_flops), _ = engine_step("bp")
    assert (bp_dots, bp_flops) == compiled(
        lambda p, x, t: jax.value_and_grad(lambda q: mse(MODEL(q, x), t))(p), params, x, t
    )
    (fa_dots, fa_flops), feedback = engine_step("fa")
    b = [feedback.weights[f"{i}/kernel"] for i in range(len(SIZES) - 1)]
    assert (fa_dots, fa_flops) == compiled(hand_fa, params, b, x, t)
    (dfa_dots, dfa_flops), feedback = engine_step("dfa")
    assert (dfa_dots, dfa_flops) == compiled(hand_dfa, params, feedback.taps, x, t)
    (shallow_dots, shallow_flops), _ = engine_step("shallow")
    assert (shallow_dots, shallow_flops) == compiled(hand_shallow, params, x, t)


def input_gradient_products(dots):
    """Dots mapping an error ``(batch, d_l)`` back to ``(batch, d_{l-1})`` through W_l, l ≥ 2."""
    found = []
    for layer in range(2, len(SIZES)):
        for operands, result in dots:
            if result == f"{BATCH},{SIZES[layer - 1]}" and f"{SIZES[layer - 1]},{SIZES[layer]}" in operands:
                found.append(layer)
    return found


def test_dfa_step_has_no_transposed_weight_product_and_one_projection():
    (bp, bp_flops), _ = engine_step("bp")
    (dfa, dfa_flops), _ = engine_step("dfa")
    assert sorted(input_gradient_products(bp)) == [2, 3, 4]  # the check can see them when present
    assert input_gradient_products(dfa) == []
    # forward (4) + weight gradients (4) + one projection GEMM
    assert sum(dfa.values()) == 2 * (len(SIZES) - 1) + 1, dfa
    hidden = sum(SIZES[1:-1])
    assert sum(n for (_, result), n in dfa.items() if result == f"{BATCH},{hidden}") == 1
    assert dfa_flops < bp_flops


@pytest.mark.parametrize("batch", [64])
def test_shallow_computes_the_forward_and_the_last_block_only(batch):
    params = init_mlp([784, 256, 256, 10], key=jax.random.key(0))
    x, t = jnp.ones((batch, 784)), jnp.ones((batch, 10))
    feedback = fj.init_feedback("shallow", params, model=MODEL, inputs=x)
    _, flops = compiled(fj.value_and_grad(MODEL, mse, "shallow"), params, feedback, x, t)
    _, forward = compiled(MODEL, params, x)
    last_block = 2 * batch * 256 * 10  # dW = hᵀ e
    assert forward <= flops <= forward + 1.1 * last_block + 10 * batch * 10
