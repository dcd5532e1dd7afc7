"""Pieces shared by the Flax adapters (``fa_jax.nnx`` and ``fa_jax.linen``).

* Feedback primitives with the signatures of ``lax.dot_general``,
  ``lax.conv_general_dilated`` and ``jnp.einsum``. A Flax layer calls one of
  these in place of its primitive, so its own code (dtype promotion, padding,
  batch flattening, bias) runs unchanged while ``dx`` goes through B
  (``fa_jax._ops.feedback_bilinear``).
* A tap recorder: taps are recorded while the root model runs and cut with a
  stop-gradient, exactly like ``fa_jax._model.TapOps``.
* :func:`dfa_head`: a ``custom_vjp`` identity on the model output whose
  backward sends ``δ_l = e B_l`` (``fa_jax._grad.project_error``) to every tap.
  It makes DFA an ordinary autodiff rule, so ``jax.grad``,
  ``nnx.value_and_grad`` and optax work unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fa_jax import _ops, _rules
from fa_jax._feedback import DFAFeedback, TapSpec, dfa_projection, layer_key, shared_projection
from fa_jax._grad import project_error


def _freeze(value: Any) -> Any:
    """Lists to tuples, recursively, so op settings can be static (hashable)."""
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return tuple(_freeze(v) for v in value)
    return value


class StaticOp:
    """A hashable ``op(lhs, rhs, *args, **kwargs)`` with its settings frozen: linear in lhs and rhs."""

    def __init__(self, op: Callable, *args: Any, **kwargs: Any):
        self.op, self.args = op, _freeze(args)
        self.kwargs = tuple(sorted((k, _freeze(v)) for k, v in kwargs.items() if v is not None))

    def __call__(self, lhs, rhs):
        if self.op is jnp.einsum:  # the spec leads: einsum(spec, lhs, rhs)
            return jnp.einsum(*self.args, lhs, rhs, **dict(self.kwargs))
        return self.op(lhs, rhs, *self.args, **dict(self.kwargs))

    def _key(self):
        return (self.op, self.args, self.kwargs)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, StaticOp) and self._key() == other._key()


def feedback_product(op: StaticOp, lhs, rhs, feedback, rule: Any):
    """``op(lhs, rhs)`` with ``dx`` through ``feedback``: the single place the FA family plugs in.

    A rule that only changes how B is built (B regenerated from a key with
    ``rule.init``, or another FA-family rule) changes this function only.
    """
    return _ops.feedback_bilinear(op, lhs, rhs, feedback, init=getattr(rule, "init", None))


def feedback_dot_general(feedback, rule: Any) -> Callable:
    """A ``lax.dot_general`` replacement whose input-gradient uses ``feedback`` (B, kernel-shaped)."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        op = StaticOp(jax.lax.dot_general, dimension_numbers, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
        return feedback_product(op, lhs, rhs, feedback, rule)

    return dot_general


