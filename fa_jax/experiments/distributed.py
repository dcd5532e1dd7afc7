"""Sweeps over several processes (hosts): start-up, and one writer for checkpoints and outputs.

JAX's distributed runtime is the engine: every process runs the same program,
:func:`initialize` joins them (``jax.distributed.initialize``; CPU collectives go
through gloo), and a sweep's seed axis is laid out over the devices of all
processes (``jax.devices()``), so seed ``i`` trains on whichever device holds it
and the numbers equal a one-process sweep of the same seeds.

Only process 0 touches the checkpoint directory and the output files. Its
checkpointer (integrity records, the directory lock, the run identity) is the
single-process one; the other processes take part through :class:`SharedCheckpointer`:

* **save**: every process gathers the state to the host (a collective), process 0
  writes it, and its outcome (done, or the error) is broadcast, which also makes
  the save a barrier: no process trains past a checkpoint that was not written.
* **check and restore**: process 0 verifies and reads the newest checkpoint and
  broadcasts the arrays; each process places them on its devices. A refusal
  (another run's directory, a held lock, nothing that verifies) is raised on every
  process with process 0's message, so no process waits for a partner that stopped.

A killed process takes the job down (the runtime's heartbeat stops the others);
re-running the same command on every process resumes from the newest checkpoint
that verifies, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fa_jax import _checks

__all__ = [
    "ProcessError",
    "initialize",
    "is_primary",
    "agree",
    "on_primary",
    "gather",
    "broadcast",
    "SharedCheckpointer",
]

#: Environment variables the CLI reads when the flags are not given (the names JAX's launchers use).
ENVIRONMENT = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout: int = 300,
) -> bool:
    """Join this process to a multi-process job; ``True`` when it did, ``False`` when there is no job.

    Each argument left ``None`` is read from its environment variable: ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
    With none of them set, and ``auto``, JAX detects the cluster itself (Slurm, Open MPI,
    Kubernetes, Cloud TPU); without ``auto`` there is no job and nothing happens.

    Args:
      coordinator: ``host:port`` of process 0's coordination service.
      num_processes: processes in the job, >= 1.
      process_id: this process's index, in ``[0, num_processes)``.
      auto: let ``jax.distributed.initialize`` detect what is not given.
      timeout: seconds to wait for the other processes to join.

    Raises:
      TypeError, ValueError: a malformed argument or environment variable, named;
        some but not all of the three given (without ``auto``).
    """
    if jax.distributed.is_initialized():
        return True
    given: dict[str, Any] = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for name, variable in ENVIRONMENT.items():
        if given[name] is None and os.environ.get(variable, "") != "":
            given[name] = os.environ[variable] if name == "coordinator" else _env_int(variable)
    if all(v is None for v in given.values()) and not auto:
        return False
    if given["coordinator"] is not None:
        value = given["coordinator"]
        host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator: expected host:port (e.g. localhost:12355), given {value!r}")
    if given["num_processes"] is not None:
        given["num_processes"] = _checks.check_int(given["num_processes"], "num_processes", minimum=1)
    if given["process_id"] is not None:
        given["process_id"] = _checks.check_int(given["process_id"], "process_id", minimum=0)
        if given["num_processes"] is not None and given["process_id"] >= given["num_processes"]:
            raise ValueError(
                f"process_id: expected a number in [0, {given['num_processes']}), given {given['process_id']}"
            )
    missing = [name for name, value in given.items() if value is None]
    if missing and not auto:
        raise ValueError(
            f"{missing[0]}: a multi-process run needs coordinator, num_processes and process_id "
            f"(flags or {', '.join(ENVIRONMENT.values())}); {', '.join(missing)} not given"
        )
    jax.distributed.initialize(
        given["coordinator"], given["num_processes"], given["process_id"], initialization_timeout=timeout
    )
    return True


def _env_int(variable: str) -> int:
    text = os.environ[variable]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{variable}: expected an integer, given {text!r}") from None


def is_primary() -> bool:
    """Whether this is process 0, the one that writes checkpoints and outputs."""
    return jax.process_index() == 0


def _exception_types() -> dict[str, type]:
    from fa_jax.experiments import checkpoint

    types: dict[str, type] = {t.__name__: t for t in (ValueError, TypeError, OSError, FileNotFoundError)}
    types.update(
        {
            t.__name__: t
            for t in (
                checkpoint.CheckpointError,
                checkpoint.CheckpointMismatch,
                checkpoint.CheckpointCorrupt,
                checkpoint.CheckpointLocked,
            )
        }
    )
    return types


class ProcessError(RuntimeError):
    """Another process of the job stopped with an error of a type this process cannot re-create."""


def _raise_as(kind: str, message: str, what: str):
    types = _exception_types()
    if kind in types:
        raise types[kind](message)
    raise ProcessError(f"{what}: {message}")


def agree(error: BaseException | None, what: str) -> None:
    """Every process reports whether it reached this point without an error; if any did not, every process raises.

    Call it on every process at the same point (a collective): with ``error=None`` where a
    phase ended well, and with the exception where it failed (e.g. in an ``except`` clause),
    so that no process goes on to a collective a stopped partner will never join. A process
    whose phase failed raises its own error; the others raise the first failing process's
    error type and message, naming the process (:class:`ProcessError` for a type this process
    cannot re-create). One process: raises ``error`` if given, else nothing.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        own = b"" if error is None else json.dumps([type(error).__name__, str(error)]).encode()
        sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(own)))).reshape(-1)
        buffer = np.zeros(max(int(sizes.max()), 1), np.uint8)
        buffer[: len(own)] = np.frombuffer(own, np.uint8)
        messages = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), -1)
        if error is None:
            for index, size in enumerate(sizes):
                if size:
                    kind, message = json.loads(messages[index, :size].tobytes())
                    _raise_as(kind, f"{message} (process {index})", what)
    if error is not None:
        raise error


