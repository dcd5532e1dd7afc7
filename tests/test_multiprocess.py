"""Sweeps over several processes on one machine: JAX's distributed runtime, CPU collectives through gloo.

Two processes with two host devices each run the CLI's sweep over all four
devices. A job whose process is killed mid-run resumes, when re-run, to the
results of a one-process sweep of the same seeds; a refusal on process 0 (a
checkpoint of another run) stops every process with its message. (Bit-identical
resumes are tested in one process: tests/test_reliability.py.)
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fa_jax.experiments import distributed, get_task, run_sweep

RULES = ("dfa",)
SEEDS, STEPS, EVERY = 4, 1000, 200  # the task's eval interval; five checkpoints, a kill lands between two
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out, checkpoints, *extra, processes=2, devices=2):
    """Start ``processes`` CLI processes of one job; each exposes ``devices`` host devices."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    command = [
        sys.executable,
        "-m",
        "fa_jax",
        "run",
        "teacher",
        "--rules",
        ",".join(RULES),
        "--seeds",
        str(SEEDS),
        "--steps",
        str(STEPS),
        "--devices",
        str(devices),
        "--out",
        str(out),
        "--no-plot",
        "--quiet",
        "--checkpoint-dir",
        str(checkpoints),
        "--checkpoint-every",
        str(EVERY),
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        str(processes),
        *extra,
    ]
    return [
        subprocess.Popen(
            [*command, "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(processes)
    ]


def _finish(procs):
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def _curves(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return results, {
        rule: (
            np.asarray(results["rules"][rule]["metrics"], np.float64),
            np.asarray(results["rules"][rule]["losses"], np.float64),
        )
        for rule in RULES
    }


def _checkpointed(directory):
    return any(
        os.path.exists(os.path.join(directory, step, "fa_jax_integrity.json"))
        for step in (os.listdir(directory) if os.path.isdir(directory) else [])
        if step.isdigit()
    )


def test_a_job_of_two_processes_killed_mid_run_resumes_to_the_one_process_sweep(tmp_path):
    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    procs = _launch(out, checkpoints)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _checkpointed(checkpoints / RULES[0]):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint was written"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)  # one process dies mid-run...
        procs[0].send_signal(signal.SIGKILL)  # ...and the scheduler stops the job
    finally:
        _finish(procs)
    assert not os.path.exists(out / "results.json"), "the job finished before it was killed: nothing was tested"

    outputs = _finish(_launch(out, checkpoints))  # the same command again, on every process
    for i, (code, _, err) in enumerate(outputs):
        assert code == 0, f"process {i} exited {code}: {err[-2000:]}"
    said = [[line for line in out.splitlines() if not line.startswith("[Gloo]")] for _, out, _ in outputs]
    assert any(line.startswith(f"{RULES[0]}: resuming from step") for line in said[0])
    assert any(line.startswith("rule") for line in said[0]) and said[1] == []  # process 0 speaks for the job
    assert sorted(os.listdir(out)) == ["results.csv", "results.json", "timings.json"]
    results, curves = _curves(out)
    assert results["devices"] == 4 and results["processes"] == 2
    task = get_task("teacher")
    assert task.eval_every == EVERY
    for rule in RULES:  # seeds 0..3 on 4 devices of 2 processes, resumed = seeds 0..3 in this one process
        reference = run_sweep(task, rule, SEEDS, steps=STEPS, strategy="vmap")
        metrics, losses = curves[rule]
        np.testing.assert_allclose(metrics, reference.metrics, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(losses[:, 1:], reference.losses[:, 1:], rtol=2e-5, atol=1e-7)
        assert metrics[:, -1].max() < 0.5 * metrics[:, 0].min()  # it trained

    # A refusal on process 0 (its checkpoints are of another run: 5 seeds, not 4) stops both processes.
    outputs = _finish(_launch(out, checkpoints, "--seeds", "5"))
    for code, _, err in outputs:
        assert code == 2 and "does not match this run" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("nohost",), {}, "coordinator: expected host:port"),
        (("localhost:99999",), {}, "coordinator: expected host:port"),
        (("localhost:1234", 2, 2), {}, "process_id: expected a number in [0, 2), given 2"),
        (("localhost:1234", 0, 0), {}, "num_processes"),
        (("localhost:1234",), {}, "num_processes: a multi-process run needs coordinator, num_processes and process_id"),
        ((None, 2, 0), {}, "coordinator: a multi-process run needs"),
        ((), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES: expected an integer, given 'two'"),
    ],
)
def test_a_malformed_job_is_refused_naming_the_setting(monkeypatch, args, env, message):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        distributed.initialize(*args)


def test_no_job_setting_means_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False and distributed.is_primary()
    with pytest.raises(KeyError, match="boom"):  # one process: agree and on_primary raise the error itself
        distributed.on_primary(lambda: {}["boom"], "test")
    assert distributed.on_primary(lambda: 7, "test") == 7


def test_the_cli_refuses_a_malformed_job_in_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fa_jax",
            "run",
            "teacher",
            "--out",
            str(tmp_path),
            "--coordinator",
            "localhost:1234",
            "--num-processes",
            "2",
            "--process-id",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2 and done.stderr == "fa-jax: error: process_id: expected a number in [0, 2), given 3\n"
