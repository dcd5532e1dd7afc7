"""Trace-time checks that name the layer path, what was expected and what was given."""

from __future__ import annotations

from typing import Any

import jax

from fa_jax import _checks
from fa_jax._feedback import DFAFeedback, FAFeedback, TapSpec, path_str
from fa_jax._ops import is_key


def _paths(tree: Any) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return [path_str(path) for path, _ in flat]


def check_fa(feedback: Any, params: Any, rule: str = "fa") -> None:
    """FA-family feedback (``rule`` names it in errors) must mirror ``params``; each B has its kernel's shape."""
    if not isinstance(feedback, FAFeedback):
        raise ValueError(
            f"feedback: rule {rule!r} needs FAFeedback from init_feedback({rule!r}, params, key=...), "
            f"got {type(feedback).__name__}"
        )
    have, want = _paths(feedback.kernels), _paths(params)
    if have != want:
        missing = [p for p in want if p not in have]
        extra = [p for p in have if p not in want]
        raise ValueError(
            f"feedback: {rule} feedback does not match params: "
            f"params have layers {missing[:5]} that feedback lacks, feedback has {extra[:5]} that params lack"
            if missing or extra
            else f"feedback: {rule} feedback does not match params: leaf order differs, expected {want[:5]}, given {have[:5]}"
        )

    def check(path, matrix, weight):
        if matrix is None or is_key(matrix):
            return
        _checks.check_floating(matrix, f"feedback: B for layer {path_str(path)!r}")
        if matrix.shape != weight.shape:
            raise ValueError(
                f"feedback: B for layer {path_str(path)!r}: expected shape {tuple(weight.shape)} "
                f"(the kernel's), given {tuple(matrix.shape)}"
            )

    jax.tree_util.tree_map_with_path(check, feedback.kernels, params, is_leaf=lambda x: x is None)


def check_dfa(
    feedback: Any, names: list[str], values: list[jax.Array], outputs: jax.Array, batch_dims: int, rule: str = "dfa"
) -> None:
    """Recorded taps and output must match the taps the feedback of tap rule ``rule`` (DFA, DRTP) was made for."""
    if not isinstance(feedback, DFAFeedback):
        raise ValueError(
            f"feedback: rule {rule!r} needs DFAFeedback from init_feedback({rule!r}, params, key=..., model=..., "
            f"inputs=...), got {type(feedback).__name__}"
        )
    if not values:
        raise ValueError(f"model: the model calls ops.tap nowhere; {rule} needs at least one tap to reach hidden layers")
    given = [TapSpec(n, tuple(v.shape[batch_dims:])) for n, v in zip(names, values)]
    if [t.name for t in given] != [t.name for t in feedback.taps]:
        raise ValueError(
            f"feedback: DFA taps differ from the feedback's: expected {[t.name for t in feedback.taps]}, "
            f"given {[t.name for t in given]}"
        )
    for want, got in zip(feedback.taps, given):
        if want.shape != got.shape:
            raise ValueError(f"feedback: tap {want.name!r}: expected feature shape {want.shape}, given {got.shape}")
    if tuple(outputs.shape[batch_dims:]) != feedback.output_shape:
        raise ValueError(
            f"feedback: model output: expected feature shape {feedback.output_shape}, given {tuple(outputs.shape[batch_dims:])}"
        )
    batch = tuple(outputs.shape[:batch_dims])
    for tap, value in zip(given, values):
        shape = tuple(value.shape[:batch_dims])
        if shape != batch:
            raise ValueError(f"model: tap {tap.name!r}: batch dims {shape} differ from the output's {batch}")
    projection = feedback.projection
    if not is_key(projection):
        _checks.check_floating(projection, "feedback: DFA projection")
        columns = (max if feedback.shared_prefix else sum)(t.size for t in feedback.taps)
        want = (feedback.output_size, columns)
        if tuple(projection.shape) != want:
            raise ValueError(f"feedback: DFA projection: expected shape {want}, given {tuple(projection.shape)}")
