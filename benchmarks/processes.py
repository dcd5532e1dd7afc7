"""A seed sweep over 1, 2 and 4 processes of one job, as paired ratios in one run.

    python benchmarks/processes.py            # mnist MLP, 8 seeds, fa, 4 devices split over 1, 2, 4 processes
    python benchmarks/processes.py --quick    # a smoke run

Every round launches the same sweep (``fa_jax.experiments``' trainer, seeds sharded over all
devices of the job) as 1 process with 4 devices, 2 processes with 2 and 4 processes with 1,
on localhost through JAX's distributed runtime (CPU collectives through gloo). Each job
compiles and warms up once, then times ``--chunks`` chunks of training; the table gives
seed-steps per second relative to the one-process job, as the median of per-round ratios.
On a CPU the devices are forced host devices sharing the machine's cores: the ratios show
what splitting a sweep over processes costs, not a speed-up. On a GPU host the same script
runs one device per process (``--devices-per-process 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args) -> None:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.local_devices}"
    ).strip()
    import jax

    from fa_jax.experiments import distributed, get_task
    from fa_jax.experiments.sweep import make_trainer

    distributed.initialize(args.coordinator, args.processes, args.process_id)
    task = get_task("mnist", hidden=(args.hidden, args.hidden))
    trainer = make_trainer(task, args.rule, args.seeds, steps=task.eval_every * (args.chunks + 1), strategy="vmap")
    state = jax.block_until_ready(trainer.run_chunk(trainer.init(), task.eval_every))  # compile, warm up
    start = time.perf_counter()
    for _ in range(args.chunks):
        state = trainer.run_chunk(state, task.eval_every)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    if distributed.is_primary():
        with open(args.report, "w") as f:
            json.dump(
                {
                    "seconds": seconds,
                    "seed_steps": args.seeds * task.eval_every * args.chunks,
                    "devices": jax.device_count(),
                    "processes": jax.process_count(),
                },
                f,
            )


def launch(args, processes: int, report: str) -> dict:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--coordinator",
        f"localhost:{port}",
        "--processes",
        str(processes),
        "--local-devices",
        str(args.devices // processes),
        "--report",
        report,
        "--rule",
        args.rule,
        "--seeds",
        str(args.seeds),
        "--chunks",
        str(args.chunks),
        "--hidden",
        str(args.hidden),
    ]
    procs = [subprocess.Popen([*command, "--process-id", str(i)]) for i in range(processes)]
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise SystemExit(f"a {processes}-process job failed: exit codes {codes}")
    with open(report) as f:
        return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="fa")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=4, help="timed chunks of the task's eval interval")
    parser.add_argument("--devices", type=int, default=4, help="devices of the job, split over the processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "processes.json"))
    for name in ("--coordinator", "--report"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--processes", "--process-id", "--local-devices"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.seeds, args.hidden, args.chunks, args.rounds = 4, 32, 1, 1
    counts = [p for p in (1, 2, 4) if args.devices % p == 0]
    times: dict[int, list[float]] = {p: [] for p in counts}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for p in counts if index % 2 == 0 else counts[::-1]:
                runs[p] = launch(args, p, os.path.join(tmp, f"{p}.json"))
                times[p].append(runs[p]["seconds"] / runs[p]["seed_steps"])
    rows = {
        f"{p} process(es) x {args.devices // p} device(s)": {
            "seed_steps_per_s_vs_1_process": statistics.median(b / t for t, b in zip(times[p], times[1], strict=True)),
            "median_seed_steps_per_s": 1 / statistics.median(times[p]),
        }
        for p in counts
    }
    title = (
        f"seed sweep over processes: mnist MLP hidden {args.hidden}, {args.rule}, {args.seeds} seeds, "
        f"{args.devices} devices, {args.rounds} paired rounds, {os.cpu_count()} cores"
    )
    print(f"\n{title}")
    print(f"{'job':<32}{'seed-steps/s vs 1 process':>28}{'seed-steps/s':>14}")
    for name, row in rows.items():
        print(f"{name:<32}{row['seed_steps_per_s_vs_1_process']:>28.2f}{row['median_seed_steps_per_s']:>14.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"title": title, "rows": rows, "args": vars(args)}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
