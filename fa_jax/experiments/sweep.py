"""Seed sweeps: one ``jax.jit`` over all seeds around a ``lax.scan`` training loop.

Everything a run needs lives in one pytree, :class:`TrainState` (params,
optimizer state, feedback, data key, step, metrics so far), and training is
``run_chunk(state, n_steps) -> state``: a jitted ``lax.scan`` over eval
intervals, each a ``lax.scan`` over steps. A sweep calls it once by default;
calling it several times (for checkpoints or a progress bar) gives the same
numbers, because the data order is ``fold_in(data_key, step)``.

Seed ``s`` fixes everything random: ``key(s)`` splits into the init, feedback
and data keys. Seed ``i`` of a sweep equals :func:`run_single` with seed ``i``.

Every step asks the rule, never its type: the gradient is
``fa_jax.value_and_grad(task.model, task.loss, rule)`` called with ``step=t``
(brSF redraws its magnitudes from it), and after the optimizer step the
feedback becomes ``rule.update_feedback(feedback, updates=u, params=W)``
(Kolen–Pollack learns B there; every other rule returns it unchanged).

The seed axis is laid out over a 1-d :class:`jax.sharding.Mesh` (axis
``"seed"``, all devices by default) with ``NamedSharding`` and split with
``jax.shard_map``. Inside a device the seeds run with one of two strategies:

* ``"vmap"``: batch the seeds (best on GPU, and on CPU for small models);
* ``"map"``: ``lax.map(..., batch_size=k)``, a loop of ``k``-seed vmaps
  (CPU, compute-bound models: XLA's batched matmuls on CPU are slower than
  ``k`` plain ones, so ``k = 1`` keeps the loop's speed in one program).

``strategy="auto"`` picks ``vmap`` off CPU, and on CPU by the XLA FLOP count of
one training step (see :func:`choose_strategy`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fa_jax
from fa_jax import _checks
from fa_jax.experiments import distributed, divergence
from fa_jax.experiments._task import Task

#: On CPU, steps above this many FLOPs per seed run as ``lax.map`` (batch 4), below it as ``vmap``.
#: Measured by benchmarks/sweep.py on 2 cores: vmap wins at 784-64-64-10 batch 32
#: (~1e7 FLOPs/step) and loses at 784-256-256-10 batch 64 (~1e8 FLOPs/step).
CPU_VMAP_MAX_FLOPS = 2e7


class TrainState(NamedTuple):
    """The whole state of one run (or, with a leading seed axis, of a sweep).

    Attributes:
      params: model parameters.
      opt_state: optax state (of ``params`` only; feedback is never optimized).
      feedback: the rule's :class:`fa_jax.Feedback` (empty for BP); changed only by
        ``rule.update_feedback`` (Kolen–Pollack's learned B).
      key: the data key; batch ``t`` is drawn from ``fold_in``-derived keys of it.
      step: int32 scalar, steps done.
      metrics: ``(n_evals + 1,)`` metric after ``0, E, 2E, …`` steps (NaN = not reached).
      losses: ``(n_evals + 1,)`` mean training loss over each interval (index 0 is NaN).
      diverged_at: int32 scalar, ``-1``, or the step whose loss, gradients or
        update first had a NaN/Inf; from then on params, opt_state and feedback stay frozen.
    """

    params: Any
    opt_state: Any
    feedback: Any
    key: jax.Array
    step: jax.Array
    metrics: jax.Array
    losses: jax.Array
    diverged_at: jax.Array


class Trainer(NamedTuple):
    """Jitted functions of one (task, rule) sweep. States carry a leading seed axis.

    Attributes:
      init: ``init(seeds) -> TrainState`` (seeds padded to a multiple of the mesh size).
      run_chunk: ``run_chunk(state, n_steps) -> state``; ``n_steps`` a multiple of ``eval_every``.
      n_seeds: seeds asked for (the state may hold padding seeds after them).
      strategy: ``"vmap"`` or ``"map"`` as used inside each device.
      mesh: the device mesh of the seed axis.
      batch_size: seeds per ``lax.map`` batch under ``"map"`` (unused by ``"vmap"``).
      data: the task's data, replicated over ``mesh``.
    """

    init: Callable
    run_chunk: Callable
    n_seeds: int
    strategy: str
    mesh: Mesh
    batch_size: int = 1
    data: Any = None  # the task's data as placed on the mesh (replicated)


#: Steps, and the step counter, are int32 inside the jitted loop.
STEP_LIMIT = 2**31


def _n_evals(task: Task, steps: int) -> int:
    eval_every = _checks.check_int(task.eval_every, f"task {task.name!r} eval_every", minimum=1, limit=STEP_LIMIT)
    if steps % eval_every:
        raise ValueError(f"steps={steps} must be a multiple of eval_every={task.eval_every} for task {task.name!r}")
    return steps // task.eval_every


def init_state(task: Task, rule: fa_jax.Rule, data: Any, seed: jax.Array, *, steps: int) -> TrainState:
    """The state of one run with ``seed`` (traceable: ``seed`` may be a traced int).

    The feedback is drawn for the model's program on the first training batch
    (``fa_jax.init_feedback(rule, params, key=, model=, inputs=)``): the engine finds
    the weights, the taps and their batch dims there (2 for a per-token LM loss).
    """
    init_key, feedback_key, data_key = jax.random.split(jax.random.key(seed), 3)
    params = task.init_params(key=init_key)
    inputs, _ = task.batch(data, data_key, jnp.int32(0))
    feedback = fa_jax.init_feedback(rule, params, key=feedback_key, model=task.model, inputs=inputs)
    metrics = jnp.full((_n_evals(task, steps) + 1,), jnp.nan, jnp.float32)
    metrics = metrics.at[0].set(task.evaluate(params, data))
    return TrainState(
        params,
        task.optimizer.init(params),
        feedback,
        data_key,
        jnp.int32(0),
        metrics,
        jnp.full_like(metrics, jnp.nan),
        jnp.int32(divergence.NOT_DIVERGED),
    )


def _train_step(task: Task, rule: fa_jax.Rule) -> Callable:
    """``step(params, opt_state, feedback, data, key, t) -> (params, opt_state, feedback, loss, finite)``: one update.

    ``W ← W + u`` with the optimizer's ``u``, then ``feedback ← rule.update_feedback(feedback,
    updates=u, params=W)`` (for Kolen–Pollack ``B ← B + u − λ(B − W)``, Akrout et al. 2019,
    eq. 6). ``finite`` says the loss, the gradients, the new params and the new feedback
    are free of NaN/Inf.
    """
    grad_fn = fa_jax.value_and_grad(task.model, task.loss, rule)
    # The step's loss goes to the optimizer as ``value`` (reduce-on-plateau reads it; others ignore it).
    optimizer = optax.with_extra_args_support(task.optimizer)

    def step(params, opt_state, feedback, data, key, t):
        inputs, targets = task.batch(data, key, t)
        loss, grads = grad_fn(params, feedback, inputs, targets, step=t)  # brSF redraws M from (seed, step)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        feedback = rule.update_feedback(feedback, updates=updates, params=params)  # params before the update
        params = optax.apply_updates(params, updates)
        return params, opt_state, feedback, loss, divergence.all_finite((loss, grads, params, feedback))

    return step


def _chunk(task: Task, rule: fa_jax.Rule) -> Callable:
    """``chunk(state, data, n_intervals) -> state`` for one seed: nested ``lax.scan``s."""
    step = _train_step(task, rule)

    def train_step(carry, _):
        learned, ctx = carry
        *new, loss, finite = step(*learned, ctx.data, ctx.key, ctx.step)
        # A seed with a NaN/Inf is frozen at its last finite state (params, optimizer and
        # feedback: KP learns B from the same update); the other seeds go on.
        learned, diverged_at = divergence.guard(
            learned, tuple(new), finite=finite, step=ctx.step, diverged_at=ctx.diverged_at
        )
        return (learned, ctx._replace(step=ctx.step + 1, diverged_at=diverged_at)), loss

    class _Ctx(NamedTuple):  # what a step reads besides params, opt_state and feedback
        data: Any
        key: jax.Array
        step: jax.Array
        diverged_at: jax.Array

    def interval(state: TrainState, data):
        ctx = _Ctx(data, state.key, state.step, state.diverged_at)
        learned = (state.params, state.opt_state, state.feedback)
        ((params, opt_state, feedback), ctx), losses = jax.lax.scan(train_step, (learned, ctx), length=task.eval_every)
        slot = ctx.step // task.eval_every
        return state._replace(
            params=params,
            opt_state=opt_state,
            feedback=feedback,
            step=ctx.step,
            diverged_at=ctx.diverged_at,
            metrics=state.metrics.at[slot].set(task.evaluate(params, data)),
            losses=state.losses.at[slot].set(losses.mean()),
        )

    def chunk(state: TrainState, data, n_intervals: int) -> TrainState:
        return jax.lax.scan(lambda s, _: (interval(s, data), None), state, length=n_intervals)[0]

    return chunk


def check_task_rule(task: Task, rule: fa_jax.Rule) -> None:
    """Refuse to train a task built for another rule's recipe (its optimizer is that rule's).

    Raises:
      ValueError: ``task.options["rule"]`` names a rule other than ``rule``.
    """
    built_for = (getattr(task, "options", None) or {}).get("rule")
    if built_for is not None and built_for != rule.name:
        raise ValueError(
            f"rule: task {task.name!r} was built with recipe {task.options.get('recipe')!r} for rule {built_for!r}; "
            f"training it under {rule.name!r} would use {built_for}'s settings; build it with rule={rule.name!r}"
        )


def make_single(task: Task, rule: str | fa_jax.Rule, *, steps: int | None = None) -> Callable:
    """``run(data, seed) -> TrainState``: one jitted run (a ``lax.scan`` over all steps)."""
    rule = fa_jax.get_rule(rule)
    check_task_rule(task, rule)
    steps = _check_steps(task.steps if steps is None else steps)
    _n_evals(task, steps)
    chunk = _chunk(task, rule)

    @jax.jit
    def run(data, seed):
        return chunk(init_state(task, rule, data, seed, steps=steps), data, _n_evals(task, steps))

    return run


def run_single(task: Task, rule: str | fa_jax.Rule, seed: int, *, steps: int | None = None) -> TrainState:
    """One run with ``seed`` (an integer in ``[0, 2**32)``): the reference a sweep must match.

    Raises:
      TypeError, ValueError: ``seed`` is not such an integer (``1.5`` is not rounded, ``-1`` not wrapped).
    """
    seed = _checks.check_seed(seed, "seed")
    return make_single(task, rule, steps=steps)(task.data, jnp.uint32(seed))


def step_flops(task: Task, rule: fa_jax.Rule) -> float:
    """XLA's FLOP estimate of one training step of one seed (0 when unavailable)."""
    try:
        state = jax.eval_shape(lambda d: init_state(task, rule, d, jnp.int32(0), steps=task.eval_every), task.data)
        step = jax.jit(_train_step(task, rule))
        lowered = step.lower(state.params, state.opt_state, state.feedback, task.data, state.key, state.step)
        cost = lowered.cost_analysis()  # HLO estimate before compilation: no compile cost
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) if cost else 0.0
    except Exception:  # cost analysis is best effort; never fail a sweep over it
        return 0.0


