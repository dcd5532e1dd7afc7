"""Reliability: SIGKILL and resume bit for bit (Kolen–Pollack's learned B included, the dead run's locks
taken over), safe checkpoint writes, checked restores (rule options by name), diverged seeds frozen and
left out of means, identical results for the same command."""

from __future__ import annotations

import json
import os
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
from fa_jax.experiments import divergence
from fa_jax.experiments.checkpoint import Checkpointer, CheckpointMismatch
from fa_jax.experiments.sweep import make_trainer, run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "reliability_task.py")
STEPS, EVERY = 48, 8  # 12 chunks of 4 steps (the task's eval interval), a checkpoint every 2 chunks


def _env(cache: str | None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    if cache is not None:
        # The persistent compilation cache makes the 7 child processes cheap; a cached
        # executable is the very program the first process compiled.
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
    return env


def _child(mode: str, at: int, out: str, checkpoint_dir: str, cache: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        CHILD,
        mode,
        str(at),
        "--",
        "run",
        "tiny",
        "--rules",
        "kp",
        "--seeds",
        "3",
        "--steps",
        str(STEPS),
        "--strategy",
        "vmap",
        "--no-plot",
        "--quiet",
        "--out",
        out,
        "--checkpoint-dir",
        checkpoint_dir,
        "--checkpoint-every",
        str(EVERY),
    ]
    return subprocess.run(command, env=_env(cache), capture_output=True, text=True, timeout=300)


def _steps_on_disk(directory: str) -> tuple[list[int], list[str]]:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _final_arrays(directory: str) -> tuple[dict, dict]:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore())
    )
    return {k: np.asarray(v) for k, v in restored["state"].items()}, restored["meta"]


