"""Step time of unmodified Flax models under BP, FA, DFA and shallow, as paired ratios to BP.

    python benchmarks/step_time_flax.py            # CNN (digits-sized) and a 2-block Transformer
    python benchmarks/step_time_flax.py --quick    # a smoke run

Models are ``tests/flax_models.py``'s ``CNN`` / ``Transformer`` (NNX, converted with
``fa_jax.nnx.convert``) and their Linen twins (``fa_jax.linen.adapt``). A step
is one jitted gradient evaluation plus an Adam update on the pure
``split``/``merge`` path. All variants of one model are timed in the same
alternating rounds (see ``_timing.py``); the table gives the median of the
per-round ratios to that model's BP. Absolute times count only on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import optax
from flax import nnx

import fa_jax
import fa_jax.linen as flinen
import fa_jax.nnx as fnnx
from _timing import add_timing_arguments, environment, paired_times, ratio_rows

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the ordinary Flax models live with the tests
from flax_models import CNN, Block, LinenBlock, LinenCNN, LinenTransformer, Transformer  # noqa: E402


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def nnx_step(build, rule, x, y, tx, **convert_kw):
    """A jitted pure step for an NNX model converted for ``rule``; returns a no-argument callable."""
    model = fnnx.convert(build(), rule, key=jax.random.key(1), inputs=x, **convert_kw)
    graphdef, params, feedback = fnnx.split(model)
    grad_fn = fnnx.value_and_grad(graphdef, xent)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = grad_fn(params, feedback, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return lambda: step(params, state)


def linen_step(model, rule, x, y, tx, **adapt_kw):
    variables = model.init(jax.random.key(0), x)
    adapted = flinen.adapt(model, rule, **adapt_kw)
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(1))
    params = variables["params"]
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: xent(adapted.apply({"params": p}, feedback, x), y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return lambda: step(params, state)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn-batch", type=int, default=256)
    parser.add_argument("--cnn-width", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tf-batch", type=int, default=32)
    add_timing_arguments(parser, os.path.join(HERE, "results", "step_time_flax.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.cnn_batch, args.cnn_width, args.seq, args.dim, args.heads, args.tf_batch = 16, 4, 8, 16, 2, 4
        args.rounds, args.repeats = 3, 2

    tx = optax.adam(1e-3)
    keys = jax.random.split(jax.random.key(0), 4)
    images = jax.random.uniform(keys[0], (args.cnn_batch, 8, 8, 1))
    labels = jax.random.randint(keys[1], (args.cnn_batch,), 0, 10)
    tokens = jax.random.randint(keys[2], (args.tf_batch, args.seq), 0, 128)
    targets = jax.random.randint(keys[3], (args.tf_batch, args.seq), 0, 128)
    cnn = lambda: CNN(width=args.cnn_width, rngs=nnx.Rngs(0))
    tf = lambda: Transformer(seq=args.seq, dim=args.dim, heads=args.heads, rngs=nnx.Rngs(0))
    linen_tf = LinenTransformer(seq=args.seq, dim=args.dim, heads=args.heads)
    dfa2 = fa_jax.DFA(batch_dims=2)

    suites = {
        "cnn": {
            "nnx/bp": nnx_step(cnn, "bp", images, labels, tx),
            "nnx/fa": nnx_step(cnn, "fa", images, labels, tx),
            "nnx/dfa": nnx_step(cnn, "dfa", images, labels, tx),
            "nnx/shallow": nnx_step(cnn, "shallow", images, labels, tx),
            "linen/bp": linen_step(LinenCNN(width=args.cnn_width), "bp", images, labels, tx),
            "linen/fa": linen_step(LinenCNN(width=args.cnn_width), "fa", images, labels, tx),
            "linen/dfa": linen_step(LinenCNN(width=args.cnn_width), "dfa", images, labels, tx),
        },
        "transformer": {
            "nnx/bp": nnx_step(tf, "bp", tokens, targets, tx),
            "nnx/fa": nnx_step(tf, "fa", tokens, targets, tx),
            "nnx/dfa_layer": nnx_step(tf, dfa2, tokens, targets, tx),
            "nnx/dfa_macro": nnx_step(tf, dfa2, tokens, targets, tx, taps="macro", blocks=Block),
            "nnx/dfa_micro": nnx_step(tf, dfa2, tokens, targets, tx, taps="micro", blocks=Block),
            "linen/bp": linen_step(linen_tf, "bp", tokens, targets, tx),
            "linen/fa": linen_step(linen_tf, "fa", tokens, targets, tx),
            "linen/dfa_macro": linen_step(linen_tf, dfa2, tokens, targets, tx, taps="macro", blocks=LinenBlock),
        },
    }
    shapes = {
        "cnn": f"CNN width {args.cnn_width}, 8x8x1 input, batch {args.cnn_batch}",
        "transformer": (
            f"Transformer 2 blocks, dim {args.dim}, {args.heads} heads, seq {args.seq}, "
            f"vocab 128, batch {args.tf_batch}"
        ),
    }
    results = {}
    for name, steps in suites.items():
        times = paired_times(steps, args.rounds, args.repeats)
        rows = {}
        for api in ("nnx", "linen"):  # each API against its own BP, timed in the same rounds
            mine = {k: v for k, v in times.items() if k.startswith(api + "/")}
            rows.update(ratio_rows(mine, f"{api}/bp"))
        rows = {
            k: {("median_ratio_to_bp" if k2.startswith("median_ratio") else k2): v for k2, v in row.items()}
            for k, row in rows.items()
        }
        rows["linen/bp"]["median_ratio_linen_bp_to_nnx_bp"] = statistics.median(
            a / b for a, b in zip(times["linen/bp"], times["nnx/bp"], strict=True)
        )
        results[name] = {"shape": shapes[name], "rows": rows}
        print(
            f"\n{shapes[name]}: {args.rounds} paired rounds x {args.repeats} steps "
            f"({environment()['backend']}, {environment()['device']})"
        )
        print(f"{'variant':<20}{'ratio to its bp':>16}{'IQR':>18}{'median ms':>12}")
        for variant, row in rows.items():
            iqr = row["ratio_iqr"]
            iqr = f"[{iqr[0]:.2f}, {iqr[1]:.2f}]" if iqr else "-"
            print(f"{variant:<20}{row['median_ratio_to_bp']:>16.3f}{iqr:>18}{row['median_ms']:>12.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "args": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
