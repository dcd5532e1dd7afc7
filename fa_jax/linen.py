"""Train an unmodified Flax Linen model with FA, DFA, their family (uSF, frSF, brSF, Kolen–Pollack, DRTP) or shallow.

:func:`adapt` wraps ``model.apply`` in ``nn.intercept_methods``; the model's
code is not touched::

    adapted = fa_jax.linen.adapt(model, "fa")
    feedback = adapted.init_feedback(variables, x, key=jax.random.key(0))
    y = adapted.apply(variables, feedback, x)          # same as model.apply(variables, x)
    grads = jax.grad(lambda p: loss(adapted.apply({"params": p}, feedback, x), t))(params)

* **FA**: each ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv`` call runs the
  layer's own ``__call__`` with its primitive (``dot_general`` /
  ``conv_general_dilated``) swapped for a feedback op, so ``dx`` goes through
  B (Lillicrap et al. 2016, eq. 2) and ``dW`` stays exact. B lives in a
  :class:`fa_jax.FAFeedback` shaped like ``params`` (B at each kernel drawn from
  ``layer_key(key, "<module path>/kernel")``, ``None`` elsewhere): outside
  ``params``, so no optimizer, weight decay or checkpoint restore touches it.
* **DFA / shallow**: the taps (see ``fa_jax.nnx`` for ``"layer"``, ``"macro"``,
  ``"micro"`` or a list of module paths) are cut with a stop-gradient, and the
  output's backward sends ``δ_l = e B_l`` to each (Nøkland 2016, eq. 3). The
  feedback is a :class:`fa_jax.DFAFeedback`.
* **uSF, frSF, brSF** (Liao et al. 2016), **Kolen–Pollack** (Akrout et al. 2019):
  like FA, with the core's feedback leaf at each kernel (M for frSF, B for KP,
  the layer key for uSF and brSF) and B built by ``rule.backward_matrix(W,
  (leaf, step))`` in the backward. brSF needs the step,
  ``apply(variables, feedback, x, step=t)``. KP's B is learned: the feedback
  is the core's :class:`fa_jax.FAFeedback` shaped like ``params``, so the core's
  ``fa_jax.update_feedback(rule, feedback, updates, params, decay=)`` steps it
  beside the optimizer (and returns every other rule's feedback unchanged).
* **DRTP** (Frenkel et al. 2021): like DFA, but the hidden taps receive a fixed
  projection of the targets, ``apply(variables, feedback, x, targets=labels)``.

``step=`` and ``targets=`` are keywords of the adapted ``apply`` (not passed on
to the model); without them evaluation runs, and a gradient raises at trace time.

Two traps are guarded, so BP is never computed silently:

* An interceptor acts only while JAX traces. A function jitted (``jax.jit``,
  ``nn.jit``) and first traced outside the adapter replays its cached trace,
  in which no layer is intercepted. Every adapted forward therefore counts the
  layers it intercepted and raises when a layer holding FA feedback, or a DFA
  tap, was not reached. Pass the un-jitted ``model.apply`` and jit the adapted
  function instead.
* ``nn.scan`` / ``nn.vmap`` over layers trace one layer for the whole stack; an
  interceptor keyed by module path would give all of them one B. A layer whose
  kernel is a slice of a stacked param raises instead (unroll the stack, or
  use ``fa_jax.nnx`` / the functional core with ``lax.scan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax

from fa_jax import _checks, _flax, _rules
from fa_jax._feedback import DFAFeedback, FAFeedback, path_str

__all__ = ["WEIGHT_LAYERS", "Adapted", "adapt"]

WEIGHT_LAYERS: tuple[type, ...] = (nn.Dense, nn.DenseGeneral, nn.Conv)
_ATTENTION = (nn.MultiHeadDotProductAttention,)

_PASS_STEP = "Pass it to the adapted apply: apply(variables, feedback, *args, step=step)"
_PASS_TARGETS = "Pass them to the adapted apply: apply(variables, feedback, *args, targets=targets)"

_TRAP = (
    "The usual cause: a function jitted (jax.jit, nn.jit) and first traced outside fa_jax.linen replayed its "
    "cached trace, in which the interceptor never ran; pass the un-jitted model.apply to adapt() and jit the "
    "adapted function instead."
)


def _primitive(module: nn.Module) -> tuple[str, str]:
    if isinstance(module, nn.Conv):
        return "conv_general_dilated", "conv_general_dilated_cls"
    return "dot_general", "dot_general_cls"


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not hasattr(tree, "get"):
            return None
        tree = tree.get(part)
    return tree


@dataclasses.dataclass
class _Plan:
    """What one adapted forward does, and what it met (built per trace)."""

    rule: Any
    taps: Any
    blocks: Any
    attention: tuple[type, ...]
    params: Any
    fa_table: dict[str, Any] | None = None
    step: Any = None  # brSF's t, read in the FA-family backward
    used: set = dataclasses.field(default_factory=set)
    seen: set = dataclasses.field(default_factory=set)
    layers: list = dataclasses.field(default_factory=list)
    unhandled: list = dataclasses.field(default_factory=list)  # (path, module) with a kernel we cannot intercept
    active: set = dataclasses.field(default_factory=set)

    def is_block(self, module: nn.Module, path: str) -> bool:
        if self.blocks is None:
            return False
        if isinstance(self.blocks, (list, tuple)) and all(isinstance(b, str) for b in self.blocks):
            return path in self.blocks
        return isinstance(module, self.blocks)

    def output_tap(self, module: nn.Module, path: str) -> bool:
        if self.taps == "layer":
            return False
        if self.taps == "macro":
            return self.is_block(module, path)
        if self.taps == "micro":
            if self.is_block(module, path):
                return True
            if not isinstance(module, self.attention):
                return False
            parent = module.parent
            while isinstance(parent, nn.Module):
                if self.is_block(parent, "/".join(parent.path)):
                    return True
                parent = parent.parent
            return False
        return path in self.taps

    def check_layer(self, module: nn.Module, path: str) -> None:
        attribute, cls_attribute = _primitive(module)
        if getattr(module, attribute, None) is not None or getattr(module, cls_attribute, None) is not None:
            raise ValueError(
                f"layer {path!r} ({type(module).__name__}): expected the default {attribute}, given a custom one; "
                "FA replaces that primitive, so a custom one cannot be honoured"
            )
        kernel = module.get_variable("params", "kernel")
        stored = _lookup(self.params, module.path + ("kernel",))
        if kernel is not None and (stored is None or tuple(stored.shape) != tuple(kernel.shape)):
            raise ValueError(
                f"layer {path!r} runs inside nn.scan / nn.vmap (its kernel is {tuple(kernel.shape)} here but "
                f"{None if stored is None else tuple(stored.shape)} in params): an interceptor keyed by module path "
                "would give every scanned layer one shared B. Unroll the layers (a Python loop), or use "
                "fa_jax.nnx or the functional core (fa_jax.value_and_grad) with lax.scan"
            )

    def fa_call(self, module, path, next_fun, args, kwargs):
        name = f"{path}/kernel"
        if name not in self.fa_table:
            raise ValueError(f"layer {path!r} has no FA feedback; expected one of {sorted(self.fa_table)[:10]}")
        self.used.add(name)
        layer = _flax.LayerFeedback(self.fa_table[name], self.rule, self.step, path, _PASS_STEP)
        attribute, cls_attribute = _primitive(module)
        if attribute == "conv_general_dilated":
            primitive = _flax.feedback_conv_general_dilated(layer, module.mask)
        else:
            primitive = _flax.feedback_dot_general(layer)
        # Linen modules are frozen dataclasses: swap the primitive for this call only.
        object.__setattr__(module, attribute, primitive)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, attribute, None)

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        # A subclass's __call__ calling super().__call__ (nn.SelfAttention) is one layer call, not two.
        if context.method_name != "__call__" or not module.path or id(module) in self.active:
            return next_fun(*args, **kwargs)
        self.active.add(id(module))
        try:
            return self.intercept(module, next_fun, args, kwargs)
        finally:
            self.active.discard(id(module))

    def intercept(self, module, next_fun, args, kwargs):
        path = "/".join(module.path)
        self.seen.add(path)
        weight = isinstance(module, WEIGHT_LAYERS)
        if not weight and module.has_variable("params", "kernel"):
            self.unhandled.append((path, module))
            if _rules.is_fa_family(self.rule) or (self.taps == "layer" and _rules.uses_taps(self.rule)):
                raise ValueError(_flax.unhandled_kernel_message(self.rule.name, path, module, WEIGHT_LAYERS))
        if weight:
            self.check_layer(module, path)
            self.layers.append(path)
            if _rules.is_fa_family(self.rule):
                return self.fa_call(module, path, next_fun, args, kwargs)
        if weight and self.taps == "layer" and _rules.uses_taps(self.rule):
            args = (_flax.tap(f"{path}:in", args[0], path),) + tuple(args[1:])
        outputs = next_fun(*args, **kwargs)
        if _rules.uses_taps(self.rule) and self.output_tap(module, path):
            outputs = _flax.tap(path, outputs, path)
        return outputs


class Adapted(NamedTuple):
    """``init_feedback(variables, *args, key=...)`` and ``apply(variables, feedback, *args, step=, targets=, **kwargs)``."""

    init_feedback: Callable
    apply: Callable


def _split_output(result: Any, kwargs: dict) -> tuple[Any, Callable]:
    """The model output, and how to put a new one back (``mutable=`` returns ``(output, state)``)."""
    if kwargs.get("mutable") not in (None, False) and isinstance(result, tuple) and len(result) == 2:
        return result[0], lambda out: (out, result[1])
    return result, lambda out: out


def adapt(
    model: nn.Module | Callable,
    rule: Any,
    *,
    taps: str | Sequence[str] = "layer",
    blocks: Any = None,
    attention: type | tuple[type, ...] = _ATTENTION,
) -> Adapted:
    """Versions of ``model.apply`` that train with ``rule``, with no change to the model.

    Args:
      model: an ``nn.Module``, or any ``apply_fn(variables, *args, **kwargs)`` that calls ``model.apply``.
      rule: ``"bp"``, ``"fa"``, ``"dfa"``, ``"shallow"``, ``"usf"``, ``"frsf"``, ``"brsf"``,
        ``"kp"``, ``"drtp"`` or a rule value.
      taps, blocks, attention: tap placement for DFA, DRTP and shallow (module paths are ``"Block_0"``-style).

    Returns:
      :class:`Adapted`. ``init_feedback(variables, *example_args, key=key)``
      returns ``None`` (BP, shallow), :class:`fa_jax.FAFeedback` (FA family) or
      :class:`fa_jax.DFAFeedback` (DFA, DRTP), drawn from the layer keys the core
      uses. ``apply(variables, feedback, *args, step=None, targets=None, **kwargs)``
      returns what ``model.apply(variables, *args, **kwargs)`` returns, with the
      rule's gradients; ``step`` (brSF) and ``targets`` (DRTP) are the adapter's.
      Both are pure: jit them, vmap them over seeds.
    """
    rule = _rules.get_rule(rule)
    _flax.check_rule(rule, "fa_jax.linen.adapt")
    apply_fn = model.apply if isinstance(model, nn.Module) else model
    if not callable(apply_fn):
        raise TypeError(f"model: expected an nn.Module or an apply function, given {type(model).__name__}")
    attention = attention if isinstance(attention, tuple) else (attention,)
    if taps in ("macro", "micro") and blocks is None:
        raise ValueError(f"DFA taps={taps!r} needs blocks=: a module type, a tuple of types, or a list of module paths")
    if isinstance(blocks, str):
        blocks = [blocks]

    def plan(variables, fa_table=None, step=None) -> _Plan:
        return _Plan(rule, taps, blocks, attention, variables.get("params", {}), fa_table, step)

    def run(p: _Plan, variables, args, kwargs, cut: bool):
        with _flax.recording(cut=cut) as recorder, nn.intercept_methods(p):
            result = apply_fn(variables, *args, **kwargs)
        return result, recorder

    def missing_paths(p: _Plan) -> None:
        if isinstance(taps, (list, tuple)):
            missing = [t for t in taps if t not in p.seen]
            if missing:
                raise ValueError(f"DFA taps: {missing} name no module; modules met: {sorted(p.seen)[:20]}")
        if isinstance(blocks, (list, tuple)) and all(isinstance(b, str) for b in blocks):
            missing = [b for b in blocks if b not in p.seen]
            if missing:
                raise ValueError(f"DFA blocks: {missing} name no module; modules met: {sorted(p.seen)[:20]}")

    def no_layer(p: _Plan) -> ValueError:
        return ValueError(
            f"rule {rule.name!r}: the model has no layer it can handle; expected at least one call of "
            f"{[c.__name__ for c in WEIGHT_LAYERS]}, met modules {sorted(p.seen)[:20]}. {_TRAP}"
        )

    def init_feedback(variables, *args, key=None, **kwargs):
        if isinstance(rule, _rules.BP):
            return None
        _flax.check_key(rule, key)
        found: dict[str, Any] = {}

        def discover(variables, args):
            p = plan(variables, fa_table={})
            if _rules.is_fa_family(p.rule):  # trace as BP here: we only need which layers run
                p.rule = _rules.BP()
            result, recorder = run(p, variables, args, kwargs, cut=True)
            leaves = jax.tree.leaves(args)
            found.update(plan=p, names=list(recorder.names),
                         raw={n for n, v in zip(recorder.names, recorder.values) if any(v is x for x in leaves)})
            return _split_output(result, kwargs)[0], recorder.values

        outputs, values = jax.eval_shape(discover, variables, args)
        p = found["plan"]
        missing_paths(p)
        if _rules.is_fa_family(rule):
            if p.unhandled:  # discovery ran as BP; the FA family would leave this layer on Wᵀ
                path, module = p.unhandled[0]
                raise ValueError(_flax.unhandled_kernel_message(rule.name, path, module, WEIGHT_LAYERS))
            if not p.layers:
                raise no_layer(p)
            layers = {f"{path}/kernel" for path in p.layers}

            def draw(path, leaf):
                name = path_str(path)
                return _flax.layer_feedback(rule, key, name, leaf) if name in layers else None

            return FAFeedback(jax.tree_util.tree_map_with_path(draw, variables["params"]))
        kept = [(n, v) for n, v in zip(found["names"], values) if n not in found["raw"]]
        if not kept:
            if taps == "layer" and not p.layers:
                raise no_layer(p)
            raise ValueError(f"rule {rule.name!r} with taps={taps!r}: no tap reaches a hidden layer. {_TRAP}")
        if not (hasattr(outputs, "shape") and hasattr(outputs, "dtype")):
            raise TypeError(f"rule {rule.name!r} needs the model to return one array, given {type(outputs).__name__}")
        specs = _flax.tap_specs([n for n, _ in kept], [v for _, v in kept], rule.batch_dims)
        output_shape = tuple(outputs.shape[rule.batch_dims:])
        # shallow: the taps only cut the network; there is no projection
        projection = _flax.draw_projection(rule, key, specs, output_shape) if _rules.projects_to_taps(rule) else None
        return _flax.dfa_feedback(projection, specs, output_shape, rule)

    def apply(variables, feedback, *args, step=None, targets=None, **kwargs):
        if step is not None:
            _checks.check_step_value(step, "step")
        if isinstance(rule, _rules.BP):
            return apply_fn(variables, *args, **kwargs)
        if _rules.is_fa_family(rule):
            if not isinstance(feedback, FAFeedback):
                raise TypeError(
                    f"feedback: rule {rule.name!r} needs FAFeedback from init_feedback, given {type(feedback).__name__}"
                )
            flat, _ = jax.tree_util.tree_flatten_with_path(feedback.kernels)
            table = {path_str(path): leaf for path, leaf in flat}
            p = plan(variables, fa_table=table, step=step)
            result, _ = run(p, variables, args, kwargs, cut=False)
            unused = sorted(set(table) - p.used)
            if unused:
                raise ValueError(f"FA feedback for {unused[:10]} was never used in this forward: those layers "
                                 f"ran without FA, which would silently be BP. {_TRAP}")
            return result
        if not isinstance(feedback, DFAFeedback):
            raise TypeError(
                f"feedback: rule {rule.name!r} needs DFAFeedback from init_feedback, given {type(feedback).__name__}"
            )
        p = plan(variables)
        result, recorder = run(p, variables, args, kwargs, cut=True)
        raw = {n for n, v in zip(recorder.names, recorder.values) if any(v is x for x in jax.tree.leaves(args))}
        names = [n for n in recorder.names if n not in raw]
        values = [v for n, v in zip(recorder.names, recorder.values) if n not in raw]
        if not names:
            raise ValueError(f"rule {rule.name!r}: no DFA tap ran in this forward, which would silently be BP "
                             f"for the output block only. {_TRAP}")
        _flax.check_taps(rule, feedback.taps, names, values)
        outputs, put_back = _split_output(result, kwargs)
        if isinstance(rule, _rules.Shallow):
            return result
        return put_back(_flax.dfa_head(outputs, feedback.projection, values, taps=feedback.taps, rule=rule,
                                       targets=targets, pass_targets=_PASS_TARGETS))

    return Adapted(init_feedback, apply)
