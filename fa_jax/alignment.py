"""Alignment diagnostics: how close a rule's learning signals are to backpropagation's.

For any model ``model(params, inputs)`` and any rule. Every metric is a pure,
jit-able and vmap-able function returning scalars in dicts keyed by parameter
path (``"0/kernel"``) or tap name (``"layer_0"``):

* **Gradient alignment** (per parameter leaf): cosine and angle between the
  rule's update ``g`` and the BP gradient ``∇L`` on the same params and batch,
  and the norm ratio ``‖g‖/‖∇L‖``.
* **Delta alignment** (per tap): for every sample ``n`` the cosine between the
  signal ``δ̃_l[n]`` the rule sends to the tap ``h_l`` and BP's
  ``δ_l[n] = ∂L/∂h_l[n]``; mean and standard deviation over the batch
  (Launay, Poli & Krzakala 2019, "Principled training of neural networks with
  direct feedback alignment"; TinyDFA).
* **Weight alignment**: for a rule with per-weight feedback (FA, the sign
  rules, Kolen–Pollack), the angle between ``vec W`` and ``vec B`` (B the
  matrix the rule uses for W in the backward) and ``‖B‖/‖W‖`` (biotorch); for a
  rule projecting the output error to the taps (DFA), the angle between ``B_l``
  and the transposed downstream product ``(W_{l+1} … W_L)ᵀ`` of the linearised
  network.

A cosine is ``NaN`` where either vector is exactly zero: the angle is then
undefined (the frozen hidden layers of ``"shallow"``, or a BP reference that
vanishes), never silently reported. :class:`Alignment` carries the BP
reference's norm per leaf beside the angles, and ``reference_floor`` turns
angles against a reference below a chosen norm (round-off at a perfect fit)
into ``NaN`` too.

:func:`value_and_grad_with_alignment` wraps :func:`fa_jax.value_and_grad` and
returns these metrics as aux; the BP reference costs one extra forward and
backward, and only in calls made with ``measure=True``.

Every rule is asked, never typed: the signals at the taps are the cotangents
arriving at zero probes the engine adds to the tapped values (before a tap
rule's cut); the feedback matrices come from :meth:`Rule.backward_matrix` and
:meth:`Rule.tap_signals`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fa_jax import _checks, _feedback
from fa_jax._engine import _program
from fa_jax._feedback import Feedback, by_path
from fa_jax._grad import check_error_informative, value_and_grad
from fa_jax.rules import BP, Rule, get_rule

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
    "dense_kernels",
    "value_and_grad_with_alignment",
]


class Cosine(NamedTuple):
    """Alignment of two vectors ``a`` (rule) and ``b`` (reference)."""

    cosine: jax.Array  # a·b / (‖a‖‖b‖); NaN where either norm is 0
    angle: jax.Array  # degrees, arccos of the cosine
    norm_ratio: jax.Array  # ‖a‖ / ‖b‖


class DeltaAlignment(NamedTuple):
    """Per-sample cosine between a rule's and BP's signal at one tap: mean and std over the samples."""

    mean: jax.Array
    std: jax.Array


class Alignment(NamedTuple):
    """All metrics of one step (fields are ``None`` where not measured)."""

    gradient: dict[str, Cosine]  # per parameter leaf
    total: Cosine  # all parameters as one vector
    delta: dict[str, DeltaAlignment] | None  # per tap
    weight: dict[str, Cosine] | None  # per-weight feedback: per parameter path; DFA: per tap
    reference: dict[str, jax.Array] | None = None  # ‖∇L‖ of the BP reference per leaf, and "total"


def cosine(a: Float[Array, "..."], b: Float[Array, "..."]) -> Cosine:  # noqa: UP037 - jaxtyping's shape "..." is a string
    """Cosine, angle (degrees) and norm ratio ``‖a‖/‖b‖`` of ``vec a`` and ``vec b``.

    Computed in float32 or wider; the cosine and angle are ``NaN`` if either norm is zero.
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