def _results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_sigkill_five_times_then_resume_is_bit_identical(tmp_path):
    cache, ck = str(tmp_path / "cache"), str(tmp_path / "ck")
    reference = _child("none", 0, str(tmp_path / "ref"), str(tmp_path / "ref_ck"), cache)
    assert reference.returncode == 0, reference.stderr[-2000:]

    # Five kills at random steps; the third one lands while a checkpoint is being written.
    rng = np.random.default_rng(2024)
    kill_steps = sorted(rng.choice(np.arange(4, STEPS - 4, 4), size=5, replace=False).tolist())
    plan = [
        ("after", kill_steps[0]),
        ("after", kill_steps[1]),
        ("saving", kill_steps[2]),
        ("after", kill_steps[3]),
        ("after", kill_steps[4]),
    ]
    latest = 0
    for mode, at in plan:
        proc = _child(mode, at, str(tmp_path / "out"), ck, cache)
        assert proc.returncode == -signal.SIGKILL, (mode, at, proc.returncode, proc.stderr[-2000:])
        steps, temporary = _steps_on_disk(os.path.join(ck, "kp"))
        newest = steps[-1] if steps else 0  # a kill before the first save leaves nothing: start over
        assert newest >= latest, (mode, at, steps)  # resumed, never went back
        if mode == "saving":
            dying = -(-max(at, latest + 1) // EVERY) * EVERY  # the first save step at or past both
            assert temporary, "the kill was meant to leave a half-written checkpoint"
            assert newest == dying - EVERY, (steps, dying)  # the half-written one is not a step
        latest = newest
    assert not os.path.exists(tmp_path / "out" / "results.json")  # no run got to the end yet

    final = _child("none", 0, str(tmp_path / "out"), ck, cache)
    assert final.returncode == 0, final.stderr[-2000:]
    # The killed process's locks (the directory's and the rule's) were free and taken over, saying whose they were.
    stale = [line for line in final.stderr.splitlines() if "took over the stale lock" in line]
    assert len(stale) == 2 and all(line.startswith("fa-jax: warning: ") and "pid " in line for line in stale), (
        final.stderr
    )
    assert _steps_on_disk(os.path.join(ck, "kp"))[1] == []  # the stale temporary directory was cleaned

    # Metrics, losses and the final state (params, optimizer, feedback, key...) bit for bit.
    assert _results(str(tmp_path / "out")) == _results(str(tmp_path / "ref"))
    got, meta = _final_arrays(os.path.join(ck, "kp"))
    want, _ = _final_arrays(str(tmp_path / "ref_ck" / "kp"))
    assert meta["step"] == STEPS and got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
    paths = [leaf["path"] for leaf in meta["leaves"]]
    for part in ("params/", "opt_state/", "feedback/weights/", "key", "step", "metrics", "losses", "diverged_at"):
        assert any(p.startswith(part) for p in paths), (part, paths)
    assert meta["config"]["rule"] == "kp" and meta["config"]["rule_options"]["decay"] == 1e-3
    assert any(leaf["dtype"].startswith("key<") for leaf in meta["leaves"])  # the data key, typed


def test_same_command_twice_gives_identical_json(tmp_path):
    command = [
        sys.executable,
        "-m",
        "fa_jax",
        "run",
        "mnist",
        "--dataset",
        "digits",
        "--rules",
        "dfa",
        "--seeds",
        "2",
        "--steps",
        "20",
        "--strategy",
        "vmap",
        "--no-plot",
        "--quiet",
        "--out",
        str(tmp_path / "out"),
    ]
    texts = []
    for _ in range(2):
        proc = subprocess.run(command, env=_env(None), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(tmp_path / "out" / "results.json") as f:
            texts.append(f.read())
    assert texts[0] == texts[1]
    payload = json.loads(texts[0])
    assert payload["rules"]["dfa"]["healthy_seeds"] == 2 and payload["rules"]["dfa"]["diverged"] == {}


@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_one_diverging_seed_is_frozen_and_the_others_match(rule):
    task = reliability_task.make_task(optimizer="sgd", steps=24, eval_every=4)
    trainer = make_trainer(task, rule, 8, strategy="vmap")
    start = trainer.init()
    baseline = trainer.run_chunk(start, 24)
    hyper = start.opt_state.hyperparams
    huge = {**hyper, "learning_rate": hyper["learning_rate"].at[3].set(1e38)}  # seed 3 only
    diverged = trainer.run_chunk(start._replace(opt_state=start.opt_state._replace(hyperparams=huge)), 24)

    at = np.asarray(diverged.diverged_at)
    assert at[3] >= 0 and np.all(np.delete(at, 3) == -1), at
    assert np.all(np.asarray(baseline.diverged_at) == -1)
    others = np.arange(8) != 3
    for got, want in zip(
        jax.tree.leaves(diverged._replace(key=None)), jax.tree.leaves(baseline._replace(key=None)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got)[others], np.asarray(want)[others])
    # Seed 3 froze at its last finite state: no NaN/Inf reached its params, optimizer state or
    # feedback (KP learns B from the same update that blew up W).
    for leaf in jax.tree.leaves((diverged.params, diverged.opt_state, diverged.feedback)):
        assert np.all(np.isfinite(np.asarray(leaf)[3]))
    if rule == "kp":  # B learned up to the divergence, then stayed
        assert not np.array_equal(
            np.asarray(diverged.feedback.weights["0/kernel"][3]), np.asarray(start.feedback.weights["0/kernel"][3])
        )
    assert not np.all(np.isfinite(np.asarray(diverged.losses)[3, 1:]))  # the loss shows it

    final = np.asarray(diverged.metrics)[:, -1]
    summary = divergence.summarize(final, at)
    assert summary.healthy == 7 and summary.diverged == {3: int(at[3])}
    assert summary.mean == float(np.mean(np.asarray(baseline.metrics, np.float64)[others, -1]))
    assert "seed 3 at step" in divergence.describe(summary)


def test_guard_freezes_only_the_bad_seed_under_vmap():
    old = {"w": jnp.arange(6.0).reshape(3, 2)}
    new = {"w": old["w"] + 1.0}
    finite = jnp.array([True, False, True])
    state, at = jax.vmap(lambda o, n, f, d: divergence.guard(o, n, finite=f, step=jnp.int32(7), diverged_at=d))(
        old, new, finite, jnp.array([-1, -1, 2], jnp.int32)
    )
    np.testing.assert_array_equal(at, [-1, 7, 2])  # seed 1 diverges now; seed 2 keeps its earlier step
    np.testing.assert_array_equal(state["w"], np.stack([new["w"][0], old["w"][1], old["w"][2]]))
    assert bool(divergence.all_finite({"a": jnp.ones(2), "i": jnp.arange(2)}))
    assert not bool(divergence.all_finite((jnp.ones(2), jnp.array([1.0, jnp.inf]))))
    summary = divergence.summarize(np.array([0.5, np.nan, 0.7]), np.array([-1, 4, -1]), np.array([10, 11, 12]))
    assert summary.mean == pytest.approx(0.6) and summary.diverged == {11: 4} and summary.healthy == 2
    with pytest.raises(ValueError, match="diverged_at"):
        divergence.summarize(np.ones(3), np.ones(2))


def _state(width: int = 4) -> dict:
    return {
        "params": [{"kernel": jnp.ones((3, width)), "bias": jnp.zeros((width,))}],
        "feedback": [{"kernel": jnp.full((3, width), 0.5), "bias": None}],
        "key": jax.random.split(jax.random.key(1), 2),
        "step": jnp.int32(6),
    }


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    ckpt = Checkpointer(tmp_path, every=2, config={"rule": "fa"})
    ckpt.save(2, _state())
    # What a process killed mid-save leaves behind: a temporary directory with part of the files.
    partial = tmp_path / "4.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    fresh = Checkpointer(tmp_path, every=2, config={"rule": "fa"})
    assert fresh.latest_step() == 2
    restored = fresh.restore(like=_state())
    assert int(restored["step"]) == 6
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(_state()["key"]))
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(_state()["key"])
    assert restored["feedback"][0]["bias"] is None


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(config={"rule": "dfa"}), "rule: checkpoint has 'fa', this run has 'dfa'"),
        (dict(config={"rule": "fa", "seeds": [0, 1]}), "seeds"),
        (dict(width=5), "params/0/kernel: checkpoint shape [3, 4], this run [3, 5]"),
    ],
)
def test_restoring_into_a_different_run_names_what_differs(tmp_path, change, named):
    Checkpointer(tmp_path, every=1, config={"rule": "fa"}).save(1, _state())
    ckpt = Checkpointer(tmp_path, every=1, config=change.get("config", {"rule": "fa"}))
    with pytest.raises(CheckpointMismatch, match=named.replace("[", r"\[").replace("]", r"\]")):
        ckpt.restore(like=_state(change.get("width", 4)))


