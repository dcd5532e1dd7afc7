"""Alignment diagnostics: how close a rule's learning signals are to backpropagation's.

Every metric is a pure, jit-able and vmap-able function returning scalars in
dicts keyed by layer path (``"0/kernel"``) or tap name (``"layer_0"``):

* **Gradient alignment** (per parameter leaf): cosine and angle between the
  rule's update ``g`` and the BP gradient ``∇L`` on the same params and batch,
  and the norm ratio ``‖g‖/‖∇L‖``.
* **Delta alignment** (per tap): for every sample ``n`` the cosine between the
  rule's error signal ``δ̃_l[n]`` and BP's ``δ_l[n] = ∂L/∂h_l[n]``; mean and
  standard deviation over the batch (Launay et al. 2019; TinyDFA).
* **Weight alignment**: FA, the angle between ``vec W_l`` and ``vec B_l`` and
  ``‖B_l‖/‖W_l‖`` (biotorch); DFA, the angle between ``B_l`` and the transposed
  downstream product ``(W_{l+1} … W_L)ᵀ`` of the linearised network.

A cosine is ``NaN`` where either vector is exactly zero (undefined, e.g. the
frozen hidden layers of ``"shallow"``).

:func:`value_and_grad_with_alignment` wraps ``fa_jax.value_and_grad`` and
returns these metrics as aux; the BP reference costs one extra forward and
backward, and only in calls made with ``measure=True``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fa_jax import _rules, _validate
from fa_jax._feedback import DFAFeedback, FAFeedback, dfa_matrices, is_kernel, materialize_fa, path_str
from fa_jax._grad import project_error, value_and_grad
from fa_jax._model import FAOps, PlainOps, TapOps, bind, tap_name

__all__ = [
    "Cosine",
    "DeltaAlignment",
    "Alignment",
    "cosine",
    "gradient_alignment",
    "total_alignment",
    "delta_alignment",
    "tap_signals",
    "fa_weight_alignment",
    "dfa_weight_alignment",
    "value_and_grad_with_alignment",
]


class Cosine(NamedTuple):
    """Alignment of two vectors ``a`` (rule) and ``b`` (reference)."""

    cosine: jax.Array  # a·b / (‖a‖‖b‖)
    angle: jax.Array  # degrees, arccos of the cosine
    norm_ratio: jax.Array  # ‖a‖ / ‖b‖


class DeltaAlignment(NamedTuple):
    """Per-sample cosine between a rule's and BP's error signal at one tap."""

    mean: jax.Array
    std: jax.Array


class Alignment(NamedTuple):
    """All metrics of one step (fields are ``None`` where not measured)."""

    gradient: dict[str, Cosine]  # per parameter leaf
    total: Cosine  # all parameters as one vector
    delta: dict[str, DeltaAlignment] | None  # per tap
    weight: dict[str, Cosine] | None  # FA: per kernel; DFA: per tap


def cosine(a: Float[Array, "..."], b: Float[Array, "..."]) -> Cosine:
    """Cosine, angle (degrees) and norm ratio ``‖a‖/‖b‖`` of ``vec a`` and ``vec b``.

    Computed in float32 or wider; the cosine is ``NaN`` if either norm is zero.
    """
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a = jnp.ravel(a).astype(dtype)
    b = jnp.ravel(b).astype(dtype)
    norm_a, norm_b = jnp.linalg.norm(a), jnp.linalg.norm(b)
    defined = (norm_a > 0) & (norm_b > 0)
    # Normalise first: a·b of two large vectors can overflow in low precision.
    unit_a = a / jnp.where(norm_a > 0, norm_a, 1)
    unit_b = b / jnp.where(norm_b > 0, norm_b, 1)
    cos = jnp.where(defined, jnp.dot(unit_a, unit_b), jnp.nan)
    # 2·atan2(‖â-b̂‖, ‖â+b̂‖) is exact near 0° and 180°, where arccos(cos) loses all digits.
    angle = jnp.degrees(2 * jnp.arctan2(jnp.linalg.norm(unit_a - unit_b), jnp.linalg.norm(unit_a + unit_b)))
    return Cosine(cos, jnp.where(defined, angle, jnp.nan), norm_a / norm_b)


def _leaves(tree: Any) -> dict[str, jax.Array]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(path): leaf for path, leaf in flat}


def gradient_alignment(rule_grads: Any, bp_grads: Any) -> dict[str, Cosine]:
    """Per-leaf alignment of a rule's update with the BP gradient (same params, same batch).

    Args:
      rule_grads, bp_grads: pytrees with the structure of ``params``.

    Returns:
      ``{path: Cosine(cosine, angle, norm_ratio)}``, e.g. ``"0/kernel"``.
    """
    rule, bp = _leaves(rule_grads), _leaves(bp_grads)
    if rule.keys() != bp.keys():
        raise ValueError(f"rule and BP gradients differ in structure: {sorted(rule)[:5]} vs {sorted(bp)[:5]}")
    return {path: cosine(rule[path], bp[path]) for path in rule}


def total_alignment(rule_grads: Any, bp_grads: Any) -> Cosine:
    """Alignment of the whole update vector (all leaves concatenated) with the BP gradient."""
    flat_rule = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(rule_grads)])
    flat_bp = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(bp_grads)])
    return cosine(flat_rule, flat_bp)


def delta_alignment(
    rule_signals: dict[str, jax.Array], bp_signals: dict[str, jax.Array], *, batch_dims: int = 1
) -> dict[str, DeltaAlignment]:
    """Mean and std over samples of ``cos(δ̃_l[n], δ_l[n])`` at every tap (Launay et al. 2019).

    Args:
      rule_signals, bp_signals: ``{tap: (*batch, *features)}``; the first
        ``batch_dims`` axes index samples (2 for ``(batch, seq, ·)``).

    Samples where either signal is zero are left out of the mean and std.
    """
    if rule_signals.keys() != bp_signals.keys():
        raise ValueError(f"taps differ: rule has {list(rule_signals)}, BP has {list(bp_signals)}")
    out = {}
    for name, rule in rule_signals.items():
        bp = bp_signals[name]
        if rule.shape != bp.shape:
            raise ValueError(f"tap {name!r}: rule signal has shape {rule.shape}, BP signal {bp.shape}")
        samples = math.prod(rule.shape[:batch_dims])
        dtype = jnp.promote_types(rule.dtype, jnp.float32)
        a = rule.reshape(samples, -1).astype(dtype)
        b = bp.reshape(samples, -1).astype(dtype)
        norm_a, norm_b = jnp.linalg.norm(a, axis=1), jnp.linalg.norm(b, axis=1)
        defined = (norm_a > 0) & (norm_b > 0)
        cos = jnp.sum(a * b, axis=1) / jnp.where(defined, norm_a * norm_b, 1)
        cos = jnp.where(defined, cos, jnp.nan)
        out[name] = DeltaAlignment(jnp.nanmean(cos), jnp.nanstd(cos))
    return out


def fa_weight_alignment(params: Any, feedback: FAFeedback, rule: _rules.FA | None = None) -> dict[str, Cosine]:
    """Angle between ``vec W`` and ``vec B`` and ``‖B‖/‖W‖`` for every FA kernel (biotorch).

    Returns ``{path: Cosine(cos(B, W), angle, ‖B‖/‖W‖)}``; keys are materialized first.
    """
    if not isinstance(feedback, FAFeedback):
        raise TypeError(f"fa_weight_alignment needs FAFeedback, got {type(feedback).__name__}")
    matrices = _leaves_with_none(materialize_fa(feedback, params, rule))
    weights = _leaves(params)
    return {path: cosine(matrices[path], weights[path]) for path in weights if matrices.get(path) is not None}


def _leaves_with_none(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {path_str(path): leaf for path, leaf in flat}


def dense_kernels(params: Any) -> list[jax.Array]:
    """The 2-d kernels of ``params`` in tree order (the layers of an MLP)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [leaf for path, leaf in flat if is_kernel(path, leaf) and leaf.ndim == 2]