def gradient_alignment(rule_grads: Any, bp_grads: Any) -> dict[str, Cosine]:
    """Per-leaf alignment of a rule's update with the BP gradient (same params, same batch).

    Args:
      rule_grads, bp_grads: pytrees with the structure of ``params``.

    Returns:
      ``{path: Cosine(cosine, angle, norm_ratio)}``, paths as :func:`fa_jax.plan` names them (``"0/kernel"``).
    """
    rule, bp = by_path(rule_grads), by_path(bp_grads)
    if rule.keys() != bp.keys():
        raise ValueError(f"rule and BP gradients differ in structure: {sorted(rule)[:5]} vs {sorted(bp)[:5]}")
    return {path: cosine(rule[path], bp[path]) for path in rule}


def total_alignment(rule_grads: Any, bp_grads: Any) -> Cosine:
    """Alignment of the whole update vector (all leaves concatenated) with the BP gradient."""
    flat_rule = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(rule_grads)])
    flat_bp = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(bp_grads)])
    return cosine(flat_rule, flat_bp)


def delta_alignment(
    rule_signals: dict[str, jax.Array],
    bp_signals: dict[str, jax.Array],
    *,
    batch_dims: int = 1,
    stack: dict[str, int] | None = None,
) -> dict[str, DeltaAlignment]:
    """Mean and std over samples of ``cos(δ̃_l[n], δ_l[n])`` at every tap (Launay et al. 2019).

    Args:
      rule_signals, bp_signals: ``{tap: (*stack, *batch, *features)}``.
      batch_dims: leading axes (after the stack) indexing samples (2 for ``(batch, seq, ·)``).
      stack: ``{tap: number of leading stack axes}`` for taps repeated by ``lax.scan``
        (each layer of a stack counts as its own samples); default none.

    Samples where either signal is zero are left out of the mean and std (all
    left out: ``NaN``, e.g. the frozen taps of ``"shallow"``).
    """
    if rule_signals.keys() != bp_signals.keys():
        raise ValueError(f"taps differ: rule has {list(rule_signals)}, BP has {list(bp_signals)}")
    _checks.check_int(batch_dims, "batch_dims", minimum=0)
    out = {}
    for name, rule in rule_signals.items():
        bp = bp_signals[name]
        if rule.shape != bp.shape:
            raise ValueError(f"tap {name!r}: rule signal has shape {rule.shape}, BP signal {bp.shape}")
        lead = batch_dims + (stack or {}).get(name, 0)
        samples = math.prod(rule.shape[:lead])
        if samples == 0 or math.prod(rule.shape[lead:]) == 0:
            raise ValueError(
                f"rule_signals: tap {name!r} has shape {rule.shape}: expected at least one sample in its first "
                f"{lead} axes and at least one feature after them (an empty batch has no per-sample cosine)"
            )
        dtype = jnp.promote_types(rule.dtype, jnp.float32)
        a = rule.reshape(samples, -1).astype(dtype)
        b = bp.reshape(samples, -1).astype(dtype)
        norm_a, norm_b = jnp.linalg.norm(a, axis=1), jnp.linalg.norm(b, axis=1)
        defined = (norm_a > 0) & (norm_b > 0)
        cos = jnp.sum(a * b, axis=1) / jnp.where(defined, norm_a * norm_b, 1)
        cos = jnp.where(defined, cos, jnp.nan)
        out[name] = DeltaAlignment(jnp.nanmean(cos), jnp.nanstd(cos))
    return out


# --- weight alignment ---------------------------------------------------------------------


def _specs(program: _program.Program) -> dict[str, Any]:
    return {spec.path: spec for spec in program.specs.values()}


def _check_feedback(feedback: Any, where: str) -> Feedback:
    if not isinstance(feedback, Feedback):
        raise TypeError(
            f"{where}: feedback: expected a Feedback from fa_jax.init_feedback, given {_checks.describe(feedback)}"
        )
    return feedback


