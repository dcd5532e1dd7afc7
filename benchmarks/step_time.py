"""Step time of every rule on an MLP, as paired ratios to BP in one run, and first-call cost per rule.

    python benchmarks/step_time.py            # 784-1024-1024-1024-10, tanh, batch 256, float32
    python benchmarks/step_time.py --quick    # a smoke run

A step is one gradient evaluation, the rule's feedback update (Kolen–Pollack learns B)
and the SGD update, jitted. The model is a plain ``model(params, x)``; fa_jax's engine
reads its program and routes every product. Two hand-written steps are the yardsticks:
``fa_hand`` (a ``custom_vjp`` dense layer with ``dx = g Bᵀ``) and ``dfa_hand_fused`` (DFA
in plain ``jnp``: one projection GEMM, no ``Wᵀ``). Absolute times count only on a GPU.

The first call of each jitted step (trace, the engine's reading of the program, compile)
is timed too, once per rule, and reported as seconds and as a ratio to BP's first call.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax

import fa_jax as fj
from _timing import add_timing_arguments, median_ratio, paired_times, ratio_rows, report
from fa_jax.models import init_mlp, mlp

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNING_RATE = 1e-3


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def rule_step(model, rule):
    """One step of any rule: gradients, the rule's feedback update, SGD. ``t`` is traced (brSF)."""
    rule = fj.get_rule(rule)
    grad_fn = fj.value_and_grad(model, cross_entropy, rule)

    @jax.jit
    def step(params, feedback, x, y, t):
        loss, grads = grad_fn(params, feedback, x, y, step=t)
        updates = jax.tree.map(lambda g: -LEARNING_RATE * g, grads)
        learned = fj.update_feedback(rule, feedback, updates, params)
        # Fixed feedback comes back as the same object: not returning it spares copying every B out.
        return jax.tree.map(jnp.add, params, updates), (None if learned is feedback else learned), loss

    return step


@jax.custom_vjp
def fa_dense(x, w, b):
    return x @ w


fa_dense.defvjp(lambda x, w, b: (x @ w, (x, b)), lambda r, g: (g @ r[1].T, r[0].T @ g, None))


@jax.jit
def hand_fa_step(params, feedback, x, y):
    """FA by hand: a ``custom_vjp`` dense layer per weight, ``dx = g Bᵀ``, ``dW = xᵀ g``."""

    def loss(p):
        h = x
        for i, layer in enumerate(p):
            a = fa_dense(h, layer["kernel"], feedback[i]) + layer["bias"]
            h = a if i == len(p) - 1 else jnp.tanh(a)
        return cross_entropy(h, y)

    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), value


@jax.jit
def hand_fused_dfa_step(params, projection, x, y):
    """DFA by hand: forward, ``e``, one GEMM ``e [B_1 … B_L]``, then ``dW_l = h_{l-1}ᵀ δ_l``."""
    *hidden, last = params
    inputs, activations = [x], []
    for layer in hidden:
        h = jnp.tanh(inputs[-1] @ layer["kernel"] + layer["bias"])
        activations.append(h)
        inputs.append(h)
    logits = inputs[-1] @ last["kernel"] + last["bias"]
    loss = cross_entropy(logits, y)
    error = (jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1])) / x.shape[0]
    signal = error @ projection
    grads, offset = [], 0
    for layer_in, h in zip(inputs[:-1], activations, strict=True):
        width = h.shape[-1]
        delta = signal[:, offset : offset + width] * (1.0 - h * h)
        offset += width
        grads.append({"kernel": layer_in.T @ delta, "bias": delta.sum(0)})
    grads.append({"kernel": inputs[-1].T @ error, "bias": error.sum(0)})
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss


def first_call_seconds(step, *args) -> float:
    """Wall time of the first call: trace (and the engine's reading of the program) plus compile plus one run."""
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    return time.perf_counter() - start


def max_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784,1024,1024,1024,10")
    parser.add_argument("--batch", type=int, default=256)
    add_timing_arguments(parser, os.path.join(HERE, "results", "step_time.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.rounds, args.repeats = "64,32,32,10", 16, 3, 2

    sizes = [int(s) for s in args.sizes.split(",")]
    params = init_mlp(sizes, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, sizes[-1])
    model = mlp("tanh")
    t = jnp.int32(1)  # traced, so brSF's M_t cannot be constant-folded

    steps, first_call = {}, {}
    for name in sorted(fj.RULES, key=lambda n: (n != "bp", n)):
        feedback = fj.init_feedback(name, params, key=jax.random.key(3), model=model, inputs=x)
        step = rule_step(model, name)
        first_call[name] = first_call_seconds(step, params, feedback, x, y, t)
        steps[name] = lambda step=step, fb=feedback: step(params, fb, x, y, t)
    fa = fj.init_feedback("fa", params, key=jax.random.key(3), model=model, inputs=x)
    b = [fa.weights[f"{i}/kernel"] for i in range(len(sizes) - 1)]
    projection = fj.init_feedback("dfa", params, key=jax.random.key(3), model=model, inputs=x).taps
    steps["fa_hand"] = lambda: hand_fa_step(params, b, x, y)
    steps["dfa_hand_fused"] = lambda: hand_fused_dfa_step(params, projection, x, y)

    # The hand-written steps must compute what fa_jax computes, or the comparison is void.
    assert max_difference(hand_fa_step(params, b, x, y)[0], steps["fa"]()[0]) < 1e-5
    assert max_difference(hand_fused_dfa_step(params, projection, x, y)[0], steps["dfa"]()[0]) < 1e-5

    times = paired_times(steps, args.rounds, args.repeats)
    rows = ratio_rows(times, "bp")
    for name, seconds in first_call.items():
        rows[name]["first_call_s"] = seconds
        rows[name]["first_call_ratio_to_bp"] = seconds / first_call["bp"]
    extra = {
        "fa_over_fa_hand_median_ratio": median_ratio(times, "fa", "fa_hand"),
        "dfa_over_hand_fused_median_ratio": median_ratio(times, "dfa", "dfa_hand_fused"),
        "args": vars(args),
    }
    title = f"step time, MLP {args.sizes}, tanh, batch {args.batch}, float32, {args.rounds} paired rounds"
    report(title, rows, "bp", args.out, extra)
    print(f"\n{'rule':<10}{'first call s':>14}{'ratio to bp':>13}")
    for name, seconds in first_call.items():
        print(f"{name:<10}{seconds:>14.2f}{seconds / first_call['bp']:>13.2f}")
    print(f"fa / fa_hand (median paired ratio): {extra['fa_over_fa_hand_median_ratio']:.3f}")
    print(f"dfa / dfa_hand_fused (median paired ratio): {extra['dfa_over_hand_fused_median_ratio']:.3f}")


if __name__ == "__main__":
    main()
