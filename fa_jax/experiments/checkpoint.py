"""Checkpoints of a whole training state with orbax-checkpoint: safe writes, verified and checked restores, one writer.

A checkpoint holds every array leaf of the state pytree (for a sweep: params,
optimizer state, feedback, the data key, the step, the per-seed divergence
flags and the metrics so far) plus a small JSON record: the run's identity
(rule and options, task and options, a digest of the data, seeds, steps, device
count...), and the path, shape, dtype and SHA-256 of every leaf.
The data order is ``fold_in(data_key, step)``, so the key and the step *are*
the position in the data; nothing else needs saving to resume bit for bit.

* **Safe writes.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``
  and renames it to ``<step>`` only once every file is on disk; then an
  integrity record (``<step>/fa_jax_integrity.json``: size and SHA-256 of every
  file of the step, itself digested) is written beside it and renamed into
  place. A step without its record was cut short and is never loaded. The last
  ``keep`` checkpoints are kept.
* **Verified restores.** Newest first, a step must pass its integrity record
  (no file missing, truncated or changed), its JSON record must parse, and
  every restored leaf must match its recorded SHA-256 (orbax checks its index,
  not the data chunks). A step that fails is reported in one line (the step and
  what failed) and the next older one is tried; with none left the restore
  refuses (:class:`CheckpointCorrupt`) unless told to start afresh. Unusable
  steps are renamed ``<step>.corrupt-<n>`` before the next save, never deleted.
* **Checked restores.** Before any array is read, the stored identity and leaf
  specs are compared with the current run's; a different rule, model, data,
  seed list or shape raises :class:`CheckpointMismatch` naming what differs. The
  rule enters by :func:`rule_identity`: ``rule.name`` and every option of
  ``rule.config()``, callables by qualified name and arguments; an option that
  cannot be named (a lambda, a closure over an array) is refused before
  anything is saved.
* **One writer.** A :class:`DirectoryLock` (``fa_jax.lock``, an ``flock`` that
  the kernel releases when its process dies) is held while a
  :class:`Checkpointer` is open; a second process is refused with the holder's
  pid, host, start time and command. A lock left by a killed process is free
  and is taken over (and said so).
* **No pickles.** Arrays go to orbax's tensorstore format, typed PRNG keys as
  their ``key_data`` (restored with ``wrap_key_data`` and the key's impl),
  metadata as JSON.
* Feedback (a :class:`fa_jax.Feedback`: B, M, keys, DFA's projection, and
  Kolen–Pollack's learned B) is restored exactly as saved; its static layout
  (taps, batch dims, exact paths) is part of the state's tree structure and is
  compared like it. Nothing here can change B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import json
import logging
import numbers
import os
import socket
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import _checks

FORMAT = 3  # 3: integrity records, leaf digests, data content and device count in the identity
INTEGRITY = "fa_jax_integrity.json"  # per step: size and SHA-256 of every file
LOCK = "fa_jax.lock"  # per directory: the flock and its holder


class CheckpointError(Exception):
    """A checkpoint directory cannot be used as asked; the message is one line saying why and what to do."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The checkpoint on disk was written by a different run (rule, model, data, shapes...)."""


class CheckpointCorrupt(CheckpointError):
    """Every checkpoint in the directory failed verification, and starting afresh was not allowed."""


class CheckpointLocked(CheckpointError):
    """Another live process holds the directory's lock."""


class CheckpointWarning(UserWarning):
    """An unusable checkpoint was skipped, or a stale lock taken over."""


