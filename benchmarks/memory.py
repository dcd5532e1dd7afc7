"""Peak memory of one training step: feedback stored vs regenerated from a key (and stored in bf16).

    python benchmarks/memory.py            # wide MLP 1024-4096-4096-4096-4096-10, batch 64, float32
    python benchmarks/memory.py --quick    # a smoke run

A step is one jitted gradient evaluation plus the SGD update. Its peak is read from
the compiled executable's ``memory_analysis()`` (XLA's buffer assignment, no run
needed)::

    peak = resident + outputs + temporaries − aliased

``resident`` is every byte the step's arguments hold on the device (params, feedback,
data), as ``device.memory_stats()["peak_bytes_in_use"]`` counts them on a GPU. It
is not XLA's ``argument_size_in_bytes``: that leaves out arguments the program never
reads, such as the first layer's B (no one reads that layer's ``dx``), which still
sits in device memory as long as the feedback is stored. On a GPU the script also
runs each step once and reports the measured ``peak_bytes_in_use``.

Regenerating keeps one key per layer instead of B and redraws B inside each layer's
backward. Drawn whole, a regenerated B and its random bits are live together (with
the default ``threefry`` keys XLA:CPU keeps about four full-size ``u32`` buffers), so
regenerating whole costs *more* than storing. With ``fa_jax.Tiled`` as the init, FA's (and frSF's, brSF's)
dense op draws B and computes ``dx = g Bᵀ`` one row tile at a time, so only a tile
and its bits are live. What regeneration cannot save is its keys and one tile with
its bits; the check is that the 8-row tiled step saves at least 99% of the stored
feedback. The FA rows also give their step time as a median paired ratio to the
stored FA step (``--rounds``; 0 skips timing): smaller tiles mean more, smaller GEMMs.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import fa_jax as fj
from _timing import paired_times, ratio_rows
from fa_jax.models import init_mlp, mlp

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNING_RATE = 1e-3
MiB = 2**20
TILE_ROWS = (8, 32, 128)
CHECKED = "fa/tiled8_regenerated_rbg"  # the variant the check holds to >= 99% of the stored feedback


def mse(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2) / outputs.shape[0]


def compiled_step(model, rule, params, feedback, x, y):
    grad_fn = fj.value_and_grad(model, mse, rule)

    def step(params, feedback, x, y, t):
        loss, grads = grad_fn(params, feedback, x, y, step=t)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    return jax.jit(step).lower(params, feedback, x, y, jnp.int32(1)).compile()


def tree_bytes(tree) -> int:
    """Bytes of every array in ``tree`` (a typed key counts as its raw key data)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        data = jax.random.key_data(leaf) if fj._checks.is_key(leaf) else leaf
        total += data.size * data.dtype.itemsize
    return total