def dfa_weight_alignment(
    feedback: DFAFeedback, kernels: list[jax.Array], rule: _rules.DFA | None = None
) -> dict[str, Cosine]:
    """Angle between ``B_l`` and ``(W_{l+1} … W_L)ᵀ`` for every tap of an MLP (linearised network).

    In a linear network BP sends ``δ_l = e (W_{l+1} … W_L)ᵀ`` to the output
    ``h_l`` of layer ``l``, DFA sends ``e B_l``; the angle says how far apart.

    Args:
      feedback: DFA feedback with taps ``h_0 … h_{L-1}``; ``B_l: (out, d_l)``.
      kernels: ``[W_0 … W_L]``, ``W_l: (d_{l-1}, d_l)``, one more than taps.

    Returns:
      ``{tap: Cosine(cos(B_l, (W_{l+1}…W_L)ᵀ), angle, ‖B_l‖/‖W_{l+1}…W_L‖)}``.
    """
    matrices = dfa_matrices(feedback, rule)
    if len(kernels) != len(matrices) + 1:
        raise ValueError(
            f"dfa_weight_alignment expects one kernel per tap plus the output layer: "
            f"{len(matrices)} taps need {len(matrices) + 1} kernels, got {len(kernels)}"
        )
    out, downstream = {}, None
    for index in range(len(matrices) - 1, -1, -1):
        after = kernels[index + 1]
        downstream = after if downstream is None else after @ downstream
        tap = feedback.taps[index]
        expected = (tap.size, feedback.output_size)
        if downstream.shape != expected:
            raise ValueError(
                f"tap {tap.name!r}: downstream product W_{index + 1}…W_L has shape {downstream.shape}, "
                f"expected {expected} (tap features, outputs); the kernels do not form a chain of dense layers"
            )
        out[tap.name] = cosine(matrices[index], downstream.T)
    return dict(reversed(out.items()))


