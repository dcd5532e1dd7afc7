"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, "Random synaptic feedback weights
support error backpropagation for deep learning")."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from fa_jax import _checks
from fa_jax.rules._base import Rule, register
from fa_jax.rules._draw import draw_or_key, materialize

# B is drawn exactly like a LeCun-normal forward kernel, N(0, 1/fan_in) truncated at 2σ: at
# step 0 ‖B‖ ≈ ‖W‖, so an FA update has the size of a BP update and BP's learning rate carries over.
FA_DEFAULT_INIT = jax.nn.initializers.lecun_normal()


@register
@dataclasses.dataclass(frozen=True)
class FA(Rule):
    """Feedback alignment: ``δ_l = (δ_{l+1} B_{l+1}ᵀ) ⊙ f'(a_l)`` (Lillicrap et al. 2016, eq. 2).

    Every weight product's input gradient uses a fixed random B with the weight's
    shape; ``dW = xᵀ δ`` stays exact.

    Attributes:
      init: ``init(key, (*window, fan_in, fan_out), dtype)``; B is drawn in that layout
        and laid out like its weight (an Equinox ``(out, in)`` weight gets ``Bᵀ``'s layout).
      regenerate: keep one key per weight (per scanned layer) and redraw B inside the
        backward: the same numbers as storing it, less memory. With ``init=fa_jax.Tiled(...)``
        a dense B is drawn and used one tile at a time.
    """

    init: Callable = FA_DEFAULT_INIT
    regenerate: bool = False
    name = "fa"

    def __post_init__(self):
        _checks.check_callable(self.init, "FA.init")
        _checks.check_bool(self.regenerate, "FA.regenerate")

    def init_weight(self, spec, *, key):
        return draw_or_key(self, spec, key, self.init, self.regenerate)

    def backward_matrix(self, weight, feedback, *, spec, step):
        return materialize(feedback, spec, self.init)

    def input_gradient(self, g, *, weight, feedback, spec, step, product) -> Any:
        if product is None or not _checks.is_key(feedback) or not hasattr(self.init, "dense_input_gradient"):
            return None
        return self.init.dense_input_gradient(feedback, g, spec.shape)
