"""Walk a model's jaxpr: classify every value, then re-evaluate it with the rule's ops.

:class:`Walker` holds what both passes share: the classes of values
(:mod:`fa_jax._engine._classes`), when a product is a weight product, which
uses of a parameter are exact and which are refused. Two passes derive from it:

* :class:`Analysis` (symbolic; no array is computed) records every weight
  product, every tap and every parameter use, and raises a ``ValueError``
  naming the parameter and the primitive for any use it cannot route through a
  rule, unless that parameter is marked exact.
* :class:`Evaluation` binds each equation again (JAX's documented custom
  interpreter technique), except that weight products go through
  :func:`fa_jax._engine._product.feedback_product` and tap sites through
  :func:`fa_jax._engine._taps.cut`. ``jit`` bodies are inlined; ``scan``,
  ``checkpoint``, ``cond`` and ``while`` are rebuilt around a walk of their
  bodies, so a scanned stack of layers gets one feedback per layer.

A site (a tap position) is ``(context, var)``, ``context`` being the path of
equation indices from the top jaxpr, so a jaxpr shared by two calls still has
two sites.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.extend import core as jcore

from fa_jax._engine import _classes, _product, _taps
from fa_jax._engine._classes import Base, Cls, Const, Op, depends_on_inputs, is_param_only

# Linear in a WEIGHT operand, the other operands constant: the result is still a WEIGHT (a view).
_UNARY_LINEAR = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "dynamic_slice",
    "gather",
    "rev",
    "pad",
    "neg",
    "reduce_sum",
    "sharding_constraint",
    "reduce_precision",
    "tile",
    "mesh_cast",
    "reshard",
    "device_put",
    "split",
}
_ALL_LINEAR = {"add", "sub", "add_any", "concatenate", "select_n", "dynamic_update_slice"}
_SCALED = {"mul", "div"}  # a WEIGHT times (or over) a constant
_PRODUCTS = {"dot_general", "conv_general_dilated"}
# Where an activation may meet a parameter with an exact gradient: elementwise (a bias, a
# normalisation scale), a lookup (an embedding table), placement (a learned token concatenated in).
_ELEMENTWISE = {
    "add",
    "sub",
    "add_any",
    "mul",
    "div",
    "max",
    "min",
    "pow",
    "atan2",
    "rem",
    "nextafter",
    "clamp",
    "select_n",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "xor",
    "complex",
}
_MULTIPLICATIVE = {"mul", "div", "pow", "atan2"}
_LOOKUP = {"gather", "dynamic_slice"}
_PLACEMENT = {
    "concatenate",
    "pad",
    "dynamic_update_slice",
    "scatter",
    "scatter_add",
    "scatter_sub",
    "scatter_max",
    "scatter_min",
    "sort",
}
_CALLS = {"jit", "pjit", "closed_call", "core_call"}
_CUSTOM = {"custom_jvp_call", "custom_vjp_call"}


@dataclasses.dataclass(frozen=True, eq=False)
class Val:
    """A value in a walk: the array (or its aval), its class and, for weights, where it comes from."""

    value: Any
    cls: Cls
    bases: frozenset = frozenset()  # parameter indices it depends on (WEIGHT, DERIVED)
    view: Any = None  # WEIGHT: how it is built from its bases
    why: str = ""  # DERIVED: the primitive that made it non-linear


class Site(NamedTuple):
    ctx: tuple
    var: Any


def join(classes) -> Cls:
    """The class of a value computed from values of these classes by a non-linear op."""
    classes = list(classes)
    if any(depends_on_inputs(c) for c in classes):
        return Cls.ACT if any(c in (Cls.ACT, Cls.WEIGHT, Cls.DERIVED) for c in classes) else Cls.DATA
    return Cls.DERIVED if any(is_param_only(c) for c in classes) else Cls.CONST


def _aval(value: Any) -> Any:
    return value.aval if hasattr(value, "aval") else value


class Walker:
    """The walk shared by both passes. ``exact``: parameter indices marked exact; ``paths``: their names."""

    symbolic = True

    def __init__(self, paths: list[str], exact: frozenset):
        self.paths, self.exact = paths, exact

    # -- a jaxpr ---------------------------------------------------------------------------

    def run(self, jaxpr: Any, consts: list[Val], args: list[Val], ctx: tuple) -> list[Val]:
        env: dict[Any, Val] = {}

        def read(atom) -> Val:
            return Val(atom.val, Cls.CONST) if isinstance(atom, jcore.Literal) else env[atom]

        def write(var, val: Val) -> None:
            if not isinstance(var, jcore.DropVar):
                env[var] = self.at_site(Site(ctx, var), val)

        for var, val in zip(jaxpr.constvars, consts, strict=True):
            write(var, val)
        for var, val in zip(jaxpr.invars, args, strict=True):
            write(var, val)
        for index, eqn in enumerate(jaxpr.eqns):
            invals = [read(v) for v in eqn.invars]
            with eqn.ctx.manager:
                outs = self.eqn(eqn, invals, ctx, index)
            for var, val in zip(eqn.outvars, outs, strict=True):
                write(var, val)
        return [read(v) for v in jaxpr.outvars]

    def at_site(self, site: Site, val: Val) -> Val:
        return val

    def eqn(self, eqn, invals: list[Val], ctx: tuple, index: int) -> list[Val]:
        name, here = eqn.primitive.name, (*ctx, index)
        if name == _taps.tap_p.name:
            return [self.explicit_tap(Site(ctx, eqn.outvars[0]), eqn.params["name"], invals[0])]
        if name in _CALLS:
            sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            return self.run(closed.jaxpr, self.consts(closed), invals, here)
        if name == "scan":
            return self.scan(eqn, invals, here)
        if name in ("remat2", "checkpoint"):
            return self.remat(eqn, invals, here)
        if name == "cond":
            return self.cond(eqn, invals, here)
        if name == "while":
            return self.while_loop(eqn, invals, here)
        if name in _CUSTOM:
            return self.custom(eqn, invals, here)
        if any(True for _ in jcore.jaxprs_in_params(eqn.params)):
            return self.opaque(eqn, invals)
        if name in _PRODUCTS:
            return [self.product(eqn, invals, ctx, index)]
        return self.first_order(eqn, invals)

    def consts(self, closed: Any) -> list[Val]:
        return [Val(c, Cls.CONST) for c in closed.consts]

    def bind(self, eqn, invals: list[Val]) -> list[Any]:
        params = eqn.primitive.get_bind_params(eqn.params)
        out = eqn.primitive.bind(*[v.value for v in invals], **params)
        return list(out) if eqn.primitive.multiple_results else [out]

    # -- first-order primitives ----------------------------------------------------------------

    def first_order(self, eqn, invals: list[Val]) -> list[Val]:
        name = eqn.primitive.name
        values = self.bind(eqn, invals)
        classes = [v.cls for v in invals]
        if name == "stop_gradient":
            return [Val(values[0], Cls.CONST if not depends_on_inputs(classes[0]) else Cls.DATA)]
        if not any(is_param_only(c) for c in classes):
            return [Val(v, join(classes)) for v in values]
        bases = frozenset().union(*(v.bases for v in invals))
        if any(depends_on_inputs(c) for c in classes):
            self.mixing(eqn, invals)
            return [Val(v, Cls.ACT) for v in values]
        if self.is_linear(name, invals):
            first = next(v for v in invals if v.cls == Cls.WEIGHT)
            args = tuple(v.view if v.cls == Cls.WEIGHT else Const(v.value) for v in invals)
            params = eqn.primitive.get_bind_params(eqn.params)
            shape_in = tuple(_aval(first.value).shape)
            return [
                Val(value, Cls.WEIGHT, bases, Op(eqn.primitive, params, args, i, shape_in))
                for i, value in enumerate(values)
            ]
        why = next((v.why for v in invals if v.cls == Cls.DERIVED), "") or name
        return [Val(v, Cls.DERIVED, bases, why=why) for v in values]

    @staticmethod
    def is_linear(name: str, invals: list[Val]) -> bool:
        if any(v.cls == Cls.DERIVED for v in invals):
            return False
        weights = sum(v.cls == Cls.WEIGHT for v in invals)
        if name in _UNARY_LINEAR:
            return weights == 1 and invals[0].cls == Cls.WEIGHT
        if name in _ALL_LINEAR:
            return True
        if name in _SCALED:
            return weights == 1 and (name == "mul" or invals[0].cls == Cls.WEIGHT)
        return False

    def mixing(self, eqn, invals: list[Val]) -> None:
        """An activation meets a parameter outside a product: exact where that is elementwise, else refused."""
        name = eqn.primitive.name
        params_in = [v for v in invals if is_param_only(v.cls)]
        bases = frozenset().union(*(v.bases for v in params_in))
        lookup = name in _LOOKUP and is_param_only(invals[0].cls)
        if not (name in _ELEMENTWISE or name in _PLACEMENT or lookup):
            self.refuse(bases, name, "meets an activation in a primitive that fa_jax cannot route through a rule")
        if name in _MULTIPLICATIVE:
            self.check_multiplicative(params_in, name)
        kind = "elementwise" if name in _ELEMENTWISE else ("lookup" if lookup else "placement")
        self.use(bases, f"exact, {kind} ({name})")

    def check_multiplicative(self, params_in: list[Val], name: str) -> None:
        """A matrix-shaped parameter multiplying an activation elementwise is likely a product written by hand."""

    def use(self, bases: frozenset, how: str) -> None:
        """Record how parameters are used (for :func:`fa_jax.plan`)."""

    def refuse(self, bases: frozenset, primitive: str, what: str) -> None:
        """Raise for a use the engine cannot route, unless every parameter involved is marked exact."""

    # -- weight products -------------------------------------------------------------------------

    def product(self, eqn, invals: list[Val], ctx: tuple, index: int) -> Val:
        params = eqn.primitive.get_bind_params(eqn.params)
        for weight_index in (1, 0):
            w, x = invals[weight_index], invals[1 - weight_index]
            if w.cls == Cls.WEIGHT and depends_on_inputs(x.cls):
                activation = eqn.invars[1 - weight_index]
                site = None if isinstance(activation, jcore.Literal) else Site(ctx, activation)
                product = _product.Product(eqn.primitive, params, weight_index)
                return Val(self.weight_product(product, x, w, site, eqn.outvars[0].aval), Cls.ACT)
        classes = [v.cls for v in invals]
        if any(is_param_only(c) for c in classes) and any(depends_on_inputs(c) for c in classes):
            derived = next(v for v in invals if is_param_only(v.cls))
            how = derived.why or "a product of parameters"
            if derived.bases <= self.exact:
                self.use(derived.bases, "exact (marked)")
            else:
                self.refuse(
                    derived.bases,
                    eqn.primitive.name,
                    f"is transformed non-linearly (by {how}) before this product, so no feedback matrix can "
                    "stand for it",
                )
                self.use(derived.bases, f"Wᵀ (transformed by {how} before a product)")
            return Val(self.bind(eqn, invals)[0], Cls.ACT)
        return self.first_order(eqn, invals)[0]

    def weight_product(self, product: _product.Product, x: Val, w: Val, site: Site | None, out_aval: Any) -> Any:
        raise NotImplementedError

    # -- higher-order primitives -----------------------------------------------------------------

    def explicit_tap(self, site: Site, name: str | None, val: Val) -> Val:
        return val  # the identity (a chosen site is cut where it is written)

    def scan(self, eqn, invals: list[Val], ctx: tuple) -> list[Val]:
        raise NotImplementedError

    def remat(self, eqn, invals: list[Val], ctx: tuple) -> list[Val]:
        raise NotImplementedError

    def cond(self, eqn, invals: list[Val], ctx: tuple) -> list[Val]:
        raise NotImplementedError

    def while_loop(self, eqn, invals: list[Val], ctx: tuple) -> list[Val]:
        raise NotImplementedError

    def custom(self, eqn, invals: list[Val], ctx: tuple) -> list[Val]:
        raise NotImplementedError

    def opaque(self, eqn, invals: list[Val]) -> list[Val]:
        """A higher-order primitive the engine does not rebuild: run as it is, unless parameters go in."""
        params_in = [v for v in invals if is_param_only(v.cls)]
        if params_in:
            self.refuse(
                frozenset().union(*(v.bases for v in params_in)),
                eqn.primitive.name,
                "enters a higher-order primitive that fa_jax cannot rebuild",
            )
        return [Val(v, join(v_.cls for v_ in invals)) for v in self.bind(eqn, invals)]


# ================================================================ the symbolic pass


class ProductRecord(NamedTuple):
    product: _product.Product
    bases: tuple  # Base, in the view's order
    roles: dict  # Base -> roles of its axes, or None
    site: Site | None  # where the activation operand was made
    activation: Cls
    exact: bool  # every base marked exact: the product keeps Wᵀ


class Analysis(Walker):
    """The symbolic pass: classes, products, taps and parameter uses, without computing anything."""

    def __init__(self, paths: list[str], exact: frozenset, avals: list[Any]):
        super().__init__(paths, exact)
        self.avals = avals
        self.records: list[ProductRecord] = []
        self.explicit: list[tuple[Site, str | None]] = []
        self.site_avals: dict[Site, Any] = {}
        self.uses: dict[int, list[str]] = {}
        self.scan_lengths: dict[tuple, int] = {}
        self.carry_classes: dict[tuple, list[Cls]] = {}
        self.out_classes: dict[tuple, list[Cls]] = {}
        self.refusals: list[tuple[frozenset, str, str]] = []  # (parameters, what, the error's message)
        self.recording = True

    def bind(self, eqn, invals):
        return [v.aval for v in eqn.outvars]

    def at_site(self, site: Site, val: Val) -> Val:
        if self.recording:
            self.site_avals.setdefault(site, _aval(val.value))
        return val

    def use(self, bases, how):
        if self.recording:
            for b in sorted(bases):
                uses = self.uses.setdefault(b, [])
                if how not in uses:
                    uses.append(how)

    def names(self, bases) -> str:
        return ", ".join(repr(self.paths[b]) for b in sorted(bases))

    def refuse(self, bases, primitive, what):
        """Record a use the engine cannot route; :func:`enforce` raises it under a rule that routes these weights."""
        if bases and bases <= self.exact:
            self.use(bases, "exact (marked)")
            return
        unmarked = frozenset(bases) - self.exact
        message = (
            f"parameter {self.names(unmarked)} {what} (primitive {primitive!r}); its gradient would silently be "
            f"backpropagation's. Write that use as a dot_general/conv (jnp.einsum, @, lax.conv) of the parameter "
            f"itself, or mark it exact (exact=[{self.names(unmarked)}]). fa_jax.plan(model, params, inputs, rule) "
            "lists how every parameter is treated"
        )
        if self.recording:
            self.refusals.append((unmarked, f"{what} ({primitive})", message))

    def check_multiplicative(self, params_in, name):
        # One layer of each parameter: a stacked (layers, d) scale sliced by lax.scan is a vector.
        layer_shapes = {}
        for val in params_in:
            bases = _classes.view_bases(val.view) if val.cls == Cls.WEIGHT else [Base(b) for b in val.bases]
            for base in bases:
                layer_shapes[base.param] = self.avals[base.param].shape[base.depth :]
        matrix = [p for p, shape in layer_shapes.items() if p not in self.exact and sum(n > 1 for n in shape) >= 2]
        if matrix:
            self.refuse(
                frozenset(matrix),
                name,
                "multiplies an activation elementwise over two or more axes (a product written by hand, "
                "x[..., None] * W summed, hides its Wᵀ from the rule)",
            )

    def weight_product(self, product, x, w, site, out_aval):
        bases = tuple(_classes.view_bases(w.view))
        marked = [b.param in self.exact for b in bases]
        if any(marked) and not all(marked):
            raise Refusal(
                f"parameters {self.names(b.param for b in bases)} feed one product, and only some are marked exact; "
                "mark all of them or none"
            )
        if self.recording:
            roles = _roles(product, w, bases)
            self.records.append(ProductRecord(product, bases, roles, site, x.cls, all(marked)))
            self.use(
                frozenset(b.param for b in bases), "exact (marked)" if all(marked) else f"feedback ({product.kind})"
            )
        return out_aval

    def explicit_tap(self, site, name, val):
        if self.recording:
            self.explicit.append((site, name))
            self.site_avals.setdefault(site, _aval(val.value))
        return val

    # -- higher-order primitives, symbolically ----------------------------------------------------

    def quietly(self, fn, *args):
        recording, self.recording = self.recording, False
        try:
            return fn(*args)
        finally:
            self.recording = recording

    def scan(self, eqn, invals, ctx):
        p = eqn.params
        body = p["jaxpr"]
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
        body_xs = [self.slice_in(v, ctx) for v in xs]
        classes = [c if c != Cls.WEIGHT else Cls.DERIVED for c in (v.cls for v in carry)]
        for _ in range(len(Cls) + 1):  # classes only rise: a fixed point comes within |Cls| rounds
            carry_in = [
                Val(var.aval, c, v.bases)
                for var, c, v in zip(body.jaxpr.invars[nc : nc + nk], classes, carry, strict=True)
            ]
            outs = self.quietly(self.run, body.jaxpr, self.consts(body), consts + carry_in + body_xs, ctx)
            new = [join([a, b.cls]) if a != b.cls else a for a, b in zip(classes, outs[:nk], strict=True)]
            new = [c if c != Cls.WEIGHT else Cls.DERIVED for c in new]
            if new == classes:
                break
            classes = new
        self.carry_classes[ctx] = classes
        self.scan_lengths[ctx] = p["length"]
        carry_in = [
            Val(var.aval, c, v.bases) for var, c, v in zip(body.jaxpr.invars[nc : nc + nk], classes, carry, strict=True)
        ]
        outs = self.run(body.jaxpr, self.consts(body), consts + carry_in + body_xs, ctx)
        out_classes = classes + [o.cls if o.cls != Cls.WEIGHT else Cls.DERIVED for o in outs[nk:]]
        self.out_classes[ctx] = out_classes
        return [Val(var.aval, c) for var, c in zip(eqn.outvars, out_classes, strict=True)]

    def slice_in(self, val: Val, ctx: tuple) -> Val:
        """An ``xs`` operand as the scan body sees it: one slice; a stacked weight becomes one layer per step."""
        aval = _aval(val.value)
        sliced = jax.core.ShapedArray(aval.shape[1:], aval.dtype)
        if val.cls != Cls.WEIGHT:
            return Val(sliced, val.cls, val.bases, why=val.why)
        if not _classes.is_leaf_chain(val.view):
            self.refuse(
                val.bases,
                "scan",
                "enters lax.scan through other operations than a dtype cast, so its "
                "layers cannot keep their own feedback; scan over the stacked parameter itself",
            )
            return Val(sliced, Cls.DERIVED, val.bases, why="scan")
        (base,) = _classes.view_bases(val.view)
        inner = Base(base.param, base.depth + 1)
        return Val(sliced, Cls.WEIGHT, val.bases, _classes.rebase(val.view, inner))

    def remat(self, eqn, invals, ctx):
        outs = self.run(eqn.params["jaxpr"], [], invals, ctx)
        return self._opaque_outs(ctx, eqn, outs)

    def _opaque_outs(self, ctx, eqn, outs):
        classes = [o.cls if o.cls != Cls.WEIGHT else Cls.DERIVED for o in outs]
        self.out_classes[ctx] = classes
        return [
            Val(var.aval, c, o.bases, why=o.why or eqn.primitive.name)
            for var, c, o in zip(eqn.outvars, classes, outs, strict=True)
        ]

    def cond(self, eqn, invals, ctx):
        index, operands = invals[0], invals[1:]
        results = []
        for b, branch in enumerate(eqn.params["branches"]):
            before = len(self.explicit)
            results.append(self.run(branch.jaxpr, self.consts(branch), operands, (*ctx, b)))
            self.no_taps_inside(before, ctx, "a lax.cond / lax.switch branch")
        classes = [
            join([index.cls] + [o.cls for o in outs])
            if depends_on_inputs(index.cls)
            else _join_branches([o.cls for o in outs])
            for outs in zip(*results, strict=True)
        ]
        self.out_classes[ctx] = classes
        bases = [frozenset().union(*(o.bases for o in outs)) for outs in zip(*results, strict=True)]
        return [Val(var.aval, c, b, why="cond") for var, c, b in zip(eqn.outvars, classes, bases, strict=True)]

    def while_loop(self, eqn, invals, ctx):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        body_consts, carry = invals[nc : nc + nb], invals[nc + nb :]
        classes = [c if c != Cls.WEIGHT else Cls.DERIVED for c in (v.cls for v in carry)]
        body = p["body_jaxpr"]
        for _ in range(len(Cls) + 1):
            carry_in = [Val(var.aval, c, v.bases) for var, c, v in zip(eqn.outvars, classes, carry, strict=True)]
            outs = self.quietly(self.run, body.jaxpr, self.consts(body), body_consts + carry_in, (*ctx, 1))
            new = [join([a, o.cls]) if a != o.cls else a for a, o in zip(classes, outs, strict=True)]
            new = [c if c != Cls.WEIGHT else Cls.DERIVED for c in new]
            if new == classes:
                break
            classes = new
        before = len(self.explicit)
        carry_in = [Val(var.aval, c, v.bases) for var, c, v in zip(eqn.outvars, classes, carry, strict=True)]
        self.run(body.jaxpr, self.consts(body), body_consts + carry_in, (*ctx, 1))
        self.no_taps_inside(before, ctx, "a lax.while_loop / fori_loop body")
        self.out_classes[ctx] = classes
        return [Val(var.aval, c, v.bases) for var, c, v in zip(eqn.outvars, classes, carry, strict=True)]

    def custom(self, eqn, invals, ctx):
        call = eqn.params["call_jaxpr"]
        closed = call if isinstance(call, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(call, ())
        before, records = len(self.explicit), len(self.records)
        outs = self.run(closed.jaxpr, self.consts(closed), invals, ctx)
        inner = [r for r in self.records[records:] if not r.exact]
        if inner:
            bases = frozenset(b.param for r in inner for b in r.bases)
            self.refuse(
                bases,
                eqn.primitive.name,
                "feeds a weight product inside a custom_jvp / custom_vjp function, whose own derivative "
                "rule fa_jax cannot replace",
            )
        self.no_taps_inside(before, ctx, f"a {eqn.primitive.name} function")
        return self._opaque_outs(ctx, eqn, outs)

    def no_taps_inside(self, before: int, ctx: tuple, where: str) -> None:
        if len(self.explicit) > before:
            names = [n or "unnamed" for _, n in self.explicit[before:]]
            raise Refusal(
                f"taps {names} are inside {where} (equation {ctx}); a tap rule cannot feed a tap from there. "
                "Tap the value outside it"
            )


def _join_branches(classes: list[Cls]) -> Cls:
    if any(c == Cls.WEIGHT for c in classes):
        return Cls.DERIVED if all(is_param_only(c) or c == Cls.CONST for c in classes) else Cls.ACT
    return join(classes) if len(set(classes)) > 1 else classes[0]


def _roles(product: _product.Product, w: Val, bases: tuple) -> dict:
    """The role of each axis of each base: from the product's dimension numbers, mapped back through the view."""
    ndim = len(_aval(w.value).shape)
    operand: list[str | None]
    if product.primitive.name == "dot_general":
        (contract, batch) = [dims[product.weight_index] for dims in product.params["dimension_numbers"]]
        operand = ["in" if i in contract else "stack" if i in batch else "out" for i in range(ndim)]
    elif product.weight_index == 1:
        spec = product.params["dimension_numbers"].rhs_spec
        operand = ["window"] * ndim
        operand[spec[0]], operand[spec[1]] = "out", "in"
    else:
        return {b: None for b in bases}
    origin = _classes.axis_origin(w.view, ndim)
    roles = {}
    for base in bases:
        axes = {o[1]: role for o, role in zip(origin, operand, strict=True) if o is not None and o[0] == base}
        roles[base] = axes or None  # base axis -> role; axes not reached were indexed away
    return roles