# --- error signals at taps -------------------------------------------------------------


class _Probe:
    """Adds a zero probe at every tap: ``∂L/∂probe_l`` is the error signal reaching ``h_l``."""

    def __init__(self, probes: list[jax.Array]):
        self.probes, self.names, self.values = probes, [], []

    def tap(self, h, name: str | None = None):
        name = tap_name(name, len(self.names))
        self.names.append(name)
        self.values.append(h)
        return h + self.probes[len(self.names) - 1]


class _PlainProbe(_Probe, PlainOps):
    pass


class _FAProbe(_Probe, FAOps):
    def __init__(self, init, probes):
        FAOps.__init__(self, init)
        _Probe.__init__(self, probes)


def _tap_structs(model, params, inputs) -> list[jax.ShapeDtypeStruct]:
    def run(p, x):
        ops = TapOps()
        model(p, x, ops)
        return ops.values

    return jax.eval_shape(run, params, inputs)


class _Pass(NamedTuple):
    value: Any
    aux: Any
    grads: Any
    signals: dict[str, jax.Array]
    error: jax.Array  # ∂L/∂y
    taps: list[jax.Array]


def _probe_pass(model, loss_with_aux, make_ops, params, inputs, targets, bind_feedback=None) -> _Pass:
    """One forward and backward giving the loss, the params' gradient and the signal at every tap.

    ``bind_feedback``: FA kernels to bind to ``params`` inside the forward (as the core does).
    """
    structs = _tap_structs(model, params, inputs)
    zeros = [jnp.zeros(s.shape, s.dtype) for s in structs]
    names: list[str] = []

    def forward(p, probes):
        ops = make_ops(probes)
        outputs = model(p if bind_feedback is None else bind(p, bind_feedback), inputs, ops)
        names[:] = ops.names
        return outputs, ops.values

    outputs, pullback, taps = jax.vjp(forward, params, zeros, has_aux=True)
    (value, aux), error = jax.value_and_grad(loss_with_aux, has_aux=True)(outputs, targets)
    grads, signals = pullback(error)
    return _Pass(value, aux, grads, dict(zip(names, signals)), error, taps)


def tap_signals(model: Callable, loss: Callable, rule: _rules.Rule | str, params, feedback, inputs, targets) -> dict[str, jax.Array]:
    """The error signal each tap ``h_l`` receives under ``rule``: ``{tap: (*batch, *features)}``.

    BP: ``∂L/∂h_l``. FA: the same backward with every ``Wᵀ`` replaced by ``Bᵀ``.
    DFA: ``e B_l`` (Nøkland 2016, eq. 3). Shallow: zeros.
    """
    rule = _rules.get_rule(rule)
    with_aux = lambda o, t: (loss(o, t), None)  # noqa: E731
    if isinstance(rule, _rules.FA):
        _validate.check_fa(feedback, params)
        fa_pass = _probe_pass(model, with_aux, lambda z: _FAProbe(rule.init, z), params, inputs, targets, feedback.kernels)
        return fa_pass.signals
    bp = _probe_pass(model, with_aux, _PlainProbe, params, inputs, targets)
    return _rule_signals_from_bp(rule, bp, feedback)


def _rule_signals_from_bp(rule, bp: _Pass, feedback) -> dict[str, jax.Array]:
    if isinstance(rule, _rules.BP):
        return bp.signals
    if isinstance(rule, _rules.Shallow):
        return {name: jnp.zeros_like(s) for name, s in bp.signals.items()}
    if isinstance(rule, _rules.DFA):
        projected = project_error(bp.error, feedback, rule, bp.taps)
        return dict(zip(bp.signals, projected))
    raise TypeError(f"no tap signals for rule {rule!r}")


