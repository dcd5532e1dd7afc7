"""Sign-symmetry rules (Liao, Leibo & Poggio 2016, "How important is weight symmetry in backpropagation?").

The backward pass may know the *sign* of each forward weight but not its size.
All three rules run FA's op, ``dx = g Bᵀ`` with ``dW`` exact, and differ only in
the matrix used as B, built from W inside the backward:

* uSF:  ``B = sign(W) · s``                                (uniform magnitude)
* frSF: ``B = |M| ⊙ sign(W)``, M drawn once and fixed       (fixed random magnitude)
* brSF: ``B = |M_t| ⊙ sign(W)``, ``M_t = init(fold_in(k, t))`` redrawn at every step t

The names and defaults follow biotorch's sign variants: ``s = √(2/(fan_in + fan_out))``
and M Xavier-uniform. So ``sign(B) == sign(W)`` holds at every step by construction
(entries where ``W == 0`` give ``B == 0``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fa_jax import _rules
from fa_jax._feedback import FAFeedback, fa_feedback, is_kernel
from fa_jax._ops import is_key, materialize

# biotorch draws the magnitudes of frSF/brSF like a Xavier (Glorot) uniform kernel.
SIGN_DEFAULT_INIT = jax.nn.initializers.glorot_uniform()


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel ``(*window, in, out)``: the window multiplies both (like Flax/torch)."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _keys_only(params: Any, *, key: jax.Array, select: Callable) -> FAFeedback:
    """FA-shaped feedback holding each selected layer's key (``fold_in(key, crc32(path))``)."""
    return fa_feedback(params, key=key, regenerate=True, select=select)


def _tiled_sign_input_gradient(init: Any, key: jax.Array, weight: jax.Array, g: jax.Array) -> jax.Array | None:
    """``dx = g (|M| ⊙ sign(W))ᵀ`` with M drawn tile by tile by a ``fa_jax.Tiled`` init, else ``None``.

    Only one ``(rows, fan_out)`` tile of M, and the matching rows of ``sign(W)``, are
    live at a time, so a regenerated sign-rule B never exists whole.
    """
    if not hasattr(init, "dense_input_gradient") or weight.ndim != 2:
        return None
    last_row = weight.shape[0] - 1

    def signed(tile, first_row):
        rows = jnp.minimum(first_row + jnp.arange(tile.shape[0]), last_row)  # padding rows repeat the last
        return jnp.abs(tile) * jnp.sign(weight[rows]).astype(tile.dtype)

    return init.dense_input_gradient(key, g, weight.shape, signed)


@dataclasses.dataclass(frozen=True)
class USF:
    """Uniform sign-concordant feedback (uSF, Liao et al. 2016): ``B = sign(W) · s``.

    ``δ_l = (δ_{l+1} (sign(W_{l+1}) s)ᵀ) ⊙ f'(a_l)``. Nothing random is drawn; the
    feedback holds each layer's key only to mark which kernels use sign feedback.

    Attributes:
      scale: ``"xavier"`` for ``s = √(2/(fan_in + fan_out))`` (biotorch), or a float.
    """

    scale: float | str = "xavier"
    name = "usf"

    def __post_init__(self):
        if not (self.scale == "xavier" or isinstance(self.scale, (int, float))):
            raise ValueError(f"USF.scale: expected 'xavier' or a number, given {self.scale!r}")

    def magnitude(self, shape: tuple[int, ...]) -> float:
        """The constant ``s`` of a kernel of this shape."""
        if self.scale == "xavier":
            fan_in, fan_out = fans(shape)
            return math.sqrt(2.0 / (fan_in + fan_out))
        return float(self.scale)

    def backward_matrix(self, weight: Float[Array, "*kernel"], feedback: tuple) -> Float[Array, "*kernel"]:
        """``sign(W) · s``; ``feedback = (layer key, step)`` is unused."""
        return jnp.sign(weight) * jnp.asarray(self.magnitude(weight.shape), weight.dtype)

    def init_feedback(self, params, *, key, select=is_kernel, **_):
        return _keys_only(params, key=key, select=select)


@dataclasses.dataclass(frozen=True)
class FRSF:
    """Fixed random-magnitude sign-concordant feedback (frSF, Liao et al. 2016): ``B = |M| ⊙ sign(W)``.

    M is drawn once per layer with ``init(fold_in(key, crc32(path)), W.shape)`` and
    stays fixed; W's sign is read at every step.

    Attributes:
      init: ``init(key, shape, dtype)`` for M (default Xavier uniform, like biotorch).
      regenerate: store the layer key and redraw M inside the backward (same numbers).
    """

    init: Callable = SIGN_DEFAULT_INIT
    regenerate: bool = False
    name = "frsf"

    def backward_matrix(self, weight, feedback: tuple):
        """``|M| ⊙ sign(W)`` with M stored or regenerated from the layer key."""
        leaf, _ = feedback
        magnitude = materialize(leaf, weight.shape, weight.dtype, self.init)
        return jnp.abs(magnitude).astype(weight.dtype) * jnp.sign(weight)

    def dense_input_gradient(self, weight, feedback: tuple, g):
        """A regenerated M drawn in tiles (``init=fa_jax.Tiled(...)``): ``dx`` without a whole B."""
        leaf, _ = feedback
        return _tiled_sign_input_gradient(self.init, leaf, weight, g) if is_key(leaf) else None

    def init_feedback(self, params, *, key, select=is_kernel, dtype=None, **_):
        return fa_feedback(params, key=key, init=self.init, regenerate=self.regenerate, select=select, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class BRSF:
    """Batchwise random-magnitude sign-concordant feedback (brSF, Liao et al. 2016).

    ``B_t = |M_t| ⊙ sign(W_t)`` with ``M_t = init(fold_in(k_l, t), W.shape)``: a fresh
    magnitude every step ``t``, yet pure: the same ``(key, t)`` gives the same M, so
    two runs with one seed are identical. ``grad_fn`` therefore needs ``step=t``.

    Attributes:
      init: ``init(key, shape, dtype)`` for M (default Xavier uniform, like biotorch).
    """

    init: Callable = SIGN_DEFAULT_INIT
    name = "brsf"
    needs_step = True  # value_and_grad raises a clear error when step= is missing

    def magnitude_key(self, layer_key: jax.Array, step: Any) -> jax.Array:
        """The key of ``M_t``: ``fold_in(layer key, t)``."""
        return jax.random.fold_in(layer_key, jnp.asarray(step, jnp.uint32))

    def backward_matrix(self, weight, feedback: tuple):
        """``|init(fold_in(k_l, t))| ⊙ sign(W)``."""
        leaf, step = feedback
        if not is_key(leaf):
            raise ValueError("brSF feedback must hold one PRNG key per layer (from init_feedback('brsf', ...))")
        magnitude = self.init(self.magnitude_key(leaf, step), weight.shape, weight.dtype)
        return jnp.abs(magnitude) * jnp.sign(weight)

    def dense_input_gradient(self, weight, feedback: tuple, g):
        """``M_t`` drawn in tiles (``init=fa_jax.Tiled(...)``): ``dx`` without a whole B."""
        leaf, step = feedback
        if not is_key(leaf):
            return None  # backward_matrix raises the clear error
        return _tiled_sign_input_gradient(self.init, self.magnitude_key(leaf, step), weight, g)

    def init_feedback(self, params, *, key, select=is_kernel, **_):
        return _keys_only(params, key=key, select=select)


for _rule in (USF, FRSF, BRSF):
    _rules.register(_rule)
