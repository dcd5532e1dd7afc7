"""Command line: ``python -m fa_jax run TASK`` (also the ``fa-jax`` console script).

Trains every rule (any name registered in ``fa_jax.RULES``) for every seed (one jitted sweep per rule), shows a progress
bar, prints mean ± std of the task's metric per rule, and writes
``results.json``, ``results.csv``, ``timings.json`` and ``curves.png`` to ``--out``.

The contract:

* Every user error (a bad flag, a size beyond int32 or memory, an output or
  checkpoint path that is a file or not writable, unusable ``--data``, a locked,
  foreign or corrupt checkpoint directory) is found *before* any training, and
  ends with one line ``fa-jax: error: ...`` and exit status 2.
* Ctrl-C ends with ``interrupted at step N; re-run the same command to resume``
  and exit status 130.
* Exit status 1 when some rule finished with no healthy seed (every seed
  diverged); the results are still written.
* ``results.json`` is strict JSON (non-finite numbers are ``null``; diverged
  seeds are listed) and depends only on what was run: normalised options, the
  data's SHA-256, the device count; never on how the command was spelled or
  where its outputs went. Wall-clock times go to ``timings.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from fa_jax import RULES, get_rule

DEFAULT_RULES = "bp,fa,dfa,shallow"
OUTPUTS = ("results.json", "results.csv", "timings.json", "curves.png")
EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def _parse_rules(text: str) -> list[str]:
    rules = [r.strip().lower() for r in text.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if not rules or bad:
        raise _UsageError(
            f"--rules {text!r}: unknown rule(s) {bad or '(empty)'}; expected a comma list of {sorted(RULES)}"
        )
    return list(dict.fromkeys(rules))


def _count(limit: int, what: str):
    """argparse type: a whole number in ``[1, limit]`` (``1e12`` and ``2.5`` are refused, not converted)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, given {text!r}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {limit:,} ({what}), given {value:,}")
        return value

    return parse


def _index(text: str) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, given {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, given {value}")
    return value


#: Optimizer flags -> (task option, parse and check one value).
def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected a finite number > 0, given {text!r}")
    return value


def _nonnegative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"expected a finite number >= 0, given {text!r}")
    return value


def _open_unit(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"expected a number in (0, 1), given {text!r}")
    return value


def _factor(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"expected a number in (0, 1], given {text!r}")
    return value