def test_restore_detects_other_state_layouts(tmp_path):
    Checkpointer(tmp_path, every=1, config={}).save(1, _state())
    other = _state()
    other["extra"] = jnp.zeros(2)
    with pytest.raises(CheckpointMismatch, match="extra"):
        Checkpointer(tmp_path, every=1, config={}).restore(like=other)
    retyped = _state()
    retyped["params"][0]["bias"] = retyped["params"][0]["bias"].astype(jnp.bfloat16)
    with pytest.raises(CheckpointMismatch, match="params/0/bias: checkpoint dtype float32, this run bfloat16"):
        Checkpointer(tmp_path, every=1, config={}).restore(like=retyped)


def test_sweep_refuses_bad_seeds_steps_and_periods(tmp_path):
    task = reliability_task.make_task(steps=8, eval_every=4)
    cases = [
        (dict(seeds=[0, 1.5]), TypeError, r"seeds\[1\]"),
        (dict(seeds=[0, -1]), ValueError, r"seeds\[1\]"),
        (dict(seeds=[3, 3]), ValueError, "seeds"),
        (dict(seeds=2.0), TypeError, r"seeds\[|seeds"),
        (dict(seeds=2, steps=-4), ValueError, "steps"),
        (dict(seeds=2, chunks=0), ValueError, "chunks"),
        (dict(seeds=2, checkpoint_dir=str(tmp_path), checkpoint_every=0), ValueError, "checkpoint_every"),
        (dict(seeds=2, chunks=2, checkpoint_dir=str(tmp_path), checkpoint_every=3), ValueError, "checkpoint_every"),
    ]
    for kwargs, error, named in cases:
        with pytest.raises(error, match=named):
            run_sweep(task, "bp", **kwargs)
    with pytest.raises(ValueError, match="every"):
        Checkpointer(tmp_path, every=0, config={})
    with pytest.raises(TypeError, match="every"):
        Checkpointer(tmp_path, every=2.5, config={})


def test_brsf_and_data_order_depend_only_on_seed_and_step():
    from fa_jax.experiments._task import sample_rows

    # M_t = |init(fold_in(k, t))|: a pure function of (layer key, step).
    rule, weight, key = fj.BRSF(), jnp.ones((4, 3)), jax.random.key(3)
    spec = fj.WeightSpec("0/kernel", (4, 3), jnp.float32, ("in", "out"))

    def matrix(step):
        return rule.backward_matrix(weight, key, spec=spec, step=step)

    np.testing.assert_array_equal(matrix(5), matrix(5))
    assert not np.array_equal(matrix(5), matrix(6))
    data_key = jax.random.key(11)
    np.testing.assert_array_equal(
        sample_rows(48, 8, data_key, jnp.int32(9)), sample_rows(48, 8, data_key, jnp.int32(9))
    )

    # A brSF sweep gives the same numbers whether it runs in one chunk or two, and with the
    # seeds listed in either order: each seed's run depends on its seed and the step alone.
    task = reliability_task.make_task(steps=8, eval_every=4)
    one = run_sweep(task, "brsf", [5, 9], chunks=1, strategy="vmap")
    two = run_sweep(task, "brsf", [9, 5], chunks=2, strategy="vmap")
    np.testing.assert_array_equal(one.metrics, two.metrics[::-1])
    np.testing.assert_array_equal(one.losses, two.losses[::-1])
    assert np.all(one.diverged_at == -1)


