"""The command line's contract: every user error is one line and exit status 2 before training; damaged
checkpoints are reported in one line and skipped (or refused); Ctrl-C says where to resume and exits 130;
a second run on a locked directory is refused; results.json is strict JSON that depends only on the
run's meaning; exit status 1 when every seed of a rule diverged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import reliability_task
from fa_jax.experiments import TASKS
from fa_jax.experiments import sweep as sweeps
from fa_jax.experiments.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "reliability_task.py")
TINY = ["--rules", "kp", "--seeds", "2", "--steps", "8", "--strategy", "vmap", "--quiet", "--no-plot"]


@pytest.fixture
def tiny(monkeypatch):
    """The 6-8-8-3 MLP of reliability_task as CLI task ``tiny`` (eval every 4 steps)."""
    monkeypatch.setitem(TASKS, "tiny", "reliability_task")


@pytest.fixture
def untrainable(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a sweep was prepared although the command should have been refused")

    monkeypatch.setattr(sweeps, "prepare_sweep", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fa-jax: error: ") and "Traceback" not in err, err
    return err


def _error_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)
    other = tmp_path / "other"
    (other / "timings.json").mkdir(parents=True)
    return [
        (["--out", str(a_file)], "--out", "is a file, not a directory"),
        (["--out", str(a_file / "sub")], "--out", "is a file, so no directory can be made under it"),
        (["--out", str(out)], "--out", "results.json exists there and is not a file"),
        (["--out", str(other)], "--out", "timings.json exists there and is not a file"),
        (["--checkpoint-dir", str(a_file)], "--checkpoint-dir", "is a file, not a directory"),
        (
            ["--checkpoint-dir", str(a_file / "ck")],
            "--checkpoint-dir",
            "is a file, so no directory can be made under it",
        ),
        (["--steps", "1e12"], "argument --steps", "expected a whole number, given '1e12'"),
        (["--steps", str(10**12)], "argument --steps", "expected an integer from 1 to 2,147,483,647"),
        (["--steps", "2.5"], "argument --steps", "expected a whole number"),
        (["--steps", "0"], "argument --steps", "expected an integer from 1"),
        (["--seeds", "4294967297"], "argument --seeds", "from 1 to 4,294,967,296"),
        (["--seeds", "-3"], "argument --seeds", "expected an integer from 1"),
        (["--seeds", "200000"], "--seeds 200000", "more than the 64.0 MiB available; use fewer seeds"),
        (["--checkpoint-every", "8"], "--checkpoint-every", "needs --checkpoint-dir (without it nothing is saved)"),
        (["--restart-if-corrupt"], "--restart-if-corrupt", "needs --checkpoint-dir"),
        (
            ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "6"],
            "--checkpoint-every 6",
            "must be a multiple of the eval interval, 4 steps",
        ),
        (["--devices", "2"], "--devices 2", "only 1 cpu device(s) available"),
        (["--data", str(tmp_path / "missing.npz")], "--data", "does not exist"),
    ]


def test_user_errors_are_one_line_and_exit_2_before_training(tmp_path, capsys, tiny, untrainable, monkeypatch):
    monkeypatch.setattr(sweeps, "available_bytes", lambda mesh: 64 * 2**20)
    for extra, flag, needle in _error_cases(tmp_path):
        argv = ["run", "tiny", *TINY, "--out", str(tmp_path / "fresh"), *extra]
        assert main(argv) == 2, extra
        err = _one_line(capsys)
        assert flag in err and needle in err, (extra, err)
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "ck").exists()
    assert main(["run", "mnist", "--data", str(tmp_path / "x.npz"), "--dataset", "digits"]) == 2
    assert "both name the data; give one" in _one_line(capsys)


def test_a_stray_empty_step_is_refused_in_one_line_or_set_aside_when_asked(tmp_path, capsys, tiny):
    ck = tmp_path / "ck"
    (ck / "kp" / "500").mkdir(parents=True)  # a stray empty directory: used to raise KeyError
    argv = ["run", "tiny", *TINY, "--out", str(tmp_path / "out"), "--checkpoint-dir", str(ck)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fa-jax: error: no usable checkpoint in ") and "step 500: empty directory" in err[-1]
    assert "--restart-if-corrupt" in err[-1] and not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--restart-if-corrupt"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("fa-jax: warning: ") for line in err), err
    assert any("set aside unusable checkpoint" in line and "500.corrupt-0" in line for line in err), err
    assert sorted(os.listdir(ck / "kp")) == ["4", "500.corrupt-0", "8", "fa_jax.lock"]


def test_garbage_metadata_is_one_line_and_the_run_resumes_from_the_previous_checkpoint(tmp_path, capsys, tiny):
    argv = ["run", "tiny", *TINY, "--checkpoint-dir", str(tmp_path / "ck")]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    (tmp_path / "ck" / "kp" / "8" / "meta" / "metadata").write_text("<html>not json</html>")
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fa-jax: warning: ") for line in err), err
    assert f"{tmp_path}/ck/kp/8 is unusable: meta/metadata" in err[0] and err[0].endswith("(not valid JSON)")
    assert "resuming from step 4" in err[1] and "8.corrupt-0" in err[2]
    assert "kp: resuming from step 4" in captured.out
    first, second = ((tmp_path / d / "results.json").read_bytes() for d in ("first", "second"))
    assert first == second


def _digits(path, *, permute=False):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    y = np.arange(50) % 10
    np.savez(path, x_train=x[:40], y_train=rng.permutation(y[:40]) if permute else y[:40], x_test=x[40:], y_test=y[40:])


def test_resume_with_other_data_content_or_path_is_refused_naming_it(tmp_path, capsys):
    _digits(tmp_path / "a.npz")
    argv = [
        "run",
        "mnist",
        "--rules",
        "bp",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--quiet",
        "--no-plot",
        "--out",
        str(tmp_path / "out"),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    ]
    assert main([*argv, "--data", str(tmp_path / "a.npz")]) == 0
    capsys.readouterr()
    _digits(tmp_path / "a.npz", permute=True)  # the same file name, labels permuted
    assert main([*argv, "--data", str(tmp_path / "a.npz")]) == 2
    err = _one_line(capsys)
    assert (
        "does not match this run: task.data_content: checkpoint has 'sha256:" in err
        and "(the data's content changed)" in err
    )
    _digits(tmp_path / "a.npz")
    os.rename(tmp_path / "a.npz", tmp_path / "b.npz")  # the same content under another name
    assert main([*argv, "--data", str(tmp_path / "b.npz")]) == 2
    err = _one_line(capsys)
    assert f"task.options.data: checkpoint has '{tmp_path}/a.npz', this run has '{tmp_path}/b.npz'" in err


def test_results_json_is_strict_lists_diverged_seeds_and_exit_1_when_no_seed_is_healthy(tmp_path, capsys, monkeypatch):
    module = types.ModuleType("exploding_task")
    module.make_task = lambda **kw: reliability_task.make_task(optimizer="sgd", learning_rate=float("inf"), **kw)
    monkeypatch.setitem(sys.modules, "exploding_task", module)
    monkeypatch.setitem(TASKS, "boom", "exploding_task")
    assert main(["run", "boom", *TINY, "--rules", "fa", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fa-jax: error: no seed of fa finished healthy (every one diverged; see results.json)"

    def no_constants(name):
        raise AssertionError(f"bare {name} in results.json")

    payload = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_constants)
    fa = payload["rules"]["fa"]
    assert fa["healthy_seeds"] == 0 and fa["mean"] is None and fa["std"] is None
    assert set(fa["diverged"]) == {"0", "1"} and None in fa["losses"][0]


def test_results_json_depends_on_the_run_not_on_how_the_command_was_spelled(tmp_path, capsys, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "run",
                "tiny",
                "--rules",
                "KP",
                "--seeds",
                "2",
                "--steps",
                "8",
                "--strategy",
                "vmap",
                "--quiet",
                "--no-plot",
                "--out",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "run",
                "tiny",
                "--rules",
                " kp,KP ",
                "--seeds=2",
                "--steps=8",
                "--no-plot",
                "--out",
                "./sub/../two",
                "--checkpoint-dir",
                "ck",
            ]
        )
        == 0
    )
    one, two = ((tmp_path / d / "results.json").read_text() for d in ("one", "two"))
    assert one == two
    payload = json.loads(one)
    assert payload["devices"] == 1 and payload["platform"] == "cpu"
    assert payload["command"] == "python -m fa_jax run tiny --rules kp --seeds 2 --steps 8 --devices 1"
    assert payload["task_options"] == {"learning_rate": None, "optimizer": "adam"}
    assert payload["data_content"].startswith("sha256:")


# ----------------------------------------------------------------------------- child processes


def _env(cache: str) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def test_ctrl_c_a_second_run_on_a_locked_directory_and_the_resume(tmp_path, capsys, tiny):
    """A child pauses holding the lock after its checkpoint at step 8; a second child is refused naming it;
    SIGINT stops the first (exit 130, one line saying where to resume); a third resumes and finishes.
    The children shard 3 seeds over 2 host devices: their results equal a 1-device run to float tolerance."""
    ck, out, cache = str(tmp_path / "ck"), str(tmp_path / "out"), str(tmp_path / "cache")
    args = [
        "run",
        "tiny",
        "--rules",
        "kp",
        "--seeds",
        "3",
        "--steps",
        "24",
        "--strategy",
        "vmap",
        "--quiet",
        "--no-plot",
        "--out",
        out,
        "--checkpoint-dir",
        ck,
        "--checkpoint-every",
        "8",
    ]
    first = subprocess.Popen(
        [sys.executable, CHILD, "pause", "8", "--", *args],
        env=_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(ck + ".paused"):
            assert first.poll() is None and time.monotonic() < deadline, (
                first.stderr.read() if first.poll() else "timeout"
            )
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, CHILD, "none", "0", "--", *args],
            env=_env(cache),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert f"checkpoint directory {ck} is in use by another run (pid {first.pid} on host " in line, line
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stderr[-2000:]
    assert stderr.strip() == (
        "fa-jax: rule kp: interrupted at step 8; re-run the same command to resume (from step 8, the last checkpoint)"
    ), stderr[-2000:]
    third = subprocess.run(
        [sys.executable, CHILD, "none", "0", "--", *args], env=_env(cache), capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert "kp: resuming from step 8" in third.stdout and third.stderr.strip() == ""
    with open(os.path.join(out, "results.json")) as f:
        sharded = json.load(f)

    assert main([*args[:-6], "--out", str(tmp_path / "alone")]) == 0  # this process: 1 device, no checkpoints
    with open(tmp_path / "alone" / "results.json") as f:
        alone = json.load(f)
    assert (sharded["devices"], alone["devices"]) == (2, 1)
    np.testing.assert_allclose(sharded["rules"]["kp"]["metrics"], alone["rules"]["kp"]["metrics"], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(sharded["rules"]["kp"]["losses"], float)[:, 1:],
        np.asarray(alone["rules"]["kp"]["losses"], float)[:, 1:],
        rtol=1e-5,
    )
    for payload in (sharded, alone):
        del payload["devices"], payload["command"], payload["rules"]["kp"]["metrics"], payload["rules"]["kp"]["losses"]
        del payload["rules"]["kp"]["mean"], payload["rules"]["kp"]["std"], payload["rules"]["kp"]["final"]
    assert sharded == alone