def _warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def one_line(text: Any, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def leaf_digest(leaf: Any) -> str:
    """SHA-256 of a leaf's dtype, shape and bytes (typed keys: their ``key_data``)."""
    data = np.ascontiguousarray(np.asarray(jax.device_get(jax.random.key_data(leaf) if _checks.is_key(leaf) else leaf)))
    head = f"{data.dtype.str}{list(data.shape)}".encode()
    return _sha256_bytes(head + data.tobytes())


def data_fingerprint(tree: Any) -> str:
    """``"sha256:<hex>"`` of a data pytree's content: every leaf's path, dtype, shape and bytes.

    Two runs on the same numbers have the same fingerprint wherever the file
    lives; permuting one label changes it.
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        digest.update(_checks.path_str(path).encode() + b"\0" + leaf_digest(leaf).encode())
    return "sha256:" + digest.hexdigest()


def _qualified(value: Any) -> str | None:
    """``module.qualname`` of a function or class, ``None`` when it has none."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if qualname is None:
        qualname = getattr(value, "__name__", None)
    return None if not (isinstance(module, str) and isinstance(qualname, str)) else f"{module}.{qualname}"


def name_option(value: Any, where: str) -> Any:
    """A JSON value that names ``value`` (a rule option) by what it is, not where it lives in memory.

    Scalars and strings are themselves; dtypes their name; sequences and string-keyed
    dicts element by element; a dataclass (e.g. ``fa_jax.Tiled(rows=8)``) its class and
    fields; ``functools.partial`` its function, args and keywords; a function its
    qualified name, plus the values it closes over (``jax.nn.initializers.lecun_normal()``
    is ``variance_scaling.<locals>.init`` over ``scale=1.0, mode='fan_in', …``).

    Raises:
      TypeError: ``value`` (or something inside it) cannot be named: a lambda, an
        array, an object of another kind. The message names ``where``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return {"dtype": str(np.dtype(value))}
    dtype = getattr(value, "dtype", None) if isinstance(value, type) else None
    if isinstance(dtype, np.dtype):  # jnp.float32, jnp.bfloat16
        return {"dtype": str(dtype)}
    if _checks.is_array(value):
        raise TypeError(
            f"{where}: an array ({_checks.describe(value)}) cannot be named in a checkpoint's run identity; pass "
            "what it is built from (a seed, a shape, an initializer) instead"
        )
    if isinstance(value, (tuple, list)):
        return [name_option(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: name_option(v, f"{where}[{k!r}]") for k, v in sorted(value.items())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: name_option(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return {"class": _qualified(type(value)), "fields": fields}
    if isinstance(value, functools.partial):
        return {
            "partial": name_option(value.func, f"{where}.func"),
            "args": [name_option(a, f"{where}.args[{i}]") for i, a in enumerate(value.args)],
            "keywords": {k: name_option(v, f"{where}.keywords[{k!r}]") for k, v in sorted(value.keywords.items())},
        }
    name = _qualified(value) if callable(value) else None
    if isinstance(value, types.FunctionType) and name is not None:  # one without a module is refused below
        if "<lambda>" in name:
            raise TypeError(
                f"{where}: a lambda ({name}) cannot be named in a checkpoint's run identity; use a function "
                "defined with def, a functools.partial of one, or a dataclass"
            )
        closure = value.__closure__ or ()
        cells = {
            v: name_option(c.cell_contents, f"{where} (closed-over {v!r})")
            for v, c in zip(value.__code__.co_freevars, closure, strict=True)
        }
        return {"function": name, "closure": cells} if cells else {"function": name}
    if isinstance(value, (types.BuiltinFunctionType, np.ufunc)) or (name is not None and isinstance(value, type)):
        return {"function": name}
    if name is not None and "<" not in name:
        return {"function": name}  # a module-level callable object (jax.nn.relu, a jitted function)
    raise TypeError(
        f"{where}: cannot name a {type(value).__qualname__} in a checkpoint's run identity; expected "
        "a number, a string, a dtype, a function defined with def, a functools.partial of one, or a dataclass"
    )


def rule_identity(rule: Any) -> dict:
    """``{"name": rule.name, "config": {option: named value}}``: what a checkpoint records of the rule.

    Every option of ``rule.config()`` is named by :func:`name_option`, so
    ``FA(init=fa_jax.xavier())`` and ``FA()`` are different runs.

    Raises:
      TypeError: an option cannot be named (the message names the rule and the option).
    """
    return {
        "name": rule.name,
        "config": {k: name_option(v, f"rule {rule.name!r} option {k}") for k, v in sorted(rule.config().items())},
    }


def task_identity(task: Any) -> dict:
    """``{"name", "options", "data_content"}`` of a task: its named options and its data's fingerprint.

    Raises:
      TypeError: an option cannot be named (see :func:`name_option`).
    """
    options = getattr(task, "options", None) or {}
    return {
        "name": task.name,
        "options": {k: name_option(v, f"task {task.name!r} option {k}") for k, v in sorted(options.items())},
        "data_content": data_fingerprint(task.data),
    }


def leaf_specs(state: Any, *, digests: bool = False) -> list[dict]:
    """``[{"path", "shape", "dtype"}]`` of every leaf (plus ``"sha256"`` with ``digests``);
    keys as ``"key<impl>"`` dtypes."""
    specs = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if _checks.is_key(leaf):
            dtype = f"key<{jax.random.key_impl(leaf)}>"
        else:
            dtype = str(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else type(leaf).__name__
        spec = {"path": _checks.path_str(path), "shape": list(np.shape(leaf)), "dtype": dtype}
        if digests:
            spec["sha256"] = leaf_digest(leaf)
        specs.append(spec)
    return specs


def _to_numpy(state: Any) -> dict[str, np.ndarray]:
    """Flat ``{"leaf_00000": array}``; keys become their raw ``key_data``."""
    leaves = jax.tree_util.tree_leaves(state)
    leaves = [jax.random.key_data(x) if _checks.is_key(x) else x for x in leaves]
    leaves = jax.device_get(leaves)
    return {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}


def _jsonable(value: Any) -> Any:
    """Round-trip ``value`` through JSON (tuples become lists) so saved and live configs compare equal."""
    return json.loads(json.dumps(value, default=str))


_ABSENT = object()


def _show(value: Any) -> str:
    return "nothing" if value is _ABSENT else one_line(repr(value), 120)


def _diff(where: str, old: Any, new: Any, out: list[str]) -> None:
    """Append ``"where.key: checkpoint has X, this run has Y"`` for every leaf-level difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            _diff(f"{where}.{key}", old.get(key, _ABSENT), new.get(key, _ABSENT), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and len(old) <= 16:
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(f"{where}[{i}]", a, b, out)
    elif old != new:
        hint = ""
        if where == "devices":
            hint = f" (resume with the same device count, e.g. --devices {old})"
        elif where == "task.data_content":
            hint = " (the data's content changed)"
        out.append(f"{where}: checkpoint has {_show(old)}, this run has {_show(new)}{hint}")


def _differences(saved: dict, current: dict) -> list[str]:
    """Human-readable list of what differs between the saved run and this one."""
    problems = []
    if saved.get("format") != FORMAT:
        problems.append(f"format {saved.get('format')!r} (this version reads {FORMAT})")
    old_cfg, new_cfg = saved.get("config", {}), current["config"]
    for name in sorted(set(old_cfg) | set(new_cfg)):
        _diff(name, old_cfg.get(name, _ABSENT), new_cfg.get(name, _ABSENT), problems)
    if "leaves" not in current:  # identity only (before the state exists)
        return problems
    old_leaves = {s["path"]: s for s in saved.get("leaves", [])}
    new_leaves = {s["path"]: s for s in current["leaves"]}
    missing = [p for p in new_leaves if p not in old_leaves]
    extra = [p for p in old_leaves if p not in new_leaves]
    if missing:
        problems.append(f"state leaves {missing[:5]} are not in the checkpoint")
    if extra:
        problems.append(f"the checkpoint has state leaves {extra[:5]} that this run lacks")
    for path, spec in new_leaves.items():
        old = old_leaves.get(path)
        if old is None:
            continue
        for field in ("shape", "dtype"):
            if old[field] != spec[field]:
                problems.append(f"{path}: checkpoint {field} {old[field]}, this run {spec[field]}")
    if not problems and saved.get("treedef") != current["treedef"]:
        problems.append("the state's tree structure differs (same leaves, different containers)")
    return problems


# ----------------------------------------------------------------------------- integrity records


def _step_files(step_dir: str) -> list[str]:
    """Every regular file under ``step_dir`` (relative, sorted), the integrity record excepted."""
    found = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if not rel.startswith(INTEGRITY):
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_integrity(step_dir: str) -> dict:
    """Record size and SHA-256 of every file of a written step, atomically (temporary file, fsync, rename)."""
    files = {
        rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256_file(os.path.join(step_dir, rel))}
        for rel in _step_files(step_dir)
    }
    record = {"format": FORMAT, "files": files}
    record["digest"] = _sha256_bytes(_canonical(record))  # of everything but itself
    tmp = os.path.join(step_dir, INTEGRITY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, INTEGRITY))
    _fsync_dir(step_dir)
    return record


