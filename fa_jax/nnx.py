"""Train an unmodified Flax NNX model with any fa_jax rule (FA, DFA, their family, shallow).

Design. :func:`convert` does not look for layer types. It re-types the *root*
module only, so that its ``__call__`` splits the model (``nnx.split(self,
nnx.Param, ...)``) and runs the original ``__call__`` as a pure function of
``(params, (call arguments, other state))`` through :func:`fa_jax.forward`.
The engine reads that function's program, so every weight product of every
module goes through the rule: ``nnx.Linear``, ``Conv``, ``ConvTranspose``,
``Einsum``, ``LoRA`` (``x A B``: both factors get feedback), a tied head
(``Embed.attend``), a raw ``h @ self.w[...]``, a ``Linear`` subclass calling
``super().__call__``, an ``nnx.scan`` stack of layers (one B per layer). Biases
and normalisation scales keep their exact gradient; a use the engine cannot
route raises, naming the parameter (see :func:`fa_jax.plan`). The updated
non-``Param`` state (BatchNorm statistics, RNG counts, also those of an
``nnx.Rngs`` passed as a call argument) comes back from that function as aux
and is written into the model, so the converted model is still stateful.

Call arguments pass through: array leaves (inputs, masks) are traced inputs of
the program; other leaves (``deterministic=True``, strings) are static.

Feedback is ONE :class:`Feedback` variable on the root (``model.fa_feedback``,
its value a :class:`fa_jax.Feedback`), not an ``nnx.Param``:
``nnx.Optimizer(model, tx, wrt=nnx.Param)``, weight decay and
``nnx.value_and_grad`` leave it alone. Only Kolen–Pollack changes it, through
:func:`optimizer_update` (stateful) or :func:`update_feedback` (pure), with the
rule's own ``decay``::

    model = fa_jax.nnx.convert(model, "fa", key=jax.random.key(0), inputs=x)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(loss_fn)(model)          # the rule's gradients
    fa_jax.nnx.optimizer_update(optimizer, model, grads)      # optimizer, then rule.update_feedback

brSF needs the step and DRTP the targets in the backward: call the model as
``fa_jax.nnx.call(model, x, step=t, targets=y)`` inside the differentiated
function (a plain ``model(x)`` still evaluates; its gradient raises).

Taps (DFA, DRTP, shallow), ``taps=``: ``"auto"`` (the rule's own placement:
``fa_jax.tap`` marks in the model code if any, else ``"layer"``), ``"layer"``
(the activation entering every weight product), ``"macro"`` (every block's
output, ``blocks=`` types or paths), ``"micro"`` (inside every block, each
attention module's output, then the block's), or a list of module paths. By
module, the chosen modules are re-typed so their output is
``fa_jax.tap(out, name=<module path>)``, whatever arguments they are called
with, and the rule cuts at those marks (``taps="marked"``).

Pure path (seed sweeps under ``jax.vmap``): ``graphdef, params, state =
split(model)``; ``value_and_grad(graphdef, loss)`` gives ``grad_fn(params, state,
inputs, targets, *, step=None) -> (loss, grads)``, the core's signature and
checks. ``jax.jacrev`` of that update is right (e.g. for a stability analysis):
the engine cuts taps with a ``custom_vjp`` identity whose backward is zero, not
with ``stop_gradient``, so an outer derivative still sees how a block's input
depends on the weights upstream.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from flax import nnx

import fa_jax
from fa_jax import _checks, _flax
from fa_jax.rules import Rule, get_rule

if TYPE_CHECKING:  # the attributes convert() sets on modules, for the type checker only

    class _Converted(nnx.Module):
        fa_feedback: Feedback
        fa_rule: Rule
        fa_placement: tuple[Any, tuple[str, ...]]  # (taps, the marked module paths)

    class _Tapped(nnx.Module):
        fa_tap: str


__all__ = [
    "Feedback",
    "convert",
    "call",
    "split",
    "value_and_grad",
    "feedback_of",
    "update_feedback",
    "optimizer_update",
    "rule_of",
]


class Feedback(nnx.Variable):
    """The rule's feedback for the whole model: its value is one :class:`fa_jax.Feedback`.

    Not an ``nnx.Param``, so no optimizer touches it. Fixed for every rule but
    Kolen–Pollack, whose B changes only through :func:`optimizer_update` /
    :func:`update_feedback`. Read it with ``model.fa_feedback.get_value()``.
    """


# --------------------------------------------------------------------------- per-call inputs


class _CallInputs(NamedTuple):
    step: Any = None
    targets: Any = None


_LOCAL = threading.local()


def _call_inputs() -> _CallInputs:
    stack = getattr(_LOCAL, "calls", None)
    return stack[-1] if stack else _CallInputs()


def call(model: nnx.Module, *args: Any, step: Any = None, targets: Any = None, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with the inputs some rules read in their backward.

    * ``step``: brSF redraws ``M_t = init(fold_in(k_l, t))`` every step (Liao et al. 2016).
    * ``targets``: DRTP sends ``(y*/N) B_l`` to the hidden taps (Frenkel et al. 2021, eq. 6);
      integer labels of the output's batch shape, or an array shaped like the output.

    Other rules ignore both. They travel with this call only (nothing is left in the
    model), so call it *inside* the function you differentiate or jit.
    """
    if step is not None:
        _checks.check_step_value(step, "step")
    if not hasattr(_LOCAL, "calls"):
        _LOCAL.calls = []
    _LOCAL.calls.append(_CallInputs(step, targets))
    try:
        return model(*args, **kwargs)
    finally:
        _LOCAL.calls.pop()


