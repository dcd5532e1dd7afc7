"""Step time of BP, FA and DFA on an MLP, as paired ratios to BP in one run.

    python benchmarks/step_time.py            # 784-1024-1024-1024-10, tanh, batch 256, float32
    python benchmarks/step_time.py --quick    # a smoke run

A step is one gradient evaluation plus the SGD update, jitted. ``dfa_hand_fused``
is DFA written by hand in plain ``jnp`` (one projection GEMM, no ``Wᵀ``
products): the yardstick for fa_jax's DFA. Absolute times count only on a GPU.
The rule family (uSF, frSF, brSF, Kolen–Pollack with its B update, DRTP, shallow)
gets one row each, timed in the same paired rounds.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax

import fa_jax as fj
from fa_jax.models import init_mlp, mlp

from _timing import add_timing_arguments, median_ratio, paired_times, ratio_rows, report

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNING_RATE = 1e-3


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def rule_step(model, rule):
    grad_fn = fj.value_and_grad(model, cross_entropy, rule)

    @jax.jit
    def step(params, feedback, x, y):
        loss, grads = grad_fn(params, feedback, x, y)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    return step


def family_step(model, rule):
    """A rule-family step: brSF reads a traced step count, Kolen–Pollack also updates its B."""
    grad_fn = fj.value_and_grad(model, cross_entropy, rule)

    @jax.jit
    def step(params, feedback, x, y, t):
        loss, grads = grad_fn(params, feedback, x, y, step=t)
        updates = jax.tree.map(lambda g: -LEARNING_RATE * g, grads)
        feedback = fj.update_feedback(rule, feedback, updates, params)
        return jax.tree.map(jnp.add, params, updates), feedback, loss

    return step


FAMILY = ("usf", "frsf", "brsf", "kp", "drtp", "shallow")  # one row per rule beyond BP/FA/DFA


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
    for layer_in, h in zip(inputs[:-1], activations):
        width = h.shape[-1]
        delta = signal[:, offset : offset + width] * (1.0 - h * h)
        offset += width
        grads.append({"kernel": layer_in.T @ delta, "bias": delta.sum(0)})
    grads.append({"kernel": inputs[-1].T @ error, "bias": error.sum(0)})
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784,1024,1024,1024,10")
    parser.add_argument("--batch", type=int, default=256)
    add_timing_arguments(parser, os.path.join(HERE, "results", "step_time.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.rounds, args.repeats = "64,32,32,10", 16, 3, 2

    sizes = [int(s) for s in args.sizes.split(",")]
    key = jax.random.key(0)
    params = init_mlp(sizes, key=key)
    x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, sizes[-1])
    model = mlp("tanh")

    steps, feedbacks = {}, {}
    for name in ("bp", "fa", "dfa"):
        feedbacks[name] = fj.init_feedback(name, params, key=jax.random.key(3), model=model, inputs=x)
        step = rule_step(model, name)
        steps[name] = lambda step=step, fb=feedbacks[name]: step(params, fb, x, y)
    step_count = jnp.int32(1)  # traced, so brSF's M_t cannot be constant-folded
    for name in FAMILY:
        feedbacks[name] = fj.init_feedback(name, params, key=jax.random.key(3), model=model, inputs=x)
        step = family_step(model, name)
        steps[name] = lambda step=step, fb=feedbacks[name]: step(params, fb, x, y, step_count)
    projection = feedbacks["dfa"].projection
    steps["dfa_hand_fused"] = lambda: hand_fused_dfa_step(params, projection, x, y)

    # The hand-fused step must compute what fa_jax's DFA computes, or the comparison is void.
    fused, _ = hand_fused_dfa_step(params, projection, x, y)
    ours, _ = rule_step(model, "dfa")(params, feedbacks["dfa"], x, y)
    drift = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(ours)))
    assert drift < 1e-5, f"hand-fused DFA differs from fa_jax DFA by {drift}"

    times = paired_times(steps, args.rounds, args.repeats)
    rows = ratio_rows(times, "bp")
    dfa_vs_fused = median_ratio(times, "dfa", "dfa_hand_fused")
    title = f"step time, MLP {args.sizes}, tanh, batch {args.batch}, float32, {args.rounds} paired rounds"
    report(title, rows, "bp", args.out, {"dfa_over_hand_fused_median_ratio": dfa_vs_fused, "args": vars(args)})
    print(f"dfa / dfa_hand_fused (median paired ratio): {dfa_vs_fused:.3f}")


if __name__ == "__main__":
    main()