def _json_problem(path: str) -> str:
    """``" (not valid JSON)"`` when a changed file no longer parses, else ``""``."""
    if not path.endswith(("metadata", ".json")):
        return ""
    try:
        with open(path) as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError, OSError):
        return " (not valid JSON)"
    return ""


def check_integrity(step_dir: str) -> str | None:
    """``None`` when every file of the step matches its integrity record, else one line saying what failed."""
    if not os.path.isdir(step_dir):
        return "not a directory"
    if not os.listdir(step_dir):
        return "empty directory (no checkpoint was written there)"
    path = os.path.join(step_dir, INTEGRITY)
    if not os.path.exists(path):
        return f"no {INTEGRITY} (the write was cut short, or not written by this version of fa_jax)"
    try:
        with open(path) as f:
            record = json.load(f)
        files = record["files"]
        body = {k: v for k, v in record.items() if k != "digest"}
        ok = isinstance(files, dict) and record.get("digest") == _sha256_bytes(_canonical(body))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        return f"{INTEGRITY} is unreadable ({one_line(err, 80)})"
    if not ok:
        return f"{INTEGRITY} does not match its own digest (corrupted)"
    if record.get("format") != FORMAT:
        return f"{INTEGRITY} has format {record.get('format')!r}, this version of fa_jax reads {FORMAT}"
    tops = {rel.split("/")[0] for rel in files}
    for top in ("meta", "state"):
        if top in tops and not os.path.isdir(os.path.join(step_dir, top)):
            return f"{top}/ is missing"
    for rel, entry in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        try:
            size, want = int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{INTEGRITY} has a malformed entry for {rel}"
        if not os.path.isfile(full):
            return f"{rel} is missing"
        actual = os.path.getsize(full)
        if actual < size:
            return f"{rel} is truncated ({actual} of {size} bytes){_json_problem(full)}"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written{_json_problem(full)}"
        if _sha256_file(full) != want:
            return f"{rel} does not match its SHA-256 (corrupted){_json_problem(full)}"
    if not {"meta", "state"} <= tops:
        return f"the integrity record lists no {' or '.join(sorted({'meta', 'state'} - tops))}/ files"
    return None


