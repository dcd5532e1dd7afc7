"""A learning rule as an optax transform (``optax.GradientTransformationExtraArgs``).

:func:`rule_gradients` turns any ``grad_fn(params, feedback, inputs, targets)
-> (loss, grads)`` (from ``fa_jax.value_and_grad``, ``fa_jax.nnx.value_and_grad``
or a wrapper around ``fa_jax.linen.adapt``) into the first element of a chain::

    tx = optax.chain(
        fa_jax.transform.rule_gradients(grad_fn),   # replaces the updates by the rule's gradients
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-3, weight_decay=1e-4),
    )
    updates, state = tx.update(params, state, params, feedback=feedback, inputs=x, targets=y)
    params = optax.apply_updates(params, updates)

The incoming ``updates`` are ignored (pass ``params`` or zeros as a
placeholder); the step's loss is in ``state[0].loss``. Rules that redraw their
feedback every step (brSF) need ``step=t`` among the extra args; it is passed
on as ``grad_fn(..., step=t)``. A rule that learns its feedback (Kolen–Pollack)
gets it after the chain, from the chain's final updates:
``feedback = fa_jax.update_feedback(rule, feedback, updates, params)``.

When to use which:

* ``value_and_grad`` (the default): you write the train step. You get the loss
  directly, can log or transform gradients, and any optimizer works.
* ``rule_gradients``: something else owns the train step and only accepts an
  optax transform plus ``**extra_args`` (a config-driven trainer, a sweep that
  swaps one chain element to compare rules). The whole rule then travels as one
  transform. Feedback is an extra argument, never optimizer state, so no
  ``weight_decay`` or checkpoint of the optimizer can change it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

__all__ = ["RuleState", "rule_gradients"]


class RuleState(NamedTuple):
    """``loss``: the loss at the last update's params (NaN before the first update)."""

    loss: Any


def rule_gradients(grad_fn: Callable, *, has_aux: bool = False) -> optax.GradientTransformationExtraArgs:
    """An optax transform whose updates are ``grad_fn(params, feedback, inputs, targets)[1]``.

    Args:
      grad_fn: ``grad_fn(params, feedback, inputs, targets) -> (loss, grads)``
        (or ``((loss, aux), grads)`` with ``has_aux``); ``grads`` shaped like ``params``.

    Returns:
      A transform with ``update(updates, state, params, *, feedback, inputs, targets, step=None)``.
    """

    def init(params):
        del params
        return RuleState(loss=jnp.full((), jnp.nan, jnp.float32))

    def update(updates, state, params=None, *, feedback=None, inputs=None, targets=None, step=None, **extra_args):
        del updates, state, extra_args
        if params is None:
            raise ValueError("rule_gradients: tx.update(updates, state, params, ...) needs params, given None")
        if inputs is None or targets is None:
            raise ValueError(
                "rule_gradients: tx.update(...) needs the batch as extra args, "
                "inputs=... and targets=... (and feedback=... for FA and DFA)"
            )
        # step only when given, so a grad_fn without the keyword keeps working
        by_step = {} if step is None else {"step": step}
        value, grads = grad_fn(params, feedback, inputs, targets, **by_step)
        loss = value[0] if has_aux else value
        return grads, RuleState(loss=jnp.asarray(loss, jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)
