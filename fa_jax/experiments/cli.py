"""Command line: ``python -m fa_jax run TASK`` (also the ``fa-jax`` console script).

Trains every rule (any name registered in ``fa_jax.RULES``) for every seed (one jitted sweep per rule), shows a progress
bar, prints mean ± std of the task's metric per rule, and writes
``results.json``, ``results.csv`` and ``curves.png`` to ``--out``.
Bad input ends with a one-line ``fa-jax: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from fa_jax import RULES

DEFAULT_RULES = "bp,fa,dfa,shallow"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def _parse_rules(text: str) -> list[str]:
    rules = [r.strip().lower() for r in text.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if not rules or bad:
        raise _UsageError(f"--rules {text!r}: unknown rule(s) {bad or '(empty)'}; expected a comma list of {sorted(RULES)}")
    return list(dict.fromkeys(rules))


def build_parser() -> argparse.ArgumentParser:
    from fa_jax.experiments import TASKS

    parser = _Parser(prog="fa-jax", description="fa_jax experiments: BP, FA, DFA, their family and shallow on offline data.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="train every rule for every seed and report a results table")
    run.add_argument("task", help=f"one of {', '.join(TASKS)}")
    run.add_argument(
        "--rules", default=DEFAULT_RULES, help=f"comma list of rules among {', '.join(sorted(RULES))} (default {DEFAULT_RULES})"
    )
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the task's, 8)")
    run.add_argument("--steps", type=int, default=None, help="training steps per run (default: the task's)")
    run.add_argument("--out", default=None, help="output directory (default results/TASK)")
    run.add_argument("--data", default=None, help="user data file or directory (mnist: IDX dir or .npz; graph: Planetoid .npz)")
    run.add_argument("--dataset", default=None, help="mnist only: mnist_5k (default), digits or mnist1d")
    run.add_argument("--model", default=None, help="mnist only: mlp (default) or cnn")
    run.add_argument("--strategy", default="auto", choices=("auto", "vmap", "map"), help="how seeds share a device")
    run.add_argument("--no-plot", action="store_true", help="skip curves.png")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--checkpoint-dir", default=None,
        help="save the sweep state under DIR/RULE; re-running the same command resumes (bit-identical results)",
    )
    run.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint period in steps (default: every eval)")
    sub.add_parser("list", help="list the tasks")
    return parser


def _eval_every(steps: int, default: int) -> int:
    if steps % default == 0:
        return default
    return steps // max(k for k in range(1, 11) if steps % k == 0)


def _format(mean: float, std: float, metric: str) -> str:
    digits = 2 if "psnr" in metric or "bits" in metric else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def run(args) -> int:
    from fa_jax.experiments import TASKS, get_task, run_sweep
    from fa_jax.experiments.divergence import describe as describe_summary

    if args.task not in TASKS:
        raise _UsageError(f"unknown task {args.task!r}; expected one of {sorted(TASKS)}")
    rules = _parse_rules(args.rules)
    if args.data is not None and not os.path.exists(args.data):
        raise _UsageError(f"--data {args.data!r} does not exist")
    options = {k: v for k, v in (("data", args.data), ("dataset", args.dataset), ("model", args.model)) if v is not None}
    try:
        task = get_task(args.task, **options)
    except TypeError as err:
        raise _UsageError(f"task {args.task!r} does not take {sorted(options)}: {err}") from None
    steps = task.steps if args.steps is None else args.steps
    seeds = task.seeds if args.seeds is None else args.seeds
    if steps < 1 or seeds < 1:
        raise _UsageError("--steps and --seeds must be positive")
    task = task._replace(eval_every=_eval_every(steps, task.eval_every))
    n_evals = steps // task.eval_every
    out = args.out or os.path.join("results", task.name)
    os.makedirs(out, exist_ok=True)
    print(f"{task.name}: {task.description}; {steps} steps, {seeds} seeds, rules {','.join(rules)}")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(rules) * steps, unit="step", disable=args.quiet, desc=task.name)
    results, timings = {}, {}
    for rule in rules:
        bar.set_postfix_str(rule)
        done = [0]

        def tick(steps_done, done=done):
            bar.update(steps_done - done[0])
            done[0] = steps_done

        start = time.perf_counter()
        ckpt = None if args.checkpoint_dir is None else os.path.join(args.checkpoint_dir, rule)
        results[rule] = run_sweep(
            task, rule, seeds, steps=steps, chunks=n_evals, strategy=args.strategy, on_chunk=tick,
            checkpoint_dir=ckpt, checkpoint_every=args.checkpoint_every,
        )
        timings[rule] = time.perf_counter() - start
    bar.close()

    rows, summaries = [], {}
    for rule, r in results.items():
        summaries[rule] = summary = r.summary()  # diverged seeds are listed, never averaged in
        rows.append((rule, summary.mean, summary.std, timings[rule], r.strategy))
    width = max(len(task.metric), 20)
    lines = [f"{'rule':<8} {task.metric:<{width}} {'time':>8}  strategy  seeds"]
    lines += [
        f"{rule:<8} {_format(m, s, task.metric):<{width}} {t:7.1f}s  {strat:<8}  {describe_summary(summaries[rule])}"
        for rule, m, s, t, strat in rows
    ]
    for name, value in task.baselines.items():
        lines.append(f"{name:<8} {value:<{width}.4f} (baseline)")
    print("\n".join(lines))

    payload = {
        "task": task.name, "description": task.description, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "steps": steps, "seeds": seeds,
        "command": "python -m fa_jax " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["run"] else None,
        "baselines": task.baselines,
        "rules": {
            rule: {
                "mean": m, "std": s, "strategy": strat, "final": results[rule].final.tolist(),
                "healthy_seeds": summaries[rule].healthy, "diverged": {str(k): v for k, v in summaries[rule].diverged.items()},
                "steps": results[rule].steps.tolist(), "metrics": results[rule].metrics.tolist(),
                "losses": results[rule].losses.tolist(),
            }
            for rule, m, s, t, strat in rows
        },
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)
    # Wall-clock times live apart so the same command twice writes an identical results.json.
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({rule: {"seconds": t} for rule, _, _, t, _ in rows}, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rule", "seed", "step", task.metric, "train_loss"])
        for rule, r in results.items():
            for i, seed in enumerate(r.seeds):
                for j, step in enumerate(r.steps):
                    writer.writerow([rule, int(seed), int(step), float(r.metrics[i, j]), float(r.losses[i, j])])
    if not args.no_plot:
        _plot(results, task, os.path.join(out, "curves.png"))
    print(f"wrote {out}/results.json, results.csv, timings.json" + ("" if args.no_plot else ", curves.png"))
    return 0


def _plot(results, task, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, r in results.items():
        healthy = r.metrics if r.diverged_at is None else r.metrics[r.diverged_at < 0]  # diverged seeds left out
        mean, std = np.nanmean(healthy, 0), np.nanstd(healthy, 0)
        ax.plot(r.steps, mean, label=rule)
        ax.fill_between(r.steps, mean - std, mean + std, alpha=0.2)
    for name, value in task.baselines.items():
        ax.axhline(value, ls="--", color="grey", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(task.metric)
    ax.set_title(f"{task.name}: mean ± std over {len(next(iter(results.values())).seeds)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def use_every_cpu_core() -> None:
    """Expose one XLA host device per CPU core, unless the user chose a count.

    XLA:CPU runs one program on about one core; with a host device per core the
    sweep shards its seeds over all of them (2 cores: 1.94× a loop of single runs
    instead of 1.38×, ``benchmarks/sweep.py``). Seed *i* gives the same numbers
    either way. It only takes effect before JAX starts its CPU backend, and it
    changes nothing for GPU or TPU runs, whose default devices are not the host's.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count() or 1}".strip()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fa-jax`` and ``python -m fa_jax``; returns the exit status.

    Run as a program (``argv`` is ``None``) it first spreads the CPU over one host
    device per core; called from Python with ``argv`` it leaves the process as it is.
    """
    if argv is None:
        use_every_cpu_core()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "list":
            from fa_jax.experiments import TASKS

            print("\n".join(TASKS))
            return 0
        if args.command != "run":
            parser.print_help()
            return 2
        return run(args)
    except (_UsageError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"fa-jax: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