OPTIMIZER_FLAGS = {
    "lr": ("learning_rate", _positive),
    "b2": ("b2", _open_unit),
    "weight_decay": ("weight_decay", _nonnegative),
    "plateau": ("plateau", _factor),
}
GRID_FLAGS = {"lr_grid": ("learning_rate", _positive), "wd_grid": ("weight_decay", _nonnegative)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _parse_spec(text: str, dest: str, rules: list[str]) -> dict[str, float]:
    """``"3e-3,dfa=1e-3"`` -> ``{rule: value}`` for the rules given a value (a bare value: every rule)."""
    parse = OPTIMIZER_FLAGS[dest][1]
    flag, out, common = _flag(dest), {}, None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise _UsageError(f"{flag} {text!r}: expected VALUE and/or RULE=VALUE items")
    for item in items:
        rule, _, value = item.rpartition("=")
        rule = rule.strip().lower()
        try:
            parsed = parse(value.strip())
        except ValueError as err:
            raise _UsageError(f"{flag} {text!r}: {item!r}: {err}") from None
        if not rule:
            if common is not None:
                raise _UsageError(
                    f"{flag} {text!r}: two values for every rule; give one, and RULE=VALUE for the others"
                )
            common = parsed
        elif rule not in rules:
            raise _UsageError(f"{flag} {text!r}: rule {rule!r} is not among --rules {','.join(rules)}")
        elif rule in out:
            raise _UsageError(f"{flag} {text!r}: rule {rule!r} is given twice")
        else:
            out[rule] = parsed
    values = {rule: out.get(rule, common) for rule in rules}
    return {rule: value for rule, value in values.items() if value is not None}


def _parse_grid(text: str, dest: str) -> list[float]:
    parse, flag = GRID_FLAGS[dest][1], _flag(dest)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise _UsageError(f"{flag} {text!r}: expected a comma list of values")
    try:
        values = [parse(item) for item in items]
    except ValueError as err:
        raise _UsageError(f"{flag} {text!r}: {err}") from None
    if len(set(values)) != len(values):
        raise _UsageError(f"{flag} {text!r}: values repeat")
    return values


def _settings(options: dict) -> str:
    """``"lr 0.001"``, plus β2, weight decay and plateau where set: the table's settings column."""
    if "learning_rate" not in options or options["learning_rate"] is None:
        return "-"
    text = f"lr {options['learning_rate']:g}"
    if options.get("b2") not in (None, 0.999):
        text += f" b2 {options['b2']:g}"
    if options.get("weight_decay"):
        text += f" wd {options['weight_decay']:g}"
    if options.get("plateau") not in (None, 1.0):
        text += f" plateau {options['plateau']:g}"
    return text


def build_parser() -> argparse.ArgumentParser:
    from fa_jax.experiments import TASKS

    parser = _Parser(
        prog="fa-jax", description="fa_jax experiments: BP, FA, DFA, their family and shallow on offline data."
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="train every rule for every seed and report a results table")
    run.add_argument("task", help=f"one of {', '.join(TASKS)}")
    run.add_argument(
        "--rules",
        default=DEFAULT_RULES,
        help=f"comma list of rules among {', '.join(sorted(RULES))} (default {DEFAULT_RULES})",
    )
    run.add_argument(
        "--seeds",
        type=_count(2**32, "seeds are the integers 0..N-1 below 2**32"),
        default=None,
        help="number of seeds (default: the task's, 8)",
    )
    run.add_argument(
        "--steps",
        type=_count(2**31 - 1, "the step counter is int32"),
        default=None,
        help="training steps per run (default: the task's)",
    )
    run.add_argument("--out", default=None, help="output directory (default results/TASK)")
    run.add_argument(
        "--data",
        default=None,
        help="user data file or directory (mnist: IDX dir or .npz; graph: Planetoid "
        ".npz; recsys: a MovieLens-style ratings file, user item rating timestamp per line)",
    )
    run.add_argument("--dataset", default=None, help="mnist only: mnist_5k (default), digits or mnist1d")
    run.add_argument(
        "--model",
        default=None,
        help="mnist: mlp (default) or cnn; graph: gcn (default) or gat; recsys: deepfm (default), fm, tower or dcn",
    )
    run.add_argument(
        "--taps",
        default=None,
        help="lm only: macro (default, one tap per block) or micro (after attention and after the MLP)",
    )
    run.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="recsys --data only: a rating at or above this many stars is a positive (default 4)",
    )
    run.add_argument(
        "--recipe",
        default=None,
        help="default (one optimizer setting for every rule) or paper (lm, graph: "
        "Launay et al. 2020's settings per rule)",
    )
    for flag, what in (
        ("--lr", "Adam learning rate"),
        ("--b2", "Adam beta2"),
        ("--weight-decay", "L2 weight decay added to the gradient before Adam"),
        ("--plateau", "reduce-on-plateau factor in (0, 1]; 1 is off"),
    ):
        run.add_argument(
            flag,
            default=None,
            metavar="SPEC",
            help=f"{what}: a value for every rule, and/or RULE=VALUE for one (e.g. 3e-3,dfa=1e-3)",
        )
    run.add_argument(
        "--lr-grid",
        default=None,
        metavar="LIST",
        help="learning rates to choose from per rule on a validation split (e.g. 1e-4,3e-4,1e-3,3e-3); "
        "the chosen one is trained and reported on the test split",
    )
    run.add_argument(
        "--wd-grid",
        default=None,
        metavar="LIST",
        help="weight decays to choose from per rule on the validation split (with --lr-grid: every pair)",
    )
    run.add_argument(
        "--grid-seeds",
        type=_count(2**32, "seeds"),
        default=None,
        help="seeds of each validation run of a grid (default: --seeds)",
    )
    run.add_argument("--strategy", default="auto", choices=("auto", "vmap", "map"), help="how seeds share a device")
    run.add_argument(
        "--devices",
        type=_count(1 << 16, "devices"),
        default=None,
        help="devices to shard the seeds over (default: all; on CPU one host device per core). "
        "Recorded in results.json and in checkpoints; results agree across counts to float tolerance",
    )
    run.add_argument("--no-plot", action="store_true", help="skip curves.png")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save the sweep state under DIR/RULE; re-running the same command resumes (bit-identical results)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=_count(2**31 - 1, "steps"),
        default=None,
        help="checkpoint period in steps, a multiple of the eval interval (default: every eval)",
    )
    run.add_argument(
        "--restart-if-corrupt",
        action="store_true",
        help="when no checkpoint in --checkpoint-dir verifies, set them aside and start afresh (default: refuse)",
    )
    job = run.add_argument_group(
        "one job over several processes (hosts)",
        "Give all three (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed on "
        "a cluster JAX detects. Every process runs the same command; seeds are sharded over the devices of all; "
        "process 0 alone writes --out and --checkpoint-dir.",
    )
    job.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    job.add_argument("--num-processes", type=_count(1 << 16, "processes"), default=None, help="processes in the job")
    job.add_argument("--process-id", type=_index, default=None, help="this process's index, from 0")
    job.add_argument(
        "--distributed", action="store_true", help="join the job JAX detects (Slurm, Open MPI, Kubernetes, Cloud TPU)"
    )
    sub.add_parser("list", help="list the tasks")
    return parser