def _check_step(rule: Rule, step: Any, where: str) -> None:
    if rule.needs_step and step is None:
        raise ValueError(
            f"{where}: step: rule {rule.name!r} redraws its feedback every step from (key, step); pass step=t"
        )


def _backward_matrices(rule: Rule, program: _program.Program, params: Any, feedback: Feedback, step: Any) -> dict:
    """``{path: (B, W)}``: the matrix the rule uses for ``W`` in the backward, for every weight with feedback."""
    specs, weights = _specs(program), by_path(params)
    out = {}
    for path, leaf in feedback.weights.items():
        if path not in specs or path not in weights:
            raise ValueError(f"feedback: the weight {path!r} is not a weight of this model; draw the feedback for it")
        weight = weights[path]
        matrix = rule.backward_matrix(weight, leaf, spec=specs[path], step=step)
        out[path] = (matrix, weight)
    return out


def fa_weight_alignment(
    params: Any, feedback: Feedback, rule: Rule | str, *, model: Callable, inputs: Any, step: Any = None
) -> dict[str, Cosine]:
    """Angle between ``vec W`` and ``vec B`` and ``‖B‖/‖W‖`` for every weight with feedback (biotorch).

    B is the matrix the rule puts in W's place in the input gradient
    ``dx = g Bᵀ`` (Lillicrap et al. 2016, eq. 2): FA's stored or regenerated B,
    ``sign(W)·s`` (uSF), ``|M| ⊙ sign(W)`` (frSF, brSF at ``step``), Kolen–Pollack's
    learned B. It is built by :meth:`Rule.backward_matrix` from the model's
    weight specs, so regenerated keys give the B the backward uses.

    Args:
      params, feedback: the model's params and ``init_feedback(rule, ...)``'s feedback.
      model, inputs: the model and an example batch (to read the weights' specs).
      step: the training step (rules with ``needs_step``, e.g. brSF).

    Returns:
      ``{path: Cosine(cos(B, W), angle, ‖B‖/‖W‖)}``; empty for a rule without per-weight feedback.
      A stacked (scanned) weight counts as one vector.
    """
    rule = get_rule(rule)
    feedback = _check_feedback(feedback, "fa_weight_alignment")
    _check_step(rule, step, "fa_weight_alignment")
    program = _program.analyse(model, params, inputs, exact=feedback.exact)
    return {path: cosine(b, w) for path, (b, w) in _backward_matrices(rule, program, params, feedback, step).items()}


def dense_kernels(model: Callable, params: Any, inputs: Any, *, exact: Any = ()) -> list[jax.Array]:
    """The 2-d weights of ``model``'s dense products in the order the program first uses them (an MLP's layers).

    Weights marked ``exact`` (paths or a predicate, as for :func:`fa_jax.init_feedback`), convolution
    kernels and stacked (scanned) weights are left out.
    """
    program = _program.analyse(model, params, inputs, exact=exact)
    return _dense_kernels(program, params)


def _dense_kernels(program: _program.Program, params: Any) -> list[jax.Array]:
    weights = by_path(params)
    return [weights[s.path] for s in program.specs.values() if s.kind == "dense" and len(s.shape) == 2 and s.depth == 0]


