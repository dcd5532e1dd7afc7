"""Train an unmodified Flax NNX model with FA, DFA, their family (uSF, frSF, brSF, Kolen–Pollack, DRTP) or shallow.

:func:`convert` walks the module graph (``nnx.iter_modules``) and re-types
modules in place, keeping the module objects, their ``nnx.Param`` s and their
paths (so shared layers stay shared and optimizer state lines up):

* **FA**: every ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and
  ``nnx.Einsum`` becomes a feedback-aware subclass holding B in a
  :class:`Feedback` variable. The layer's own ``__call__`` runs unchanged
  except that its primitive (``dot_general`` / ``conv_general_dilated`` /
  ``einsum_op``) routes ``dx`` through B (Lillicrap et al. 2016, eq. 2):
  ``dx = g Bᵀ`` for dense layers, the transposed convolution with B for conv.
* **DFA**: modules chosen by ``taps`` are cut with a stop-gradient and recorded;
  the root's output goes through a ``custom_vjp`` identity whose backward sends
  ``δ_l = e B_l`` to each tap (Nøkland 2016, eq. 3) with one GEMM of ``e`` and
  the concatenated ``[B_1 … B_L]`` (held by the root in a :class:`Feedback`).
* **shallow**: the same cuts, no projection: only the part after the last tap trains.
* **uSF, frSF, brSF** (Liao et al. 2016) and **Kolen–Pollack** (Akrout et al.
  2019) are converted like FA: each layer holds the core's feedback leaf for its
  kernel (M for frSF, B for KP, the layer key for uSF and brSF) and its backward
  builds ``rule.backward_matrix(W, (leaf, step))``, as ``fa_jax.FAOps`` does.
* **DRTP** (Frenkel et al. 2021) is converted like DFA, but the head sends
  ``y* B_l``, a fixed projection of the *targets*, to the hidden taps.

Two rules need more than the batch in their backward, and get it at call time
through :func:`call` (the pure :func:`value_and_grad` passes both):

* brSF the step ``t``: ``fa_jax.nnx.call(model, x, step=t)``;
* DRTP the targets: ``fa_jax.nnx.call(model, x, targets=labels)``.

A plain ``model(x)`` still evaluates; differentiating it raises at trace time
and says what to use. Kolen–Pollack's B is learned: :func:`optimizer_update`
(stateful, in place of ``optimizer.update``) or :func:`update_feedback` (on the
pure :func:`split` states) give it W's update and decay; the optimizer itself
never sees it.

Feedback is a :class:`Feedback` variable, not an ``nnx.Param``, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.value_and_grad`` leave it
alone. Gradients are ordinary autodiff of the converted model::

    model = fa_jax.nnx.convert(model, "fa", key=jax.random.key(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(loss_fn)(model)     # FA gradients
    optimizer.update(model, grads)

    # brSF / DRTP: call the model with its step / targets; KP: learn B beside the optimizer
    loss_fn = lambda m: loss(fa_jax.nnx.call(m, x, step=t, targets=y), y)
    fa_jax.nnx.optimizer_update(optimizer, model, grads, decay=lr * weight_decay)

Pure path (seed sweeps under ``jax.vmap``): ``graphdef, params, feedback =
fa_jax.nnx.split(model)`` and ``grad_fn = fa_jax.nnx.value_and_grad(graphdef,
loss)``, ``grad_fn(params, feedback, inputs, targets, *, step=None) -> (loss,
grads)``, the signature of the core ``fa_jax.value_and_grad``.

DFA tap placements (``taps=``), following Launay et al. 2020:

* ``"layer"``: one tap at the input of every weight layer that does not read
  the model input directly. For an MLP that is the post-activation ``h_l`` of
  every hidden layer, Nøkland's DFA exactly; for a CNN it is every feature map
  a conv or dense layer reads.
* ``"macro"``: one tap at the output of every block (``blocks=``: a module
  type, a tuple of types, or a list of module paths).
* ``"micro"``: inside every block, a tap at the output of each attention module
  (``attention=``, default ``nnx.MultiHeadAttention``), plus the block output
  (after the MLP and its residual).
* a list of module paths (``"blocks/0"``): a tap at each module's output.

Normalization, dropout and residual connections need nothing: between taps
they are differentiated as usual (they carry no transported weight matrix).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fa_jax import _checks, _flax, _kolen_pollack, _rules
from fa_jax._feedback import FAFeedback

__all__ = [
    "Feedback", "WEIGHT_LAYERS", "convert", "call", "split", "value_and_grad", "feedback_of",
    "update_feedback", "optimizer_update",
]


class Feedback(nnx.Variable):
    """Feedback: B, M, a DFA/DRTP projection, or a key. Not an ``nnx.Param``: no optimizer touches it.

    Fixed for every rule but Kolen–Pollack, whose B changes only through
    :func:`optimizer_update` / :func:`update_feedback`.
    """


WEIGHT_LAYERS: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)

# The primitive each layer calls through ``self.<attribute>`` and its default.
_PRIMITIVE = (
    (nnx.Conv, "conv_general_dilated", (jax.lax.conv_general_dilated,)),
    (nnx.Einsum, "einsum_op", (jnp.einsum,)),
    (nnx.LinearGeneral, "dot_general", (None, jax.lax.dot_general)),
    (nnx.Linear, "dot_general", (jax.lax.dot_general,)),
)


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _primitive(module: nnx.Module) -> tuple[str, tuple]:
    for cls, attribute, defaults in _PRIMITIVE:
        if isinstance(module, cls):
            return attribute, defaults
    raise TypeError(f"{type(module).__name__} is not one of {[c.__name__ for c in WEIGHT_LAYERS]}")


class _Overlay:
    """``module`` with a few attributes replaced; the layer's own ``__call__`` runs on it."""

    def __init__(self, module: Any, overrides: dict[str, Any]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        return overrides[name] if name in overrides else getattr(object.__getattribute__(self, "_module"), name)


def _value(variable: nnx.Variable) -> jax.Array:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


class _CallInputs(NamedTuple):
    """What a forward may need beyond the model's own arguments: brSF's step, DRTP's targets."""

    step: Any = None
    targets: Any = None


_CALLS = threading.local()

_PASS_STEP = (
    "Call the model as fa_jax.nnx.call(model, x, step=step) inside the differentiated function, or pass "
    "step=step to the grad_fn of fa_jax.nnx.value_and_grad(graphdef, loss)"
)
_PASS_TARGETS = (
    "A plain model(x) under nnx.value_and_grad cannot see them: call the model as "
    "fa_jax.nnx.call(model, x, targets=targets) inside the differentiated function, or use the pure "
    "fa_jax.nnx.value_and_grad(graphdef, loss), whose grad_fn(params, feedback, inputs, targets) passes them"
)


def _call_inputs() -> _CallInputs:
    """The innermost :func:`call`'s step and targets (both ``None`` for a plain ``model(x)``)."""
    stack = getattr(_CALLS, "stack", None)
    return stack[-1] if stack else _CallInputs()


def call(model: nnx.Module, *args: Any, step: Any = None, targets: Any = None, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` given the per-call inputs some rules read in their backward.

    * ``step``: brSF redraws ``M_t = init(fold_in(k_l, t))`` every step (Liao et al. 2016).
    * ``targets``: DRTP sends ``y* B_l`` to the hidden taps (Frenkel et al. 2021, eq. 6);
      integer labels of the output's batch shape, or an array shaped like the output.

    Other rules ignore both, so one training step serves every rule. The values travel
    with this call only (no state is left in the model), so call it *inside* the
    function you differentiate or jit: the step and targets then are that trace's own
    arguments, never constants of an earlier trace. Without them, evaluation runs as
    usual and a gradient raises at trace time.
    """
    if step is not None:
        _checks.check_step_value(step, "step")
    if not hasattr(_CALLS, "stack"):
        _CALLS.stack = []
    _CALLS.stack.append(_CallInputs(step, targets))
    try:
        return model(*args, **kwargs)
    finally:
        _CALLS.stack.pop()


_CLASSES: dict[tuple, type] = {}


def _fa_class(base: type) -> type:
    """``FA<Base>``: ``Base.__call__`` with its primitive's input-gradient through the layer's feedback."""
    if ("fa", base) not in _CLASSES:

        def __call__(self, *args, **kwargs):
            attribute, _ = _primitive(self)
            layer = _flax.LayerFeedback(_value(self.fa_feedback), self.fa_rule, _call_inputs().step,
                                        self.fa_path, _PASS_STEP)
            if attribute == "conv_general_dilated":
                primitive = _flax.feedback_conv_general_dilated(layer, getattr(self, "mask", None))
            elif attribute == "einsum_op":
                primitive = _flax.feedback_einsum(layer)
            else:
                primitive = _flax.feedback_dot_general(layer)
            overrides = {attribute: primitive, "dot_general_cls": None}
            return base.__call__(_Overlay(self, overrides), *args, **kwargs)

        _CLASSES["fa", base] = type(f"FA{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__})
    return _CLASSES["fa", base]


def _tap_class(base: type, where: str) -> type:
    """``Tapped<Base>``: records and cuts the module's input (``where="input"``) or output."""
    if (where, base) not in _CLASSES:

        def __call__(self, x, *args, **kwargs):
            if where == "input":
                return base.__call__(self, _flax.tap(self.fa_tap, x, self.fa_tap), *args, **kwargs)
            return _flax.tap(self.fa_tap, base.__call__(self, x, *args, **kwargs), self.fa_tap)

        name = f"Tapped{base.__name__}" + ("Input" if where == "input" else "")
        _CLASSES[where, base] = type(name, (base,), {"__call__": __call__, "__module__": __name__})
    return _CLASSES[where, base]


def _root_class(base: type) -> type:
    """``DFA<Base>``: runs ``Base.__call__`` recording taps, then the DFA head on the output."""
    if ("root", base) not in _CLASSES:

        def __call__(self, *args, **kwargs):
            rule = self.fa_rule
            with _flax.recording(cut=True) as recorder:
                outputs = base.__call__(self, *args, **kwargs)
            if not (hasattr(outputs, "shape") and hasattr(outputs, "dtype")):
                raise TypeError(f"rule {rule.name!r} needs the model to return one array, given {type(outputs).__name__}")
            _flax.check_taps(rule, self.fa_taps, recorder.names, recorder.values)
            if isinstance(rule, _rules.Shallow):
                return outputs
            return _flax.dfa_head(outputs, _value(self.fa_dfa_feedback), recorder.values, taps=self.fa_taps,
                                  rule=rule, targets=_call_inputs().targets, pass_targets=_PASS_TARGETS)

        _CLASSES["root", base] = type(f"{base.__name__}WithTaps", (base,), {"__call__": __call__, "__module__": __name__})
    return _CLASSES["root", base]


def _is_converted(module: nnx.Module) -> bool:
    return type(module) in _CLASSES.values()


def _modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    return [(_path_str(path), module) for path, module in nnx.iter_modules(model)]


def _check_not_stacked(path: str, module: nnx.Module) -> None:
    """A layer made under ``nnx.vmap`` holds a stack of kernels; one B drawn for the stack would be wrong."""
    if isinstance(module, nnx.Linear):
        want = (module.in_features, module.out_features)
    elif isinstance(module, (nnx.Conv, nnx.Einsum)):
        want = tuple(module.kernel_shape)
    else:
        return
    given = tuple(module.kernel.shape)
    if given != want:
        raise ValueError(
            f"layer {path!r} ({type(module).__name__}): expected a kernel of shape {want}, given {given}, a stack "
            "of layers made with nnx.vmap / run with nnx.scan; fa_jax.nnx draws one B per module, so it does not "
            "convert layer stacks. Use a Python loop over an nnx.List, or the functional core with lax.scan"
        )


def _weight_layers(model: nnx.Module, rule_name: str) -> list[tuple[str, nnx.Module]]:
    layers = [(p, m) for p, m in _modules(model) if isinstance(m, WEIGHT_LAYERS) and p]
    if not layers:
        found = sorted({type(m).__name__ for _, m in _modules(model)})
        raise ValueError(
            f"rule {rule_name!r}: the model has no layer it can handle; expected at least one of "
            f"{[c.__name__ for c in WEIGHT_LAYERS]} as a sub-module, found modules {found}"
        )
    for path, module in _modules(model):
        if path and not isinstance(module, WEIGHT_LAYERS) and isinstance(getattr(module, "kernel", None), nnx.Param):
            raise ValueError(_flax.unhandled_kernel_message(rule_name, path, module, WEIGHT_LAYERS))
    for path, module in layers:
        _check_not_stacked(path, module)
        attribute, defaults = _primitive(module)
        custom = getattr(module, attribute, None)
        if all(custom is not d for d in defaults) or getattr(module, "dot_general_cls", None) is not None:
            raise ValueError(
                f"layer {path!r} ({type(module).__name__}): expected the default {attribute}, given a custom one "
                f"({custom!r}); FA replaces that primitive, so a custom one cannot be honoured"
            )
    return layers


def _convert_fa(model: nnx.Module, rule: Any, key: jax.Array) -> None:
    """FA and its family: every weight layer holds its feedback leaf, drawn from ``layer_key(key, "<path>/kernel")``."""
    for path, module in _weight_layers(model, rule.name):
        module.fa_feedback = Feedback(_flax.layer_feedback(rule, key, f"{path}/kernel", _value(module.kernel)))
        module.fa_rule = rule
        module.fa_path = path
        module.__class__ = _fa_class(type(module))


def _match(path: str, module: nnx.Module, spec: Any) -> bool:
    if isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(s, type) for s in spec)):
        return isinstance(module, spec)
    return path in spec


def _named(modules: list[tuple[str, nnx.Module]], spec: Any, what: str) -> list[tuple[str, nnx.Module]]:
    if spec is None:
        raise ValueError(f"DFA taps={what!r} needs blocks=: a module type, a tuple of types, or a list of module paths")
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, type) and not (isinstance(spec, tuple) and all(isinstance(s, type) for s in spec)):
        known = {p for p, _ in modules}
        missing = [s for s in spec if s not in known]
        if missing:
            raise ValueError(
                f"DFA taps ({what}): {missing} name no module; expected paths among {sorted(known - {''})[:20]}"
            )
    chosen = [(p, m) for p, m in modules if p and _match(p, m, spec)]
    if not chosen:
        raise ValueError(f"DFA taps ({what}): no module matches {spec!r}")
    return chosen


def _tap_sites(model, taps, blocks, attention, rule_name) -> list[tuple[str, nnx.Module, str]]:
    """``(path, module, "input" | "output")`` for each tap of the placement."""
    modules = _modules(model)
    if taps == "layer":
        return [(p, m, "input") for p, m in _weight_layers(model, rule_name)]
    if taps == "macro":
        return [(p, m, "output") for p, m in _named(modules, blocks, "macro")]
    if taps == "micro":
        sites = []
        for block_path, block in _named(modules, blocks, "micro"):
            inner = [(p, m) for p, m in modules if p.startswith(block_path + "/") and isinstance(m, attention)]
            if not inner:
                raise ValueError(
                    f"DFA taps ('micro'): block {block_path!r} holds no attention module of type "
                    f"{attention!r}; pass attention= or use taps='macro'"
                )
            sites += [(p, m, "output") for p, m in inner] + [(block_path, block, "output")]
        return sites
    if isinstance(taps, str) or not isinstance(taps, Sequence):
        raise ValueError(f"taps: expected 'layer', 'macro', 'micro' or a list of module paths, given {taps!r}")
    return [(p, m, "output") for p, m in _named(modules, list(taps), "paths")]


def _discover(model: nnx.Module, inputs: Any) -> tuple[list[str], list[Any], Any, set[str]]:
    """Run the model abstractly: tap names and values in call order, output, and taps that read the model input."""
    graphdef, state = nnx.split(model)
    found: dict[str, Any] = {}

    def run(state, inputs):
        with _flax.recording(cut=True) as recorder:
            outputs = nnx.merge(graphdef, state)(inputs)
        leaves = jax.tree.leaves(inputs)
        found["names"] = list(recorder.names)
        found["raw"] = {n for n, v in zip(recorder.names, recorder.values) if any(v is leaf for leaf in leaves)}
        return outputs, recorder.values

    outputs, values = jax.eval_shape(run, state, inputs)
    return found["names"], values, outputs, found["raw"]


def _convert_taps(model, rule, key, inputs, taps, blocks, attention) -> None:
    if inputs is None:
        raise ValueError(f"convert(model, {rule.name!r}, ...) needs inputs= (an example batch) to find the taps")
    sites = _tap_sites(model, taps, blocks, attention, rule.name)
    originals = {}
    for path, module, where in sites:
        if _is_converted(module):
            raise ValueError(f"module {path!r} is already converted ({type(module).__name__})")
        originals[path] = (module, type(module))
        module.fa_tap = f"{path}:in" if where == "input" else path
        module.__class__ = _tap_class(type(module), where)
    try:
        names, values, outputs, raw = _discover(model, inputs)
    except Exception:
        for module, cls in originals.values():
            module.__class__ = cls
        raise
    # A tap on the model input itself feeds no parameter: leave that layer alone.
    for path, (module, cls) in originals.items():
        if module.fa_tap in raw or module.fa_tap not in names:
            module.__class__ = cls
            del module.fa_tap
    kept = [(n, v) for n, v in zip(names, values) if n not in raw]
    if not kept:
        raise ValueError(
            f"rule {rule.name!r} with taps={taps!r}: no tap reaches a hidden layer (sites {[s[0] for s in sites]} "
            "read only the model input or never ran)"
        )
    if not (hasattr(outputs, "shape") and hasattr(outputs, "dtype")):
        raise TypeError(f"rule {rule.name!r} needs the model to return one array, given {type(outputs).__name__}")
    specs = _flax.tap_specs([n for n, _ in kept], [v for _, v in kept], rule.batch_dims)
    model.fa_taps = specs
    model.fa_rule = rule
    if _rules.projects_to_taps(rule):  # DFA, DRTP; shallow only cuts
        output_shape = tuple(outputs.shape[rule.batch_dims:])
        model.fa_dfa_feedback = Feedback(_flax.draw_projection(rule, key, specs, output_shape))
    model.__class__ = _root_class(type(model))


def convert(
    model: nnx.Module,
    rule: Any,
    *,
    key: jax.Array | None = None,
    inputs: Any = None,
    taps: str | Sequence[str] = "layer",
    blocks: Any = None,
    attention: type | tuple[type, ...] = (nnx.MultiHeadAttention,),
) -> nnx.Module:
    """Convert ``model`` in place for ``rule`` and return it.

    Args:
      model: an ``nnx.Module`` whose root call takes the batch and returns one array.
      rule: ``"bp"`` (no change), ``"fa"``, ``"dfa"``, ``"shallow"``, ``"usf"``, ``"frsf"``,
        ``"brsf"``, ``"kp"``, ``"drtp"`` or a rule value.
      key: typed PRNG key for the feedback (every rule but BP and shallow); keyword-only.
        Layer ``path`` draws from ``layer_key(key, path)`` like the core: the FA
        family from ``"<module path>/kernel"``, DFA and DRTP from the tap name
        (``"<module path>"`` or ``"<module path>:in"``).
      inputs: DFA, DRTP and shallow: an example batch, traced abstractly to find taps.
      taps, blocks, attention: tap placement for DFA, DRTP and shallow (see the module doc).
    """
    rule = _rules.get_rule(rule)
    _flax.check_rule(rule, "fa_jax.nnx.convert")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module, given {type(model).__name__}")
    if any(_is_converted(m) for _, m in nnx.iter_modules(model)):
        raise ValueError("model is already converted; build a fresh model to convert it for another rule")
    _flax.check_key(rule, key)
    if isinstance(rule, _rules.BP):
        return model
    if _rules.is_fa_family(rule):
        _convert_fa(model, rule, key)
    else:
        _convert_taps(model, rule, key, inputs, taps, blocks, attention)
    return model


def feedback_of(model: nnx.Module) -> nnx.State:
    """All :class:`Feedback` variables of ``model`` (e.g. to check that training left them unchanged)."""
    return nnx.state(model, Feedback)


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, feedback)``: ``nnx.split(model, nnx.Param, ...)``; ``feedback`` holds every non-Param state."""
    return nnx.split(model, nnx.Param, ...)


def value_and_grad(graphdef: nnx.GraphDef, loss: Callable, *, has_aux: bool = False) -> Callable:
    """Pure ``grad_fn(params, feedback, inputs, targets, *, step=None) -> (loss, grads)`` for a converted model.

    ``params`` and ``feedback`` come from :func:`split`; ``grads`` is an
    ``nnx.State`` shaped like ``params``, the rule's gradients (FA, DFA, …) since
    the model was converted. Pure, so it composes with ``jax.jit`` and
    ``jax.vmap`` over seeds. ``loss(outputs, targets)``. The model runs through
    :func:`call`, so DRTP gets ``targets`` and brSF the ``step`` (an int or int32
    scalar, required by brSF, ignored by the other rules), like the core's grad_fn.
    """

    def objective(params, feedback, inputs, targets, step):
        outputs = call(nnx.merge(graphdef, params, feedback), inputs, step=step, targets=targets)
        return loss(outputs, targets)

    grad = jax.value_and_grad(objective, has_aux=has_aux)

    def grad_fn(params, feedback, inputs, targets, *, step=None):
        return grad(params, feedback, inputs, targets, step)

    return grad_fn


def _pure(tree: Any) -> Any:
    """An ``nnx.State`` as its nested dict of arrays (a snapshot: the State's Variables may be the model's own)."""
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _kernel_path(path: tuple) -> tuple:
    """The kernel beside a layer's :class:`Feedback` (``(…, "fa_feedback")`` → ``(…, "kernel")``)."""
    return path[:-1] + ("kernel",)


def update_feedback(rule: Any, feedback: nnx.State, updates: Any, params: Any, *, decay: float = 0.0) -> nnx.State:
    """The feedback state after one training step, on the pure :func:`split` states.

    Kolen–Pollack learns B (Akrout et al. 2019, eqs. 5–6): ``B ← B + u − decay·(B − W)``
    through the core's ``fa_jax.kolen_pollack_update``; every other rule returns
    ``feedback`` itself, so one loop serves the whole family.

    Args:
      rule: the rule the model was converted for (a name or a rule value).
      feedback: the feedback state from :func:`split` (``Feedback`` at ``"<layer>/fa_feedback"``).
      updates: what is added to the params this step (optax's ``updates``), shaped like
        ``params``, *including* the optimizer's own weight-decay term.
      params: the params *before* the update.
      decay: ``learning_rate × weight_decay`` of the optimizer, B's own decay.
    """
    flat = list(nnx.to_flat_state(feedback))
    learned = {_kernel_path(path): path for path, variable in flat if path[-1] == "fa_feedback"}
    values = {path: _value(variable) for path, variable in flat}
    params, updates = _pure(params), _pure(updates)

    def at_kernel(keypath, leaf):
        path = tuple(k.key for k in keypath)
        return values[learned[path]] if path in learned else None

    before = FAFeedback(jax.tree_util.tree_map_with_path(at_kernel, params))
    after = _kolen_pollack.update_feedback(rule, before, updates, params, decay=decay)
    if after is before:  # fixed feedback
        return feedback
    new = {
        learned[tuple(k.key for k in keypath)]: matrix
        for keypath, matrix in jax.tree_util.tree_flatten_with_path(after.kernels)[0]
    }
    return nnx.from_flat_state([(path, variable.replace(new[path]) if path in new else variable) for path, variable in flat])


def _rule_of(model: nnx.Module) -> Any:
    """The rule ``model`` was converted for (BP when none)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "fa_rule"):
            return module.fa_rule
    return _rules.BP()


def optimizer_update(optimizer: nnx.Optimizer, model: nnx.Module, grads: Any, *, decay: float = 0.0) -> None:
    """``optimizer.update(model, grads)``, then the rule's feedback step (:func:`update_feedback`).

    The stateful form of the Kolen–Pollack loop: the optimizer touches only
    ``nnx.Param`` s; B then gets the same update as W plus its own decay
    (``decay = learning_rate × weight_decay``), so ``B − W`` shrinks by ``1 − decay``
    per step. For every other rule this is ``optimizer.update(model, grads)``.
    Works eagerly and inside ``nnx.jit``.
    """
    rule = _rule_of(model)
    if not isinstance(rule, _kolen_pollack.KolenPollack):  # fixed feedback: nothing to learn
        optimizer.update(model, grads)
        return
    _, before, feedback = split(model)
    before = _pure(before)  # arrays, taken before optimizer.update replaces the Params' values
    optimizer.update(model, grads)
    updates = jax.tree.map(jnp.subtract, _pure(split(model)[1]), before)
    nnx.update(model, update_feedback(rule, feedback, updates, before, decay=decay))
