"""From the lowered program: a DFA step builds no ``g Wᵀ`` product."""

import re

import jax
import jax.numpy as jnp
import pytest

import fa_jax as fj
from fa_jax.models import init_mlp, mlp

SIZES = [11, 23, 19, 17, 7]  # distinct widths, so dot shapes identify the product
BATCH = 5


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2)


def dots(rule):
    """``((lhs, rhs), result)`` shapes of every dot_general JAX emits for one step, and its cost."""
    params = init_mlp(SIZES, key=jax.random.key(0))
    x, t = jnp.ones((BATCH, SIZES[0])), jnp.ones((BATCH, SIZES[-1]))
    model = mlp("tanh")
    feedback = fj.init_feedback(rule, params, key=jax.random.key(1), model=model, inputs=x)
    lowered = jax.jit(fj.value_and_grad(model, mse, rule)).lower(params, feedback, x, t)
    shapes = []
    for line in lowered.as_text().splitlines():
        if "stablehlo.dot_general" in line:
            lhs, rhs, result = re.findall(r"tensor<([\dx]*)xf32>", line.rsplit(":", 1)[1])
            shapes.append(((lhs.replace("x", ","), rhs.replace("x", ",")), result.replace("x", ",")))
    return shapes, lowered.compile().cost_analysis()


def input_gradient_products(shapes):
    """Dots that map an error ``(batch, d_l)`` back to ``(batch, d_{l-1})`` through W_l, l ≥ 2."""
    found = []
    for l in range(2, len(SIZES)):
        for operands, result in shapes:
            if result == f"{BATCH},{SIZES[l - 1]}" and f"{SIZES[l - 1]},{SIZES[l]}" in operands:
                found.append(l)
    return found


def test_dfa_step_has_no_transposed_weight_product():
    bp, bp_cost = dots("bp")
    dfa, dfa_cost = dots("dfa")
    assert sorted(input_gradient_products(bp)) == [2, 3, 4]  # the check can see them when present
    assert input_gradient_products(dfa) == []
    # forward (4) + weight gradients (4) + one projection GEMM
    assert len(dfa) == 2 * (len(SIZES) - 1) + 1, dfa
    assert dfa_cost["flops"] < bp_cost["flops"]


def test_dfa_projection_is_a_single_gemm():
    dfa, _ = dots("dfa")
    hidden = sum(SIZES[1:-1])
    projections = [op for op, result in dfa if result == f"{BATCH},{hidden}"]
    assert len(projections) == 1
