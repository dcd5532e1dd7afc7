"""What each value of a model's program is, seen from the parameters.

Every variable of the jaxpr gets one :class:`Cls`:

* ``CONST``: depends on neither params nor inputs (iota, literals, closed-over arrays);
* ``DATA``: depends on the inputs only (the batch, masks, integer ids);
* ``ACT``: depends on the inputs and the params: an activation carrying gradient;
* ``WEIGHT``: a *linear* function of params only (``W``, ``W.T``, ``W.astype(bf16)``,
  a slice of a stack, ``W * mask``): a :class:`View` says how to build its
  feedback from the feedback of the params it reads;
* ``DERIVED``: a non-linear function of params only (``W / ‖W‖``, ``A @ B``).

A weight product is a ``dot_general`` / ``conv_general_dilated`` of a WEIGHT
with an ACT or DATA operand. Everything about a product, a tap or a refusal is
decided from these classes, in one place (:mod:`fa_jax._engine._walk`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple


class Cls(enum.IntEnum):
    CONST = 0
    DATA = 1
    ACT = 2
    WEIGHT = 3
    DERIVED = 4


def depends_on_inputs(cls: Cls) -> bool:
    return cls in (Cls.DATA, Cls.ACT)


def is_param_only(cls: Cls) -> bool:
    return cls in (Cls.WEIGHT, Cls.DERIVED)


class Base(NamedTuple):
    """One parameter leaf as a product sees it: ``param`` index, sliced by ``depth`` scans.

    ``given`` marks a base whose feedback was materialized in the forward (a view
    too complex to rebuild inside a scan body): its leaf *is* the backward matrix.
    """

    param: int
    depth: int = 0
    given: int = -1


# --- views: how a WEIGHT is built from params, so its feedback can be built the same way ------


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    base: Base


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """``primitive.bind(*args, **params)``; args are views or :class:`Const`."""

    primitive: Any
    params: dict
    args: tuple
    index: int = 0  # which result, for multiple-result primitives (split)
    shape_in: tuple = ()  # shape of the first view argument (to map axes through it)


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
    value: Any  # the array (or, in a symbolic walk, its aval)


View = Any  # Leaf | Op


def view_bases(view: View) -> list[Base]:
    """The bases a view reads, in first-use order, without repeats."""
    found: list[Base] = []

    def visit(v):
        if isinstance(v, Leaf):
            if v.base not in found:
                found.append(v.base)
        elif isinstance(v, Op):
            for a in v.args:
                visit(a)

    visit(view)
    return found


def view_consts(view: View) -> list[Any]:
    """The constant arrays a view reads, in order."""
    found: list[Any] = []

    def visit(v):
        if isinstance(v, Const):
            found.append(v.value)
        elif isinstance(v, Op):
            for a in v.args:
                visit(a)

    visit(view)
    return found


def build_view(view: View, matrices: dict[Base, Any], consts: list[Any]) -> Any:
    """Evaluate ``view`` with each base replaced by ``matrices[base]`` and constants from ``consts``."""
    it = iter(consts)

    def visit(v):
        if isinstance(v, Leaf):
            return matrices[v.base]
        if isinstance(v, Const):
            return next(it)
        out = v.primitive.bind(*[visit(a) for a in v.args], **v.params)
        return out[v.index] if v.primitive.multiple_results else out

    return visit(view)


def is_leaf_chain(view: View) -> bool:
    """A view that is one base through unary, constant-free ops (``convert``, ``copy``): it commutes with slicing."""
    while isinstance(view, Op):
        if len(view.args) != 1 or view.primitive.name not in _SLICE_COMMUTING:
            return False
        view = view.args[0]
    return isinstance(view, Leaf)


def rebase(view: View, base: Base) -> View:
    """The same unary chain over another base (the per-iteration slice inside a scan body)."""
    if isinstance(view, Leaf):
        return Leaf(base)
    return dataclasses.replace(view, args=(rebase(view.args[0], base),))


_SLICE_COMMUTING = {"convert_element_type", "copy", "copy_p", "reduce_precision", "neg"}


# --- mapping a product's axes back to the parameter's ------------------------------------------


def axis_origin(view: View, ndim: int) -> list[tuple[Base, int] | None]:
    """For each axis of the viewed value, the ``(base, axis)`` it comes from, or ``None``.

    Follows the structural ops whose axis mapping is plain; anything else maps to
    ``None`` and the weight's feedback is drawn at the parameter's own shape.
    """
    if isinstance(view, Leaf):
        return [(view.base, i) for i in range(ndim)]
    if not isinstance(view, Op):
        return [None] * ndim
    name, params = view.primitive.name, view.params
    inner = next((a for a in view.args if not isinstance(a, Const)), None)
    if inner is None:
        return [None] * ndim
    inner_ndim = len(view.shape_in)
    src = axis_origin(inner, inner_ndim)
    if name in (
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "neg",
        "mul",
        "div",
        "slice",
        "dynamic_slice",
        "sharding_constraint",
        "mesh_cast",
        "reshard",
        "device_put",
        "rev",
        "pad",
        "add",
        "sub",
        "add_any",
        "select_n",
    ):
        return src if len(src) == ndim else [None] * ndim
    if name == "transpose":
        return [src[p] for p in params["permutation"]]
    if name == "broadcast_in_dim":
        out: list = [None] * ndim
        for j, d in enumerate(params["broadcast_dimensions"]):
            out[d] = src[j]
        return out
    if name == "squeeze":
        dims = {d % inner_ndim for d in params["dimensions"]}
        return [s for i, s in enumerate(src) if i not in dims]
    if name == "expand_dims":
        out = list(src)
        for d in sorted(params["dimensions"]):
            out.insert(d, None)
        return out
    if name == "reshape":
        return _reshape_origin(src, view.shape_in, params["new_sizes"])
    return [None] * ndim


def _reshape_origin(src, shape_in, new_sizes):
    """A reshape that only inserts or removes size-1 axes keeps the other axes' origins."""
    kept = [(n, s) for n, s in zip(shape_in, src, strict=True) if n != 1]
    out: list[Any] = []
    it = iter(kept)
    for n in new_sizes:
        if n == 1:
            out.append(None)
            continue
        nxt = next(it, None)
        if nxt is None or nxt[0] != n:
            return [None] * len(new_sizes)
        out.append(nxt[1])
    return out if next(it, None) is None else [None] * len(new_sizes)