def test_learned_feedback_round_trips_exactly_through_a_sweep_checkpoint(tmp_path):
    """A finished KP sweep resumed from its checkpoint restores the whole state bit for bit, learned B included."""
    task = reliability_task.make_task(steps=8, eval_every=4)
    first = run_sweep(task, "kp", 2, chunks=2, strategy="vmap", checkpoint_dir=str(tmp_path))
    again = run_sweep(task, "kp", 2, chunks=2, strategy="vmap", checkpoint_dir=str(tmp_path))  # nothing left to train
    assert jax.tree.structure(again.state) == jax.tree.structure(first.state)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(again.state), jax.tree.leaves(first.state), strict=True
    ):
        if is_key(want):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), jax.tree_util.keystr(path)
    initial = make_trainer(task, "kp", 2, strategy="vmap").init().feedback
    assert not np.array_equal(
        np.asarray(first.state.feedback.weights["0/kernel"]), np.asarray(initial.weights["0/kernel"])
    )
    np.testing.assert_array_equal(again.metrics, first.metrics)


def test_feedback_layouts_and_keys_round_trip_and_other_layouts_are_refused(tmp_path):
    """DFA's projection with its static layout (taps, batch dims), regenerated FA's keys and the exact paths."""
    task = reliability_task.make_task()
    params = task.init_params(key=jax.random.key(0))
    inputs = task.data["x_train"][:8]

    def feedback(rule, **kw):
        return fj.init_feedback(rule, params, key=jax.random.key(1), model=task.model, inputs=inputs, **kw)

    state = {"dfa": feedback("dfa"), "fa": feedback(fj.FA(regenerate=True), exact="2/kernel")}
    assert state["dfa"].layout.batch_dims == 1 and state["fa"].exact == ("2/kernel",)
    Checkpointer(tmp_path, every=1, config={}).save(1, state)
    restored = Checkpointer(tmp_path, every=1, config={}).restore(like=state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored["dfa"].layout == state["dfa"].layout and restored["fa"].exact == ("2/kernel",)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert is_key(got) == is_key(want)
        if is_key(want):
            assert jax.random.key_impl(got) == jax.random.key_impl(want)
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    # Same leaves, other static layout (taps cut at every layer input, other exact paths): refused.
    for other in (
        {"dfa": feedback(fj.DFA(taps="layer")), "fa": state["fa"]},
        {"dfa": state["dfa"], "fa": feedback(fj.FA(regenerate=True), exact="0/kernel")},
    ):
        with pytest.raises(CheckpointMismatch):
            Checkpointer(tmp_path, every=1, config={}).restore(like=other)


def test_resume_refuses_other_rule_options_and_unnamed_ones(tmp_path):
    task = reliability_task.make_task(steps=4, eval_every=4)
    run_sweep(task, "fa", 1, strategy="vmap", checkpoint_dir=str(tmp_path))
    # Same rule name, another initializer for B: a different run, named in the message.
    with pytest.raises(CheckpointMismatch, match=r"rule_options.*fan_in.*fan_avg"):
        run_sweep(task, fj.FA(init=fj.xavier()), 1, strategy="vmap", checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="rule_options"):
        run_sweep(task, fj.FA(regenerate=True), 1, strategy="vmap", checkpoint_dir=str(tmp_path))
    # An option that cannot be named is refused before anything is trained or saved.
    unnamed = fj.FA(init=lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype))
    with pytest.raises(TypeError, match="rule 'fa' option init: a lambda"):
        run_sweep(task, unnamed, 1, strategy="vmap", checkpoint_dir=str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")
    # Named options are recorded by what they are: a dataclass by its fields, a partial by its arguments.
    from fa_jax.experiments.checkpoint import rule_identity

    tiled = rule_identity(fj.FA(init=fj.Tiled(rows=8), regenerate=True))["config"]["init"]
    assert tiled == {
        "class": "fa_jax.initializers.Tiled",
        "fields": {"rows": 8, "distribution": "truncated_normal", "mode": "fan_in", "scale": 1.0},
    }
    assert rule_identity(fj.KolenPollack(decay=0.25))["config"]["decay"] == 0.25