# --------------------------------------------------------------------------- taps by module


@contextlib.contextmanager
def _recording():
    """Collect the names of the module taps that run (per trace of the model's program)."""
    stack = _LOCAL.__dict__.setdefault("taps", [])
    stack.append([])
    try:
        yield stack[-1]
    finally:
        stack.pop()


_TAPPED: dict[type, type] = {}


def _tapped_class(base: type) -> type:
    """``Tapped<Base>``: ``Base.__call__``, its output marked ``fa_jax.tap(out, name=<module path>)``."""
    if base not in _TAPPED:

        def __call__(self, *args, **kwargs):
            outputs = _flax.tap_output(base.__call__(self, *args, **kwargs), self.fa_tap)
            stack = getattr(_LOCAL, "taps", None)
            if stack:
                stack[-1].append(self.fa_tap)
            return outputs

        _TAPPED[base] = type(
            f"Tapped{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__, "_fa_base": base}
        )
    return _TAPPED[base]


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _tap_modules(model: nnx.Module, taps: Any, blocks: Any, attention: tuple) -> list[tuple[str, nnx.Module]]:
    """The modules whose outputs are taps, for a placement by module."""
    modules = [(_path_str(p), m) for p, m in nnx.iter_modules(model) if p]
    known = [p for p, _ in modules]
    if taps in ("macro", "micro"):
        if not isinstance(blocks, type) and all(isinstance(b, str) for b in blocks):
            missing = [b for b in blocks if b not in known]
            if missing:
                raise ValueError(f"convert: blocks: {missing} name no module; expected paths among {known[:20]}")
        chosen = [(p, m) for p, m in modules if _flax.is_block(p, m, blocks)]
        if not chosen:
            raise ValueError(f"convert: blocks: no module of the model matches {blocks!r}; its modules: {known[:20]}")
        if taps == "macro":
            return chosen
        sites = []
        for block_path, block in chosen:
            inner = [(p, m) for p, m in modules if p.startswith(block_path + "/") and isinstance(m, attention)]
            if not inner:
                raise ValueError(
                    f"convert: taps='micro': block {block_path!r} holds no attention module of type "
                    f"{[a.__name__ for a in attention]}; pass attention= or use taps='macro'"
                )
            sites += [*inner, (block_path, block)]
        return sites
    missing = [t for t in taps if t not in known]
    if missing:
        raise ValueError(f"convert: taps: {missing} name no module; expected paths among {known[:20]}")
    return [(p, m) for p, m in modules if p in taps]


# --------------------------------------------------------------------------- the converted root

_ROOTS: dict[type, type] = {}
_NOT_STATE = nnx.Not(nnx.Any(nnx.Param, Feedback))  # what the original __call__ may update


def _program(base: type, graphdef: Any, arg_graphdef: Any, expected: tuple, taps: Any) -> Callable:
    """``fn(params, (call argument state, other state)) -> (outputs, (new state, new argument state))``.

    Merges the model and its call arguments, runs ``base.__call__`` (the original)
    and returns the state it updated, so the caller writes it back.
    """

    def fn(params, inputs):
        arg_state, rest = inputs
        model = nnx.merge(graphdef, params, rest)
        args, kwargs = nnx.merge(arg_graphdef, arg_state)
        with _recording() as met:
            outputs = base.__call__(model, *args, **kwargs)
        if expected:
            _flax.check_marked(taps, expected, met, "fa_jax.nnx")
        return outputs, (nnx.state(model, _NOT_STATE), nnx.state((args, kwargs), nnx.Variable))

    return fn


