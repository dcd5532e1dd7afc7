"""Pieces shared by the Flax adapters (``fa_jax.nnx`` and ``fa_jax.linen``).

* Feedback primitives with the signatures of ``lax.dot_general``,
  ``lax.conv_general_dilated`` and ``jnp.einsum``. A Flax layer calls one of
  these in place of its primitive, so its own code (dtype promotion, padding,
  batch flattening, bias) runs unchanged while ``dx`` goes through B
  (``fa_jax._ops.feedback_bilinear``), or through ``rule.backward_matrix(W, (leaf,
  step))`` for the rest of the FA family (``fa_jax._ops.matrix_bilinear``).
* A tap recorder: taps are recorded while the root model runs and cut with a
  stop-gradient, exactly like ``fa_jax._model.TapOps``.
* :func:`dfa_head`: a ``custom_vjp`` identity on the model output whose
  backward sends ``δ_l = e B_l`` (``fa_jax._grad.project_error``) to every tap,
  or ``y* B_l`` for DRTP. It makes DFA an ordinary autodiff rule, so
  ``jax.grad``, ``nnx.value_and_grad`` and optax work unchanged.
* :func:`layer_feedback`: one kernel's feedback leaf, drawn by the core's
  ``init_feedback`` from ``layer_key(key, path)``, so the adapters and the core
  hold the same B for the same key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fa_jax import _checks, _ops, _rules
from fa_jax._feedback import DFAFeedback, TapSpec, dfa_projection, init_feedback, shared_projection
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


class LayerFeedback(NamedTuple):
    """What one converted layer's backward needs.

    Attributes:
      leaf: the layer's feedback leaf: B (FA, Kolen–Pollack), M (frSF), or the layer key
        (regenerated FA/frSF, uSF, brSF), drawn by :func:`layer_feedback`.
      rule: the rule; FA-family rules with ``backward_matrix`` build B from W in the backward.
      step: the training step ``t`` (read only by brSF, ``M_t = init(fold_in(k_l, t))``).
      path: the layer's module path, for error messages.
      pass_step: how this adapter is given a step, for the error when brSF has none.
    """

    leaf: Any
    rule: Any
    step: Any = None
    path: str = "?"
    pass_step: str = ""


@dataclasses.dataclass(frozen=True)
class _MissingStep:
    """Stands in for ``rule.backward_matrix`` when brSF got no step: raises as the backward is traced.

    The forward never reads B, so evaluation runs without a step; a gradient without
    one raises instead of silently drawing ``M_0`` (or computing BP).
    """

    rule: Any
    path: str
    pass_step: str

    def __call__(self, weight, feedback):
        raise ValueError(
            f"layer {self.path!r}: rule {self.rule.name!r} redraws its feedback every step from (layer key, step) "
            f"(Liao et al. 2016, brSF: M_t = init(fold_in(k, t))); expected a step, given none. {self.pass_step}"
        )


def feedback_product(op: StaticOp, lhs, rhs, layer: LayerFeedback):
    """``op(lhs, rhs)`` with ``dx`` through the layer's feedback: the single place the FA family plugs in.

    FA (Lillicrap et al. 2016) passes B or its key to ``_ops.feedback_bilinear``. The rules
    with ``backward_matrix`` (uSF, frSF, brSF: Liao et al. 2016; Kolen–Pollack: Akrout
    et al. 2019) build B from ``(W, leaf, step)`` inside the backward, exactly as the
    core's ``FAOps`` does, through ``_ops.matrix_bilinear``.
    """
    rule = layer.rule
    _checks.check_feedback_matrix(layer.leaf, rhs, f"feedback for layer {layer.path!r}")
    if not _rules.uses_backward_matrix(rule):
        return _ops.feedback_bilinear(op, lhs, rhs, layer.leaf, init=getattr(rule, "init", None))
    backward = rule.backward_matrix
    if _rules.needs_step(rule) and layer.step is None:
        backward = _MissingStep(rule, layer.path, layer.pass_step)
    return _ops.matrix_bilinear(op, lhs, rhs, (layer.leaf, layer.step), backward_matrix=backward)


def feedback_dot_general(layer: LayerFeedback) -> Callable:
    """A ``lax.dot_general`` replacement whose input-gradient uses the layer's feedback (B, kernel-shaped)."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        op = StaticOp(jax.lax.dot_general, dimension_numbers, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
        return feedback_product(op, lhs, rhs, layer)

    return dot_general