def _tap_matrices(rule: Rule, feedback: Feedback, dtype: Any) -> list[jax.Array]:
    """``B_l`` of shape ``(output features, tap features)`` per tap: the rule's tap map applied to unit errors.

    For DFA the signal of tap ``l`` is ``e B_l`` (Nøkland 2016, eq. 3), linear in ``e``, so feeding the
    rows of the identity as ``e`` reads ``B_l`` row by row, whatever the feedback's storage (a matrix,
    a regenerated key, TinyDFA's shared prefix).
    """
    layout = feedback.layout
    if layout is None:
        raise ValueError(f"feedback: rule {rule.name!r}: expected feedback with taps (a tap rule's), given none")
    if layout.batch_dims < 1:
        raise ValueError(f"feedback: batch_dims={layout.batch_dims}: a projection mixing samples has no per-sample B_l")
    if any(t.stack for t in layout.taps):
        raise ValueError(
            f"feedback: taps {[t.name for t in layout.taps if t.stack]} are stacked (lax.scan); "
            "expected one layer per tap"
        )
    out = layout.output.size
    lead = (out,) + (1,) * (layout.batch_dims - 1)
    error = jnp.eye(out, dtype=dtype).reshape(*lead, *layout.output.shape)
    structs = [jax.ShapeDtypeStruct((*lead, *t.shape), dtype) for t in layout.taps]
    signals = rule.tap_signals(
        feedback.taps, layout, error=error, outputs=jnp.zeros_like(error), targets=None, taps=structs
    )
    return [
        jnp.zeros((out, t.size), dtype) if s is None else jnp.reshape(s, (out, t.size))
        for s, t in zip(signals, layout.taps, strict=True)
    ]


def dfa_weight_alignment(feedback: Feedback, kernels: list[jax.Array], rule: Rule | str = "dfa") -> dict[str, Cosine]:
    """Angle between ``B_l`` and ``(W_{l+1} … W_L)ᵀ`` for every tap of an MLP (linearised network).

    In a linear network BP sends ``δ_l = e (W_{l+1} … W_L)ᵀ`` to the output
    ``h_l`` of layer ``l``, DFA sends ``e B_l`` (Nøkland 2016, eq. 3); the angle says how far apart.

    Args:
      feedback: a tap rule's feedback with taps ``h_0 … h_{L-1}`` (``B_l: (out, d_l)``).
      kernels: ``[W_0 … W_L]``, ``W_l: (d_{l-1}, d_l)``, one more than taps
        (:func:`dense_kernels` lists them for a model).
      rule: the rule the feedback was drawn for (its tap map gives ``B_l``).

    Returns:
      ``{tap: Cosine(cos(B_l, (W_{l+1}…W_L)ᵀ), angle, ‖B_l‖/‖W_{l+1}…W_L‖)}``.
    """
    rule = get_rule(rule)
    feedback = _check_feedback(feedback, "dfa_weight_alignment")
    if feedback.layout is None:
        raise ValueError(
            "dfa_weight_alignment: feedback: expected a tap rule's feedback (with taps), given one without"
        )
    taps = feedback.layout.taps
    if len(kernels) != len(taps) + 1:
        raise ValueError(
            f"dfa_weight_alignment: kernels: expected one kernel per tap plus the output layer: "
            f"{len(taps)} taps need {len(taps) + 1} kernels, given {len(kernels)}"
        )
    matrices = _tap_matrices(rule, feedback, jnp.result_type(kernels[-1]))
    out, downstream = {}, None
    for index in range(len(taps) - 1, -1, -1):
        after = kernels[index + 1]
        downstream = after if downstream is None else after @ downstream
        tap = taps[index]
        expected = (tap.size, feedback.layout.output.size)
        if downstream.shape != expected:
            raise ValueError(
                f"dfa_weight_alignment: tap {tap.name!r}: downstream product W_{index + 1}…W_L has shape "
                f"{downstream.shape}, expected {expected} (tap features, outputs); the kernels do not form a chain "
                "of dense layers"
            )
        out[tap.name] = cosine(matrices[index], downstream.T)
    return dict(reversed(out.items()))


def _chains(kernels: list[jax.Array], feedback: Feedback) -> bool:
    layout = feedback.layout
    if layout is None or len(kernels) != len(layout.taps) + 1 or any(t.stack for t in layout.taps):
        return False
    if kernels[-1].shape[-1] != layout.output.size:
        return False
    return all(
        k.shape[1] == t.size == nxt.shape[0] for k, t, nxt in zip(kernels[:-1], layout.taps, kernels[1:], strict=True)
    )


# --- the signal each tap receives ------------------------------------------------------------


