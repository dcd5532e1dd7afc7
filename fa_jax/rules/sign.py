"""Sign-symmetry rules (Liao, Leibo & Poggio 2016, "How important is weight symmetry in backpropagation?").

The backward pass may know the *sign* of each forward weight but not its size.
All three run FA's op, ``dx = g Bᵀ`` with ``dW`` exact, and differ only in B,
built from W inside the backward:

* uSF:  ``B = sign(W) · s``                                (uniform magnitude)
* frSF: ``B = |M| ⊙ sign(W)``, M drawn once and fixed       (fixed random magnitude)
* brSF: ``B = |M_t| ⊙ sign(W)``, ``M_t = init(fold_in(k, t))`` redrawn at every step t

Names and defaults follow biotorch: ``s = √(2/(fan_in + fan_out))`` and M Xavier
uniform. ``sign(B) == sign(W)`` at every step by construction (``W = 0`` gives ``B = 0``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fa_jax import _checks
from fa_jax._specs import map_stack, stack_keys
from fa_jax.rules._base import Rule, register
from fa_jax.rules._draw import draw_or_key, materialize, require_key

# biotorch draws the magnitudes of frSF/brSF like a Xavier (Glorot) uniform kernel.
SIGN_DEFAULT_INIT = jax.nn.initializers.glorot_uniform()


def _tiled(init: Any, key: Any, weight: Any, g: jax.Array, spec: Any, product: Any) -> jax.Array | None:
    """``dx = g (|M| ⊙ sign(W))ᵀ`` with M drawn tile by tile by a ``fa_jax.Tiled`` init, else ``None``.

    Only one ``(rows, fan_out)`` tile of M and the matching rows of ``sign(W)`` are
    live at a time, so a regenerated sign-rule B never exists whole.
    """
    if product is None or spec.stack or not _checks.is_key(key) or not hasattr(init, "dense_input_gradient"):
        return None
    last_row = weight.shape[0] - 1

    def signed(tile, first_row):
        rows = jnp.minimum(first_row + jnp.arange(tile.shape[0]), last_row)  # padding rows repeat the last
        return jnp.abs(tile) * jnp.sign(weight[rows]).astype(tile.dtype)

    return init.dense_input_gradient(key, g, weight.shape, signed)


@register
@dataclasses.dataclass(frozen=True)
class USF(Rule):
    """Uniform sign-concordant feedback (uSF): ``δ_l = (δ_{l+1} (sign(W_{l+1}) s)ᵀ) ⊙ f'(a_l)``.

    The feedback leaf holds ``s`` itself (one per scanned layer); nothing random is drawn.

    Attributes:
      scale: ``"xavier"`` for ``s = √(2/(fan_in + fan_out))`` (biotorch), or a number.
    """

    scale: float | str = "xavier"
    name = "usf"
    reads_weight = True

    def __post_init__(self):
        if not (self.scale == "xavier" or (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool))):
            raise ValueError(f"USF.scale: expected 'xavier' or a number, given {self.scale!r}")

    def magnitude(self, spec) -> float:
        """``s`` for one layer of this weight."""
        if self.scale == "xavier":
            fan_in, fan_out = spec.fans()
            return math.sqrt(2.0 / (fan_in + fan_out))
        return float(self.scale)

    def init_weight(self, spec, *, key):
        return jnp.full(spec.stack, self.magnitude(spec), jnp.float32)

    def backward_matrix(self, weight, feedback, *, spec, step):
        scale = jnp.asarray(feedback, weight.dtype).reshape(feedback.shape + (1,) * (weight.ndim - feedback.ndim))
        return jnp.sign(weight) * scale


@register
@dataclasses.dataclass(frozen=True)
class FRSF(Rule):
    """Fixed random-magnitude sign-concordant feedback (frSF): ``B = |M| ⊙ sign(W)``.

    M is drawn once per weight, like FA's B, and stays fixed; W's sign is read at every step.

    Attributes:
      init: ``init(key, (*window, fan_in, fan_out), dtype)`` for M (default Xavier uniform).
      regenerate: store the keys and redraw M inside the backward (same numbers).
    """

    init: Callable = SIGN_DEFAULT_INIT
    regenerate: bool = False
    name = "frsf"
    reads_weight = True

    def __post_init__(self):
        _checks.check_callable(self.init, "FRSF.init")
        _checks.check_bool(self.regenerate, "FRSF.regenerate")

    def init_weight(self, spec, *, key):
        return draw_or_key(self, spec, key, self.init, self.regenerate)

    def backward_matrix(self, weight, feedback, *, spec, step):
        magnitude = materialize(feedback, spec, self.init, weight.dtype)
        return jnp.abs(magnitude).astype(weight.dtype) * jnp.sign(weight)

    def input_gradient(self, g, *, weight, feedback, spec, step, product):
        return _tiled(self.init, feedback, weight, g, spec, product)


@register
@dataclasses.dataclass(frozen=True)
class BRSF(Rule):
    """Batchwise random-magnitude sign-concordant feedback (brSF): ``B_t = |M_t| ⊙ sign(W_t)``.

    ``M_t = init(fold_in(k, t))``: a fresh magnitude every step ``t``, yet pure: the same
    ``(key, t)`` gives the same M, so two runs with one seed are identical. Every
    gradient call needs ``step=t``.

    Attributes:
      init: ``init(key, (*window, fan_in, fan_out), dtype)`` for M (default Xavier uniform).
    """

    init: Callable = SIGN_DEFAULT_INIT
    name = "brsf"
    reads_weight = True
    needs_step = True

    def __post_init__(self):
        _checks.check_callable(self.init, "BRSF.init")

    def init_weight(self, spec, *, key):
        require_key(self, key)
        return stack_keys(key, spec.stack)

    def step_keys(self, keys: jax.Array, step: Any) -> jax.Array:
        """The keys of ``M_t``: ``fold_in(k, t)`` for every layer key."""
        if step is None:
            raise ValueError(
                f"step: rule {self.name!r} redraws its feedback every step from (key, step) (Liao et al. 2016, "
                "brSF: M_t = init(fold_in(k, t))); expected step=t on the call, given none"
            )
        return map_stack(lambda k: jax.random.fold_in(k, jnp.asarray(step, jnp.uint32)), keys)

    def backward_matrix(self, weight, feedback, *, spec, step):
        magnitude = spec.draw(self.init, self.step_keys(feedback, step), weight.dtype)
        return jnp.abs(magnitude) * jnp.sign(weight)

    def input_gradient(self, g, *, weight, feedback, spec, step, product):
        return _tiled(self.init, self.step_keys(feedback, step), weight, g, spec, product)
