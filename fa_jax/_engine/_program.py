"""A model's program: traced once, analysed, and run again under a rule.

:func:`analyse` traces ``model(params, inputs)`` to a jaxpr (``jax.make_jaxpr``)
and walks it symbolically (:class:`fa_jax._engine._walk.Analysis`): it finds
every weight product and the role of each axis of its weight, every tap, and
how every parameter is used. :func:`run` walks it again with real values
(:class:`fa_jax._engine._walk.Evaluation`), sending each weight product through
the rule and, for a cutting rule, each tap through a cut and the output through
the head that feeds the taps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fa_jax._engine import _taps, _walk
from fa_jax._engine._classes import Base, Cls, Leaf
from fa_jax._engine._taps import TapLayout
from fa_jax._specs import OutputSpec, TapSpec, WeightSpec

PLACEMENTS = ("auto", "layer", "marked")


def param_path(path: tuple) -> str:
    """``"layers/0/kernel"``: a key path with the ``.value`` of boxed leaves (Flax variables) dropped."""
    keys = [k for k in path if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("value", "raw_value"))]
    return jax.tree_util.keystr(tuple(keys), simple=True, separator="/")


def exact_set(paths: list[str], exact: Any) -> frozenset:
    """Indices of the parameters marked exact: a path, a sequence of paths, or ``predicate(path) -> bool``."""
    if exact is None or exact == ():
        return frozenset()
    if callable(exact):
        return frozenset(i for i, p in enumerate(paths) if exact(p))
    names = [exact] if isinstance(exact, str) else list(exact)
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise ValueError(f"exact: {unknown} name no parameter; expected paths among {paths[:12]}")
    return frozenset(i for i, p in enumerate(paths) if p in names)


@dataclasses.dataclass
class Program:
    """What :func:`analyse` found. Built per trace; its sites are valid for that trace only."""

    closed: Any  # ClosedJaxpr of fn(flat_params, inputs)
    paths: list[str]
    avals: list[Any]
    exact: frozenset
    out_tree: Any
    outs: list[Any]  # avals of the outputs (without the model's aux)
    specs: dict[int, WeightSpec]  # parameters with a feedback-eligible product
    uses: dict[int, list[str]]
    sites: dict[str, dict]  # placement -> {site: (name, aval, stack)}, in walk order
    carry_classes: dict
    out_classes: dict
    n_params: int
    model_has_aux: bool = False
    refusals: list = dataclasses.field(default_factory=list)  # (parameter indices, what, message)

    def spec(self, base: Base) -> WeightSpec:
        return self.specs[base.param].layer(base.depth)

    def taps(self, placement: str) -> list[tuple[Any, str, Any, tuple[int, ...]]]:
        """``(site, name, per-layer aval, stack)`` of every tap a rule with this placement cuts."""
        if placement == "auto":
            placement = "marked" if self.sites["marked"] else "layer"
        return [(site, *info) for site, info in self.sites[placement].items()]


def analyse(model: Callable, params: Any, inputs: Any, *, exact: Any = (), model_has_aux: bool = False) -> Program:
    """Trace ``model(params, inputs)`` and classify its program (see the module doc).

    ``model_has_aux``: the model returns ``(outputs, aux)``; only ``outputs`` reach the
    loss (``aux`` is, e.g., updated state), so only they are projected from.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [param_path(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    marked = exact_set(paths, exact)

    def fn(flat_params, inputs):
        return model(jax.tree_util.tree_unflatten(treedef, flat_params), inputs)

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(leaves, inputs)
    avals = [jax.core.ShapedArray(tuple(x.shape), x.dtype) for x in leaves]
    out_tree = jax.tree_util.tree_structure(out_shape)
    if model_has_aux:
        if not (isinstance(out_shape, tuple) and len(out_shape) == 2):
            raise ValueError(f"model: with model_has_aux=True the model must return (outputs, aux), given {out_tree}")
        out_shape = out_shape[0]
    out_flat = jax.tree_util.tree_leaves(out_shape)
    analysis = _walk.Analysis(paths, marked, avals)
    args = _args(avals, closed.jaxpr.invars[len(leaves) :], symbolic=True)
    analysis.run(closed.jaxpr, [_walk.Val(c, Cls.CONST) for c in closed.consts], args, ())
    specs = _weight_specs(analysis, paths, avals)
    sites = {"marked": _explicit_sites(analysis), "layer": _layer_sites(analysis, paths)}
    return Program(
        closed,
        paths,
        avals,
        marked,
        out_tree,
        out_flat,
        specs,
        analysis.uses,
        sites,
        analysis.carry_classes,
        analysis.out_classes,
        len(leaves),
        model_has_aux,
        analysis.refusals,
    )


def refused(program: Program, rule: Any) -> list[tuple[frozenset, str, str]]:
    """The refused uses of parameters that ``rule`` would route through feedback.

    Under a rule that keeps ``Wᵀ`` for those parameters (BP, or inside a DFA block)
    such a use computes exactly what was asked, so it is allowed.
    """
    key, found = jax.random.key(0), []
    for refusal in program.refusals:
        for index in refusal[0]:
            aval = program.avals[index]
            spec = program.specs.get(index) or WeightSpec(program.paths[index], tuple(aval.shape), aval.dtype, None)
            if jax.eval_shape(lambda s=spec: rule.init_weight(s, key=key)) is not None:
                found.append(refusal)
                break
    return found


def enforce(program: Program, rule: Any) -> None:
    """Raise the first use of a parameter that ``rule`` would route but the engine cannot (:func:`refused`)."""
    for _, _, message in refused(program, rule)[:1]:
        raise _walk.Refusal(f"rule {rule.name!r}: {message}")


def _args(params: list[Any], input_vars: Sequence[Any], *, symbolic: bool, inputs: Sequence[Any] = ()) -> list:
    """The walk's arguments: each floating parameter a WEIGHT (its own view), each input DATA."""
    args = []
    for i, p in enumerate(params):
        aval = p if symbolic else jax.typeof(p)
        if jnp.issubdtype(aval.dtype, jnp.floating):
            args.append(_walk.Val(p, Cls.WEIGHT, frozenset([i]), Leaf(Base(i))))
        else:
            args.append(_walk.Val(p, Cls.CONST))
    values = [v.aval for v in input_vars] if symbolic else list(inputs)
    return args + [_walk.Val(v, Cls.DATA) for v in values]


def _weight_specs(analysis: _walk.Analysis, paths: list[str], avals: list[Any]) -> dict[int, WeightSpec]:
    specs: dict[int, WeightSpec] = {}
    depth: dict[int, int] = {}
    for record in analysis.records:
        if record.exact:
            continue
        for base in record.bases:
            depth[base.param] = max(depth.get(base.param, 0), base.depth)
            if base.param in specs:
                continue
            aval = avals[base.param]
            axes = record.roles.get(base)
            roles = None
            if axes is not None:
                per_layer = len(aval.shape) - base.depth
                roles = ("stack",) * base.depth + tuple(axes.get(k, "stack") for k in range(per_layer))
            specs[base.param] = WeightSpec(
                paths[base.param], tuple(aval.shape), aval.dtype, roles, 0, record.product.kind
            )
    return {i: s._replace(depth=depth[i]) for i, s in specs.items()}


def _stack(analysis: _walk.Analysis, site: Any) -> tuple[int, ...]:
    return tuple(
        analysis.scan_lengths[site.ctx[:k]]
        for k in range(1, len(site.ctx) + 1)
        if site.ctx[:k] in analysis.scan_lengths
    )


def _explicit_sites(analysis: _walk.Analysis) -> dict:
    sites: dict = {}
    names: set[str] = set()
    for index, (site, name) in enumerate(analysis.explicit):
        name = f"tap_{index}" if name is None else name
        if name in names:
            raise ValueError(
                f"tap name {name!r} is used twice; each tap needs its own feedback, so names must be unique"
            )
        names.add(name)
        sites[site] = (name, analysis.site_avals[site], _stack(analysis, site))
    return sites


def _layer_sites(analysis: _walk.Analysis, paths: list[str]) -> dict:
    """One tap at the activation entering each weight product (not at the model input itself)."""
    sites: dict = {}
    names: set[str] = set()
    for record in analysis.records:
        if record.site is None or record.activation != Cls.ACT or record.site in sites:
            continue
        name = f"{paths[record.bases[0].param]}:in"
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}#{k}", k + 1
        names.add(unique)
        sites[record.site] = (unique, analysis.site_avals[record.site], _stack(analysis, record.site))
    return sites


# --------------------------------------------------------------------------- taps and batch dims


def tap_layout(program: Program, placement: str, batch_dims: int) -> TapLayout:
    """The taps a rule with ``placement`` cuts, as specs after ``batch_dims`` leading batch dims."""
    taps = tuple(
        TapSpec(name, tuple(aval.shape[batch_dims:]), stack) for _, name, aval, stack in program.taps(placement)
    )
    return TapLayout(taps, OutputSpec(tuple(single_output(program).shape[batch_dims:])), batch_dims)


def single_output(program: Program) -> Any:
    if len(program.outs) != 1:
        raise ValueError(
            f"model: a tap rule projects the output error, so the model must return one array (or, with "
            f"model_has_aux=True, (one array, aux)); it returned {program.out_tree}"
        )
    return program.outs[0]


def find_batch_dims(
    model: Callable,
    params: Any,
    inputs: Any,
    program: Program,
    placement: str,
    *,
    exact: Any,
    asked: int | None,
    mix: bool,
) -> int:
    """The leading dims the output and every tap share as batch (or sequence) axes.

    Output axis ``i`` (of size ``n``, the same in every tap) is a batch axis when the
    model, traced again with its input axes of size ``n`` resized (doubled, else
    shortened by one; all of them, as a symbolic dimension would be, else all but one,
    else one at a time), changes axis ``i`` of the output and of every tap together. A
    leading shape that only coincides (a batch of 10 and 10 classes) does not grow and
    does not count. When no input axis of that size can
    be resized (a fixed positional table), the answer is unknown: ``asked`` (the
    rule's ``batch_dims``) must then say it, and an explicit ``asked`` is checked
    against what was found.
    """
    taps = program.taps(placement)
    if not taps:
        raise ValueError(f"the model has no tap for placement {placement!r}: {_no_taps(placement)}")
    output = single_output(program)
    base = _shapes(program, placement)
    out = base["output"]
    cache: dict = {}
    found, unknown = 0, None
    while found < len(out) and all(len(s) > found and s[found] == out[found] for s in base.values()):
        verdict = _is_batch_axis(model, params, inputs, placement, exact, program.model_has_aux, base, found, cache)
        if verdict is None:
            unknown = found
        if not verdict:
            break
        found += 1
    if asked is None:
        if unknown is not None:
            raise ValueError(
                f"batch_dims: cannot tell whether axis {unknown} (size {out[unknown]}) of the output {out} is a batch "
                f"axis: the model does not run with its input axes of that size resized. Pass batch_dims={unknown} "
                f"(one projection per {'sample' if unknown == 1 else 'leading position'}) or batch_dims={unknown + 1} "
                "(per position too, e.g. per token) to the rule"
            )
        if found == 0:
            raise ValueError(
                f"batch_dims: no leading axis of the model output {out} is a batch axis of every tap too; expected "
                "taps shaped (*batch, *features) like the output (pass batch_dims= to the rule to say which)"
            )
        return found
    if unknown is not None and asked > unknown:
        found = asked  # the caller settled what the shapes could not
    return _taps.check_batch_dims(output, [(n, a, st) for _, n, a, st in taps], asked, found, mix=mix)


def _is_batch_axis(model, params, inputs, placement, exact, model_has_aux, base, axis, cache) -> bool | None:
    """Does output axis ``axis`` grow with an input axis of its size, with every tap? ``None``: unknown."""
    size = base["output"][axis]
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    candidates = [
        (i, a) for i, leaf in enumerate(leaves) for a, n in enumerate(getattr(leaf, "shape", ())) if n == size
    ]
    if not candidates:
        return False

    def resized(chosen, new_size):
        structs = [
            jax.ShapeDtypeStruct(
                tuple(new_size if (i, a) in chosen else n for a, n in enumerate(leaf.shape)), leaf.dtype
            )
            for i, leaf in enumerate(leaves)
        ]
        try:
            program = analyse(
                model, params, jax.tree_util.tree_unflatten(treedef, structs), exact=exact, model_has_aux=model_has_aux
            )
            return _shapes(program, placement)
        except Exception:  # the model cannot run at that size along these axes
            return None

    def grows(chosen) -> bool | None:
        chosen = tuple(chosen)
        if chosen not in cache:
            # Longer, else shorter (a positional table may allow fewer positions but not more).
            cache[chosen] = resized(chosen, size * 2) or (resized(chosen, size - 1) if size > 1 else None)
        other = cache[chosen]
        if other is None:
            return None
        return all(
            name in other and len(other[name]) > axis and other[name][axis] != shape[axis]
            for name, shape in base.items()
        )

    joint = grows(candidates)
    if joint is not None:
        return joint
    # Some axes of this size may be features (X = I in a graph): leave each one out, then try each alone.
    others = [grows([c for c in candidates if c != left]) for left in candidates] if len(candidates) > 2 else []
    each = others + [grows([c]) for c in candidates]
    if any(each):
        return True
    # A size-1 axis projects the same either way (one position); as a feature axis, a later
    # call with more positions is refused by the layout check instead of being mixed.
    return None if None in each and size > 1 else False


def _shapes(program: Program, placement: str) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(aval.shape) for _, name, aval, _ in program.taps(placement)}
    shapes["output"] = tuple(single_output(program).shape)
    return shapes


