"""Train an unmodified Flax Linen model with any fa_jax rule (FA, DFA, their family, shallow).

Design. :func:`adapt` changes nothing in the model. Its ``apply`` hands
``lambda params, inputs: model.apply({"params": params, **other collections},
*args, **kwargs)`` to :func:`fa_jax.forward`; the engine reads that program, so
every weight product goes through the rule whatever module computes it
(``nn.Dense``, ``DenseGeneral``, ``Conv``, ``ConvTranspose``, ``ConvLocal``,
``Einsum``, ``Embed.attend`` heads, ``self.param`` matmuls, ``nn.scan`` stacks
with one B per layer, ``nn.remat``), and a ``model.apply`` jitted elsewhere is
read as well. Biases and normalisation scales keep their exact gradient; a use
the engine cannot route raises, naming the parameter (see :func:`fa_jax.plan`).
Params boxed by ``nn.with_logical_partitioning`` work as they are (the box is
dropped from paths: B of ``Dense_0/kernel`` is keyed ``"Dense_0/kernel"``)::

    adapted = fa_jax.linen.adapt(model, "fa")
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(0))
    y = adapted.apply(variables, feedback, x)       # model.apply(variables, x), differentiable under the rule
    grads = jax.grad(lambda p: loss(adapted.apply({"params": p}, feedback, x), t))(params)

Call arguments pass through: array leaves (inputs, ``rngs={"dropout": k}``) are
traced inputs; other leaves (``train=False``, ``mutable=["batch_stats"]``) are
static. With ``mutable``, ``apply`` returns ``(outputs, updated collections)``
as ``model.apply`` does, and only ``outputs`` are projected from.

The feedback is one :class:`fa_jax.Feedback`, outside ``params``: no optimizer,
weight decay or checkpoint restore of params reaches it;
``fa_jax.update_feedback(rule, feedback, updates, params)`` steps Kolen–Pollack's
B (the rule's ``decay``) and returns every other rule's feedback unchanged.
brSF's ``step`` and DRTP's ``targets`` are keywords of the adapted ``apply``.

Taps (DFA, DRTP, shallow), ``taps=``: ``"auto"`` (the rule's own placement:
``fa_jax.tap`` marks if any, else ``"layer"``), ``"layer"`` (the activation
entering every weight product), ``"macro"`` / ``"micro"`` / module paths
(``"Block_0"``): ``nn.intercept_methods`` wraps those modules' outputs in
``fa_jax.tap(out, name=<module path>)`` and the rule cuts there. An interceptor
acts only while JAX traces: a ``model.apply`` jitted and first traced outside
the adapter replays a trace without the marks, and the adapter raises rather than
cut elsewhere. Pass the un-jitted apply and jit the adapted function.

``jax.jacrev`` of the update is right: taps are cut by a ``custom_vjp``
identity with a zero backward, not by ``stop_gradient``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.errors
import flax.linen as nn
import jax

import fa_jax
from fa_jax import _checks, _flax
from fa_jax.rules import Rule, get_rule

__all__ = ["Adapted", "adapt"]

_ATTENTION = (nn.MultiHeadDotProductAttention,)

_TRAP = (
    " The usual cause: model.apply jitted (jax.jit, nn.jit) and first traced outside fa_jax.linen replays its "
    "cached trace, in which the interceptor that marks the taps never ran; pass the un-jitted model.apply to "
    "adapt() and jit the adapted function instead."
)


class _Marker:
    """An ``nn.intercept_methods`` interceptor marking the outputs of the chosen modules as taps."""

    def __init__(self, taps: Any, blocks: Any, attention: tuple):
        self.taps, self.blocks, self.attention = taps, blocks, attention
        self.met: list[str] = []
        self.seen: set[str] = set()
        self.active: set[int] = set()

    def chosen(self, module: nn.Module, path: str) -> bool:
        if self.taps == "macro":
            return _flax.is_block(path, module, self.blocks)
        if self.taps == "micro":
            if _flax.is_block(path, module, self.blocks):
                return True
            if not isinstance(module, self.attention):
                return False
            parent = module.parent
            while isinstance(parent, nn.Module):
                if _flax.is_block("/".join(parent.path), parent, self.blocks):
                    return True
                parent = parent.parent
            return False
        return path in self.taps

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        # A subclass's __call__ calling super().__call__ is one module call, one tap.
        if context.method_name != "__call__" or not module.path or id(module) in self.active:
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        self.seen.add(path)
        if not self.chosen(module, path):
            return next_fun(*args, **kwargs)
        self.active.add(id(module))
        try:
            outputs = next_fun(*args, **kwargs)
        finally:
            self.active.discard(id(module))
        self.met.append(path)
        return _flax.tap_output(outputs, path)

    def check(self) -> None:
        """Raise when the requested taps did not all appear in this trace."""
        if self.seen:  # the interceptor ran: a name that matched nothing is the user's
            named = self.taps if isinstance(self.taps, tuple) else ()
            if isinstance(self.blocks, tuple) and all(isinstance(b, str) for b in self.blocks):
                named += self.blocks
            missing = [name for name in named if name not in self.seen]
            if missing:
                raise ValueError(f"fa_jax.linen: taps: {missing} name no module; modules met: {sorted(self.seen)[:20]}")
            if not self.met:
                raise ValueError(
                    f"fa_jax.linen: taps={self.taps!r}: no module called matches blocks={self.blocks!r}; "
                    f"modules met: {sorted(self.seen)[:20]}"
                )
        expected = self.taps if isinstance(self.taps, tuple) else (tuple(self.met) or (f"the {self.taps} blocks",))
        _flax.check_marked(self.taps, expected, self.met, "fa_jax.linen", _TRAP)


class Adapted(NamedTuple):
    """What :func:`adapt` returns.

    Attributes:
      init_feedback: ``init_feedback(variables, *args, key=None, **kwargs) -> fa_jax.Feedback``.
      apply: ``apply(variables, feedback, *args, step=None, targets=None, **kwargs)``: what
        ``model.apply(variables, *args, **kwargs)`` returns, differentiable under the rule.
      value_and_grad: ``value_and_grad(loss, *, has_aux=False, **kwargs) -> grad_fn(params,
        feedback, inputs, targets, *, step=None) -> (loss, grads)``, pure (jit, vmap, jacrev).
      rule: the rule, with the tap placement applied.
    """

    init_feedback: Callable
    apply: Callable
    value_and_grad: Callable
    rule: Rule


def _split_variables(variables: Any) -> tuple[Any, dict]:
    if not hasattr(variables, "keys") or "params" not in variables:
        raise TypeError(
            f"variables: expected a dict of collections with 'params' (from model.init), given "
            f"{_checks.describe(variables) if not hasattr(variables, 'keys') else sorted(variables.keys())}"
        )
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _mutable(kwargs: dict) -> bool:
    """``model.apply`` returns ``(outputs, collections)`` whenever ``mutable`` is not ``False``."""
    return kwargs.get("mutable", False) is not False


def adapt(
    model: nn.Module | Callable,
    rule: Rule | str,
    *,
    taps: str | Sequence[str] = "auto",
    blocks: Any = None,
    attention: type | tuple[type, ...] = _ATTENTION,
    exact: Any = (),
) -> Adapted:
    """Versions of ``model.apply`` that train with ``rule``, with no change to the model.

    Args:
      model: an ``nn.Module``, or any ``apply_fn(variables, *args, **kwargs)`` that calls ``model.apply``.
      rule: a rule or its name (``"bp"``, ``"fa"``, ``"dfa"``, …).
      taps, blocks, attention: where a tap rule cuts (module doc; paths are ``"Block_0"``-style);
        other rules ignore them.
      exact: parameter paths (``"Dense_0/kernel"``) or ``predicate(path)`` whose products keep ``Wᵀ``.

    Returns:
      :class:`Adapted`. ``init_feedback(variables, *example_args, key=key, **kwargs)`` traces
      the model abstractly (no FLOPs; a model with dropout needs no ``rngs``: placeholder
      keys are used for the trace) and draws the rule's feedback from the layer keys the
      core uses. ``apply(variables, feedback, *args, step=None, targets=None, **kwargs)``
      returns what ``model.apply(variables, *args, **kwargs)`` returns. All are pure.
    """
    rule = get_rule(rule)
    apply_fn = model.apply if isinstance(model, nn.Module) else model
    _checks.check_callable(apply_fn, "model")
    taps, blocks, attention = _flax.check_placement(taps, blocks, attention, "adapt")
    rule = _flax.placed_rule(rule, taps, "adapt")
    marks = rule.cuts and _flax.marks_modules(taps)

    def program(rebuild: Callable) -> Callable:
        """``fn(params, (arrays, rest)) -> model.apply(...)``, marking module taps when asked."""

        def fn(params, inputs):
            arrays, rest = inputs
            args, kwargs = rebuild(arrays)
            variables = {"params": params, **rest}
            if not marks:
                return apply_fn(variables, *args, **kwargs)
            marker = _Marker(taps, blocks, attention)
            with nn.intercept_methods(marker):
                result = apply_fn(variables, *args, **kwargs)
            marker.check()
            return result

        return fn

    def init_feedback(variables, *args, key=None, **kwargs):
        params, rest = _split_variables(variables)
        kwargs = dict(kwargs)
        placeholders = "rngs" not in kwargs
        for _ in range(16):  # one more rng stream per round
            arrays, rebuild = _flax.split_leaves((args, kwargs))
            try:
                return fa_jax.init_feedback(
                    rule,
                    params,
                    key=key,
                    model=program(rebuild),
                    inputs=(arrays, rest),
                    exact=exact,
                    model_has_aux=_mutable(kwargs),
                )
            except flax.errors.InvalidRngError as error:
                name = re.search(r'needs PRNG for "([^"]+)"', str(error))
                if not placeholders or name is None or name.group(1) in kwargs.get("rngs", {}):
                    raise
                # Shapes do not depend on the key: a placeholder stream lets the trace run.
                kwargs["rngs"] = {**kwargs.get("rngs", {}), name.group(1): jax.random.key(0)}
        raise RuntimeError("init_feedback: the model asked for more than 16 rng streams")

    def apply(variables, feedback, *args, step=None, targets=None, **kwargs):
        params, rest = _split_variables(variables)
        arrays, rebuild = _flax.split_leaves((args, kwargs))
        run = fa_jax.forward(program(rebuild), rule, model_has_aux=_mutable(kwargs))
        return run(params, feedback, (arrays, rest), step=step, targets=targets)

    def value_and_grad(loss: Callable, *, has_aux: bool = False, **kwargs: Any) -> Callable:
        """Pure ``grad_fn(params, feedback, inputs, targets, *, step=None) -> (loss, grads)``.

        :func:`fa_jax.value_and_grad` of ``model.apply({"params": params}, inputs, **kwargs)``:
        the core's checks and signature, for sweeps under ``jax.vmap``.
        """
        _checks.check_callable(loss, "loss")

        def grad_fn(params, feedback, inputs, targets, *, step=None):
            arrays, rebuild = _flax.split_leaves(((inputs,), kwargs))
            core = fa_jax.value_and_grad(program(rebuild), loss, rule, has_aux=has_aux)
            return core(params, feedback, (arrays, {}), targets, step=step)

        return grad_fn

    return Adapted(init_feedback, apply, value_and_grad, rule)