def measure(compiled, args) -> dict:
    analysis = compiled.memory_analysis()
    row = {
        "resident_bytes": tree_bytes(args),
        "read_argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
    }
    row["peak_bytes"] = row["resident_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    device = jax.devices()[0]
    if device.platform == "gpu":  # measured, not only planned
        device.memory_stats()  # touch before the run
        jax.block_until_ready(compiled(*args))
        row["device_peak_bytes_in_use"] = device.memory_stats().get("peak_bytes_in_use")
    return row


def variants(rows: tuple[int, ...]) -> dict[str, tuple]:
    """``name -> (rule, feedback dtype, key)`` for every measured step."""
    threefry, rbg = jax.random.key(3), jax.random.key(3, impl="rbg")
    table = {
        "bp/none": (fj.BP(), None, threefry),
        "fa/stored": (fj.FA(), None, threefry),
        "fa/stored_bf16": (fj.FA(), jnp.bfloat16, threefry),
        "fa/regenerated_threefry": (fj.FA(regenerate=True), None, threefry),
        "fa/regenerated_rbg": (fj.FA(regenerate=True), None, rbg),
    }
    for tile in rows:
        table[f"fa/tiled{tile}_regenerated_rbg"] = (fj.FA(init=fj.Tiled(rows=tile), regenerate=True), None, rbg)
    table[f"fa/tiled{rows[0]}_regenerated_threefry"] = (
        fj.FA(init=fj.Tiled(rows=rows[0]), regenerate=True),
        None,
        threefry,
    )
    table.update(
        {
            "frsf/stored": (fj.FRSF(), None, threefry),
            "frsf/regenerated_rbg": (fj.FRSF(regenerate=True), None, rbg),
            f"frsf/tiled{rows[0]}_regenerated_rbg": (fj.FRSF(init=fj.Tiled(rows=rows[0]), regenerate=True), None, rbg),
            "brsf/whole_rbg": (fj.BRSF(), None, rbg),  # brSF always redraws: keys only, no stored variant
            f"brsf/tiled{rows[0]}_rbg": (fj.BRSF(init=fj.Tiled(rows=rows[0])), None, rbg),
            "dfa/stored": (fj.DFA(), None, threefry),
            "dfa/regenerated": (fj.DFA(regenerate=True), None, threefry),
        }
    )
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,4096,4096,4096,4096,10")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="paired timing rounds of the FA steps (0: no timing)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.rounds = "64,256,256,10", 8, 2

    sizes = [int(s) for s in args.sizes.split(",")]
    model = mlp("tanh")
    params = init_mlp(sizes, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
    y = jax.random.normal(jax.random.key(2), (args.batch, sizes[-1]))

    rows, steps = {}, {}
    for name, (rule, dtype, key) in variants(TILE_ROWS).items():
        feedback = fj.init_feedback(rule, params, key=key, model=model, inputs=x, dtype=dtype)
        compiled = compiled_step(model, rule, params, feedback, x, y)
        step_args = (params, feedback, x, y, jnp.int32(1))
        row = measure(compiled, step_args)
        row["feedback_bytes"] = tree_bytes(feedback)
        rows[name] = row
        if name.startswith("fa/") and args.rounds:
            steps[name] = lambda compiled=compiled, step_args=step_args: compiled(*step_args)
    if steps:  # the same compiled steps, timed in paired rounds against the stored one
        for name, timing in ratio_rows(paired_times(steps, args.rounds, repeats=1), "fa/stored").items():
            rows[name]["time_over_stored"] = timing["median_ratio_to_fa/stored"]

    checks = {}
    for name, row in rows.items():
        family = name.split("/")[0]
        stored = rows.get(f"{family}/stored")
        if stored is None or row is stored:
            continue
        saved = stored["peak_bytes"] - row["peak_bytes"]
        checks[name] = {
            "saved_bytes": saved,
            "stored_feedback_bytes": stored["feedback_bytes"],
            "saved_over_stored_feedback": saved / stored["feedback_bytes"],
        }

    title = f"peak memory of one training step, MLP {args.sizes}, tanh, batch {args.batch}, float32"
    print(f"\n{title}  ({jax.default_backend()}, {jax.devices()[0].device_kind})")
    print(
        f"{'variant':<32}{'peak MiB':>10}{'temp MiB':>10}{'feedback MiB':>14}{'saved MiB':>11}"
        f"{'saved / stored B':>18}{'time / stored':>15}"
    )
    for name, row in rows.items():
        check = checks.get(name)
        saved = (
            f"{check['saved_bytes'] / MiB:>11.2f}{check['saved_over_stored_feedback']:>18.4f}" if check else " " * 29
        )
        timed = f"{row['time_over_stored']:>15.2f}" if "time_over_stored" in row else ""
        print(
            f"{name:<32}{row['peak_bytes'] / MiB:>10.1f}{row['temp_bytes'] / MiB:>10.2f}"
            f"{row['feedback_bytes'] / MiB:>14.2f}{saved}{timed}"
        )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "title": title,
                "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "rows": rows,
                "checks": checks,
                "checked": CHECKED,
                "args": vars(args),
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
    if not args.quick:  # at smoke-test sizes one tile is a whole B
        assert checks[CHECKED]["saved_over_stored_feedback"] >= 0.99, (CHECKED, checks[CHECKED])


if __name__ == "__main__":
    main()