def feedback_conv_general_dilated(layer: LayerFeedback, mask=None) -> Callable:
    """A ``lax.conv_general_dilated`` replacement: ``dx`` is the transposed convolution with B."""
    if mask is not None and not _ops.is_key(layer.leaf):
        layer = layer._replace(leaf=layer.leaf * mask)  # the masked kernel's B (sign rules mask W itself)

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        op = StaticOp(jax.lax.conv_general_dilated, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
        return feedback_product(op, lhs, rhs, layer)

    return conv_general_dilated


def feedback_einsum(layer: LayerFeedback) -> Callable:
    """A ``jnp.einsum(spec, x, kernel)`` replacement with ``dx`` through B."""

    def einsum(spec, lhs, rhs, precision=None, preferred_element_type=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        op = StaticOp(jnp.einsum, spec, precision=precision, preferred_element_type=preferred_element_type, **kwargs)
        return feedback_product(op, lhs, rhs, layer)

    return einsum


# --------------------------------------------------------------------------- rules


def check_rule(rule: Any, where: str) -> None:
    """The adapters route per-layer feedback (FA family) or taps (DFA family); anything else would be computed wrongly."""
    if not (isinstance(rule, _rules.BP) or _rules.is_fa_family(rule) or _rules.uses_taps(rule)):
        raise TypeError(
            f"{where}: rule {getattr(rule, 'name', rule)!r} ({type(rule).__name__}) is not BP, an FA-family rule "
            f"(FA or one with backward_matrix) or a tap rule; expected one of {sorted(_rules.RULES)}"
        )


def unhandled_kernel_message(rule: str, path: str, module: Any, handled: tuple[type, ...]) -> str:
    """The error for a layer with a kernel the adapter cannot intercept (e.g. ``ConvTranspose``).

    Such a layer calls its primitive directly, so its input-gradient would silently be
    BP's ``g Wᵀ`` under a rule that promised no weight transport.
    """
    return (
        f"rule {rule!r}: layer {path!r} ({type(module).__name__}) holds a kernel whose input-gradient the "
        f"adapter cannot route through feedback; it would silently be BP's (g Wᵀ). Expected kernels only in "
        f"{[c.__name__ for c in handled]}, given {type(module).__name__}. Write that layer with the functional "
        "core's ops (fa_jax.value_and_grad), or, for DFA, tap whole blocks (taps='macro' or module paths)"
    )


def needs_key(rule: Any) -> bool:
    """Every rule but BP and shallow draws (or keys) its feedback from a PRNG key."""
    return not isinstance(rule, (_rules.BP, _rules.Shallow))


def check_key(rule: Any, key: Any) -> None:
    """A rule with feedback needs one typed key; a raw or missing one would draw nothing reproducible."""
    if needs_key(rule) and not (key is not None and _checks.is_key(key)):
        raise TypeError(f"key: rule {rule.name!r} needs a typed PRNG key, jax.random.key(seed); given {key!r}")


def layer_feedback(rule: Any, key: jax.Array, path: str, kernel: jax.Array) -> Any:
    """The feedback leaf of the kernel at ``path``, drawn by the core's ``init_feedback``.

    ``init_feedback`` is handed ``{path: kernel}``, so the leaf comes from
    ``layer_key(key, path)`` exactly as it does for that kernel in the functional
    core: B (FA, Kolen–Pollack), M (frSF) or the layer key (regenerated, uSF, brSF).
    """
    drawn = init_feedback(rule, {path: kernel}, key=key, select=lambda *_: True)
    return drawn.kernels[path]


# --------------------------------------------------------------------------- taps


class _Recorder:
    def __init__(self, cut: bool):
        self.cut = cut
        self.names: list[str] = []
        self.values: list[jax.Array] = []
        self.trace = _checks.trace_token()  # taps must run in this trace (see check_tap_trace)


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
    _checks.check_tap_trace(recorder.trace, name)
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


def check_taps(rule: Any, want: tuple[TapSpec, ...], names: list[str], values: list[Any]) -> None:
    """The taps met in this forward must be the ones the feedback was drawn for."""
    given = tap_specs(names, values, rule.batch_dims)
    if tuple(t.name for t in given) != tuple(t.name for t in want):
        raise ValueError(
            f"rule {rule.name!r}: taps differ from the feedback's: expected {[t.name for t in want]}, "
            f"given {[t.name for t in given]}"
        )
    for w, g in zip(want, given):
        if w.shape != g.shape:
            raise ValueError(f"rule {rule.name!r}: tap {w.name!r}: expected feature shape {w.shape}, given {g.shape}")


class _HeadSpec(NamedTuple):
    """The static part of the head: the taps, the output's feature shape, and how to pass DRTP's targets."""

    taps: tuple[TapSpec, ...]
    output_shape: tuple[int, ...]
    pass_targets: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dfa_head(spec, rule, outputs, projection, tap_values, teaching):
    return outputs


def _head_fwd(spec, rule, outputs, projection, tap_values, teaching):
    structs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in tap_values]
    return outputs, (projection, structs, teaching)


def _head_bwd(spec, rule, residuals, error):
    projection, structs, teaching = residuals
    feedback = DFAFeedback(projection, spec.taps, spec.output_shape, shared_prefix=_shared(rule))
    # DRTP projects the target, not the error (Frenkel et al. 2021, eq. 6): no backward dependency.
    source = teaching if _rules.projects_target(rule) else error
    if source is None:
        raise ValueError(
            f"rule {rule.name!r}: the hidden taps receive a random projection of the targets (Frenkel et al. 2021), "
            f"expected targets, given none. {spec.pass_targets}"
        )
    signals = project_error(source, feedback, rule, structs)
    return error, None, signals, None


_dfa_head.defvjp(_head_fwd, _head_bwd)


def dfa_head(outputs: jax.Array, projection: jax.Array, tap_values: list[jax.Array], *,
             taps: tuple[TapSpec, ...], rule: Any, targets: Any = None, pass_targets: str = "") -> jax.Array:
    """Identity on ``outputs``; its backward sends ``δ_l = s B_l`` to tap ``l``.

    ``s`` is the error ``e = ∂L/∂y`` for DFA (Nøkland 2016, eq. 3) and the teaching
    signal ``y* = rule.teaching_signal(outputs, targets)`` for DRTP (Frenkel et al.
    2021, eq. 6); the output's own cotangent passes through, so the output block
    trains on its exact gradient.

    Args:
      outputs: the model output ``(*batch, *output_shape)``; its cotangent is ``e = ∂L/∂y``.
      projection: ``[B_1 … B_L]`` of shape ``(output_features, Σ tap_features)``, or its key.
      tap_values: the recorded taps, ``(*batch, *tap_shape_l)``, already cut downstream.
      targets: DRTP's targets (labels or one-hot); ``None`` raises when the backward is traced.
      pass_targets: how the adapter is given targets, for that error.
    """
    output_shape = tuple(outputs.shape[rule.batch_dims:])
    if not _ops.is_key(projection):
        columns = max(t.size for t in taps) if _shared(rule) else sum(t.size for t in taps)
        want = (math.prod(output_shape), columns)
        if tuple(projection.shape) != want:
            raise ValueError(
                f"rule {rule.name!r}: projection: expected shape {want} for output {output_shape}, "
                f"given {tuple(projection.shape)}"
            )
    uses_targets = _rules.projects_target(rule) and targets is not None
    teaching = rule.teaching_signal(outputs, targets) if uses_targets else None
    spec = _HeadSpec(taps, output_shape, pass_targets)
    return _dfa_head(spec, rule, outputs, projection, list(tap_values), teaching)


def _shared(rule: Any) -> bool:
    """TinyDFA's layout: one (output, widest tap) matrix whose prefixes serve every tap."""
    return bool(getattr(rule, "shared_prefix", False))


def draw_projection(rule: Any, key: jax.Array, taps: tuple[TapSpec, ...], output_shape: tuple[int, ...],
                    dtype: Any = jnp.float32) -> jax.Array:
    """``[B_1 … B_L]`` from ``layer_key(key, tap name)`` (the core's ``dfa_projection``), the shared matrix, or the key."""
    if rule.regenerate:
        return key
    draw = shared_projection if _shared(rule) else dfa_projection
    return draw(key, taps, math.prod(output_shape), rule.init, dtype)


def dfa_feedback(projection: Any, taps: tuple[TapSpec, ...], output_shape: tuple[int, ...], rule: Any) -> DFAFeedback:
    return DFAFeedback(projection, taps, output_shape, shared_prefix=_shared(rule))
