"""Peak memory of one training step: feedback stored vs regenerated from a key (and stored in bf16).

    python benchmarks/memory.py            # wide MLP 1024-4096-4096-4096-4096-10, batch 64, float32
    python benchmarks/memory.py --quick    # a smoke run

A step is one jitted gradient evaluation plus the SGD update. Its peak is read from
the compiled executable's ``memory_analysis()`` (XLA's buffer assignment, no run
needed): ``arguments + outputs + temporaries − aliased``. On a GPU the script also
runs each step once and reports ``peak_bytes_in_use`` from ``device.memory_stats()``.

Regenerating keeps one key per layer instead of B and redraws B inside each layer's
backward. Drawn whole, a regenerated B and its random bits are live together; with
the default ``threefry`` keys XLA:CPU even keeps about four full-size ``u32``
buffers per draw, so regenerating whole costs *more* than storing (``rbg`` keys,
``jax.random.key(seed, impl="rbg")``, draw into one buffer). With ``fa_jax.Tiled``
as the init, FA's dense op draws B and computes ``dx = g Bᵀ`` one row tile at a time,
so only a tile is ever live. The check: the tiled, regenerated step saves at least
90% of the feedback the stored step holds (XLA drops the first layer's B, whose
``dx`` nobody reads; the rest of the gap is one tile and its bits).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import fa_jax as fj
from fa_jax.models import init_mlp, mlp

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNING_RATE = 1e-3
MiB = 2**20
TILED = fj.Tiled(rows=128)  # LeCun normal like FA's default, drawn in 128-row tiles


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def compiled_step(model, rule, params, feedback, x, y):
    grad_fn = fj.value_and_grad(model, mse, rule)

    def step(params, feedback, x, y, t):
        loss, grads = grad_fn(params, feedback, x, y, step=t)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    return jax.jit(step).lower(params, feedback, x, y, jnp.int32(1)).compile()


def feedback_bytes(feedback) -> int:
    """Bytes of the stored matrices (keys count as their raw key data)."""
    total = 0
    for leaf in jax.tree.leaves(feedback):
        data = jax.random.key_data(leaf) if fj._ops.is_key(leaf) else leaf
        total += data.size * data.dtype.itemsize
    return total


def measure(compiled, args) -> dict:
    analysis = compiled.memory_analysis()
    row = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
    }
    row["peak_bytes"] = row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    device = jax.devices()[0]
    if device.platform == "gpu":  # measured, not only planned
        device.memory_stats()  # touch before the run
        jax.block_until_ready(compiled(*args))
        row["device_peak_bytes_in_use"] = device.memory_stats().get("peak_bytes_in_use")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,4096,4096,4096,4096,10")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch = "64,256,256,10", 8

    sizes = [int(s) for s in args.sizes.split(",")]
    model = mlp("tanh")
    params = init_mlp(sizes, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
    y = jax.random.normal(jax.random.key(2), (args.batch, sizes[-1]))

    threefry, rbg = jax.random.key(3), jax.random.key(3, impl="rbg")
    variants = {
        "fa": [
            ("stored", fj.FA(), None, threefry),
            ("stored_bf16", fj.FA(), jnp.bfloat16, threefry),
            ("regenerated_threefry", fj.FA(regenerate=True), None, threefry),
            ("regenerated_rbg", fj.FA(regenerate=True), None, rbg),
            ("tiled_stored", fj.FA(init=TILED), None, threefry),
            ("tiled_regenerated", fj.FA(init=TILED, regenerate=True), None, threefry),
            ("tiled_regenerated_rbg", fj.FA(init=TILED, regenerate=True), None, rbg),
        ],
        "frsf": [("stored", fj.FRSF(), None, threefry), ("regenerated_rbg", fj.FRSF(regenerate=True), None, rbg)],
        "dfa": [("stored", fj.DFA(), None, threefry), ("regenerated", fj.DFA(regenerate=True), None, threefry)],
        "bp": [("none", fj.BP(), None, threefry)],
    }
    rows = {}
    for name, modes in variants.items():
        for mode, rule, dtype, key in modes:
            feedback = fj.init_feedback(rule, params, key=key, model=model, inputs=x, dtype=dtype)
            compiled = compiled_step(model, rule, params, feedback, x, y)
            row = measure(compiled, (params, feedback, x, y, jnp.int32(1)))
            row["feedback_bytes"] = feedback_bytes(feedback)
            rows[f"{name}/{mode}"] = row

    largest_b = max(a * b for a, b in zip(sizes[:-1], sizes[1:])) * 4
    checks = {}
    pairs = {
        "fa whole, threefry": ("fa/stored", "fa/regenerated_threefry"),
        "fa whole, rbg": ("fa/stored", "fa/regenerated_rbg"),
        "fa tiled, threefry": ("fa/tiled_stored", "fa/tiled_regenerated"),
        "fa tiled, rbg": ("fa/tiled_stored", "fa/tiled_regenerated_rbg"),
        "frsf whole, rbg": ("frsf/stored", "frsf/regenerated_rbg"),
        "dfa": ("dfa/stored", "dfa/regenerated"),
    }
    for name, (stored_name, regen_name) in pairs.items():
        stored, regen = rows[stored_name], rows[regen_name]
        saved = stored["peak_bytes"] - regen["peak_bytes"]
        held = stored["argument_bytes"] - regen["argument_bytes"]  # the B the stored step reads
        checks[name] = {
            "saved_bytes": saved,
            "stored_feedback_bytes": stored["feedback_bytes"],
            "held_feedback_bytes": held,
            "saved_over_stored_feedback": saved / stored["feedback_bytes"],
            "saved_over_held_feedback": saved / held,
        }

    title = f"peak memory of one training step, MLP {args.sizes}, tanh, batch {args.batch}, float32"
    print(f"\n{title}  ({jax.default_backend()}, {jax.devices()[0].device_kind})")
    print(f"{'variant':<22}{'peak MiB':>10}{'args MiB':>10}{'temp MiB':>10}{'feedback MiB':>14}")
    for name, row in rows.items():
        print(
            f"{name:<22}{row['peak_bytes'] / MiB:>10.1f}{row['argument_bytes'] / MiB:>10.1f}"
            f"{row['temp_bytes'] / MiB:>10.1f}{row['feedback_bytes'] / MiB:>14.2f}"
        )
    print(f"\nregenerated vs stored (largest single B: {largest_b / MiB:.1f} MiB)")
    print(f"{'variant':<22}{'saved MiB':>11}{'stored B MiB':>14}{'held B MiB':>12}{'saved / held B':>16}")
    for name, check in checks.items():
        print(
            f"{name:<22}{check['saved_bytes'] / MiB:>11.1f}{check['stored_feedback_bytes'] / MiB:>14.1f}"
            f"{check['held_feedback_bytes'] / MiB:>12.1f}{check['saved_over_held_feedback']:>16.2f}"
        )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"title": title, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "rows": rows, "checks": checks, "largest_b_bytes": largest_b,
                   "args": vars(args)}, f, indent=2)
    print(f"wrote {args.out}")
    for name in ("fa tiled, threefry", "fa tiled, rbg"):  # FA-shaped B is as large as the model
        check = checks[name]
        if args.quick:  # at smoke-test sizes one tile is a whole B
            break
        assert check["saved_over_held_feedback"] >= 0.9, (name, check)


if __name__ == "__main__":
    main()