class _Taps(NamedTuple):
    names: list[str]
    sites: list[Any]
    shapes: list[tuple[int, ...]]  # (*stack, *batch, *features)
    dtypes: list[Any]
    stacks: list[int]  # leading stack axes per tap


def _taps(program: _program.Program, placement: str) -> _Taps:
    found = program.taps(placement)
    names, sites, shapes, dtypes, stacks = [], [], [], [], []
    for site, name, aval, stack in found:
        names.append(name)
        sites.append(site)
        shapes.append((*stack, *aval.shape))
        dtypes.append(aval.dtype)
        stacks.append(len(stack))
    return _Taps(names, sites, shapes, dtypes, stacks)


class _Pass(NamedTuple):
    value: jax.Array
    aux: Any
    grads: Any
    signals: dict[str, jax.Array]


def _probe_pass(
    program, taps: _Taps, rule: Rule, loss_with_aux: Callable, params, feedback, inputs, targets, step, placement: str
) -> _Pass:
    """One forward and backward under ``rule``: the loss, the rule's update and the signal at every tap.

    The signal at a tap is the cotangent of a zero probe the engine adds to the tapped
    value before any cut (``_program.run(..., probes=)``).
    """
    feedback = _feedback.check(program, rule, feedback)
    zeros = [jnp.zeros(shape, dtype) for shape, dtype in zip(taps.shapes, taps.dtypes, strict=True)]

    def outputs_of(p, probes):
        # No taps measured (deltas=False): no probes at all, not an empty list the engine pairs with the model's taps.
        return _program.run(
            program,
            rule,
            p,
            feedback,
            inputs,
            step=step,
            targets=targets,
            probes=probes if taps.names else None,
            placement=placement,
        )

    outputs, pullback = jax.vjp(outputs_of, params, zeros)
    _checks.check_targets(outputs, targets)
    if rule.projects_error:
        check_error_informative(lambda o, t: loss_with_aux(o, t)[0], outputs, targets, rule)
    (value, aux), error = jax.value_and_grad(loss_with_aux, has_aux=True)(outputs, targets)
    grads, signals = pullback(error)
    return _Pass(value, aux, grads, dict(zip(taps.names, signals, strict=True)))


def _prepare(model, params, inputs, feedback, rule: Rule) -> tuple[_program.Program, _Taps]:
    _checks.check_floating_tree(params, "params")
    _checks.check_array_tree(inputs, "inputs")
    exact = feedback.exact if isinstance(feedback, Feedback) else ()
    program = _program.analyse(model, params, inputs, exact=exact)
    return program, _taps(program, rule.taps)


def tap_signals(
    model: Callable,
    loss: Callable,
    rule: Rule | str,
    params: Any,
    feedback: Any,
    inputs: Any,
    targets: Any,
    *,
    step: Any = None,
) -> dict[str, jax.Array]:
    """The signal each tap ``h_l`` receives under ``rule``: ``{tap: (*stack, *batch, *features)}``.

    BP: ``∂L/∂h_l``. FA family: the same backward with every ``Wᵀ`` replaced by the
    rule's ``Bᵀ`` (Lillicrap et al. 2016, eq. 2). DFA: ``e B_l`` (Nøkland 2016, eq. 3);
    DRTP: ``(y*/N) B_l`` (Frenkel et al. 2021, eq. 6); shallow: zeros.

    The taps are those the rule cuts or, for a rule that cuts nothing, the
    ``fa_jax.tap`` marks (else the activation entering every weight product):
    ``rule.taps``. Each signal is the cotangent of a zero probe added to the tapped
    value before any cut, under :func:`fa_jax.forward` of the rule.

    Args:
      model: ``model(params, inputs) -> outputs``.
      loss: ``loss(outputs, targets) -> scalar``.
      rule: a rule or its name; ``feedback`` is ``init_feedback(rule, ...)``'s (``None`` for BP).
      step: the training step (rules with ``needs_step``).
    """
    rule = get_rule(rule)
    _checks.check_callable(model, "model")
    _checks.check_callable(loss, "loss")
    _check_step(rule, step, "tap_signals")
    _checks.check_batch(inputs, "inputs")
    program, taps = _prepare(model, params, inputs, feedback, rule)
    return _probe_pass(
        program, taps, rule, lambda o, t: (loss(o, t), None), params, feedback, inputs, targets, step, rule.taps
    ).signals