def _root_class(base: type) -> type:
    """``Converted<Base>``: ``__call__`` runs ``Base.__call__`` through the engine under the model's rule."""
    if base not in _ROOTS:

        def __call__(self, *args, **kwargs):
            return _converted_call(self, base, args, kwargs)

        _ROOTS[base] = type(
            f"Converted{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__, "_fa_base": base}
        )
    return _ROOTS[base]


def _converted_call(model: _Converted, base: type, args: tuple, kwargs: dict) -> Any:
    rule, placement = model.fa_rule, model.fa_placement
    context = _call_inputs()
    graphdef, params, rest = split(model)
    arg_graphdef, arg_state = nnx.split((args, kwargs))
    fn = _program(base, graphdef, arg_graphdef, placement[1], placement[0])
    run = fa_jax.forward(fn, rule, model_has_aux=True)
    outputs, (state, arg_state) = run(
        params, model.fa_feedback.get_value(), (arg_state, rest), step=context.step, targets=context.targets
    )
    nnx.update(model, state)
    nnx.update((args, kwargs), arg_state)
    return outputs


def _is_converted(model: nnx.Module) -> bool:
    return any(type(m) in _ROOTS.values() or type(m) in _TAPPED.values() for _, m in nnx.iter_modules(model))


def convert(
    model: nnx.Module,
    rule: Rule | str,
    *,
    key: jax.Array | None = None,
    inputs: Any = None,
    taps: str | Sequence[str] = "auto",
    blocks: Any = None,
    attention: type | tuple[type, ...] = (nnx.MultiHeadAttention,),
    exact: Any = (),
    **call_kwargs: Any,
) -> nnx.Module:
    """Convert ``model`` in place for ``rule`` and return it (see the module doc).

    Args:
      model: an ``nnx.Module``; its root ``__call__(inputs, **call_kwargs)`` is what trains.
      rule: a rule or its name (``"bp"`` too: the converted model then trains with BP's gradients).
      key: typed PRNG key for the feedback (every rule that draws); keyword-only. Weight
        ``path`` draws from ``layer_key(key, path)`` (``"layers/0/kernel"``), tap ``name``
        from ``layer_key(key, name)``: the same numbers as the core for the same params.
      inputs: an example first argument (a batch), traced abstractly (no FLOPs) to find
        the weight products and taps.
      taps, blocks, attention: where a tap rule cuts (module doc); other rules ignore them.
      exact: parameter paths (or ``predicate(path)``) whose products keep ``Wᵀ``.
      **call_kwargs: other arguments of the example call (``deterministic=True``, ``rngs=``).

    Returns:
      ``model`` itself, re-typed; its ``fa_feedback`` holds the :class:`fa_jax.Feedback`.
    """
    rule = get_rule(rule)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, given {_checks.describe(model)}")
    taps, blocks, attention = _flax.check_placement(taps, blocks, attention, "convert")
    if _is_converted(model):
        raise ValueError("model: already converted; build a fresh model to convert it for another rule")
    if inputs is None:
        raise ValueError(
            f"inputs: convert(model, {rule.name!r}, ...) needs inputs=, an example first argument of the model, "
            "to read its program; given none"
        )
    rule = _flax.placed_rule(rule, taps, "convert")
    retyped: list[tuple[_Tapped, type]] = []
    expected: tuple[str, ...] = ()
    if rule.cuts and _flax.marks_modules(taps):
        for path, module in _tap_modules(model, taps, blocks, attention):
            tapped = cast("_Tapped", module)
            retyped.append((tapped, type(module)))
            tapped.fa_tap = path
            module.__class__ = _tapped_class(type(module))
        expected = tuple(m.fa_tap for m, _ in retyped)
    base = type(model)
    try:
        graphdef, params, rest = split(model)
        arg_graphdef, arg_state = nnx.split(((inputs,), call_kwargs))
        fn = _program(base, graphdef, arg_graphdef, expected, taps)
        feedback = fa_jax.init_feedback(
            rule, params, key=key, model=fn, inputs=(arg_state, rest), exact=exact, model_has_aux=True
        )
    except Exception:
        for module, cls in retyped:
            module.__class__ = cls
            del module.fa_tap
        raise
    converted = cast("_Converted", model)
    converted.fa_feedback = Feedback(feedback)
    converted.fa_rule = rule
    converted.fa_placement = (taps, expected)
    converted.__class__ = _root_class(base)
    return converted


def rule_of(model: nnx.Module) -> Rule:
    """The rule ``model`` was converted for (BP when it was not)."""
    return getattr(model, "fa_rule", fa_jax.BP())


def feedback_of(model: nnx.Module) -> nnx.State:
    """The :class:`Feedback` variable of ``model`` as a state (e.g. to check training left it unchanged)."""
    return nnx.state(model, Feedback)


# --------------------------------------------------------------------------- pure path


