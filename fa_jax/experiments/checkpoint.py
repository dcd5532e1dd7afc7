"""Checkpoints of a whole training state with orbax-checkpoint: safe writes, checked restores.

A checkpoint holds every array leaf of the state pytree (for a sweep: params,
optimizer state, feedback, the data key, the step, the per-seed divergence
flags and the metrics so far) plus a small JSON record: the run's config (rule,
task, model, seeds, steps...), and the path, shape and dtype of every leaf.
The data order is ``fold_in(data_key, step)``, so the key and the step *are*
the position in the data; nothing else needs saving to resume bit for bit.

* **Safe writes.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``
  and renames it to ``<step>`` only once every file is on disk. A process
  killed mid-save leaves a temporary directory that is never listed as a step,
  so a restart restores the previous complete checkpoint. The last ``keep``
  checkpoints are kept.
* **Checked restores.** Before any array is read, the stored config and leaf
  specs are compared with the current run's; a different rule, model, seed
  list or shape raises :class:`CheckpointMismatch` naming what differs. The
  rule enters by :func:`rule_identity`: ``rule.name`` and every option of
  ``rule.config()``, callables by qualified name and arguments; an option that
  cannot be named (a lambda, a closure over an array) is refused before
  anything is saved.
* **No pickles.** Arrays go to orbax's tensorstore format, typed PRNG keys as
  their ``key_data`` (restored with ``wrap_key_data`` and the key's impl),
  metadata as JSON.
* Feedback (a :class:`fa_jax.Feedback`: B, M, keys, DFA's projection, and
  Kolen–Pollack's learned B) is restored exactly as saved; its static layout
  (taps, batch dims, exact paths) is part of the state's tree structure and is
  compared like it. Nothing here can change B.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import _checks

FORMAT = 2  # 2: fa_jax.Feedback state and rule options named by rule_identity


class CheckpointMismatch(ValueError):
    """The checkpoint on disk was written by a different run (rule, model, shapes...)."""


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
    if isinstance(value, type) and isinstance(getattr(value, "dtype", None), np.dtype):  # jnp.float32, jnp.bfloat16
        return {"dtype": str(value.dtype)}
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
    if isinstance(value, types.FunctionType):
        if "<lambda>" in name:
            raise TypeError(
                f"{where}: a lambda ({name}) cannot be named in a checkpoint's run identity; use a function "
                "defined with def, a functools.partial of one, or a dataclass"
            )
        closure = value.__closure__ or ()
        cells = {v: name_option(c.cell_contents, f"{where} (closed-over {v!r})")
                 for v, c in zip(value.__code__.co_freevars, closure)}
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


def leaf_specs(state: Any) -> list[dict]:
    """``[{"path", "shape", "dtype"}]`` of every leaf; keys as ``"key<impl>"`` dtypes."""
    specs = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if _checks.is_key(leaf):
            dtype = f"key<{jax.random.key_impl(leaf)}>"
        else:
            dtype = str(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else type(leaf).__name__
        specs.append({"path": _checks.path_str(path), "shape": list(np.shape(leaf)), "dtype": dtype})
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


def _differences(saved: dict, current: dict) -> list[str]:
    """Human-readable list of what differs between the saved run and this one."""
    problems = []
    if saved.get("format") != FORMAT:
        problems.append(f"format {saved.get('format')!r} (this version reads {FORMAT})")
    old_cfg, new_cfg = saved.get("config", {}), current["config"]
    for name in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(name) != new_cfg.get(name):
            problems.append(f"{name}: checkpoint has {old_cfg.get(name)!r}, this run has {new_cfg.get(name)!r}")
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


class Checkpointer:
    """Save and restore a state pytree under ``directory`` every ``every`` steps.

    Args:
      directory: where the steps go (created if missing).
      every: save period in steps (a positive integer).
      config: JSON-able description of the run (rule, task, model, seeds,
        steps...); a restore into a run with a different config fails.
      keep: how many complete checkpoints to keep (at least 1).

    Use::

        ckpt = Checkpointer(dir, every=100, config={"rule": "fa", ...})
        state = ckpt.restore(like=state) or state   # resume if a checkpoint exists
        ... state = run_chunk(state, n); ckpt.maybe_save(step, state)
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, config: dict, keep: int = 2):
        import orbax.checkpoint as ocp  # heavy import, only when checkpointing

        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise TypeError(f"directory: expected a path, given {directory!r}")
        self.every = _checks.check_int(every, "every", minimum=1)
        keep = _checks.check_int(keep, "keep", minimum=1)
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict, given {type(config).__name__}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = _jsonable(config)
        self._ocp = ocp
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _record(self, state: Any, step: int) -> dict:
        return {
            "format": FORMAT,
            "step": step,
            "config": self.config,
            "treedef": str(jax.tree_util.tree_structure(state)),
            "leaves": leaf_specs(state),
        }

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        self._manager.reload()
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Write ``state`` as ``step`` (atomic: all of it or, after a crash, nothing)."""
        step = _checks.check_steps(step, "step")
        if step in self._manager.all_steps():
            return  # already on disk, e.g. the final step of a resumed, finished run
        ocp = self._ocp
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(_to_numpy(state)), meta=ocp.args.JsonSave(self._record(state, step))
            ),
        )
        self._manager.wait_until_finished()

    def maybe_save(self, step: int, state: Any, *, final: bool = False) -> bool:
        """Save when ``step`` is a multiple of ``every`` (or ``final``); True when it saved."""
        if final or step % self.every == 0:
            self.save(step, state)
            return True
        return False

    def restore(self, like: Any) -> Any | None:
        """The newest checkpoint as a pytree shaped (and sharded) like ``like``, or ``None``.

        Raises:
          CheckpointMismatch: the checkpoint was written by a run with another
            config, tree structure, leaf shape or dtype; the message lists each.
        """
        step = self.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        problems = _differences(meta, self._record(like, step))
        if problems:
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not match this run: " + "; ".join(problems)
                + ". Use another --checkpoint-dir or delete this one."
            )
        leaves, treedef = jax.tree_util.tree_flatten(like)
        target = {f"leaf_{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        arrays = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=_restore_args(target)))
        )["state"]
        restored = []
        for i, like_leaf in enumerate(leaves):
            value = np.asarray(arrays[f"leaf_{i:05d}"])
            if _checks.is_key(like_leaf):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like_leaf))
            sharding = getattr(like_leaf, "sharding", None)
            restored.append(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
        return jax.tree_util.tree_unflatten(treedef, restored)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    data = jax.random.key_data(leaf) if _checks.is_key(leaf) else leaf
    return jax.ShapeDtypeStruct(np.shape(data), np.dtype(data.dtype))


def _restore_args(target: dict) -> dict:
    import orbax.checkpoint as ocp

    return {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in target}