# --- gradient function with alignment as aux --------------------------------------------


def value_and_grad_with_alignment(
    model: Callable,
    loss: Callable,
    rule: Rule | str,
    *,
    has_aux: bool = False,
    deltas: bool = True,
    weights: bool | None = None,
    batch_dims: int | None = None,
    reference_floor: float = 0.0,
) -> Callable:
    """:func:`fa_jax.value_and_grad` that also returns :class:`Alignment` as aux.

    Returns ``grad_fn(params, feedback, inputs, targets, *, measure=True, step=None)``
    giving ``((loss, alignment), grads)`` (``((loss, (aux, alignment)), grads)`` with
    ``has_aux``). With ``measure=False`` it is the core gradient function and
    ``alignment`` is ``None``: no BP reference is computed. ``measure`` is a Python
    bool; under ``jax.jit`` mark it static (``static_argnames="measure"``).

    Cost of ``measure=True``: one extra forward and BP backward. The rule's own
    backward gives its update and, through zero probes on the taps, the signal
    each tap receives (:func:`tap_signals`), for every rule.

    Args:
      deltas: measure per-sample delta alignment at the taps (``rule.taps``'s placement).
        ``None`` in the result when the model has no tap there.
      batch_dims: the leading axes of a tap that index samples. ``None``: a tap rule's
        feedback's, else found as for a tap rule (the leading axes the output and every
        tap share), else 1 (e.g. a batch of one sample, where nothing can be found).
      weights: measure weight alignment. ``None``: rules with per-weight feedback
        always (:func:`fa_weight_alignment`); rules projecting
        the error to the taps (DFA) when the model's dense kernels chain like an
        MLP's (one per tap plus the output), else skipped. ``True``: raise where
        neither applies. ``False``: never.
      reference_floor: a BP reference whose norm is ``<= reference_floor`` (per leaf
        for ``gradient``, the whole vector for ``total``) is no reference: its cosine
        and angle are ``NaN``, as for an exactly zero one (the default, 0). Near a
        perfect fit the BP gradient is round-off, and an angle against it means
        nothing; ``Alignment.reference`` reports the norms either way.

    Raises:
      ValueError: ``inputs`` with an empty batch (no sample to measure), naming it.
    """
    rule = get_rule(rule)
    _checks.check_callable(model, "model")
    _checks.check_callable(loss, "loss")
    _checks.check_bool(has_aux, "has_aux")
    _checks.check_bool(deltas, "deltas")
    if weights is not None:
        _checks.check_bool(weights, "weights")
    if batch_dims is not None:
        _checks.check_int(batch_dims, "batch_dims", minimum=0)
    if isinstance(reference_floor, bool) or not isinstance(reference_floor, (int, float)) or not reference_floor >= 0:
        raise ValueError(f"reference_floor: expected a number >= 0, given {reference_floor!r}")
    core = value_and_grad(model, loss, rule, has_aux=has_aux)
    loss_with_aux = loss if has_aux else (lambda o, t: (loss(o, t), None))

    def pack(value, aux, alignment, grads):
        return ((value, (aux, alignment)) if has_aux else (value, alignment)), grads

    def grad_fn(params, feedback, inputs, targets, *, measure: bool = True, step: Any = None):
        _checks.check_bool(measure, "measure")
        if not measure:
            value, grads = core(params, feedback, inputs, targets, step=step)
            value, aux = value if has_aux else (value, None)
            return pack(value, aux, None, grads)
        _check_step(rule, step, "grad_fn")
        _checks.check_array_tree(targets, "targets")
        _checks.check_batch(inputs, "inputs")
        program, taps = _prepare(model, params, inputs, feedback, rule)
        if not deltas:
            taps = _Taps([], [], [], [], [])
        mine = _probe_pass(program, taps, rule, loss_with_aux, params, feedback, inputs, targets, step, rule.taps)
        bp = _probe_pass(program, taps, BP(), loss_with_aux, params, None, inputs, targets, None, rule.taps)
        delta = None
        if taps.names:
            samples = (
                batch_dims if batch_dims is not None else _batch_dims(model, params, inputs, program, rule, feedback)
            )
            delta = delta_alignment(
                mine.signals, bp.signals, batch_dims=samples, stack=dict(zip(taps.names, taps.stacks, strict=True))
            )
        gradient = gradient_alignment(mine.grads, bp.grads)
        total = total_alignment(mine.grads, bp.grads)
        norms = {
            path: jnp.linalg.norm(jnp.ravel(g).astype(jnp.promote_types(g.dtype, jnp.float32)))
            for path, g in by_path(bp.grads).items()
        }
        norms["total"] = jnp.sqrt(sum(jnp.square(n) for n in norms.values()))
        if reference_floor:
            gradient = {path: _floored(c, norms[path], reference_floor) for path, c in gradient.items()}
            total = _floored(total, norms["total"], reference_floor)
        alignment = Alignment(
            gradient=gradient,
            total=total,
            delta=delta,
            weight=_weight_alignment(rule, program, params, feedback, weights, step),
            reference=norms,
        )
        return pack(mine.value, mine.aux, alignment, mine.grads)

    return grad_fn


