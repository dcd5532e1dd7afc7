"""Backpropagation (Rumelhart et al. 1986): the reference every other rule departs from."""

from __future__ import annotations

import dataclasses

from fa_jax.rules._base import Rule, register


@register
@dataclasses.dataclass(frozen=True)
class BP(Rule):
    """Backpropagation: ``δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ f'(a_l)``; exactly ``jax.value_and_grad``.

    Every default of :class:`Rule` is BP's: no feedback, no cut, nothing learned.
    """

    name = "bp"
