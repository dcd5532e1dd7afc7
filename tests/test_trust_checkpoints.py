"""Trustworthy checkpoints: every bit flip detected and never resumed from, damaged steps reported in one line
and skipped for the newest step that verifies (or refused), resumes refused for other data or other rule
options, one writer per directory, and the runner's API refusing bad arguments by name.

Corruption is tested by restoring (no training): a two-chunk sweep's states after 4 and 8 steps are
saved once, then damaged and restored many times. That a restored state equal to the saved one resumes
to the uninterrupted result is checked once by training the last chunk from it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax as fj
import reliability_task
from fa_jax._checks import is_key
from fa_jax.experiments import get_task
from fa_jax.experiments.checkpoint import (
    INTEGRITY,
    CheckpointCorrupt,
    Checkpointer,
    CheckpointLocked,
    CheckpointMismatch,
    DirectoryLock,
)
from fa_jax.experiments.sweep import make_trainer, prepare_sweep, run_single, run_sweep, sweep_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same(got, want) -> bool:
    """Bit-identical pytrees (typed keys by their key data)."""
    if jax.tree.structure(got) != jax.tree.structure(want):
        return False
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if is_key(a) != is_key(b):
            return False
        if is_key(b):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return False
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A KP sweep of 2 seeds: states after 0, 4 and 8 steps, and a directory holding steps 4 and 8."""
    task = reliability_task.make_task(steps=8, eval_every=4)
    trainer = make_trainer(task, "kp", 2, strategy="vmap")
    s0 = trainer.init()
    s4 = trainer.run_chunk(s0, 4)
    s8 = trainer.run_chunk(s4, 4)
    config = sweep_config(task, fj.get_rule("kp"), np.arange(2), 8, 2, strategy="vmap")
    directory = tmp_path_factory.mktemp("saved") / "ck"
    with Checkpointer(directory, every=4, config=config) as ckpt:
        ckpt.save(4, s4)
        ckpt.save(8, s8)
    return dict(task=task, trainer=trainer, states={0: s0, 4: s4, 8: s8}, config=config, directory=str(directory))


def _files(step_dir: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), step_dir) for root, _, names in os.walk(step_dir) for name in names
    )


def _flip(path: str, byte: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(byte)
        value = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([value ^ (1 << bit)]))


def test_fifty_single_bit_flips_are_all_detected_and_never_resumed_from(saved):
    directory, states = saved["directory"], saved["states"]
    rng = np.random.default_rng(13)
    reports: list[str] = []
    ckpt = Checkpointer(directory, every=4, config=saved["config"], report=reports.append)
    assert ckpt.verify() == {8: None, 4: None}  # a later save left the earlier step intact
    flipped_files = set()
    for trial in range(50):
        step = int(rng.choice([4, 8]))
        step_dir = os.path.join(directory, str(step))
        rel = str(rng.choice(_files(step_dir)))  # any file of the step: data chunks, indexes, JSON, the record
        path = os.path.join(step_dir, rel)
        byte, bit = int(rng.integers(os.path.getsize(path))), int(rng.integers(8))
        _flip(path, byte, bit)
        flipped_files.add(rel)
        reports.clear()
        try:
            verdict = ckpt.verify()
            assert verdict[step] is not None, (trial, rel, byte, bit)  # detected
            assert verdict[12 - step] is None
            assert "\n" not in verdict[step] and len(verdict[step]) < 300, verdict[step]
            restored = ckpt.restore(like=states[0])
            newest_intact = 4 if step == 8 else 8
            assert _same(restored, states[newest_intact]), (trial, rel)  # the intact step, bit for bit
            if step == 8:  # fell back, and said so in one line each
                assert len(reports) == 2 and all("\n" not in r for r in reports), reports
                assert f"{directory}/8 is unusable" in reports[0] and "resuming from step 4" in reports[1]
        finally:
            _flip(path, byte, bit)
    ckpt.close()
    assert len(flipped_files) > 5
    assert any("/d/" in f for f in flipped_files)  # array data chunks were among the targets

    # Resuming from the step it fell back to reproduces the uninterrupted run bit for bit.
    with Checkpointer(directory, every=4, config=saved["config"]) as ckpt:
        assert ckpt.verify() == {8: None, 4: None}
    shutil.rmtree(os.path.join(directory, "..", "fallback"), ignore_errors=True)
    fallback = shutil.copytree(directory, os.path.join(directory, "..", "fallback"))
    _flip(os.path.join(fallback, "8", "meta", "metadata"), 0, 0)
    with Checkpointer(fallback, every=4, config=saved["config"], report=lambda _: None) as ckpt:
        resumed = saved["trainer"].run_chunk(ckpt.restore(like=states[0]), 4)
    assert _same(resumed, states[8])


