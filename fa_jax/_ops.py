"""Feedback linear ops: a forward like BP, a backward through B instead of W.

One generic ``custom_vjp`` serves every op that is linear in its input and in
its weight (dense, conv, einsum). For ``y = f(x, W)`` the backward returns

* ``dW = (∂f/∂W)ᵀ g`` exactly, the transpose of ``f(x, ·)`` applied to ``g``;
* ``dx = (∂f/∂x)ᵀ g`` evaluated with **B in place of W**: the transpose of
  ``f(·, B)`` applied to ``g``. For dense layers this is ``dx = g Bᵀ``
  (Lillicrap et al. 2016, eq. 2, ``δ_l = Bᵀ δ_{l+1} ⊙ f'(a_l)``).

B is an ordinary argument (never a closure or a ``nondiff_argnums`` array, which
break under ``lax.scan``, ``jit`` and ``vmap``) and gets a ``None`` cotangent.
It may instead be a typed PRNG key, in which case B is regenerated inside the
backward with the static ``init``. Every cotangent is cast to its input's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fa_jax import _checks

Bilinear = Callable[[jax.Array, jax.Array], jax.Array]


is_key = _checks.is_key  # a typed PRNG key marks a regenerated-feedback slot


def materialize(feedback: jax.Array, shape: tuple[int, ...], dtype: Any, init: Callable | None) -> jax.Array:
    """Return B itself, or regenerate it from its key with ``init(key, shape, dtype)``."""
    if is_key(feedback):
        if init is None:
            raise ValueError("feedback is a PRNG key but no init was given to regenerate B from it")
        return init(feedback, shape, dtype)
    return feedback


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _feedback_bilinear(f: Bilinear, x, weight, feedback, init):
    return f(x, weight)


def _fwd(f, x, weight, feedback, init):
    # Only shapes of W are needed in the backward: no copy of W is kept alive.
    weight_struct = jax.ShapeDtypeStruct(weight.shape, weight.dtype)
    return f(x, weight), (x, weight_struct, feedback)


def _bwd(f, init, residuals, g):
    x, weight_struct, feedback = residuals
    if is_key(feedback) and f is dense_product and hasattr(init, "dense_input_gradient"):
        # A tiled init (fa_jax.Tiled) redraws B and multiplies it one tile at a time,
        # so a regenerated B never exists whole.
        dx = init.dense_input_gradient(feedback, g, weight_struct.shape)
    else:
        matrix = materialize(feedback, weight_struct.shape, weight_struct.dtype, init)
        matrix = jax.lax.stop_gradient(matrix).astype(g.dtype)
        (dx,) = jax.linear_transpose(lambda x_: f(x_, matrix), jax.ShapeDtypeStruct(x.shape, g.dtype))(g)
    return dx.astype(x.dtype), _weight_gradient(f, x, weight_struct, g), None


def _weight_gradient(f: Bilinear, x, weight_struct, g):
    """The exact ``dW = (∂f/∂W)ᵀ g``: the linear transpose of ``f(x, ·)``, in W's dtype."""
    (dw,) = jax.linear_transpose(
        lambda w_: f(x.astype(g.dtype), w_), jax.ShapeDtypeStruct(weight_struct.shape, g.dtype)
    )(g)
    return dw.astype(weight_struct.dtype)


_feedback_bilinear.defvjp(_fwd, _bwd)


def feedback_bilinear(f: Bilinear, x: jax.Array, weight: jax.Array, feedback: jax.Array, *, init: Callable | None = None) -> jax.Array:
    """``f(x, weight)`` whose input-gradient uses ``feedback`` in place of ``weight``.

    Args:
      f: a static function linear in each argument, e.g. a dense or conv op.
      x: the layer input.
      weight: W, same shape as B.
      feedback: B with ``weight``'s shape, or a typed PRNG key to regenerate B.
      init: ``init(key, shape, dtype)``, required when ``feedback`` is a key.
    """
    _checks.check_callable(f, "f")
    _checks.check_array_tree(x, "x")
    if not _checks.is_array(x):
        raise TypeError(f"x: expected an array, given {_checks.describe(x)}")
    _checks.check_floating(weight, "weight")
    _checks.check_feedback_matrix(feedback, weight, "feedback")
    if is_key(feedback) and init is None:
        raise ValueError("init: feedback is a PRNG key, so init(key, shape, dtype) is needed to regenerate B")
    return _feedback_bilinear(f, x, weight, feedback, init)


