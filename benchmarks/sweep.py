"""Seed-sweep benchmark: one jitted 16-seed sweep vs a Python loop of 16 jitted single runs.

Each single run is itself a ``lax.scan`` over all steps (``run_single``), jitted
once and called 16 times; the sweep is one ``make_trainer`` program. Timings
are alternated (loop, then every strategy, repeated ``--repeats`` times) and
the table reports the median of the per-round ratios loop_time / sweep_time.

Models (mnist_5k data): a small MLP 784-64-64-10 with batch 32, and a
compute-bound MLP 784-256-256-10 with batch 64. Usage::

    python benchmarks/sweep.py                 # one host device per core (seed axis sharded), like the CLI
    python benchmarks/sweep.py --devices 1     # one CPU device
    python benchmarks/sweep.py --rule kp       # any name in fa_jax.RULES

Writes ``benchmarks/results/sweep_<platform>_<devices>dev.json`` (or ``--out PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--devices",
        type=int,
        default=os.cpu_count() or 1,
        help="force this many host (CPU) devices; default one per core, as `python -m fa_jax` does",
    )
    parser.add_argument("--rule", default="dfa", help="a rule name registered in fa_jax.RULES")
    parser.add_argument("--out", default=None, help="JSON path (default results/sweep_<platform>_<devices>dev.json)")
    args = parser.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
        )

    import jax
    import jax.numpy as jnp

    import fa_jax
    from fa_jax.experiments import make_trainer, mnist
    from fa_jax.experiments.sweep import choose_strategy, make_single, seed_mesh, step_flops

    def timed(fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    rows = []
    for name, hidden, batch in (
        ("small 784-64-64-10 b32", (64, 64), 32),
        ("compute-bound 784-256-256-10 b64", (256, 256), 64),
    ):
        task = mnist.make_task(hidden=hidden, batch_size=batch, steps=args.steps, eval_every=args.steps)
        rule = fa_jax.get_rule(args.rule)
        auto = choose_strategy(task, rule, seed_mesh())
        single = make_single(task, rule, steps=args.steps)
        data = jax.device_put(task.data)
        contenders = {"loop": lambda: [single(data, jnp.int32(s)) for s in range(args.seeds)]}  # noqa: B023
        for strategy, batch_size in (("vmap", 1), ("map", 1), ("map", 4)):
            trainer = make_trainer(task, rule, args.seeds, steps=args.steps, strategy=strategy, batch_size=batch_size)
            label = strategy if strategy == "vmap" else f"map(batch_size={batch_size})"
            if (strategy, batch_size if strategy == "map" else 0) == tuple(auto):
                label += " [auto]"
            contenders[label] = lambda t=trainer: t.run_chunk(t.init(), args.steps)
        for fn in contenders.values():  # compile and warm up
            jax.block_until_ready(fn())
        times = {label: [] for label in contenders}
        for _ in range(args.repeats):
            for label, fn in contenders.items():
                times[label].append(timed(fn))
        for label in contenders:
            if label == "loop":
                continue
            ratios = [lo / sw for lo, sw in zip(times["loop"], times[label], strict=True)]
            rows.append(
                {
                    "model": name,
                    "strategy": label,
                    "loop_s": statistics.median(times["loop"]),
                    "sweep_s": statistics.median(times[label]),
                    "speedup": statistics.median(ratios),
                    "step_mflops": step_flops(task, rule) / 1e6,
                }
            )

    device = jax.devices()[0]
    print(
        f"\n{args.seeds} seeds x {args.steps} steps, rule {args.rule}, "
        f"{len(jax.devices())} x {device.platform} ({device.device_kind}), {os.cpu_count()} cores"
    )
    print(f"{'model':<34} {'strategy':<24} {'loop s':>8} {'sweep s':>8} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:<34} {r['strategy']:<24} {r['loop_s']:8.3f} {r['sweep_s']:8.3f} {r['speedup']:7.2f}x")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = args.out or os.path.join(out, f"sweep_{device.platform}_{len(jax.devices())}dev.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {
        "seeds": args.seeds,
        "steps": args.steps,
        "rule": args.rule,
        "repeats": args.repeats,
        "devices": len(jax.devices()),
        "platform": device.platform,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