def _floored(c: Cosine, reference_norm: jax.Array, floor: float) -> Cosine:
    """``c`` with its cosine and angle ``NaN`` where the reference's norm is ``<= floor``."""
    valid = reference_norm > floor
    return Cosine(jnp.where(valid, c.cosine, jnp.nan), jnp.where(valid, c.angle, jnp.nan), c.norm_ratio)


def _batch_dims(model, params, inputs, program, rule: Rule, feedback) -> int:
    """The sample axes of the taps: the feedback's (a tap rule's), the rule's, else found like a tap rule's, else 1."""
    layout = getattr(feedback, "layout", None) if isinstance(feedback, Feedback) else None
    if layout is not None:
        return layout.batch_dims
    if rule.batch_dims is not None:
        return rule.batch_dims
    try:
        exact = tuple(program.paths[i] for i in sorted(program.exact))
        return _program.find_batch_dims(model, params, inputs, program, rule.taps, exact=exact, asked=None, mix=False)
    except ValueError:
        return 1  # taps not shaped like the output (or several outputs): one leading sample axis


def _weight_alignment(rule: Rule, program, params, feedback, weights: bool | None, step) -> dict[str, Cosine] | None:
    if weights is False:
        return None
    if isinstance(feedback, Feedback) and feedback.weights:
        pairs = _backward_matrices(rule, program, params, feedback, step)
        return {path: cosine(b, w) for path, (b, w) in pairs.items()}
    if rule.projects_error and isinstance(feedback, Feedback) and feedback.layout is not None:
        kernels = _dense_kernels(program, params)
        if _chains(kernels, feedback):
            return dfa_weight_alignment(feedback, kernels, rule)
        if weights:
            raise ValueError(
                f"weights=True: rule {rule.name!r} projects the error to the taps, and its weight alignment compares "
                f"B_l with W_(l+1)…W_L, so the dense kernels must chain like an MLP's (one per tap plus the output); "
                f"given kernels {[tuple(k.shape) for k in kernels]} for taps {[t.name for t in feedback.layout.taps]}"
            )
        return None
    if weights:
        raise ValueError(
            f"weights=True: rule {rule.name!r} has no per-weight feedback and does not project the error to taps, "
            "so no weight alignment is defined for it"
        )
    return None