def _no_taps(placement: str) -> str:
    if placement == "marked":
        return "mark activations with fa_jax.tap(h, name=...)"
    return "no weight product reads an activation that depends on a parameter"


# --------------------------------------------------------------------------- running it


def run(
    program: Program,
    rule: Any,
    params: Any,
    feedback: Any,
    inputs: Any,
    *,
    step: Any,
    targets: Any,
    probes: Sequence[jax.Array] | None = None,
    placement: str | None = None,
) -> Any:
    """The model's outputs, differentiable under ``rule``: feedback products, cut taps and the head.

    ``probes``: one array per tap of ``program.taps(placement or rule.taps)``, shaped
    ``(*stack, *batch, *features)`` like the tap and added to it before any cut, so the
    cotangent of a zero probe is the signal the rule sends to that tap (``fa_jax.alignment``).
    """
    flat_params = jax.tree_util.tree_leaves(params)
    leaves, weights = {}, {}
    weight_leaves = feedback.weight_leaves(program.paths) if feedback is not None else [None] * len(flat_params)
    for i, (p, leaf) in enumerate(zip(flat_params, weight_leaves, strict=True)):
        if leaf is not None:
            leaves[Base(i)] = leaf
        weights[Base(i)] = p
    layout = feedback.layout if (feedback is not None and rule.cuts) else None
    taps = program.taps(rule.taps) if rule.cuts else []
    sites = {site: k for k, (site, *_) in enumerate(taps)}
    probed = {}
    if probes is not None:
        probed = {site: p for (site, *_), p in zip(program.taps(placement or rule.taps), probes, strict=True)}
    evaluation = _walk.Evaluation(program, rule, leaves, weights, step, sites, probed)
    args = _args(flat_params, (), symbolic=False, inputs=jax.tree_util.tree_leaves(inputs))
    outs = evaluation.run(program.closed.jaxpr, [_walk.Val(c, Cls.CONST) for c in program.closed.consts], args, ())
    outputs = jax.tree_util.tree_unflatten(program.out_tree, [o.value for o in outs])
    if not rule.cuts:
        return outputs
    if feedback is None or layout is None:
        raise ValueError(
            f"feedback: rule {rule.name!r} cuts the model at taps; expected a Feedback with their layout from "
            "init_feedback, given none"
        )
    values = [evaluation.taps[site] for site, *_ in taps]
    fed = outputs[0] if program.model_has_aux else outputs
    fed = _taps.head(fed, values, rule=rule, feedback=feedback.taps, layout=layout, targets=targets, step=step)
    return (fed, outputs[1]) if program.model_has_aux else fed
