"""Gradient functions for any JAX model under any rule.

``value_and_grad(model, loss, rule)`` takes ``model(params, inputs)`` as it is (plain
JAX, ``nnx.merge(graphdef, state)(x)``, a Linen ``apply``, an Equinox module split
with ``eqx.partition``). Its program is read and run again with every weight
product through the rule (:mod:`fa_jax._engine`). The result is ordinary autodiff
of that program: it composes with ``jit``, ``vmap`` (seed sweeps), ``lax.scan``
and ``jax.jacrev`` of the update itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

from fa_jax import _checks, _feedback
from fa_jax._engine import _program
from fa_jax.rules import Rule, get_rule

Model = Callable[[Any, Any], Any]
Loss = Callable[[Any, Any], Any]


def forward(model: Model, rule: Rule | str, *, model_has_aux: bool = False) -> Callable:
    """``run(params, feedback, inputs, *, step=None, targets=None) -> outputs``, differentiable under ``rule``.

    The outputs are the model's; their gradient (``jax.grad`` of any loss of them)
    is the rule's update: feedback products, and for a cutting rule the taps fed
    by :meth:`Rule.tap_signals`. ``step`` and ``targets`` are read only by the rules
    that need them (brSF, DRTP), and only in the backward: a forward without them
    still evaluates. With ``model_has_aux`` the model returns ``(outputs, aux)``
    (e.g. updated state) and only ``outputs`` are projected from.
    """
    rule = get_rule(rule)
    _checks.check_callable(model, "model")

    def run(params, feedback, inputs, *, step=None, targets=None):
        if step is not None:
            _checks.check_step_value(step, "step")
        has_weights = feedback is not None and bool(getattr(feedback, "weights", None))
        if not (rule.cuts or has_weights):
            # Nothing to route: the program itself (BP, or an empty feedback checked below).
            program = _program.analyse(
                model, params, inputs, exact=getattr(feedback, "exact", ()), model_has_aux=model_has_aux
            )
            _feedback.check(program, rule, feedback)
            return model(params, inputs)
        program = _program.analyse(
            model, params, inputs, exact=feedback.exact if feedback is not None else (), model_has_aux=model_has_aux
        )
        feedback = _feedback.check(program, rule, feedback)
        return _program.run(program, rule, params, feedback, inputs, step=step, targets=targets)

    return run


def _check_call(params: Any, inputs: Any, targets: Any) -> None:
    _checks.check_floating_tree(params, "params")
    _checks.check_array_tree(inputs, "inputs")
    _checks.check_array_tree(targets, "targets")
    _checks.check_batch(inputs, "inputs")


def value_and_grad(model: Model, loss: Loss, rule: Rule | str, *, has_aux: bool = False) -> Callable:
    """Turn ``model`` and ``loss`` into ``grad_fn(params, feedback, inputs, targets, *, step=None)``.

    Args:
      model: ``model(params, inputs) -> outputs``, any JAX function; mark DFA taps with
        :func:`fa_jax.tap` or let the rule place them at every weight product's input.
      loss: ``loss(outputs, targets) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      rule: a rule or its name (``"bp"``, ``"fa"``, ``"dfa"``, …).

    Returns:
      ``grad_fn(params, feedback, inputs, targets, *, step=None) -> (loss, grads)`` (or
      ``((loss, aux), grads)``), ``grads`` shaped like ``params``, ready for optax.
      ``feedback`` comes from :func:`fa_jax.init_feedback` (``None`` is accepted for
      rules that need none, such as BP). ``step`` is required by rules that redraw
      their feedback every step (brSF). Shape and feedback errors rise at trace time.
    """
    rule = get_rule(rule)
    _checks.check_callable(loss, "loss")
    _checks.check_bool(has_aux, "has_aux")
    run = forward(model, rule)

    def with_aux(outputs, targets):
        _checks.check_targets(outputs, targets)
        return loss(outputs, targets) if has_aux else (loss(outputs, targets), None)

    def grad_fn(params, feedback, inputs, targets, *, step=None):
        _check_call(params, inputs, targets)
        if rule.needs_step and step is None:
            raise ValueError(
                f"step: rule {rule.name!r} redraws its feedback every step from (key, step); call "
                "grad_fn(params, feedback, inputs, targets, step=step)"
            )

        def objective(p):
            outputs = run(p, feedback, inputs, step=step, targets=targets)
            _checks.check_targets(outputs, targets)
            if rule.projects_error:
                check_error_informative(loss if not has_aux else (lambda o, t: loss(o, t)[0]), outputs, targets, rule)
            return with_aux(outputs, targets)

        (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return ((value, aux), grads) if has_aux else (value, grads)

    return grad_fn


def apply(model: Model, params: Any, inputs: Any) -> Any:
    """``model(params, inputs)``: the forward pass, the same under every rule (taps are the identity)."""
    return model(params, inputs)


def check_error_informative(loss: Callable, outputs: Any, targets: Any, rule: Rule) -> None:
    """Warn when ``∂L/∂y`` does not depend on ``y``: a rule that projects ``e`` would feed every tap a constant.

    The usual cause: the model already returns ``log_softmax`` and the loss is
    ``-(y* · outputs)``; DFA's ``e = -y*/N`` then never shrinks. Move ``log_softmax``
    into the loss (``optax.softmax_cross_entropy``).
    """
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (outputs, targets))
    closed = jax.make_jaxpr(jax.grad(lambda o, t: loss(o, t).sum()))(*structs)
    n_out = len(jax.tree.leaves(outputs))
    if not _depends(closed.jaxpr, set(closed.jaxpr.invars[:n_out])):
        warnings.warn(
            f"rule {rule.name!r}: the loss is linear in the model outputs, so the error e = ∂L/∂y it projects to "
            "every tap does not depend on the outputs and never shrinks (e.g. a model returning log_softmax with "
            "the loss -(targets * outputs)); move log_softmax into the loss (optax.softmax_cross_entropy)",
            stacklevel=4,
        )


def _depends(jaxpr: Any, sources: set) -> bool:
    """True when some output of ``jaxpr`` depends on a variable in ``sources``."""
    from jax.extend import core as jcore

    live = set(sources)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jcore.Literal) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return any(not isinstance(v, jcore.Literal) and v in live for v in jaxpr.outvars)