def _eval_every(steps: int, default: int) -> int:
    if steps % default == 0:
        return default
    return steps // max(k for k in range(1, 11) if steps % k == 0)


def _format(mean: float, std: float, metric: str) -> str:
    digits = 2 if "psnr" in metric or "bits" in metric else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _directory_target(path: str, flag: str) -> str:
    """``path`` made absolute, if it is (or can become) a writable directory; else one usage error line."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise _UsageError(f"{flag} {path!r} is a file, not a directory")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise _UsageError(f"{flag} {path!r}: {probe!r} is a file, so no directory can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _UsageError(f"{flag} {path!r}: {probe!r} is not writable")
    return path


def _probe_writable(directory: str, flag: str) -> None:
    probe = os.path.join(directory, f".fa_jax_write_test_{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise _UsageError(f"{flag} {directory!r} is not writable ({err.strerror or err})") from None


def configure_host_devices(count: int | None) -> None:
    """Expose ``count`` XLA host devices (default one per CPU core), unless ``XLA_FLAGS`` already sets a count.

    XLA:CPU runs one program on about one core; with a host device per core the
    sweep shards its seeds over all of them (2 cores: 1.94× a loop of single runs
    instead of 1.38×, ``benchmarks/sweep.py``). Seed *i* gives the same numbers
    either way to float tolerance (batched matmuls of another width may round the
    last bit differently), and results.json records the count. It only takes effect
    before JAX starts its CPU backend, and changes nothing for GPU or TPU runs.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = count or os.cpu_count() or 1
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


use_every_cpu_core = configure_host_devices  # the name of earlier versions


def _devices(requested: int | None) -> list:
    import jax

    available = jax.devices()
    if jax.process_count() > 1:  # a job's mesh spans every process's devices; --devices counts this process's
        if requested is not None and requested != jax.local_device_count():
            raise _UsageError(
                f"--devices {requested}: in a job of {jax.process_count()} processes every process "
                f"uses all its devices, and this one has {jax.local_device_count()}"
            )
        return available
    if requested is None:
        return available
    if requested > len(available):
        where = (
            "XLA_FLAGS fixes the host device count"
            if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            else "this process started JAX with that many"
        )
        raise _UsageError(
            f"--devices {requested}: only {len(available)} {available[0].platform} device(s) available ({where})"
        )
    return available[:requested]