def feedback_conv_general_dilated(feedback, rule: Any, mask=None) -> Callable:
    """A ``lax.conv_general_dilated`` replacement: ``dx`` is the transposed convolution with B."""
    matrix = feedback if mask is None or _ops.is_key(feedback) else feedback * mask

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        op = StaticOp(jax.lax.conv_general_dilated, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
        return feedback_product(op, lhs, rhs, matrix, rule)

    return conv_general_dilated


def feedback_einsum(feedback, rule: Any) -> Callable:
    """A ``jnp.einsum(spec, x, kernel)`` replacement with ``dx`` through B."""

    def einsum(spec, lhs, rhs, precision=None, preferred_element_type=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        op = StaticOp(jnp.einsum, spec, precision=precision, preferred_element_type=preferred_element_type, **kwargs)
        return feedback_product(op, lhs, rhs, feedback, rule)

    return einsum


SUPPORTED_RULES = (_rules.BP, _rules.FA, _rules.DFA, _rules.Shallow)


def check_rule(rule: Any, where: str) -> None:
    """Only BP, FA, DFA and shallow are wired into the Flax adapters; anything else would be computed wrongly."""
    if type(rule) not in SUPPORTED_RULES:
        raise TypeError(
            f"{where}: rule {getattr(rule, 'name', rule)!r} is not supported by the Flax adapters yet; expected one of "
            f"{[r.name for r in SUPPORTED_RULES]} (use the functional core, fa_jax.value_and_grad, for the others)"
        )


def fa_matrix(rule: _rules.FA, key: jax.Array, path: str, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """B of the layer whose kernel sits at ``path``: ``rule.init(layer_key(key, path), shape)``, or that key."""
    layer = layer_key(key, path)
    return layer if rule.regenerate else rule.init(layer, shape, dtype)


# --------------------------------------------------------------------------- taps


class _Recorder:
    def __init__(self, cut: bool):
        self.cut = cut
        self.names: list[str] = []
        self.values: list[jax.Array] = []


_STATE = threading.local()


def _stack() -> list[_Recorder]:
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    return _STATE.stack


@contextlib.contextmanager
def recording(cut: bool = True):
    """Record every :func:`tap` made inside; ``cut`` stop-gradients them (DFA, shallow)."""
    recorder = _Recorder(cut)
    _stack().append(recorder)
    try:
        yield recorder
    finally:
        _stack().pop()


def tap(name: str, value: Any, where: str) -> Any:
    """Record ``value`` as tap ``name`` and cut the graph there. Outside a recording: an error."""
    stack = _stack()
    if not stack:
        raise ValueError(
            f"DFA tap {name!r} ran outside its converted root model ({where}); call the root model, "
            "not a sub-module, so the DFA error projection can reach this tap"
        )
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(f"DFA tap {name!r}: expected the module to return one array, given {type(value).__name__}")
    recorder = stack[-1]
    if name in recorder.names:
        raise ValueError(
            f"DFA tap {name!r} ran twice in one forward (a shared or re-used module); each tap needs its own "
            "B, so tap a module that runs once"
        )
    recorder.names.append(name)
    recorder.values.append(value)
    return jax.lax.stop_gradient(value) if recorder.cut else value


def tap_specs(names: list[str], values: list[Any], batch_dims: int) -> tuple[TapSpec, ...]:
    return tuple(TapSpec(n, tuple(v.shape[batch_dims:])) for n, v in zip(names, values))


def check_taps(want: tuple[TapSpec, ...], names: list[str], values: list[Any], batch_dims: int) -> None:
    """The taps met in this forward must be the ones the feedback was drawn for."""
    given = tap_specs(names, values, batch_dims)
    if tuple(t.name for t in given) != tuple(t.name for t in want):
        raise ValueError(
            f"DFA taps differ from the feedback's: expected {[t.name for t in want]}, given {[t.name for t in given]}"
        )
    for w, g in zip(want, given):
        if w.shape != g.shape:
            raise ValueError(f"DFA tap {w.name!r}: expected feature shape {w.shape}, given {g.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dfa_head(feedback_spec, rule, outputs, projection, tap_values):
    return outputs


def _head_fwd(feedback_spec, rule, outputs, projection, tap_values):
    structs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in tap_values]
    return outputs, (projection, structs)


def _head_bwd(feedback_spec, rule, residuals, error):
    projection, structs = residuals
    taps, output_shape = feedback_spec
    feedback = DFAFeedback(projection, taps, output_shape, shared_prefix=_shared(rule))
    signals = project_error(error, feedback, rule, structs)
    return error, None, signals


_dfa_head.defvjp(_head_fwd, _head_bwd)


def dfa_head(outputs: jax.Array, projection: jax.Array, tap_values: list[jax.Array], *,
             taps: tuple[TapSpec, ...], rule: _rules.DFA) -> jax.Array:
    """Identity on ``outputs``; its backward sends ``δ_l = e B_l`` (Nøkland 2016, eq. 3) to tap ``l``.

    Args:
      outputs: the model output ``(*batch, *output_shape)``; its cotangent is ``e = ∂L/∂y``.
      projection: ``[B_1 … B_L]`` of shape ``(output_features, Σ tap_features)``, or its key.
      tap_values: the recorded taps, ``(*batch, *tap_shape_l)``, already cut downstream.
    """
    output_shape = tuple(outputs.shape[rule.batch_dims:])
    if not _ops.is_key(projection):
        columns = max(t.size for t in taps) if _shared(rule) else sum(t.size for t in taps)
        want = (math.prod(output_shape), columns)
        if tuple(projection.shape) != want:
            raise ValueError(f"DFA projection: expected shape {want} for output {output_shape}, given {tuple(projection.shape)}")
    return _dfa_head((taps, output_shape), rule, outputs, projection, list(tap_values))


def _shared(rule: Any) -> bool:
    """TinyDFA's layout: one (output, widest tap) matrix whose prefixes serve every tap."""
    return bool(getattr(rule, "shared_prefix", False))


def draw_projection(rule: _rules.DFA, key: jax.Array, taps: tuple[TapSpec, ...], output_shape: tuple[int, ...],
                    dtype: Any = jnp.float32) -> jax.Array:
    """``[B_1 … B_L]`` from ``layer_key(key, tap name)`` (the core's ``dfa_projection``), the shared matrix, or the key."""
    if rule.regenerate:
        return key
    draw = shared_projection if _shared(rule) else dfa_projection
    return draw(key, taps, math.prod(output_shape), rule.init, dtype)


def dfa_feedback(projection: Any, taps: tuple[TapSpec, ...], output_shape: tuple[int, ...], rule: Any) -> DFAFeedback:
    return DFAFeedback(projection, taps, output_shape, shared_prefix=_shared(rule))
