"""Data-parallel step time over 1, 2 and 4 devices, as paired ratios in one run.

    python benchmarks/scaling.py            # MLP 784-1024-1024-10, global batch 512, bp/fa/dfa
    python benchmarks/scaling.py --quick    # a smoke run

One jitted training step (gradient, the rule's feedback update, Adam) of one model whose batch is
sharded over a ``data`` mesh axis of the first 1, 2 or 4 devices (params and feedback replicated).
On a CPU the devices are forced host devices (``--xla_force_host_platform_device_count=4``, set
here before JAX starts), sharing the machine's cores: they show what the sharding costs, not a
speed-up a 2-core machine cannot give. On a GPU or TPU host the same script uses the real devices.
The table gives, per rule, steps per second relative to one device (median of paired rounds).
"""

from __future__ import annotations

import argparse
import json
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa_jax as fj
from _timing import add_timing_arguments, environment, paired_times
from fa_jax.models import init_mlp, mlp

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784,1024,1024,10")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rules", default="bp,fa,dfa")
    add_timing_arguments(parser, os.path.join(HERE, "results", f"scaling_{jax.default_backend()}.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.rounds, args.repeats = "64,32,10", 16, 3, 2
    sizes = [int(s) for s in args.sizes.split(",")]
    model = mlp("tanh")
    params = init_mlp(sizes, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, sizes[-1])
    counts = [n for n in (1, 2, 4) if n <= jax.device_count()]
    tx = optax.adam(1e-3)

    def loss(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    steps = {}
    for name in args.rules.split(","):
        rule = fj.get_rule(name)
        grad_fn = fj.value_and_grad(model, loss, rule)
        feedback = fj.init_feedback(rule, params, key=jax.random.key(3), model=model, inputs=x)

        @jax.jit
        def step(p, s, fb, x, y, rule=rule, grad_fn=grad_fn):
            value, grads = grad_fn(p, fb, x, y, step=1)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, fj.update_feedback(rule, fb, updates, p), value

        for n in counts:
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            put = lambda tree, spec, mesh=mesh: jax.tree.map(
                lambda a: jax.device_put(a, NamedSharding(mesh, spec)), tree
            )
            args_n = (
                put(params, P()),
                put(tx.init(params), P()),
                put(feedback, P()),
                put(x, P("data")),
                put(y, P("data")),
            )
            steps[f"{name}/{n}dev"] = lambda step=step, a=args_n: step(*a)

    times = paired_times(steps, args.rounds, args.repeats)
    rows = {}
    for key, values in times.items():
        name = key.split("/")[0]
        base = times[f"{name}/1dev"]
        speedups = [b / t for t, b in zip(values, base, strict=True)]
        rows[key] = {
            "median_ratio_to_1dev": float(np.median([t / b for t, b in zip(values, base, strict=True)])),
            "steps_per_s_over_1dev": float(np.median(speedups)),
            "median_ms": 1e3 * float(np.median(values)),
        }
    title = (
        f"data-parallel step time, MLP {args.sizes}, global batch {args.batch}, {args.rounds} paired rounds, "
        f"{jax.device_count()} {jax.default_backend()} devices on {os.cpu_count()} cores"
    )
    print(f"\n{title}")
    print(f"{'rule / devices':<16}{'steps/s vs 1 device':>22}{'median ms':>12}")
    for key, row in rows.items():
        print(f"{key:<16}{row['steps_per_s_over_1dev']:>22.2f}{row['median_ms']:>12.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"title": title, "environment": environment(), "rows": rows, "args": vars(args)}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