# --- gradient function with alignment as aux --------------------------------------------


def value_and_grad_with_alignment(
    model: Callable,
    loss: Callable,
    rule: _rules.Rule | str,
    *,
    has_aux: bool = False,
    deltas: bool = True,
    weights: bool | None = None,
) -> Callable:
    """``fa_jax.value_and_grad`` that also returns :class:`Alignment` as aux.

    Returns ``grad_fn(params, feedback, inputs, targets, *, measure=True)``
    giving ``((loss, alignment), grads)`` (``((loss, (aux, alignment)), grads)``
    with ``has_aux``). With ``measure=False`` it is the core gradient function
    and ``alignment`` is ``None``: no BP reference is computed. ``measure`` is a
    Python bool; under ``jax.jit`` mark it static (``static_argnames="measure"``).

    Cost of ``measure=True``: one extra forward and BP backward (for FA the
    rule's own backward also yields its tap signals, for DFA they are ``e B_l``).
    Other rules (e.g. the FA family) get gradient alignment; ``delta`` is
    ``None`` for them. ``call_kwargs`` (e.g. ``step=``) go to the core function.

    Args:
      deltas: measure per-sample delta alignment at the taps (needs ``ops.tap``).
      weights: measure weight alignment. ``None``: FA always; DFA when the 2-d
        kernels of ``params`` chain like an MLP's (one per tap plus the output),
        else skipped. ``True``: DFA raises if they do not.
    """
    rule = _rules.get_rule(rule)
    core = value_and_grad(model, loss, rule, has_aux=has_aux)
    loss_with_aux = loss if has_aux else (lambda o, t: (loss(o, t), None))
    batch_dims = getattr(rule, "batch_dims", 1)

    def pack(value, aux, alignment, grads):
        return ((value, (aux, alignment)) if has_aux else (value, alignment)), grads

    def grad_fn(params, feedback, inputs, targets, *, measure: bool = True, **call_kwargs):
        if not measure:
            value, grads = core(params, feedback, inputs, targets, **call_kwargs)
            if has_aux:
                value, aux = value
                return pack(value, aux, None, grads)
            return pack(value, None, None, grads)

        bp = _probe_pass(model, loss_with_aux, _PlainProbe, params, inputs, targets)
        if isinstance(rule, _rules.BP):
            value, aux, grads, signals = bp.value, bp.aux, bp.grads, bp.signals
        elif isinstance(rule, _rules.FA):
            _validate.check_fa(feedback, params)
            fa = _probe_pass(model, loss_with_aux, lambda z: _FAProbe(rule.init, z), params, inputs, targets, feedback.kernels)
            value, aux, grads, signals = fa.value, fa.aux, fa.grads, fa.signals
        else:
            value, grads = core(params, feedback, inputs, targets, **call_kwargs)
            value, aux = value if has_aux else (value, None)
            known = isinstance(rule, (_rules.DFA, _rules.Shallow))
            signals = _rule_signals_from_bp(rule, bp, feedback) if deltas and known else None

        measured = deltas and bp.signals and signals is not None
        delta = delta_alignment(signals, bp.signals, batch_dims=batch_dims) if measured else None
        alignment = Alignment(
            gradient=gradient_alignment(grads, bp.grads),
            total=total_alignment(grads, bp.grads),
            delta=delta,
            weight=_weight_alignment(rule, params, feedback, weights),
        )
        return pack(value, aux, alignment, grads)

    return grad_fn


def _weight_alignment(rule, params, feedback, weights: bool | None):
    if weights is False:
        return None
    if isinstance(rule, _rules.FA):
        return fa_weight_alignment(params, feedback, rule)
    if isinstance(rule, _rules.DFA):
        kernels = dense_kernels(params)
        if weights is None and not _chains(kernels, feedback):
            return None
        return dfa_weight_alignment(feedback, kernels, rule)
    if weights:
        raise ValueError(f"weight alignment is defined for FA and DFA, not for rule {rule.name!r}")
    return None


def _chains(kernels: list[jax.Array], feedback: DFAFeedback) -> bool:
    if len(kernels) != len(feedback.taps) + 1 or kernels[-1].shape[-1] != feedback.output_size:
        return False
    return all(k.shape[1] == tap.size == nxt.shape[0] for k, tap, nxt in zip(kernels, feedback.taps, kernels[1:]))