def split(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, params, state)`` = ``nnx.split(model, nnx.Param, ...)``.

    ``state`` holds the feedback and every other non-Param.
    """
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    (state,) = rest  # the one filter after nnx.Param, `...`, gives one state
    return graphdef, params, state


def value_and_grad(graphdef: Any, loss: Callable, *, has_aux: bool = False, **call_kwargs: Any) -> Callable:
    """Pure ``grad_fn(params, state, inputs, targets, *, step=None) -> (loss, grads)`` for a converted model.

    ``graphdef, params, state`` come from :func:`split`; the model is called as
    ``model(inputs, **call_kwargs)``. This is :func:`fa_jax.value_and_grad` on the
    model's original ``__call__`` with the feedback held in ``state``: the same
    checks, ``step`` (brSF) and ``targets`` (DRTP) handling, and it composes with
    ``jax.jit``, ``jax.vmap`` and ``jax.jacrev``. ``grads`` is an ``nnx.State``
    shaped like ``params``. Updates of the non-Param state (BatchNorm statistics)
    are dropped, as in any pure gradient function. An unconverted (BP) graphdef
    gives BP's gradients.
    """
    _checks.check_callable(loss, "loss")

    def grad_fn(params, state, inputs, targets, *, step=None):
        probe = nnx.merge(graphdef, params, state)
        rule = rule_of(probe)
        base = getattr(type(probe), "_fa_base", type(probe))
        taps, expected = getattr(probe, "fa_placement", ("auto", ()))
        arg_graphdef, arg_state = nnx.split(((inputs,), call_kwargs))
        fn = _program(base, graphdef, arg_graphdef, expected, taps)
        feedback = probe.fa_feedback.get_value() if hasattr(probe, "fa_feedback") else None

        def model(p, program_inputs):
            return fn(p, program_inputs)[0]

        core = fa_jax.value_and_grad(model, loss, rule, has_aux=has_aux)
        return core(params, feedback, (arg_state, state), targets, step=step)

    return grad_fn


def _pure(tree: Any) -> Any:
    """An ``nnx.State`` as its nested dict of arrays (a snapshot: the State's Variables may be the model's)."""
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def update_feedback(rule: Rule | str, state: nnx.State, updates: Any, params: Any) -> nnx.State:
    """The state from :func:`split` after one training step: :func:`fa_jax.update_feedback` on its feedback.

    Kolen–Pollack learns B (``B ← B + u − λ(B − W)``, ``λ = rule.decay``, Akrout et al.
    2019, eqs. 5–6); every other rule returns ``state`` itself.

    Args:
      rule: the rule the model was converted for.
      state: the non-Param state from :func:`split`.
      updates: what the optimizer adds to ``params`` this step (optax's ``updates``), shaped like ``params``.
      params: the params *before* the update.
    """
    rule = get_rule(rule)
    flat = list(nnx.to_flat_state(state))
    found = [(path, variable) for path, variable in flat if path == ("fa_feedback",)]
    if not found:
        none = fa_jax.Feedback()
        if fa_jax.update_feedback(rule, none, _pure(updates), _pure(params)) is none:
            return state  # an unconverted model (BP): the rule has no feedback to change
        raise ValueError(
            "state: expected the non-Param state of a converted model (from fa_jax.nnx.split), "
            "given one without its fa_feedback"
        )
    before = found[0][1].get_value()
    after = fa_jax.update_feedback(rule, before, _pure(updates), _pure(params))
    if after is before:  # fixed feedback
        return state
    return nnx.from_flat_state([(p, v.replace(after) if p == ("fa_feedback",) else v) for p, v in flat])


def optimizer_update(optimizer: nnx.Optimizer, model: nnx.Module, grads: Any) -> None:
    """``optimizer.update(model, grads)``, then the rule's feedback step (:meth:`Rule.update_feedback`).

    For Kolen–Pollack, B gets the update the optimizer gave W (weight decay included)
    and the rule's own decay, so ``B − W`` shrinks by ``1 − rule.decay`` per step; every
    other rule's feedback is left as it is. Works eagerly and inside ``nnx.jit``.
    """
    if not hasattr(model, "fa_feedback"):
        optimizer.update(model, grads)
        return
    before = _pure(nnx.state(model, nnx.Param))  # arrays, kept while optimizer.update replaces the values
    optimizer.update(model, grads)
    updates = jax.tree.map(jnp.subtract, _pure(nnx.state(model, nnx.Param)), before)
    converted = cast("_Converted", model)
    feedback = converted.fa_feedback.get_value()
    new = fa_jax.update_feedback(converted.fa_rule, feedback, updates, before)
    if new is not feedback:
        converted.fa_feedback.set_value(new)
