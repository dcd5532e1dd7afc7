"""Gradient functions: ``value_and_grad(model, loss, rule)`` for every rule.

All returned functions are pure: they compose with ``jit``, ``vmap`` (seed
sweeps), ``lax.scan`` and ``jax.jacrev`` of the update itself.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import _checks, _rules, _validate
from fa_jax._feedback import DFAFeedback, projection_matrix, split_taps
from fa_jax._model import FAOps, PlainOps, RecordOps, TapOps, bind

Model = Callable[[Any, Any, PlainOps], Any]
Loss = Callable[[Any, Any], Any]


def project_error(
    error: jax.Array, feedback: DFAFeedback, rule: _rules.DFA, tap_values: list[jax.Array]
) -> list[jax.Array]:
    """``δ_l = e B_l`` for every tap with **one** GEMM of ``e`` and ``[B_1 … B_L]``.

    Args:
      error: ``e = ∂L/∂y``, shape ``(*batch, *output_shape)``.
      feedback: the DFA projection ``(output_features, Σ tap_features)`` or its key.
      tap_values: the recorded taps, ``(*batch, *tap_shape_l)``.

    Returns:
      One cotangent per tap, with the tap's shape and dtype (Nøkland 2016, eq. 3).
    """
    batch_shape = error.shape[: rule.batch_dims]
    flat_error = error.reshape(int(np.prod(batch_shape)), feedback.output_size)
    projection = projection_matrix(feedback, rule.init, error.dtype)
    signal = flat_error @ jax.lax.stop_gradient(projection).astype(error.dtype)
    return [
        part.reshape(value.shape).astype(value.dtype)
        for part, value in zip(split_taps(signal, feedback), tap_values)
    ]


def _loss_and_aux(loss: Loss, has_aux: bool) -> Callable:
    return loss if has_aux else (lambda outputs, targets: (loss(outputs, targets), None))


def _check_call(params: Any, inputs: Any, targets: Any, step: Any = None) -> None:
    """Trace-time checks of a ``grad_fn`` call: floating params, numeric inputs and targets, a step >= 0."""
    _checks.check_floating_tree(params, "params")
    _checks.check_array_tree(inputs, "inputs")
    _checks.check_array_tree(targets, "targets")
    if step is not None:
        _checks.check_step_value(step, "step")


def _checked(with_aux: Callable) -> Callable:
    """The loss, after checking that a same-rank target can broadcast against the outputs."""

    def run(outputs, targets):
        _checks.check_targets(outputs, targets)
        return with_aux(outputs, targets)

    return run


def _pack(value, aux, grads, has_aux):
    return ((value, aux), grads) if has_aux else (value, grads)


def value_and_grad(model: Model, loss: Loss, rule: _rules.Rule | str, *, has_aux: bool = False) -> Callable:
    """Turn ``model`` and ``loss`` into ``grad_fn(params, feedback, inputs, targets)``.

    Args:
      model: ``model(params, inputs, ops) -> outputs``; layers through ``ops``.
      loss: ``loss(outputs, targets) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      rule: ``"bp"``, ``"fa"``, ``"dfa"``, ``"shallow"`` or a rule value.

    Returns:
      ``grad_fn(params, feedback, inputs, targets) -> (loss, grads)`` (or
      ``((loss, aux), grads)``), where ``grads`` has the structure of ``params``
      and goes straight into an optax optimizer. ``feedback`` is ``None`` for BP
      and shallow. Errors for a wrong feedback or tap shape rise at trace time.
      The keyword ``step`` (an int or int32 scalar) is read only by rules that redraw
      feedback each batch (brSF: ``M_t = init(fold_in(k, step))``); others ignore it.
    """
    rule = _rules.get_rule(rule)
    _checks.check_callable(model, "model")
    _checks.check_callable(loss, "loss")
    _checks.check_bool(has_aux, "has_aux")
    with_aux = _checked(_loss_and_aux(loss, has_aux))

    if isinstance(rule, _rules.BP):

        def grad_fn(params, feedback, inputs, targets, *, step=None):
            _check_call(params, inputs, targets, step)
            def objective(p):
                return with_aux(model(p, inputs, PlainOps()), targets)

            (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return _pack(value, aux, grads, has_aux)

    elif _rules.is_fa_family(rule):

        def grad_fn(params, feedback, inputs, targets, *, step=None):
            _check_call(params, inputs, targets, step)
            _validate.check_fa(feedback, params, rule.name)
            if _rules.needs_step(rule) and step is None:
                raise ValueError(
                    f"step: rule {rule.name!r} redraws its feedback every batch from (key, step); "
                    "call grad_fn(params, feedback, inputs, targets, step=step)"
                )
            ops = FAOps(rule.init) if isinstance(rule, _rules.FA) else FAOps(None, rule=rule, step=step)

            def objective(p):
                return with_aux(model(bind(p, feedback.kernels), inputs, ops), targets)

            (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return _pack(value, aux, grads, has_aux)

    elif _rules.uses_taps(rule):

        def grad_fn(params, feedback, inputs, targets, *, step=None):
            _check_call(params, inputs, targets, step)
            names: list[str] = []
            # A plain forward pass gives each block its input from outside the vjp:
            # first-order gradients stay block-local, second-order ones (jacrev of
            # the update) keep the upstream dependence. Under jit XLA merges the
            # two identical forward passes into one.
            recording = RecordOps()
            model(params, inputs, recording)

            def forward(p):
                ops = TapOps(replay=recording.values)
                outputs = model(p, inputs, ops)
                names[:] = ops.names
                return outputs, ops.values

            (outputs, taps), pullback = jax.vjp(forward, params)
            (value, aux), error = jax.value_and_grad(with_aux, has_aux=True)(outputs, targets)
            if isinstance(rule, _rules.Shallow):
                if not taps:
                    raise ValueError("the model calls ops.tap nowhere; 'shallow' needs taps to cut the network")
                signals = [jnp.zeros_like(t) for t in taps]
            else:
                _validate.check_dfa(feedback, names, taps, outputs, rule.batch_dims, rule.name)
                # DRTP projects the target, not the error (Frenkel et al. 2021): no backward dependency.
                source = rule.teaching_signal(outputs, targets) if _rules.projects_target(rule) else error
                signals = project_error(source, feedback, rule, taps)
            (grads,) = pullback((error, signals))
            return _pack(value, aux, grads, has_aux)

    else:  # pragma: no cover - get_rule only returns known rules
        raise TypeError(f"no gradient function for rule {rule!r}")

    return grad_fn