def _strict(value):
    """JSON-safe copy: NaN and ±Inf become ``None`` (strict parsers reject bare ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


class _Progress:
    """Where the run is, for the Ctrl-C message."""

    def __init__(self):
        self.rule, self.step, self.sweep, self.phase = None, 0, None, "checking"  # then "training", "writing"
        self.agreed = False  # every process of a job passed the checks


def _warn(message: str) -> None:
    print(f"fa-jax: warning: {message}", file=sys.stderr)


def _task_options(args) -> dict:
    """The task options the command names (only those given: a task keeps its defaults for the rest)."""
    named = (
        ("data", args.data),
        ("dataset", args.dataset),
        ("model", args.model),
        ("taps", args.taps),
        ("threshold", args.threshold),
        ("recipe", args.recipe),
    )
    return {k: v for k, v in named if v is not None}


def _common(dicts: list[dict]) -> dict:
    """The items every dict shares with the same value."""
    first, *rest = dicts
    return {k: v for k, v in first.items() if all(k in d and d[k] == v for d in rest)}


def run(args, progress: _Progress | None = None) -> int:
    import jax

    from fa_jax.experiments import TASKS, distributed, get_task, protocol
    from fa_jax.experiments import sweep as sweeps
    from fa_jax.experiments.checkpoint import DirectoryLock, data_fingerprint, name_option
    from fa_jax.experiments.divergence import describe as describe_summary

    progress = _Progress() if progress is None else progress
    primary = distributed.is_primary()
    say = print if primary else (lambda *_, **__: None)  # process 0 speaks for the job
    if args.task not in TASKS:
        raise _UsageError(f"unknown task {args.task!r}; expected one of {sorted(TASKS)}")
    rules = _parse_rules(args.rules)
    if args.checkpoint_dir is None:
        for flag, given in (
            ("--checkpoint-every", args.checkpoint_every is not None),
            ("--restart-if-corrupt", args.restart_if_corrupt),
        ):
            if given:
                raise _UsageError(f"{flag} needs --checkpoint-dir (without it nothing is saved)")
    if args.data is not None and args.dataset is not None:
        raise _UsageError(f"--data {args.data!r} and --dataset {args.dataset!r} both name the data; give one")
    if args.recipe is not None and args.recipe not in ("default", "paper"):
        raise _UsageError(f"--recipe {args.recipe!r}: expected default or paper")
    if args.threshold is not None and (args.data is None or not math.isfinite(args.threshold)):
        raise _UsageError(
            f"--threshold {args.threshold:g} "
            + ("must be finite" if args.data is not None else "binarises the ratings of --data; give a ratings file")
        )
    per_rule = {
        dest: _parse_spec(getattr(args, dest), dest, rules)
        for dest in OPTIMIZER_FLAGS
        if getattr(args, dest) is not None
    }
    grid: dict[str, Sequence[Any]] = {
        GRID_FLAGS[dest][0]: _parse_grid(getattr(args, dest), dest)
        for dest in GRID_FLAGS
        if getattr(args, dest) is not None
    }
    for dest, option in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
        if dest in per_rule and option in grid:
            grid_flag = "--lr-grid" if option == "learning_rate" else "--wd-grid"
            raise _UsageError(f"{_flag(dest)} and {grid_flag} both set the {option.replace('_', ' ')}; give one")
    if args.grid_seeds is not None and not grid:
        raise _UsageError("--grid-seeds needs --lr-grid or --wd-grid (it sets the seeds of their validation runs)")
    out = _directory_target(args.out or os.path.join("results", args.task), "--out")
    for name in OUTPUTS:
        target = os.path.join(out, name)
        if os.path.exists(target) and not os.path.isfile(target):
            raise _UsageError(f"--out {out!r}: {name} exists there and is not a file")
        if os.path.isfile(target) and not os.access(target, os.W_OK):
            raise _UsageError(f"--out {out!r}: {name} exists there and is not writable")
    checkpoint_root = (
        None if args.checkpoint_dir is None else _directory_target(args.checkpoint_dir, "--checkpoint-dir")
    )
    if args.data is not None and not os.path.exists(args.data):
        raise _UsageError(f"--data {args.data!r} does not exist")
    from fa_jax.experiments.sweep import seed_mesh

    mesh = seed_mesh(_devices(args.devices))
    options = _task_options(args)

    def rule_options(rule: str) -> dict:
        """What the command asks of ``rule``'s task: the shared options, the recipe's rule, its optimizer values."""
        mine = dict(options)
        if options.get("recipe") == "paper":
            mine["rule"] = rule
        for dest, values in per_rule.items():
            if rule in values:
                mine[OPTIMIZER_FLAGS[dest][0]] = values[rule]
        return mine

    def build(rule: str, **extra):
        try:
            return get_task(args.task, **rule_options(rule), **extra)
        except TypeError as err:
            asked = sorted({**rule_options(rule), **extra})
            raise _UsageError(f"task {args.task!r} does not take {asked}: {err}") from None

    tasks = {rule: build(rule) for rule in rules}
    task = tasks[rules[0]]
    steps = task.steps if args.steps is None else args.steps
    seeds = task.seeds if args.seeds is None else args.seeds
    grid_seeds = seeds if args.grid_seeds is None else args.grid_seeds
    eval_every = _eval_every(steps, task.eval_every)
    tasks = {rule: t._replace(eval_every=eval_every) for rule, t in tasks.items()}
    task = tasks[rules[0]]
    n_evals = steps // task.eval_every
    if args.checkpoint_every is not None and args.checkpoint_every % task.eval_every:
        raise _UsageError(
            f"--checkpoint-every {args.checkpoint_every} must be a multiple of the eval interval, "
            f"{task.eval_every} steps"
        )
    if grid:  # the validation split exists and keeps the test data out: checked before anything trains
        for rule in rules:
            try:
                protocol.validation_task(lambda rule=rule, **kw: build(rule, **kw), protocol.grid_points(grid)[0])
            except ValueError as err:
                raise _UsageError(f"--lr-grid/--wd-grid on task {args.task!r}: {err}") from None
    # The whole run's states live at once (every rule prepared before any trains): check their sum.
    rule_objects = [get_rule(r) for r in rules]
    per_seed = [sweeps.state_bytes_per_seed(tasks[r.name], r, steps) for r in rule_objects]
    available = sweeps.available_bytes(mesh)
    padded = math.ceil(seeds / mesh.size) * mesh.size
    need = padded * (sum(per_seed) + (sweeps.MEMORY_FACTOR - 1) * max(per_seed))
    if available is not None and need > available:
        raise _UsageError(
            f"--seeds {seeds} --steps {steps}: the run needs about {sweeps._gib(need)} ({len(rules)} rule(s), "
            f"{sweeps._gib(max(per_seed))} of state per seed), more than the {sweeps._gib(available)} available; "
            "use fewer seeds or rules"
        )

    lock, prepared, selections = None, {}, {}
    try:
        if checkpoint_root is not None and primary:
            os.makedirs(checkpoint_root, exist_ok=True)
            lock = DirectoryLock(checkpoint_root, report=_warn).acquire()
        # One process checks --out after its checkpoints (a refused resume leaves no empty --out); a job's
        # process 0 checks it before its partners go on, since they cannot wait for a refusal found later.
        early = primary and jax.process_count() > 1
        if early:
            os.makedirs(out, exist_ok=True)
            _probe_writable(out, "--out")
        distributed.agree(None, "checking the run")  # every process passed its checks, or every one stops
        progress.agreed = True
        if grid:
            # Chosen per rule on the validation split (the test split is never built here), then trained on the
            # test split. Not checkpointed: a resumed run chooses again, the same way (the runs are deterministic).
            progress.phase = "selecting"
            for rule in rules:
                progress.rule = rule

                def show(point, rule=rule):
                    if not args.quiet:
                        values = " ".join(f"{k}={v:g}" for k, v in point.values.items())
                        say(
                            f"{rule}: {values}: validation {_format(point.mean, point.std, task.metric)}"
                            + (f" ({len(point.diverged)} seed(s) diverged)" if point.diverged else "")
                        )

                selections[rule] = selection = protocol.select(
                    lambda rule=rule, **kw: build(rule, **kw)._replace(eval_every=eval_every),
                    rule,
                    grid,
                    seeds=grid_seeds,
                    steps=steps,
                    strategy=args.strategy,
                    mesh=mesh,
                    on_point=show,
                )
                tasks[rule] = build(rule, **selection.chosen)._replace(eval_every=eval_every)
                chosen = ", ".join(f"{k}={v:g}" for k, v in selection.chosen.items())
                say(f"{rule}: chose {chosen} on the validation split ({selection.metric})")
            progress.phase = "checking"
        for rule in rules:
            progress.rule, progress.step = rule, 0
            prepared[rule] = sweep = sweeps.prepare_sweep(
                tasks[rule],
                rule,
                seeds,
                steps=steps,
                chunks=n_evals,
                strategy=args.strategy,
                mesh=mesh,
                checkpoint_dir=None if checkpoint_root is None else os.path.join(checkpoint_root, rule),
                checkpoint_every=args.checkpoint_every,
                restart_if_corrupt=args.restart_if_corrupt,
                report=_warn,
            )
            if sweep.start:
                say(f"{rule}: resuming from step {sweep.start} ({checkpoint_root}/{rule}/{sweep.start})")
        if primary and not early:
            os.makedirs(out, exist_ok=True)
            _probe_writable(out, "--out")
        say(
            f"{task.name}: {task.description}; {steps} steps, {seeds} seeds, rules {','.join(rules)}, "
            f"{mesh.size} {mesh.devices.flat[0].platform} device(s)"
        )

        from tqdm.auto import tqdm

        bar = tqdm(total=len(rules) * steps, unit="step", disable=args.quiet or not primary, desc=task.name)
        results, timings = {}, {}
        progress.phase = "training"
        for rule in rules:
            sweep = prepared[rule]
            progress.rule, progress.step, progress.sweep = rule, sweep.start, sweep
            bar.set_postfix_str(rule)
            done = [0]

            def tick(steps_done, done=done):
                bar.update(steps_done - done[0])
                done[0] = progress.step = steps_done

            start = time.perf_counter()
            results[rule] = sweep.run(on_chunk=tick)
            timings[rule] = time.perf_counter() - start
        bar.close()
        progress.phase = "writing"
    finally:
        for sweep in prepared.values():
            sweep.close()
        if lock is not None:
            lock.release()

    rows, summaries, reports = [], {}, {}
    for rule, r in results.items():
        summaries[rule] = summary = r.summary()  # diverged seeds are listed, never averaged in
        reports[rule] = r.report_summary()
        rows.append((rule, summary.mean, summary.std, timings[rule], r.strategy))
    width = max(len(task.metric), 20)
    extra = sorted({name for rule in rules for name in reports[rule]})
    settings = {rule: _settings(tasks[rule].options) for rule in rules}
    setting_width = max(len("settings"), *(len(v) for v in settings.values()))
    lines = [
        f"{'rule':<8} {task.metric:<{width}} {'settings':<{setting_width}} "
        + "".join(f"{name:<{max(len(name), 16)}} " for name in extra)
        + f"{'time':>8}  strategy  seeds"
    ]

    def cell(rule, name):
        report = reports[rule]
        text = _format(report[name].mean, report[name].std, name) if name in report else "-"
        return f"{text:<{max(len(name), 16)}} "

    for rule, m, s, t, strat in rows:
        cells = "".join(cell(rule, n) for n in extra)
        lines.append(
            f"{rule:<8} {_format(m, s, task.metric):<{width}} {settings[rule]:<{setting_width}} {cells}"
            f"{t:7.1f}s  {strat:<8}  {describe_summary(summaries[rule])}"
        )
    for name, value in task.baselines.items():
        lines.append(f"{name:<8} {value:<{width}.4f} (baseline)")
    say("\n".join(lines))

    named = {
        rule: {k: name_option(v, f"task option {k}") for k, v in sorted(tasks[rule].options.items())} for rule in rules
    }
    task_options = _common([named[rule] for rule in rules])
    command = [
        "python",
        "-m",
        "fa_jax",
        "run",
        task.name,
        "--rules",
        ",".join(sorted(rules)),
        "--seeds",
        str(seeds),
        "--steps",
        str(steps),
        "--devices",
        str(mesh.size // jax.process_count()),
    ]
    if jax.process_count() > 1:
        command += ["--num-processes", str(jax.process_count())]
    for key in ("data", "dataset", "model", "taps", "threshold", "recipe"):
        if key in options and task_options.get(key) is not None:
            command += [f"--{key}", str(task_options[key])]
    for dest, values in sorted(per_rule.items()):
        command += [_flag(dest), ",".join(f"{rule}={values[rule]:g}" for rule in sorted(values))]
    for dest, (option, _) in sorted(GRID_FLAGS.items()):
        if option in grid:
            command += [_flag(dest), ",".join(f"{v:g}" for v in grid[option])]
    if grid:
        command += ["--grid-seeds", str(grid_seeds)]
    payload = {
        "task": task.name,
        "description": task.description,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "steps": steps,
        "seeds": seeds,
        "eval_every": task.eval_every,
        "devices": mesh.size,
        "processes": jax.process_count(),
        "platform": mesh.devices.flat[0].platform,
        "task_options": task_options,
        "data_content": data_fingerprint(task.data),
        "command": shlex.join(command),
        "baselines": task.baselines,
        "rules": {
            rule: {
                "mean": m,
                "std": s,
                "strategy": strat,
                "final": results[rule].final.tolist(),
                "healthy_seeds": summaries[rule].healthy,
                "diverged": {str(k): v for k, v in summaries[rule].diverged.items()},
                "steps": results[rule].steps.tolist(),
                "metrics": results[rule].metrics.tolist(),
                "losses": results[rule].losses.tolist(),
                "task_options": named[rule],
                "description": tasks[rule].description,
                "learning_rate": tasks[rule].options.get("learning_rate"),
                "selection": selections[rule].to_json() if rule in selections else None,
                "report": {
                    name: {"mean": v.mean, "std": v.std, "final": (results[rule].report or {})[name].tolist()}
                    for name, v in reports[rule].items()
                },
            }
            for rule, m, s, t, strat in rows
        },
    }
    failed = [rule for rule in rules if summaries[rule].healthy == 0]
    if not primary:
        return EXIT_DIVERGED if failed else 0
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write(json.dumps(_strict(payload), indent=1, sort_keys=True, allow_nan=False) + "\n")
    # Wall-clock times live apart so the same run writes an identical results.json.
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({rule: {"seconds": t} for rule, _, _, t, _ in rows}, f, indent=1, sort_keys=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rule", "seed", "step", task.metric, "train_loss"])
        for rule, r in results.items():
            for i, seed in enumerate(r.seeds):
                for j, step in enumerate(r.steps):
                    writer.writerow([rule, int(seed), int(step), float(r.metrics[i, j]), float(r.losses[i, j])])
    if not args.no_plot:
        _plot(results, task, os.path.join(out, "curves.png"))
    say(f"wrote {out}/results.json, results.csv, timings.json" + ("" if args.no_plot else ", curves.png"))
    if failed:
        say(
            f"fa-jax: error: no seed of {', '.join(failed)} finished healthy (every one diverged; see results.json)",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    return 0


def _plot(results, task, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, r in results.items():
        healthy = r.metrics if r.diverged_at is None else r.metrics[r.diverged_at < 0]  # diverged seeds left out
        if not len(healthy):
            continue
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


def _interrupted(progress: _Progress) -> str:
    if progress.phase == "checking":
        return "fa-jax: interrupted before training started; nothing was trained"
    if progress.phase == "selecting":
        return (
            f"fa-jax: rule {progress.rule}: interrupted while choosing its options on the validation split; "
            "nothing was saved, so re-running the same command chooses again from the start"
        )
    if progress.phase == "writing":
        return "fa-jax: interrupted while writing the results; re-run the same command to write them again"
    where = f"fa-jax: rule {progress.rule}: interrupted at step {progress.step}"
    checkpointer = getattr(progress.sweep, "checkpointer", None)
    if checkpointer is None:
        return f"{where}; nothing was saved (no --checkpoint-dir), so re-running the same command starts over"
    latest = checkpointer.latest_step()
    resume = f" (from step {latest}, the last checkpoint)" if latest else " (no checkpoint yet: from step 0)"
    return f"{where}; re-run the same command to resume{resume}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fa-jax`` and ``python -m fa_jax``; returns the exit status.

    Run as a program (``argv`` is ``None``) it first spreads the CPU over ``--devices``
    host devices (default one per core); called from Python with ``argv`` it leaves the
    process as it is (``--devices`` then picks among the devices JAX already has).
    """
    from fa_jax.experiments.checkpoint import CheckpointError
    from fa_jax.experiments.distributed import ProcessError

    progress = _Progress()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "list":
            from fa_jax.experiments import TASKS

            print("\n".join(TASKS))
            return 0
        if args.command != "run":
            parser.print_help()
            return EXIT_USAGE
        if argv is None:
            configure_host_devices(args.devices)
        import jax

        from fa_jax.experiments import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        try:
            return run(args, progress)
        except Exception as err:
            if jax.process_count() > 1 and not progress.agreed:
                distributed.agree(err, "checking the run")  # the others wait there; they stop with this message
            raise
    except KeyboardInterrupt:
        print(_interrupted(progress), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (_UsageError, ValueError, OSError, ImportError, CheckpointError, ProcessError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"fa-jax: error: {text}", file=sys.stderr)
        return EXIT_USAGE