def test_damage_under_a_rewritten_integrity_record_is_caught_reading_the_arrays(saved, tmp_path):
    """Damage from before the files were digested (the record agrees with it): tensorstore's own checks,
    then the SHA-256 of every restored leaf in the metadata, keep it from being resumed."""
    from fa_jax.experiments.checkpoint import write_integrity

    states, directory = saved["states"], str(tmp_path / "ck")
    shutil.copytree(saved["directory"], directory)
    step8 = os.path.join(directory, "8")
    read = [f for f in _files(step8) if f.startswith("state/d/")]  # the merged chunks orbax reads
    assert read
    rng = np.random.default_rng(7)
    with Checkpointer(directory, every=4, config=saved["config"], report=lambda _: None) as ckpt:
        for _ in range(8):
            path = os.path.join(step8, str(rng.choice(read)))
            byte, bit = int(rng.integers(os.path.getsize(path))), int(rng.integers(8))
            _flip(path, byte, bit)
            write_integrity(step8)
            restored = ckpt.restore(like=states[0])
            assert _same(restored, states[4]) or _same(restored, states[8])  # never damaged values
            _flip(path, byte, bit)
        # A step whose arrays are another step's (a mixed-up copy): orbax reads them without complaint.
        shutil.rmtree(os.path.join(step8, "state"))
        shutil.copytree(os.path.join(directory, "4", "state"), os.path.join(step8, "state"))
        write_integrity(step8)
        assert ckpt.verify() == {8: None, 4: None}  # files and metadata look fine
        assert _same(ckpt.restore(like=states[0]), states[4])
        assert "leaf " in ckpt.unusable[8] and "does not match its recorded SHA-256" in ckpt.unusable[8]


def _truncate(step_dir):
    data = max(
        (f for f in _files(step_dir) if f.startswith("state")), key=lambda f: os.path.getsize(os.path.join(step_dir, f))
    )
    path = os.path.join(step_dir, data)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "is truncated"


def _remove(sub):
    def damage(step_dir):
        shutil.rmtree(os.path.join(step_dir, sub))
        return f"{sub}/ is missing"

    return damage


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return "empty directory"


def _garbage_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write("{ this is not json")
    return "meta/metadata is truncated (18 of"


def _no_record(step_dir):
    os.remove(os.path.join(step_dir, INTEGRITY))
    return f"no {INTEGRITY}"


@pytest.mark.parametrize(
    "damage",
    [_truncate, _remove("meta"), _remove("state"), _empty, _garbage_meta, _no_record],
    ids=["truncated", "no-meta", "no-state", "empty-step", "garbage-meta", "no-record"],
)
def test_damaged_newest_step_is_reported_in_one_line_and_skipped(saved, tmp_path, damage):
    directory = shutil.copytree(saved["directory"], str(tmp_path / "ck"))
    said = damage(os.path.join(directory, "8"))
    reports = []
    with Checkpointer(directory, every=4, config=saved["config"], report=reports.append) as ckpt:
        assert _same(ckpt.restore(like=saved["states"][0]), saved["states"][4])
        assert ckpt.unusable.keys() == {8}
        # The next save at step 8 sets the damaged one aside (never deletes it) and writes a verified one.
        ckpt.save(8, saved["states"][8])
        assert ckpt.verify() == {8: None, 4: None}
    assert os.path.isdir(os.path.join(directory, "8.corrupt-0"))
    assert len(reports) == 3 and all("\n" not in r for r in reports), reports
    assert f"checkpoint {directory}/8 is unusable: " in reports[0] and said in reports[0], reports[0]
    if damage is _garbage_meta:
        assert reports[0].endswith("(not valid JSON)")


