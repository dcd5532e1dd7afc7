"""The one feedback op: a weight product whose input gradient goes through the rule.

For ``y = f(x, W)``, ``f`` a ``dot_general`` or ``conv_general_dilated`` with any
dimension numbers, the backward returns

* ``dW = (∂f/∂W)ᵀ g`` exactly: the linear transpose of ``f(x, ·)`` applied to ``g``;
* ``dx = (∂f/∂x)ᵀ g`` with **B in place of W**: the linear transpose of
  ``f(·, B)``. For a dense layer that is ``dx = g Bᵀ`` (Lillicrap et al. 2016,
  eq. 2, ``δ_l = (δ_{l+1} B_{l+1}ᵀ) ⊙ f'(a_l)``); for a convolution, the
  transposed convolution with B.

B is built *inside the backward* by the rule (:meth:`Rule.backward_matrix` per
parameter, then the same structural ops that made the operand from the
parameter), so a regenerated B or a sign-symmetric ``|M| ⊙ sign(W)`` never
outlives its layer's backward. Its inputs (feedback leaves, keys, the step,
constant arrays of the view) are ordinary ``custom_vjp`` arguments with zero
cotangents: never closures or ``nondiff_argnums`` arrays, which break under
``lax.scan``, ``jit`` and ``vmap``. Every cotangent keeps its primal's dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from fa_jax._engine import _classes
from fa_jax._specs import WeightSpec


def like(value: jax.Array, aval: Any) -> jax.Array:
    """``value`` laid out as ``aval`` under an explicit-sharding mesh (a cotangent must keep its primal's type)."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return value
    if jax.typeof(value).sharding.spec == sharding.spec:
        return value
    return jax.sharding.reshard(value, sharding)


class Product(NamedTuple):
    """A static weight product: the primitive, its parameters and which operand is the weight."""

    primitive: Any
    params: dict
    weight_index: int  # 0: the weight is the lhs, 1: the rhs

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        operands = (w, x) if self.weight_index == 0 else (x, w)
        return self.primitive.bind(*operands, **self.params)

    def is_dense(self, x: Any, w: Any) -> bool:
        """``x (…, in) · W (in, out)``: the layout tiled regeneration computes ``dx`` for."""
        if self.primitive.name != "dot_general" or self.weight_index != 1 or len(w.shape) != 2:
            return False
        return tuple(map(tuple, self.params["dimension_numbers"][0])) == ((len(x.shape) - 1,), (0,)) and not any(
            self.params["dimension_numbers"][1]
        )

    @property
    def kind(self) -> str:
        """``"dense"``, ``"einsum"``, ``"conv"``, ``"conv (transposed)"``, … (for :func:`fa_jax.plan`)."""
        if self.primitive.name == "dot_general":
            (contract, _), (batch, _) = self.params["dimension_numbers"]
            return "einsum" if batch or len(contract) != 1 else "dense"
        name = "conv"
        if any(d != 1 for d in self.params.get("lhs_dilation") or ()):
            name += " (transposed)"
        if self.params.get("feature_group_count", 1) != 1:
            name += " (grouped)"
        return name


class Backward(NamedTuple):
    """How one product's backward builds its matrix: static, closed over by the ``custom_vjp``."""

    rule: Any
    view: Any  # the weight operand as a view of its bases
    bases: tuple  # the view's bases, in order
    specs: tuple[WeightSpec, ...]  # each base's spec at its slicing


def feedback_product(
    product: Product,
    backward: Backward,
    x: jax.Array,
    w: jax.Array,
    leaves: tuple,
    weights: tuple,
    consts: tuple,
    step: Any,
) -> jax.Array:
    """``product(x, w)`` whose ``dx`` uses the rule's matrix in the place of ``w``.

    Args:
      leaves: each base's feedback leaf (B, M, a key or a stack of keys).
      weights: each base's ``W`` when the rule reads it (sign symmetry), else ``None``.
      consts: the constant arrays of the view (a mask, slice indices).
      step: the training step, for rules that redraw every step (brSF).
    """
    rule = backward.rule
    x_type, w_type = jax.typeof(x), jax.typeof(w)  # static: closed over, never residuals

    @jax.custom_vjp
    def op(x, w, leaves, weights, consts, step):
        return product(x, w)

    def fwd(x, w, leaves, weights, consts, step):
        # Only W's type is needed below (unless the rule reads W): no copy of W stays alive.
        return product(x, w), (x, leaves, weights, consts, step)

    def bwd(residuals, g):
        x, leaves, weights, consts, step = residuals
        dx = None
        if len(backward.bases) == 1 and isinstance(backward.view, _classes.Leaf) and backward.bases[0].given < 0:
            dx = rule.input_gradient(
                g,
                weight=weights[0] if rule.reads_weight else w_type,
                feedback=leaves[0],
                spec=backward.specs[0],
                step=step,
                product=product if product.is_dense(x, w_type) else None,
            )
        if dx is None:
            matrices = {}
            for base, spec, leaf, weight in zip(backward.bases, backward.specs, leaves, weights, strict=True):
                if base.given >= 0:  # materialized in the forward: the leaf is the matrix
                    matrices[base] = leaf
                else:
                    matrix = rule.backward_matrix(
                        weight if rule.reads_weight else jax.ShapeDtypeStruct(spec.shape, spec.dtype),
                        leaf,
                        spec=spec,
                        step=step,
                    )
                    if tuple(matrix.shape) != tuple(spec.shape):
                        raise ValueError(
                            f"feedback for {spec.path!r}: rule {rule.name!r} built a backward matrix of shape "
                            f"{tuple(matrix.shape)}, expected the weight's {tuple(spec.shape)}"
                        )
                    matrices[base] = matrix
            matrix = _classes.build_view(backward.view, matrices, list(consts))
            matrix = like(jax.lax.stop_gradient(matrix).astype(w_type.dtype), w_type)
            (dx,) = jax.linear_transpose(lambda x_: product(x_, matrix), x_type)(g)
        (dw,) = jax.linear_transpose(lambda w_: product(x, w_), w_type)(g)
        return like(dx.astype(x_type.dtype), x_type), like(dw.astype(w_type.dtype), w_type), None, None, None, None

    op.defvjp(fwd, bwd)
    return op(x, w, leaves, weights, consts, step)
