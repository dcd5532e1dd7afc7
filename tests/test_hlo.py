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
    """``((lhs, rhs), result)`` shapes of every dot the compiled step executes, and its cost.

    The optimized HLO is read, so a product that XLA keeps is seen wherever it
    was fused; operand shapes come from each operand's own definition.
    """
    params = init_mlp(SIZES, key=jax.random.key(0))
    x, t = jnp.ones((BATCH, SIZES[0])), jnp.ones((BATCH, SIZES[-1]))
    model = mlp("tanh")
    feedback = fj.init_feedback(rule, params, key=jax.random.key(1), model=model, inputs=x)
    compiled = jax.jit(fj.value_and_grad(model, mse, rule)).lower(params, feedback, x, t).compile()
    text = compiled.as_text()
    shape_of = dict(re.findall(r"(%[\w.\-]+) = f32\[([\d,]*)\]", text))
    shapes = []
    for line in text.splitlines():
        match = re.search(r"(%[\w.\-]+) = f32\[([\d,]*)\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
        if match:
            _, result, lhs, rhs = match.groups()
            shapes.append(((shape_of[lhs], shape_of[rhs]), result))
    return shapes, compiled.cost_analysis()


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