# ----------------------------------------------------------------------------- one writer


_HELD: dict[str, list] = {}  # lock path -> [fd, count]: locks this process holds (shared by its Checkpointers)


def _holder_text(info: Any) -> str:
    if not isinstance(info, dict):
        return "an unknown process"
    command = one_line(info.get("command", ""), 120)
    return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}" + (
        f", running {command!r}" if command else ""
    )


def _read_holder(fd: int) -> Any:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw.decode()) if raw.strip() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return "unreadable"


def _command_line() -> str:
    """This process's command, as typed: ``python -m fa_jax run ...`` rather than ``.../__main__.py run ...``."""
    argv = list(sys.argv) or [""]
    head = argv[0]
    if head.endswith("__main__.py"):
        head = f"python -m {os.path.basename(os.path.dirname(head))}"
    else:
        head = os.path.basename(head)
    return " ".join([head, *argv[1:]])


class DirectoryLock:
    """An exclusive lock on a directory: ``flock`` on ``<directory>/fa_jax.lock``, which names its holder.

    The kernel drops an ``flock`` when its process dies (SIGKILL included), so a
    lock file left by a killed run is free: the next run takes it over and
    ``report`` says whose it was. Within one process the lock is shared (counted),
    so several :class:`Checkpointer` objects on one directory do not block each other.

    Raises (from :meth:`acquire`):
      CheckpointLocked: a live process holds it; the message names its pid,
        host, start time and command.
    """

    def __init__(self, directory: str | os.PathLike, *, report: Callable[[str], None] | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        self.path = os.path.join(self.directory, LOCK)
        self._report = _warn if report is None else report
        self._held = False

    def acquire(self) -> DirectoryLock:
        if self._held:
            return self
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._held = True
            return self
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CheckpointLocked(
                    f"checkpoint directory {self.directory} is in use by another run ({_holder_text(holder)}); "
                    "wait for it to finish or use another --checkpoint-dir"
                ) from None
            raise CheckpointLocked(f"cannot lock checkpoint directory {self.directory}: {one_line(err, 120)}") from None
        previous = _read_holder(fd)
        if previous is not None and not (isinstance(previous, dict) and previous.get("pid") == os.getpid()):
            self._report(
                f"took over the stale lock on {self.directory} left by {_holder_text(previous)} "
                "(that process no longer holds it)"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": _command_line(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        _HELD[key] = [fd, 1]
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        key = os.path.realpath(self.path)
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            import fcntl

            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(entry[0], 0)  # free and empty: the next holder has nobody to report
                fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter exit the modules may be gone; the kernel frees the lock
            pass


def _drop_closed_loop_noise() -> None:
    """After a failed read, tensorstore's other pending reads finish into orbax's closed event loop and
    print "Exception ignored ... Event loop is closed" tracebacks; the failure is already reported in one line."""
    if not isinstance(sys.unraisablehook, _LoopClosedHook):
        sys.unraisablehook = _LoopClosedHook(sys.unraisablehook)


class _LoopClosedHook:
    """``sys.unraisablehook`` dropping "Event loop is closed" and passing the rest to the hook it replaced."""

    def __init__(self, previous: Callable[[Any], object]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        self.previous(unraisable)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs absl warnings (e.g. a step without its metadata file); our checks report those in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Checkpointer:
    """Save and restore a state pytree under ``directory`` every ``every`` steps.

    Args:
      directory: where the steps go (created if missing); locked while this
        object is open (:class:`DirectoryLock`; :meth:`close` releases it).
      every: save period in steps (a positive integer).
      config: JSON-able description of the run (rule, task, data, seeds,
        steps...); a restore into a run with a different config fails.
      keep: how many complete checkpoints to keep (at least 1).
      restart_if_corrupt: when every checkpoint on disk fails verification,
        start afresh (they are set aside as ``<step>.corrupt-<n>``) instead of
        raising :class:`CheckpointCorrupt`.
      report: called with one line for each skipped checkpoint or stale lock
        (default: ``warnings.warn`` with :class:`CheckpointWarning`).

    Use::

        with Checkpointer(dir, every=100, config={"rule": "fa", ...}) as ckpt:
            state = ckpt.restore(like=state) or state   # resume if a checkpoint exists
            ... state = run_chunk(state, n); ckpt.maybe_save(step, state)

    Raises:
      CheckpointLocked: another live process holds ``directory``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int,
        config: dict,
        keep: int = 2,
        restart_if_corrupt: bool = False,
        report: Callable[[str], None] | None = None,
    ):
        import orbax.checkpoint as ocp  # heavy import, only when checkpointing

        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise TypeError(f"directory: expected a path, given {directory!r}")
        self.every = _checks.check_int(every, "every", minimum=1)
        keep = _checks.check_int(keep, "keep", minimum=1)
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict, given {type(config).__name__}")
        _checks.check_bool(restart_if_corrupt, "restart_if_corrupt")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} is a file, not a directory")
        self.config = _jsonable(config)
        self.restart_if_corrupt = restart_if_corrupt
        self._report = _warn if report is None else report
        self._ocp = ocp
        self.unusable: dict[int, str] = {}  # step -> what failed, from the last restore
        os.makedirs(self.directory, exist_ok=True)
        self._lock = DirectoryLock(self.directory, report=self._report).acquire()
        # In a multi-process job only process 0 opens a Checkpointer (distributed.SharedCheckpointer): orbax must
        # not wait for the others at its barriers.
        alone = (
            ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
            if jax.process_count() > 1
            else None
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            create=alone is None,
            cleanup_tmp_directories=True,
            **({} if alone is None else {"multiprocessing_options": alone}),
        )
        with _quiet_orbax():
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def close(self) -> None:
        """Release the directory's lock and orbax's manager (the object cannot save afterwards)."""
        self._lock.release()
        manager, self._manager = getattr(self, "_manager", None), None
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, state: Any, step: int, *, digests: bool = False) -> dict:
        return {
            "format": FORMAT,
            "step": step,
            "config": self.config,
            "treedef": str(jax.tree_util.tree_structure(state)),
            "leaves": leaf_specs(state, digests=digests),
        }

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def steps_on_disk(self) -> list[int]:
        """Every ``<step>`` entry in the directory, newest first (verified or not)."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return sorted((int(n) for n in names if n.isdigit()), reverse=True)

    def latest_step(self) -> int | None:
        """The newest step whose files pass their integrity record, or ``None`` (arrays are not read)."""
        for step in self.steps_on_disk():
            if check_integrity(self._step_dir(step)) is None:
                return step
        return None

    def verify(self) -> dict[int, str | None]:
        """``{step: None or what failed}`` for every step on disk: files against their record, and the JSON record."""
        records = {step: self._check_meta(step) for step in self.steps_on_disk()}
        return {step: record if isinstance(record, str) else None for step, record in records.items()}

    def _check_meta(self, step: int) -> dict | str:
        """The step's JSON record, or what failed (its files' integrity, reading it, its form)."""
        problem = check_integrity(self._step_dir(step))
        if problem is not None:
            return problem
        ocp = self._ocp
        try:
            with _quiet_orbax():
                meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # any failure to read is reported, in one line
            return f"meta/ is unreadable ({type(err).__name__}: {one_line(err, 120)})"
        if not isinstance(meta, dict) or not isinstance(meta.get("leaves"), list):
            return "meta/metadata is not a checkpoint record"
        return meta

    def _read_state(self, step: int, like: Any, meta: dict) -> tuple[Any, str | None]:
        ocp = self._ocp
        leaves, treedef = jax.tree_util.tree_flatten(like)
        target = {f"leaf_{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        try:
            with _quiet_orbax():
                arrays = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=_restore_args(target))),
                )["state"]
        except Exception as err:  # a damaged file can fail inside tensorstore in many ways
            _drop_closed_loop_noise()
            return None, f"state/ is unreadable ({type(err).__name__}: {one_line(err, 120)})"
        restored = []
        for i, (like_leaf, spec) in enumerate(zip(leaves, meta["leaves"], strict=True)):
            value = np.asarray(arrays[f"leaf_{i:05d}"])
            if _checks.is_key(like_leaf):
                value = jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(like_leaf))
            if leaf_digest(value) != spec.get("sha256"):
                return None, f"leaf {spec['path']} does not match its recorded SHA-256 (corrupted)"
            sharding = getattr(like_leaf, "sharding", None)
            restored.append(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
        return jax.tree_util.tree_unflatten(treedef, restored), None

    def _mismatch(self, step: int, differences: list[str]) -> CheckpointMismatch:
        return CheckpointMismatch(
            f"checkpoint {self._step_dir(step)} does not match this run: "
            + "; ".join(differences[:8])
            + ". Use another --checkpoint-dir or delete this one."
        )

    def _corrupt(self, unusable: dict[int, str]) -> CheckpointCorrupt:
        listed = "; ".join(f"step {s}: {p}" for s, p in unusable.items())
        return CheckpointCorrupt(
            f"no usable checkpoint in {self.directory} ({listed}); re-run with --restart-if-corrupt "
            "(restart_if_corrupt=True) to set them aside and start afresh"
        )

    def check(self) -> int | None:
        """Before any state exists: the newest step whose files and record verify, or ``None``.

        Cheap (no array is read), so a run can be refused before it compiles anything.
        Reports nothing; :meth:`restore` reports what it skips.

        Raises:
          CheckpointMismatch: that step's recorded run identity differs from ``config``.
          CheckpointCorrupt: no step verifies (and ``restart_if_corrupt`` is off).
        """
        unusable: dict[int, str] = {}
        for step in self.steps_on_disk():
            meta = self._check_meta(step)
            if isinstance(meta, str):
                unusable[step] = meta
                continue
            differences = _differences(meta, {"config": self.config})
            if differences:
                raise self._mismatch(step, differences)
            return step
        if unusable and not self.restart_if_corrupt:
            raise self._corrupt(unusable)
        return None

    def restore(self, like: Any) -> Any | None:
        """The newest verified checkpoint as a pytree shaped (and sharded) like ``like``, or ``None``.

        Steps that fail verification are reported (one line each) and skipped;
        :attr:`unusable` lists them, and they are set aside before the next save.

        Raises:
          CheckpointMismatch: the newest verified checkpoint was written by a run
            with another config, tree structure, leaf shape or dtype; the message lists each.
          CheckpointCorrupt: there are checkpoints but none passes verification
            (and ``restart_if_corrupt`` is off); the message lists what failed.
        """
        self.unusable = {}
        with _quiet_orbax():
            self._manager.reload()
        for step in self.steps_on_disk():
            meta = self._check_meta(step)
            if isinstance(meta, str):
                problem = meta
            else:
                differences = _differences(meta, self._record(like, step))
                if differences:
                    raise self._mismatch(step, differences)
                state, read_problem = self._read_state(step, like, meta)
                if read_problem is None:
                    if self.unusable:
                        self._report(
                            f"resuming from step {step}, the newest checkpoint in {self.directory} that verifies"
                        )
                    return state
                problem = read_problem
            self.unusable[step] = problem
            self._report(f"checkpoint {self._step_dir(step)} is unusable: {problem}")
        if self.unusable and not self.restart_if_corrupt:
            raise self._corrupt(self.unusable)
        if self.unusable:
            self._report(f"starting afresh in {self.directory}: no checkpoint there verifies")
        return None

    def _set_aside(self, step: int) -> None:
        source = self._step_dir(step)
        if not os.path.lexists(source):
            return
        n = 0
        while os.path.lexists(f"{source}.corrupt-{n}"):
            n += 1
        os.rename(source, f"{source}.corrupt-{n}")
        self._report(f"set aside unusable checkpoint {source} as {os.path.basename(source)}.corrupt-{n}")

    def save(self, step: int, state: Any) -> None:
        """Write ``state`` as ``step`` (atomic: all of it or, after a crash, a step that never verifies)."""
        step = _checks.check_steps(step, "step")
        for bad in sorted(self.unusable):
            self._set_aside(bad)
        self.unusable = {}
        step_dir = self._step_dir(step)
        if os.path.lexists(step_dir):
            if check_integrity(step_dir) is None:
                return  # already on disk, e.g. the final step of a resumed, finished run
            self._set_aside(step)  # a stray or half-committed step of that name
        with _quiet_orbax():
            self._manager.reload()
            newer = [s for s in self.steps_on_disk() if s > step]
            if newer:
                raise CheckpointError(
                    f"cannot save step {step} in {self.directory}: it already holds a later step {newer[0]}"
                )
            ocp = self._ocp
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(_to_numpy(state)),
                    meta=ocp.args.JsonSave(self._record(state, step, digests=True)),
                ),
            )
            self._manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"orbax declined to save step {step} in {self.directory}")
        write_integrity(step_dir)

    def maybe_save(self, step: int, state: Any, *, final: bool = False) -> bool:
        """Save when ``step`` is a multiple of ``every`` (or ``final``); True when it saved."""
        if final or step % self.every == 0:
            self.save(step, state)
            return True
        return False


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    data = jax.random.key_data(leaf) if _checks.is_key(leaf) else leaf
    return jax.ShapeDtypeStruct(np.shape(data), np.dtype(data.dtype))


def _restore_args(target: dict) -> dict:
    import orbax.checkpoint as ocp

    return {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in target}