def test_no_usable_checkpoint_is_refused_unless_restarting_is_asked_for(saved, tmp_path):
    directory = shutil.copytree(saved["directory"], str(tmp_path / "ck"))
    _truncate(os.path.join(directory, "8"))
    _empty(os.path.join(directory, "4"))
    os.makedirs(os.path.join(directory, "500"))  # a stray empty step directory
    with pytest.raises(CheckpointCorrupt) as refused:
        Checkpointer(directory, every=4, config=saved["config"], report=lambda _: None).restore(like=saved["states"][0])
    message = str(refused.value)
    assert "\n" not in message and "step 500: empty directory" in message and "step 8: state/" in message
    assert "step 4: empty directory" in message and "--restart-if-corrupt" in message
    reports = []
    with Checkpointer(
        directory, every=4, config=saved["config"], restart_if_corrupt=True, report=reports.append
    ) as ckpt:
        assert ckpt.restore(like=saved["states"][0]) is None
        assert any("starting afresh" in r for r in reports)
        ckpt.save(4, saved["states"][4])  # every unusable step is set aside first, so orbax sees no later step
        assert ckpt.verify() == {4: None}
    assert sorted(n for n in os.listdir(directory) if "corrupt" in n) == ["4.corrupt-0", "500.corrupt-0", "8.corrupt-0"]


# ----------------------------------------------------------------------------- run identity


def scaled_normal(key, shape, dtype=jnp.float32, *, scale):
    return scale * jax.random.normal(key, shape, dtype)