# ================================================================ the evaluation pass


class Evaluation(Walker):
    """Re-evaluates the program: weight products through the rule, taps cut and collected."""

    symbolic = False

    def __init__(
        self,
        program: Any,
        rule: Any,
        leaves: dict,
        weights: dict,
        step: Any,
        tap_sites: dict,
        probes: dict | None = None,
    ):
        super().__init__(program.paths, program.exact)
        self.program, self.rule, self.step = program, rule, step
        self.leaves, self.weights = leaves, weights  # Base -> feedback leaf, Base -> W
        self.tap_sites = tap_sites  # Site -> tap index (only under a cutting rule)
        self.probes = dict(
            probes or {}
        )  # Site -> an array added there, before any cut (its cotangent: the tap's signal)
        self.taps: dict[Site, Any] = {}

    def at_site(self, site, val):
        probe = self.probes.get(site)
        if probe is not None:
            val = dataclasses.replace(val, value=val.value + probe.astype(val.value.dtype))
        if site in self.tap_sites:
            self.taps[site] = val.value
            return dataclasses.replace(val, value=_taps.cut(val.value))
        return val

    def inner_probes(self, ctx: tuple) -> dict:
        """The probes of sites inside the equation at ``ctx`` (scan bodies slice theirs per iteration)."""
        return {site: p for site, p in self.probes.items() if site.ctx[: len(ctx)] == ctx}

    def weight_product(self, product, x, w, site, out_aval):
        bases = tuple(_classes.view_bases(w.view))
        leaves = tuple(self.leaves.get(b) for b in bases)
        if all(leaf is None for leaf in leaves):  # exact: no feedback for these weights
            return product(x.value, w.value)
        specs = tuple(self.program.spec(b) for b in bases)
        weights = tuple(self.weights.get(b) if self.rule.reads_weight else None for b in bases)
        backward = _product.Backward(self.rule, w.view, bases, specs)
        consts = tuple(_classes.view_consts(w.view))
        return _product.feedback_product(product, backward, x.value, w.value, leaves, weights, consts, self.step)

    def custom(self, eqn, invals, ctx):
        return self._classed(ctx, self.bind(eqn, invals))

    def opaque(self, eqn, invals):
        return [Val(v, join(v_.cls for v_ in invals)) for v in self.bind(eqn, invals)]

    def _classed(self, ctx, values):
        return [Val(v, c) for v, c in zip(values, self.program.out_classes[ctx], strict=True)]

    def scan(self, eqn, invals, ctx):
        p = eqn.params
        body = p["jaxpr"]
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
        classes = self.program.carry_classes[ctx]
        # Each stacked weight's feedback leaf (and W, when the rule reads it) rides along as an extra xs.
        stacked = []
        for v in xs:
            if v.cls == Cls.WEIGHT:
                (base,) = _classes.view_bases(v.view)
                stacked.append((v, base, Base(base.param, base.depth + 1)))
        extras = [(self.leaves.get(outer), self.weights.get(outer)) for _, outer, _ in stacked]
        probes = self.inner_probes(ctx)
        found: list[Site] = []

        def step(carry_values, x_values):
            xs_values, extra_values, probe_values = x_values
            self.probes.update(zip(probes, probe_values, strict=True))
            for (_, _, inner), (leaf, weight) in zip(stacked, extra_values, strict=True):
                self.leaves[inner], self.weights[inner] = leaf, weight
            carry_in = [Val(value, c) for value, c in zip(carry_values, classes, strict=True)]
            inner_xs = []
            for v, value in zip(xs, xs_values, strict=True):
                if v.cls == Cls.WEIGHT:
                    (base,) = _classes.view_bases(v.view)
                    inner = Base(base.param, base.depth + 1)
                    inner_xs.append(Val(value, Cls.WEIGHT, v.bases, _classes.rebase(v.view, inner)))
                else:
                    inner_xs.append(Val(value, v.cls, v.bases, why=v.why))
            before = dict(self.taps)
            self.taps = {}
            outs = self.run(body.jaxpr, self.consts(body), consts + carry_in + inner_xs, ctx)
            inner_taps, self.taps = self.taps, before
            found[:] = list(inner_taps)
            return [o.value for o in outs[:nk]], ([o.value for o in outs[nk:]], list(inner_taps.values()))

        carry_out, (ys, tapped) = lax.scan(
            step,
            [v.value for v in carry],
            ([v.value for v in xs], extras, list(probes.values())),
            length=p["length"],
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        self.probes.update(probes)  # the stacked probes again, for what follows the scan
        self.taps.update(zip(found, tapped, strict=True))
        return self._classed(ctx, list(carry_out) + list(ys))

    def remat(self, eqn, invals, ctx):
        p = eqn.params
        found: list[Site] = []

        def fn(*values):
            vals = [dataclasses.replace(v, value=value) for v, value in zip(invals, values, strict=True)]
            before, self.taps = self.taps, {}
            outs = self.run(p["jaxpr"], [], vals, ctx)
            inner, self.taps = self.taps, before
            found[:] = list(inner)
            return [o.value for o in outs], list(inner.values())

        outs, tapped = jax.checkpoint(fn, prevent_cse=p["prevent_cse"], policy=p["policy"])(*[v.value for v in invals])
        self.taps.update(zip(found, tapped, strict=True))
        return self._classed(ctx, outs)

    def cond(self, eqn, invals, ctx):
        index, operands = invals[0], invals[1:]

        def branch_fn(b, branch):
            def fn(*values):
                vals = [dataclasses.replace(v, value=value) for v, value in zip(operands, values, strict=True)]
                return [o.value for o in self.run(branch.jaxpr, self.consts(branch), vals, (*ctx, b))]

            return fn

        branches = [branch_fn(b, branch) for b, branch in enumerate(eqn.params["branches"])]
        return self._classed(ctx, lax.switch(index.value, branches, *[v.value for v in operands]))

    def while_loop(self, eqn, invals, ctx):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
        classes = self.program.out_classes[ctx]
        if self.inner_probes(ctx):
            raise ValueError(f"a probed tap lies inside a lax.while_loop (equation {ctx}); tap the value outside it")

        def cond_fn(values):
            vals = [Val(value, c) for value, c in zip(values, classes, strict=True)]
            (out,) = self.run(p["cond_jaxpr"].jaxpr, self.consts(p["cond_jaxpr"]), cond_consts + vals, (*ctx, 0))
            return out.value

        def body_fn(values):
            vals = [Val(value, c) for value, c in zip(values, classes, strict=True)]
            outs = self.run(p["body_jaxpr"].jaxpr, self.consts(p["body_jaxpr"]), body_consts + vals, (*ctx, 1))
            return [o.value for o in outs]

        return self._classed(ctx, lax.while_loop(cond_fn, body_fn, [v.value for v in carry]))


class Refusal(ValueError):
    """A parameter use that fa_jax cannot route through the rule (the message names it and the fix)."""