def on_primary(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on process 0; its exception, if any, raised on every process (a collective, see :func:`agree`).

    Returns ``fn()``'s result on process 0 and ``None`` elsewhere. One process: just ``fn()``.
    """
    if jax.process_count() == 1:
        return fn()
    result, error = None, None
    if is_primary():
        try:
            result = fn()
        except Exception as err:
            error = err
    agree(error, what)
    return result


def _split_keys(tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Typed PRNG keys as their raw data (collectives move plain arrays), and the inverse."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    impls = [jax.random.key_impl(x) if _checks.is_key(x) else None for x in leaves]
    raw = [jax.random.key_data(x) if impl is not None else x for x, impl in zip(leaves, impls, strict=True)]

    def join(values):
        values = jax.tree_util.tree_leaves(values)
        return jax.tree_util.tree_unflatten(
            treedef,
            [
                v if impl is None else jax.random.wrap_key_data(v, impl=impl)
                for v, impl in zip(values, impls, strict=True)
            ],
        )

    return raw, join


def gather(tree: Any) -> Any:
    """Host copies of a tree's arrays, all of them on every process (a collective across processes)."""
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    raw, join = _split_keys(tree)
    return join(multihost_utils.process_allgather(raw, tiled=True))


def broadcast(tree: Any, like: Any) -> Any:
    """Process 0's ``tree`` on every process, placed like ``like`` (same structure, shapes, shardings).

    ``tree`` is read on process 0 only (host arrays or keys); elsewhere pass ``None``.
    """
    from jax.experimental import multihost_utils

    like_raw, join = _split_keys(like)
    source = _split_keys(tree)[0] if is_primary() else [np.zeros(np.shape(x), x.dtype) for x in like_raw]
    values = [np.asarray(v) for v in multihost_utils.broadcast_one_to_all([np.asarray(x) for x in source])]
    # Each process builds its own shards (device_put would compare the values across hosts, and NaN != NaN).
    placed = [_shards_of(v, x.sharding) for v, x in zip(values, like_raw, strict=True)]
    return join(placed)


def _shards_of(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class SharedCheckpointer:
    """A :class:`~fa_jax.experiments.checkpoint.Checkpointer` on process 0 that every process calls.

    Same methods as the one-process checkpointer that a sweep
    uses (``check``, ``restore``, ``maybe_save``, ``close``), each a collective: call it on
    every process in the same order.

    Args:
      make: ``make() -> Checkpointer``, called on process 0 only (it takes the directory's lock).
    """

    def __init__(self, make: Callable[[], Any]):
        self._inner = on_primary(make, "open the checkpoint directory")
        self.every = int(_broadcast_int(self._inner.every if is_primary() else 0))

    def check(self) -> int | None:
        """Process 0's newest step that verifies, or ``None``, on every process (refusals raised on every process)."""
        step = on_primary(self._inner.check if is_primary() else lambda: None, "check the checkpoints")
        step = int(_broadcast_int(-1 if step is None else step))
        return None if step < 0 else step

    def restore(self, like: Any) -> Any | None:
        """The newest verified checkpoint, read by process 0, placed like ``like`` on every process; or ``None``."""
        restored = on_primary(lambda: self._inner.restore(like=_host_template(like)), "restore the checkpoint")
        if not int(_broadcast_int(int(restored is not None) if is_primary() else 0)):
            return None
        return broadcast(restored, like)

    def maybe_save(self, step: int, state: Any, *, final: bool = False) -> bool:
        """Gather ``state`` and let process 0 save it when ``step`` is due (or ``final``); True when it saved."""
        if not (final or step % self.every == 0):
            return False
        host = gather(state)  # every process: a collective
        on_primary(lambda: self._inner.save(step, host), f"save step {step}")
        return True

    def latest_step(self) -> int | None:
        """Process 0's newest verified step (not a collective: for messages); ``None`` on the others."""
        return self._inner.latest_step() if is_primary() else None

    def close(self) -> None:
        """Release process 0's checkpointer (its directory lock)."""
        if is_primary() and self._inner is not None:
            self._inner.close()


def _broadcast_int(value: int) -> int:
    """Process 0's integer on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _host_template(like: Any) -> Any:
    """``like`` as zeros on this process (keys stay keys): restore's template, read by process 0 alone."""
    raw, join = _split_keys(like)
    return join([np.zeros(np.shape(x), x.dtype) for x in raw])
