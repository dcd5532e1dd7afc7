"""Feedback state: what a rule draws for a model, kept outside ``params``.

:class:`Feedback` holds, per parameter path, the leaf the rule stores for that
weight (B, M, a key or a stack of keys), and the rule's tap feedback (DFA's one
concatenated projection). No optimizer, weight decay or checkpoint restore of
``params`` reaches it; only :meth:`Rule.update_feedback` changes it, for the
rules that learn it (Kolen–Pollack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from fa_jax import _checks
from fa_jax._engine import _program
from fa_jax._engine._taps import TapLayout
from fa_jax._specs import layer_key
from fa_jax.rules import Rule, get_rule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Feedback:
    """A rule's feedback for one model.

    Attributes:
      weights: ``{parameter path: leaf}`` for every weight whose products use feedback.
      taps: the tap feedback of a cutting rule (e.g. DFA's projection ``(output, Σ taps)``), else ``None``.
      layout: static: the taps it was drawn for, the output and the batch dims.
      exact: static: the parameter paths marked exact (their products keep ``Wᵀ``).
    """

    weights: dict = dataclasses.field(default_factory=dict)
    taps: Any = None
    layout: TapLayout | None = dataclasses.field(default=None, metadata=dict(static=True))
    exact: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    def weight_leaves(self, paths: list[str]) -> list[Any]:
        """The leaf of each parameter path (``None`` where the weight has no feedback)."""
        return [self.weights.get(p) for p in paths]


def init_feedback(
    rule: Rule | str,
    params: Any,
    *,
    key: jax.Array | None = None,
    model: Callable,
    inputs: Any,
    exact: Any = (),
    dtype: Any = None,
    model_has_aux: bool = False,
) -> Feedback:
    """The feedback ``rule`` needs to train ``model``, kept outside ``params``.

    The model's program is traced once, abstractly (no FLOPs): every weight
    product gets the rule's leaf for its parameter, keyed by
    ``layer_key(key, path)``; a cutting rule gets feedback for the taps it finds.

    Args:
      rule: a rule or its name.
      params: the model's params (arrays or ``jax.ShapeDtypeStruct``).
      key: a typed PRNG key (``jax.random.key(seed)``); keyword-only. Needed by
        every rule that draws feedback.
      model: ``model(params, inputs) -> outputs``, any JAX function.
      inputs: an example batch.
      exact: parameters whose products keep ``Wᵀ`` (paths, or ``predicate(path)``).
      dtype: storage dtype of the drawn matrices (default: each weight's dtype).
      model_has_aux: the model returns ``(outputs, aux)``; only ``outputs`` are projected from.
    """
    rule = get_rule(rule)
    _checks.check_callable(model, "model")
    _checks.check_array_tree(params, "params")
    _checks.check_array_tree(inputs, "inputs")
    if key is not None:
        _checks.check_key(key, "key")
    if dtype is not None:
        _checks.check_dtype(dtype, "dtype")
    program = _program.analyse(model, params, inputs, exact=exact, model_has_aux=model_has_aux)
    _program.enforce(program, rule)
    weights = {}
    for spec in program.specs.values():
        if dtype is not None:
            spec = spec._replace(dtype=dtype)
        leaf = rule.init_weight(spec, key=None if key is None else layer_key(key, spec.path))
        if leaf is not None:
            weights[spec.path] = leaf
    layout, taps = None, None
    if rule.cuts:
        batch_dims = _program.find_batch_dims(
            model, params, inputs, program, rule.taps, exact=exact, asked=rule.batch_dims, mix=rule.mix_batch
        )
        layout = _program.tap_layout(program, rule.taps, batch_dims)
        taps = rule.init_taps(layout, key=key, dtype=dtype)
    marked = tuple(program.paths[i] for i in sorted(program.exact))
    return Feedback(weights, taps, layout, marked)


def update_feedback(rule: Rule | str, feedback: Feedback, updates: Any, params: Any) -> Feedback:
    """The feedback after one training step: :meth:`Rule.update_feedback` (learned for Kolen–Pollack, else unchanged).

    Args:
      updates: what the optimizer adds to ``params`` this step (optax's ``updates``).
      params: the params *before* the update.
    """
    rule = get_rule(rule)
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback: expected a Feedback from init_feedback, given {_checks.describe(feedback)}")
    return rule.update_feedback(feedback, updates=updates, params=params)


def shard_feedback(feedback: Feedback, params: Any) -> Feedback:
    """``feedback`` laid out like ``params``: each stored B (or M) with its weight's sharding.

    A matrix with its weight's shape follows that weight (a kernel sharded over a
    ``model`` axis keeps its B sharded the same way, so no step gathers it); keys,
    per-layer scales and a tap rule's projection are replicated on the same mesh
    (the projection ``e [B_1 … B_L]`` then needs no communication under data
    parallelism: every device projects its own rows of ``e``).

    Args:
      feedback: from :func:`init_feedback`.
      params: the params, already placed (``jax.device_put`` with a ``NamedSharding``).
    """
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback: expected a Feedback from init_feedback, given {_checks.describe(feedback)}")
    placed = by_path(params)
    mesh = None
    for leaf in placed.values():
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            mesh = sharding.mesh
            break
    if mesh is None:
        raise ValueError(
            "params: expected arrays placed with a NamedSharding (jax.device_put(x, NamedSharding(mesh, spec)))"
        )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, leaf):
        param = placed.get(path)
        if param is not None and not _checks.is_key(leaf) and tuple(leaf.shape) == tuple(param.shape):
            return jax.device_put(leaf, param.sharding)
        return jax.device_put(leaf, replicated)

    weights = {
        path: jax.tree.map(lambda leaf, p=path: place(p, leaf), value) for path, value in feedback.weights.items()
    }
    taps = jax.tree.map(lambda leaf: jax.device_put(leaf, replicated), feedback.taps)
    return dataclasses.replace(feedback, weights=weights, taps=taps)


def by_path(tree: Any) -> dict[str, Any]:
    """``{parameter path: leaf}`` of a params-shaped tree (paths as the engine names them)."""
    return {_program.param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_weights(program: _program.Program, rule: Rule, dtypes: dict[str, Any]) -> dict[str, Any]:
    """The abstract leaf ``rule`` stores for each weight of ``program`` (``None`` entries dropped)."""
    found = {}
    key = jax.random.key(0)
    for spec in program.specs.values():
        if spec.path in dtypes:
            spec = spec._replace(dtype=dtypes[spec.path])
        leaf = jax.eval_shape(lambda s=spec: rule.init_weight(s, key=key))
        if leaf is not None:
            found[spec.path] = leaf
    return found


def check(program: _program.Program, rule: Rule, feedback: Any) -> Feedback:
    """``feedback`` fits ``program`` under ``rule``: every weight and tap it needs, with their shapes."""
    _program.enforce(program, rule)
    if feedback is None:
        feedback = Feedback()
    if not isinstance(feedback, Feedback):
        raise TypeError(
            f"feedback: rule {rule.name!r} expected a Feedback from init_feedback({rule.name!r}, params, key=..., "
            f"model=..., inputs=...), given {_checks.describe(feedback)}"
        )
    given = feedback.weights
    dtypes = {p: leaf.dtype for p, leaf in given.items() if _checks.is_array(leaf) and not _checks.is_key(leaf)}
    want = expected_weights(program, rule, dtypes)
    missing = [p for p in want if p not in given]
    extra = [p for p in given if p not in want]
    if missing or extra:
        made = f"init_feedback({rule.name!r}, params, key=..., model=..., inputs=...)"
        raise ValueError(
            f"feedback: rule {rule.name!r} needs feedback for the weights {missing[:5]} that it lacks"
            + (f", and has {extra[:5]} that this model does not use as weights" if extra else "")
            + f"; draw it with {made} for this model and these params"
        )
    for path, struct in want.items():
        if not _same_kind(struct, given[path]):
            raise ValueError(
                f"feedback for {path!r}: rule {rule.name!r} expected {_describe(struct)}, "
                f"given {_describe(given[path])}"
            )
    if rule.cuts:
        if feedback.layout is None:
            raise ValueError(
                f"feedback: rule {rule.name!r} cuts the model at taps; expected a Feedback with their layout from "
                f"init_feedback({rule.name!r}, params, key=..., model=..., inputs=...), given one without"
            )
        check_layout(program, rule, feedback.layout)
    return feedback


def _same_kind(want: Any, leaf: Any) -> bool:
    """The same tree of arrays, each of the same shape and the same kind (key or not); dtypes may differ."""
    if jax.tree.structure(want) != jax.tree.structure(leaf):  # type: ignore[operator]  # jax PyTreeDef stub unresolved
        return False
    return all(
        _checks.is_array(b) and _checks.is_key(a) == _checks.is_key(b) and tuple(a.shape) == tuple(b.shape)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(leaf), strict=True)
    )


def _describe(tree: Any) -> str:
    leaves = jax.tree.leaves(tree)
    return (
        _checks.describe(tree)
        if _checks.is_array(tree)
        else f"{jax.tree.structure(tree)} of {[_checks.describe(leaf) for leaf in leaves]}"
    )


def check_layout(program: _program.Program, rule: Rule, layout: TapLayout) -> None:
    """The taps met now are the ones the feedback was drawn for, with the same feature shapes."""
    now = _program.tap_layout(program, rule.taps, layout.batch_dims)
    names, given = [t.name for t in layout.taps], [t.name for t in now.taps]
    if names != given:
        raise ValueError(f"feedback: rule {rule.name!r}: expected taps {names}, the model now has {given}")
    for want, got in zip(layout.taps, now.taps, strict=True):
        if (want.shape, want.stack) != (got.shape, got.stack):
            raise ValueError(
                f"feedback: tap {want.name!r}: expected feature shape {want.shape} (stack {want.stack}), "
                f"given {got.shape} (stack {got.stack})"
            )
    if now.output != layout.output:
        raise ValueError(
            f"feedback: model output: expected feature shape {layout.output.shape}, given {now.output.shape}"
        )
    out = _program.single_output(program)
    for _, name, aval, _ in program.taps(rule.taps):
        if tuple(aval.shape[: layout.batch_dims]) != tuple(out.shape[: layout.batch_dims]):
            raise ValueError(
                f"model: tap {name!r}: batch dims {tuple(aval.shape[: layout.batch_dims])} differ from the output's "
                f"{tuple(out.shape[: layout.batch_dims])}"
            )