def _digits_npz(path, *, permute=False):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    y = np.arange(50) % 10
    if permute:
        y = rng.permutation(y)
    np.savez(path, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    return str(path)


def test_resume_refuses_other_data_content_other_data_path_and_other_callable_options(tmp_path):
    ck = str(tmp_path / "ck")
    path = _digits_npz(tmp_path / "a.npz")

    def task(data):
        return get_task("mnist", data=data, hidden=(8,), batch_size=8, steps=2, eval_every=2)

    rule = fj.FA(init=functools.partial(scaled_normal, scale=1.0))
    run_sweep(task(path), rule, 1, strategy="vmap", checkpoint_dir=ck)  # (the same run resumes: test_reliability)

    _digits_npz(tmp_path / "a.npz", permute=True)  # same path, labels permuted
    with pytest.raises(
        CheckpointMismatch, match=r"task\.data_content: checkpoint has 'sha256:.*\(the data's content changed\)"
    ):
        prepare_sweep(task(path), rule, 1, strategy="vmap", checkpoint_dir=ck)
    other = _digits_npz(tmp_path / "b.npz")  # the original content under another name
    with pytest.raises(
        CheckpointMismatch, match=r"task\.options\.data: checkpoint has '.*a\.npz', this run has '.*b\.npz'"
    ) as err:
        prepare_sweep(task(other), rule, 1, strategy="vmap", checkpoint_dir=ck)
    assert "data_content" not in str(err.value)  # the content is the same; only the path is named
    _digits_npz(tmp_path / "a.npz")  # the original file back: only the rule's initializer differs now
    changed = fj.FA(init=functools.partial(scaled_normal, scale=2.0))
    with pytest.raises(
        CheckpointMismatch, match=r"rule_options\.init\.keywords\.scale: checkpoint has 1\.0, this run has 2\.0"
    ) as err:
        prepare_sweep(task(path), changed, 1, strategy="vmap", checkpoint_dir=ck)
    assert "task." not in str(err.value)
    with pytest.raises(TypeError, match="rule 'fa' option init: a lambda"):
        prepare_sweep(
            task(path), fj.FA(init=lambda k, s, d=jnp.float32: jax.random.normal(k, s, d)), 1, checkpoint_dir=ck
        )


# ----------------------------------------------------------------------------- one writer

HOLDER = """
import os, sys, time
from fa_jax.experiments.checkpoint import DirectoryLock
lock = DirectoryLock(sys.argv[1]).acquire()  # held while the object lives
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(
            CheckpointLocked, match=f"is in use by another run \\(pid {child.pid} on host .*since .*running"
        ):
            DirectoryLock(tmp_path).acquire()
        with pytest.raises(CheckpointLocked, match=f"pid {child.pid}"):
            Checkpointer(tmp_path, every=1, config={})
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.stdout.close()
    reports = []
    with DirectoryLock(tmp_path, report=reports.append):
        # Within one process the lock is shared: several Checkpointers may open the directory.
        with Checkpointer(tmp_path, every=1, config={}), Checkpointer(tmp_path, every=1, config={}):
            pass
    assert len(reports) == 1 and f"took over the stale lock on {tmp_path} left by pid {child.pid}" in reports[0]
    with DirectoryLock(tmp_path, report=reports.append):  # released cleanly: nobody to report
        pass
    assert len(reports) == 1


# ----------------------------------------------------------------------------- API validation


def test_runner_arguments_are_checked_and_named():
    task = reliability_task.make_task(steps=4, eval_every=4)
    cases = [
        (lambda: run_single(task, "bp", 1.5), TypeError, "seed: expected an integer, given 1.5"),
        (lambda: run_single(task, "bp", -1), ValueError, "seed: expected an integer >= 0, given -1"),
        (lambda: run_single(task, "bp", 2**32), ValueError, "seed: expected an integer < 4294967296"),
        (lambda: run_sweep(task, "bp", 2, steps=2**31), ValueError, "steps: expected an integer < 2147483648"),
        (lambda: run_sweep(task, "bp", 2**32 + 1), ValueError, "seeds: expected an integer < 4294967297"),
        (
            lambda: run_sweep(task, "bp", 2, checkpoint_every=4),
            ValueError,
            "checkpoint_every=4 was given without checkpoint_dir",
        ),
        (lambda: run_sweep(task, "bp", 2, strategy="pmap"), ValueError, "strategy: unknown strategy 'pmap'"),
        (
            lambda: run_sweep(task, "bp", 2, strategy="map", batch_size=0),
            ValueError,
            "batch_size: expected an integer >= 1",
        ),
        (lambda: make_trainer(task, "bp", 0), ValueError, "n_seeds: expected an integer >= 1"),
        (lambda: make_trainer(task, "bp", 1, mesh="cpu"), TypeError, "mesh: expected a 1-d jax.sharding.Mesh"),
        (lambda: run_sweep(task._replace(eval_every=0), "bp", 1), ValueError, "eval_every: expected an integer >= 1"),
        (
            lambda: get_task("graph", learning_rate=-1.0),
            ValueError,
            "learning_rate: expected a finite number > 0, given -1.0",
        ),
        (lambda: get_task("graph", learning_rate=float("nan")), ValueError, "learning_rate"),
        (
            lambda: get_task("mnist", dataset="digits", batch_size=0),
            ValueError,
            "batch_size: expected an integer >= 1, given 0",
        ),
        (
            lambda: get_task("mnist", dataset="digits", eval_every=0),
            ValueError,
            "eval_every: expected an integer >= 1, given 0",
        ),
        (lambda: get_task("mnist", dataset="digits", hidden=(16, 2.5)), TypeError, r"hidden\[1\]: expected an integer"),
        (
            lambda: get_task("mnist", dataset="digits", steps=10, eval_every=3),
            ValueError,
            "steps=10 must be a multiple of eval_every=3",
        ),
        (lambda: get_task("mnist", dataset="cifar"), ValueError, "dataset: unknown dataset 'cifar'"),
        (lambda: get_task("mnist", dataset="digits", data="x.npz"), FileNotFoundError, "data:"),
        (lambda: get_task("field", sigma=0), ValueError, "sigma: expected a finite number > 0, given 0"),
        (lambda: get_task("lm", heads=3), ValueError, "heads: 3 heads must divide d=32"),
        (lambda: get_task("graph", train_per_class=0), ValueError, "train_per_class: expected an integer >= 1"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    trainer = make_trainer(task, "bp", 1, strategy="vmap")
    with pytest.raises(TypeError, match=r"n_steps: expected an integer, given 2\.5"):
        trainer.run_chunk(trainer.init(), 2.5)
    with pytest.raises(ValueError, match=r"seeds\[0\]: expected an integer >= 0, given -1"):
        trainer.init([-1])


def test_a_sweep_too_big_for_memory_is_refused_before_anything_is_allocated(monkeypatch):
    from fa_jax.experiments import sweep as sweeps

    task = reliability_task.make_task(steps=4, eval_every=4)
    with pytest.raises(
        ValueError, match=r"seeds=4294967296, steps=4: the sweep needs about .* GiB .* available; use fewer seeds"
    ):
        run_sweep(task, "bp", 2**32)  # the count alone: no 32 GiB arange of seed values is made first
    monkeypatch.setattr(sweeps, "available_bytes", lambda mesh: 2**20)
    with pytest.raises(ValueError, match=r"seeds=200000, steps=4: .* more than the 1\.0 MiB available"):
        run_sweep(task, "bp", 200000)


def test_seeds_above_two_to_the_31_are_themselves_not_wrapped():
    """uint32 seeds: seed 2**31 + 5 is its own key (int32 wrapped it to a negative number)."""
    task = reliability_task.make_task(steps=4, eval_every=4)
    big = 2**31 + 5
    state = make_trainer(task, "bp", 2, strategy="vmap").init([3, big])
    for i, seed in enumerate((3, big)):
        init_key = jax.random.split(jax.random.key(np.uint32(seed)), 3)[0]
        want = task.init_params(key=init_key)
        for got, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got)[i], np.asarray(expected), atol=1e-6)  # another key: O(1) apart