def choose_strategy(task: Task, rule: fa_jax.Rule, mesh: Mesh) -> tuple[str, int]:
    """``(strategy, batch_size)``: ``vmap`` off CPU or for small steps; on CPU above
    :data:`CPU_VMAP_MAX_FLOPS`, ``lax.map`` over chunks of 4 seeds (a 4-wide vmap
    keeps batched matmuls efficient; 16-wide ones were slower than a loop)."""
    if mesh.devices.flat[0].platform != "cpu":
        return "vmap", 0
    flops = step_flops(task, rule)
    return ("vmap", 0) if flops <= CPU_VMAP_MAX_FLOPS else ("map", 4)


def seed_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-d mesh with axis ``"seed"`` over ``devices`` (default: all, including other hosts')."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("seed",))


def make_trainer(
    task: Task,
    rule: str | fa_jax.Rule,
    n_seeds: int,
    *,
    steps: int | None = None,
    strategy: str = "auto",
    batch_size: int = 1,
    mesh: Mesh | None = None,
) -> Trainer:
    """Jitted ``init``/``run_chunk`` for ``n_seeds`` seeds of ``task`` under ``rule``.

    Args:
      steps: total steps the metric arrays are sized for (default ``task.steps``).
      strategy: ``"auto"``, ``"vmap"`` or ``"map"`` (``lax.map`` with ``batch_size``).
      mesh: 1-d mesh named ``"seed"`` (default: all devices). Seeds are padded
        to a multiple of its size; padding seeds continue the seed numbering.
    """
    rule = fa_jax.get_rule(rule)
    check_task_rule(task, rule)
    n_seeds = _checks.check_int(n_seeds, "n_seeds", minimum=1, limit=_checks.SEED_LIMIT + 1)
    steps = _check_steps(task.steps if steps is None else steps)
    _n_evals(task, steps)  # validates steps
    batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
    if strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"strategy: unknown strategy {strategy!r}; expected 'auto', 'vmap' or 'map'")
    mesh = seed_mesh() if mesh is None else mesh
    if not isinstance(mesh, Mesh) or mesh.axis_names != ("seed",):
        raise TypeError(f"mesh: expected a 1-d jax.sharding.Mesh with axis 'seed' (seed_mesh()), given {mesh!r}")
    if strategy == "auto":
        strategy, batch_size = choose_strategy(task, rule, mesh)
    chunk = _chunk(task, rule)
    seeds_spec = NamedSharding(mesh, P("seed"))
    replicated = NamedSharding(mesh, P())
    data = jax.device_put(task.data, replicated)

    def per_device(fn: Callable) -> Callable:
        if strategy == "vmap":
            return jax.vmap(fn)
        return lambda xs: jax.lax.map(fn, xs, batch_size=batch_size)

    def sharded(fn: Callable) -> Callable:
        return jax.shard_map(fn, mesh=mesh, in_specs=(P("seed"), P()), out_specs=P("seed"), check_vma=False)

    @jax.jit
    def init_all(seeds, data):
        return sharded(lambda s, d: per_device(lambda seed: init_state(task, rule, d, seed, steps=steps))(s))(
            seeds, data
        )

    @functools.partial(jax.jit, static_argnums=2)
    def run_all(state, data, n_intervals):
        return sharded(lambda s, d: per_device(lambda one: chunk(one, d, n_intervals))(s))(state, data)

    padded = math.ceil(n_seeds / mesh.size) * mesh.size

    def init(seeds=None):
        if seeds is None:
            seeds = np.arange(n_seeds, dtype=np.int64)
        else:
            seeds = np.asarray([_checks.check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)], np.int64)
            if len(seeds) != n_seeds:
                raise ValueError(f"seeds: expected {n_seeds} seeds, given {len(seeds)}")
        if len(seeds) < padded:  # padding seeds continue the numbering (mod 2**32); their results are dropped
            seeds = np.concatenate([seeds, (seeds.max() + 1 + np.arange(padded - len(seeds))) % _checks.SEED_LIMIT])
        # uint32: every seed in [0, 2**32) reaches jax.random.key as itself (int32 wrapped those >= 2**31).
        return init_all(jax.device_put(jnp.asarray(seeds, jnp.uint32), seeds_spec), data)

    def run_chunk(state: TrainState, n_steps: int) -> TrainState:
        n_steps = _checks.check_int(n_steps, "n_steps", minimum=0, limit=STEP_LIMIT)
        if n_steps % task.eval_every:
            raise ValueError(f"n_steps={n_steps} must be a multiple of eval_every={task.eval_every}")
        return run_all(state, data, n_steps // task.eval_every)

    return Trainer(init, run_chunk, n_seeds, strategy, mesh, batch_size, data)


class SweepResult(NamedTuple):
    """Per-seed curves of one rule: ``metrics``/``losses`` ``(n_seeds, n_evals + 1)``, ``steps (n_evals + 1,)``.

    ``state`` is the final :class:`TrainState` of the asked seeds (leading axis
    ``n_seeds``, padding seeds dropped): params, optimizer state and feedback
    (e.g. Kolen–Pollack's learned B) after the last step. ``report`` holds the
    task's extra final metrics (``task.report``), ``{name: (n_seeds,)}``, or ``None``.
    """

    rule: str
    seeds: np.ndarray
    steps: np.ndarray
    metrics: np.ndarray
    losses: np.ndarray
    strategy: str
    diverged_at: np.ndarray | None = None  # (n_seeds,) step each seed diverged at, -1 if it did not
    state: TrainState | None = None
    report: dict | None = None

    def report_summary(self) -> dict[str, divergence.Summary]:
        """Mean ± std of each ``report`` value over the seeds that did not diverge."""
        diverged_at = np.full(len(self.seeds), -1) if self.diverged_at is None else self.diverged_at
        return {k: divergence.summarize(v, diverged_at, self.seeds) for k, v in (self.report or {}).items()}

    @property
    def final(self) -> np.ndarray:
        """Final metric per seed, ``(n_seeds,)``."""
        return self.metrics[:, -1]

    def summary(self) -> divergence.Summary:
        """Mean ± std of the final metric over seeds that did not diverge, and the diverged ones."""
        diverged_at = np.full(len(self.seeds), -1) if self.diverged_at is None else self.diverged_at
        return divergence.summarize(self.final, diverged_at, self.seeds)


def _check_steps(steps: Any, name: str = "steps") -> int:
    return _checks.check_int(steps, name, minimum=1, limit=STEP_LIMIT)


def sweep_config(
    task: Task,
    rule: fa_jax.Rule,
    seeds: np.ndarray,
    steps: int,
    chunks: int,
    *,
    devices: int = 1,
    strategy: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """What a checkpoint must agree on to be resumed by this sweep (JSON-able).

    The rule enters as ``rule.name`` and ``rule.config()`` with every option named
    (callables by qualified name and arguments, see :func:`checkpoint.rule_identity`);
    the task as its name, its options (``task.options``, named the same way) and the
    SHA-256 of the data it holds (:func:`checkpoint.data_fingerprint`: the numbers, not
    the path); then the seeds, steps, eval interval, chunks, device count and the
    per-device strategy, which fix the programs (and so the last bits of every float).

    Raises:
      TypeError: a rule or task option that cannot be named (a lambda, a closure over arrays).
    """
    from fa_jax.experiments.checkpoint import rule_identity, task_identity

    identity = rule_identity(rule)
    return {
        "task": task_identity(task),
        "description": task.description,
        "rule": identity["name"],
        "rule_options": identity["config"],
        "seeds": [int(s) for s in seeds],
        "steps": steps,
        "eval_every": task.eval_every,
        "chunks": chunks,
        "devices": devices,
        "strategy": strategy,
        "map_batch_size": batch_size if strategy == "map" else None,
    }


def _leaf_bytes(leaf: Any) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64)) * int(leaf.dtype.itemsize)