def dense_product(x: Float[Array, "*batch fan_in"], kernel: Float[Array, "fan_in fan_out"]) -> Float[Array, "*batch fan_out"]:
    """``x @ kernel`` over any leading batch dims (one ``dot_general``)."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def feedback_dense(
    x: Float[Array, "*batch fan_in"],
    kernel: Float[Array, "fan_in fan_out"],
    bias: Float[Array, " fan_out"] | None,
    feedback: Float[Array, "fan_in fan_out"] | jax.Array,
    *,
    init: Callable | None = None,
) -> Float[Array, "*batch fan_out"]:
    """FA dense layer: forward ``x W + b``; backward ``dW = xᵀg``, ``db = Σg``, ``dx = g Bᵀ``.

    Lillicrap et al. 2016, eq. 2. ``x`` may have any leading dims, e.g.
    ``(batch, seq, fan_in)``; the bias gradient is exact by ordinary autodiff.
    """
    _checks.check_dense_args(x, kernel, bias, "feedback_dense")
    y = feedback_bilinear(dense_product, x, kernel, feedback, init=init)
    return y if bias is None else y + bias


class ConvProduct:
    """A static, hashable N-d convolution ``x ⋆ kernel`` (channels-last, like Flax)."""

    def __init__(self, strides: tuple[int, ...], padding: str | tuple, dilation: tuple[int, ...] | None = None):
        self.strides, self.padding, self.dilation = tuple(strides), padding, dilation

    def __call__(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        spatial = kernel.ndim - 2
        names = "HWDXYZ"[:spatial] if spatial <= 3 else None
        numbers = jax.lax.conv_dimension_numbers(
            x.shape, kernel.shape, ("N" + names + "C", names + "IO", "N" + names + "C")
        )
        return jax.lax.conv_general_dilated(
            x, kernel, self.strides, self.padding, rhs_dilation=self.dilation, dimension_numbers=numbers
        )

    def _key(self):
        return (self.strides, self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding)), self.dilation)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, ConvProduct) and self._key() == other._key()


def feedback_conv(
    x: Float[Array, "batch *spatial c_in"],
    kernel: Float[Array, "*window c_in c_out"],
    bias: Float[Array, " c_out"] | None,
    feedback: jax.Array,
    *,
    strides: tuple[int, ...] | int = 1,
    padding: str = "SAME",
    init: Callable | None = None,
) -> Float[Array, "batch *spatial_out c_out"]:
    """FA convolution: the input gradient is the transposed convolution with B.

    ``dx = conv_transpose(g, B)``, ``dW`` exact. B has the kernel's shape
    ``(*window, c_in, c_out)`` (biotorch's FA Conv2d).
    """
    _checks.check_conv_args(x, kernel, bias, strides, padding, "feedback_conv")
    spatial = kernel.ndim - 2
    strides = (strides,) * spatial if isinstance(strides, int) else tuple(strides)
    y = feedback_bilinear(ConvProduct(strides, padding), x, kernel, feedback, init=init)
    return y if bias is None else y + bias


class EinsumProduct:
    """A static, hashable ``jnp.einsum(spec, x, kernel)``."""

    def __init__(self, spec: str):
        self.spec = spec

    def __call__(self, x, kernel):
        return jnp.einsum(self.spec, x, kernel)

    def __hash__(self):
        return hash(("einsum", self.spec))

    def __eq__(self, other):
        return isinstance(other, EinsumProduct) and other.spec == self.spec


def feedback_einsum(spec: str, x: jax.Array, kernel: jax.Array, feedback: jax.Array, *, init: Callable | None = None) -> jax.Array:
    """FA ``einsum(spec, x, kernel)`` (e.g. attention projections ``"bsd,dhk->bshk"``)."""
    _checks.check_einsum_args(spec, x, kernel, "feedback_einsum")
    return feedback_bilinear(EinsumProduct(spec), x, kernel, feedback, init=init)


# Rules whose backward matrix depends on W itself (sign symmetry: |M| ⊙ sign(W)) keep
# W as a residual; under jit W is a live argument anyway, so no copy is held.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _matrix_bilinear(f: Bilinear, x, weight, feedback, backward_matrix, input_gradient):
    return f(x, weight)


def _matrix_fwd(f, x, weight, feedback, backward_matrix, input_gradient):
    return f(x, weight), (x, weight, feedback)


def _matrix_bwd(f, backward_matrix, input_gradient, residuals, g):
    x, weight, feedback = residuals
    if f is dense_product and input_gradient is not None:
        dx = input_gradient(weight, feedback, g)  # None: this feedback has no tiled path
        if dx is not None:
            return dx.astype(x.dtype), _weight_gradient(f, x, weight, g), None
    matrix = backward_matrix(weight, feedback)
    if tuple(matrix.shape) != tuple(weight.shape):  # e.g. a stored M drawn for another kernel
        raise ValueError(f"feedback: the backward matrix has shape {tuple(matrix.shape)}, expected the kernel's {tuple(weight.shape)}")
    # The FA backward with the computed matrix as B (an array, so nothing is regenerated).
    dx, dw, _ = _bwd(f, None, (x, jax.ShapeDtypeStruct(weight.shape, weight.dtype), matrix), g)
    return dx, dw, None


_matrix_bilinear.defvjp(_matrix_fwd, _matrix_bwd)


def matrix_bilinear(
    f: Bilinear, x: jax.Array, weight: jax.Array, feedback: Any, *, backward_matrix: Callable,
    input_gradient: Callable | None = None,
) -> jax.Array:
    """``f(x, weight)`` whose input-gradient uses ``backward_matrix(weight, feedback)`` in W's place.

    The generalisation of :func:`feedback_bilinear` used by the rule family: uSF
    (``sign(W)·s``), frSF/brSF (``|M| ⊙ sign(W)``) and Kolen–Pollack (learned B).
    ``backward_matrix`` is static and hashable and runs inside the backward, so a
    regenerated M never lives past its layer's backward. ``feedback`` is any pytree
    (e.g. ``(key, step)``) and gets no cotangent; ``dW`` stays exact. For dense
    layers, ``input_gradient(weight, feedback, g)`` may compute ``dx = g Bᵀ`` without
    building B whole (a regenerated M drawn in tiles, see ``fa_jax.Tiled``), or
    return ``None`` to use ``backward_matrix``.
    """
    return _matrix_bilinear(f, x, weight, feedback, backward_matrix, input_gradient)