def state_bytes_per_seed(task: Task, rule: fa_jax.Rule, steps: int) -> int:
    """Bytes of one seed's :class:`TrainState` (params, optimizer, feedback, metrics...), from shapes alone."""
    shapes = jax.eval_shape(lambda d: init_state(task, rule, d, jnp.uint32(0), steps=steps), task.data)
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(shapes))


def available_bytes(mesh: Mesh) -> int | None:
    """Memory a sweep may use on one device of ``mesh``: the host's available RAM for CPU devices
    (they share it), the device's free memory otherwise; ``None`` when unknown."""
    device = mesh.devices.flat[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: A training step holds the state it reads, the state it writes and its temporaries.
MEMORY_FACTOR = 3
#: :func:`prepare_sweep` checks memory (one trace of the state's shapes) above these many seeds or evals.
MEMORY_CHECK_SEEDS, MEMORY_CHECK_EVALS = 64, 1024


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(task: Task, rule: fa_jax.Rule, n_seeds: int, steps: int, mesh: Mesh) -> None:
    """Refuse a sweep whose state cannot fit: ``MEMORY_FACTOR`` × state bytes per seed × seeds per
    memory pool (all seeds for CPU devices, which share the host's RAM; a device's share otherwise).

    Raises:
      ValueError: naming ``seeds`` (and ``steps``, whose metric arrays are in the state), the
        bytes needed and the bytes available.
    """
    available = available_bytes(mesh)
    if available is None:
        return
    per_seed = state_bytes_per_seed(task, rule, steps)
    padded = math.ceil(n_seeds / mesh.size) * mesh.size
    on_one = padded if mesh.devices.flat[0].platform == "cpu" else padded // mesh.size
    need = MEMORY_FACTOR * (per_seed * on_one + sum(_leaf_bytes(x) for x in jax.tree.leaves(task.data)))
    if need > available:
        raise ValueError(
            f"seeds={n_seeds}, steps={steps}: the sweep needs about {_gib(need)} ({_gib(per_seed)} of state per seed, "
            f"x{MEMORY_FACTOR} while training), more than the {_gib(available)} available; use fewer seeds"
        )


class Sweep:
    """A sweep ready to train: the trainer built, the state initialised or restored from a checkpoint.

    Made by :func:`prepare_sweep`; :meth:`run` trains the remaining chunks and returns
    the :class:`SweepResult`. While it holds a checkpointer, the checkpoint directory is
    locked; :meth:`close` (or leaving a ``with`` block) releases it.

    Attributes:
      rule: the rule object; ``seeds``: ``(n,)`` int64 seed values; ``steps``, ``chunks``.
      start: steps already done (restored from a checkpoint; 0 for a fresh sweep).
      trainer: the :class:`Trainer`; ``state``: the current :class:`TrainState`.
      checkpointer: the :class:`checkpoint.Checkpointer` or ``None``.
      config: the run identity a checkpoint records (``None`` without checkpoints).
    """

    def __init__(self, task, rule, seeds, steps, chunks, trainer, state, start, checkpointer, config):
        self.task, self.rule, self.seeds, self.steps, self.chunks = task, rule, seeds, steps, chunks
        self.trainer, self.state, self.start, self.checkpointer, self.config = (
            trainer,
            state,
            start,
            checkpointer,
            config,
        )

    @property
    def chunk_steps(self) -> int:
        return self.steps // self.chunks

    def run(self, on_chunk: Callable[[int], None] | None = None) -> SweepResult:
        """Train from :attr:`start` to ``steps``, saving checkpoints; ``on_chunk(steps_done)`` after each chunk."""
        state, chunk_steps = self.state, self.chunk_steps
        if on_chunk is not None and self.start:
            on_chunk(self.start)
        for index in range(self.start // chunk_steps, self.chunks):
            state = self.trainer.run_chunk(state, chunk_steps)
            done = (index + 1) * chunk_steps
            self.state, self.start = state, done
            if on_chunk is not None:
                on_chunk(done)
            if self.checkpointer is not None:
                self.checkpointer.maybe_save(done, state, final=index == self.chunks - 1)
        metrics, losses, diverged_at = distributed.gather((state.metrics, state.losses, state.diverged_at))
        n = len(self.seeds)
        addressable = all(leaf.is_fully_addressable for leaf in jax.tree.leaves(state))
        report = None
        if self.task.report is not None:
            values = jax.jit(jax.vmap(self.task.report, in_axes=(0, None)))(state.params, self.trainer.data)
            report = {k: np.asarray(v, np.float64)[:n] for k, v in distributed.gather(values).items()}
        return SweepResult(
            self.rule.name,
            self.seeds,
            np.arange(_n_evals(self.task, self.steps) + 1) * self.task.eval_every,
            np.asarray(metrics)[:n],
            np.asarray(losses)[:n],
            self.trainer.strategy,
            np.asarray(diverged_at)[:n],
            jax.tree.map(lambda x: x[:n], state) if addressable else None,
            report,
        )

    def close(self) -> None:
        """Release the checkpoint directory's lock."""
        if self.checkpointer is not None:
            self.checkpointer.close()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _seed_values(seeds: Any) -> tuple[int, np.ndarray | None]:
    """``(count, values)``: a count stays a count (no ``arange`` before the memory check), a sequence is checked."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, (bool, np.bool_)):
        return _checks.check_int(seeds, "seeds", minimum=1, limit=_checks.SEED_LIMIT + 1), None
    if isinstance(seeds, (str, bytes, bool, np.bool_)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"seeds: expected a count or a sequence of integer seeds, given {seeds!r}")
    values = np.asarray([_checks.check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)], np.int64)
    if values.size == 0 or len(set(values.tolist())) != values.size:
        raise ValueError(f"seeds: expected distinct seeds, at least one, given {values.tolist()}")
    return len(values), values


def prepare_sweep(
    task: Task,
    rule: str | fa_jax.Rule,
    seeds: int | Sequence[int] = 8,
    *,
    steps: int | None = None,
    chunks: int = 1,
    strategy: str = "auto",
    batch_size: int = 1,
    mesh: Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    restart_if_corrupt: bool = False,
    report: Callable[[str], None] | None = None,
) -> Sweep:
    """Check every argument, build the trainer, and initialise or restore the state; train nothing.

    Everything a user can get wrong is refused here, before any training: bad
    seeds, steps, chunks or periods, a sweep too big for memory, a rule or task
    option that cannot be named, a checkpoint directory held by another process,
    one written by another run (:class:`checkpoint.CheckpointMismatch`), or one
    whose checkpoints all fail verification (:class:`checkpoint.CheckpointCorrupt`).
    Arguments as in :func:`run_sweep`.
    """
    n_seeds, values = _seed_values(seeds)
    steps = task.steps if steps is None else steps
    steps = _check_steps(steps)
    chunks = _checks.check_int(chunks, "chunks", minimum=1)
    n_evals = _n_evals(task, steps)
    if n_evals % chunks:
        raise ValueError(f"chunks={chunks} must divide the {n_evals} eval intervals")
    chunk_steps = steps // chunks
    if checkpoint_dir is None and checkpoint_every is not None:
        raise ValueError(
            f"checkpoint_every={checkpoint_every!r} was given without checkpoint_dir: nothing would be saved"
        )
    every = (
        chunk_steps if checkpoint_every is None else _checks.check_int(checkpoint_every, "checkpoint_every", minimum=1)
    )
    if every % chunk_steps:
        raise ValueError(f"checkpoint_every={every} must be a multiple of the chunk size, {chunk_steps} steps")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir: expected a path, given {checkpoint_dir!r}")
    rule = fa_jax.get_rule(rule)
    check_task_rule(task, rule)
    if checkpoint_dir is not None:
        from fa_jax.experiments.checkpoint import rule_identity

        rule_identity(rule)  # refuse unnamed options before anything is traced, trained or saved
    mesh = seed_mesh() if mesh is None else mesh
    if n_seeds > MEMORY_CHECK_SEEDS or n_evals > MEMORY_CHECK_EVALS:  # where seeds or steps can outgrow memory
        check_memory(task, rule, n_seeds, steps, mesh)
    seed_values = np.arange(n_seeds, dtype=np.int64) if values is None else values
    trainer = make_trainer(task, rule, n_seeds, steps=steps, strategy=strategy, batch_size=batch_size, mesh=mesh)
    start, checkpointer, config = 0, None, None
    if checkpoint_dir is None:
        return Sweep(
            task, rule, seed_values, steps, chunks, trainer, trainer.init(seed_values), start, checkpointer, config
        )
    from fa_jax.experiments.checkpoint import Checkpointer  # orbax is imported only when asked for

    config = sweep_config(
        task,
        rule,
        seed_values,
        steps,
        chunks,
        devices=mesh.size,
        strategy=trainer.strategy,
        batch_size=trainer.batch_size,
    )

    def open_checkpointer():
        return Checkpointer(
            checkpoint_dir, every=every, config=config, restart_if_corrupt=restart_if_corrupt, report=report
        )

    # Several processes: process 0 alone reads and writes the directory; the others take part through it.
    checkpointer = (
        open_checkpointer() if jax.process_count() == 1 else distributed.SharedCheckpointer(open_checkpointer)
    )
    try:
        checkpointer.check()  # another run's or no usable checkpoint: refused before anything compiles
        state = trainer.init(seed_values)
        restored = checkpointer.restore(like=state)
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        state, start = restored, int(np.asarray(distributed.gather(restored.step)).reshape(-1)[0])
    return Sweep(task, rule, seed_values, steps, chunks, trainer, state, start, checkpointer, config)


def run_sweep(
    task: Task,
    rule: str | fa_jax.Rule,
    seeds: int | Sequence[int] = 8,
    *,
    steps: int | None = None,
    chunks: int = 1,
    strategy: str = "auto",
    batch_size: int = 1,
    mesh: Mesh | None = None,
    on_chunk: Callable[[int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    restart_if_corrupt: bool = False,
    report: Callable[[str], None] | None = None,
) -> SweepResult:
    """Train ``task`` under ``rule`` for every seed in one jitted program per chunk.

    Args:
      seeds: a count (seeds ``0..n-1``) or explicit seed values, integers in ``[0, 2**32)``.
      steps: training steps, ``1 <= steps < 2**31``, a multiple of ``task.eval_every``.
      chunks: number of ``run_chunk`` calls (same numbers for any value; default one).
      strategy, batch_size, mesh: see :func:`make_trainer`.
      on_chunk: called with the steps done after each chunk (progress bars).
      checkpoint_dir: save the whole state there (see ``checkpoint.Checkpointer``)
        and, when it already holds a checkpoint of this same sweep, resume from
        the newest one that verifies: the result is bit-identical to an
        uninterrupted run. The directory is locked while the sweep runs.
      checkpoint_every: save period in steps, a multiple of ``steps // chunks``
        (default: after every chunk; only with ``checkpoint_dir``). The last step is always saved.
      restart_if_corrupt: when every checkpoint in ``checkpoint_dir`` fails
        verification, set them aside and start afresh instead of refusing.
      report: receives one line per skipped checkpoint or stale lock (default: a warning).

    Raises:
      TypeError, ValueError: a bad argument, named; a sweep too big for memory.
      checkpoint.CheckpointError: the directory is locked, holds another run, or
        holds no checkpoint that verifies.
    """
    with prepare_sweep(
        task,
        rule,
        seeds,
        steps=steps,
        chunks=chunks,
        strategy=strategy,
        batch_size=batch_size,
        mesh=mesh,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        restart_if_corrupt=restart_if_corrupt,
        report=report,
    ) as sweep:
        return sweep.run(on_chunk)
