"""Kolen–Pollack learning (Kolen & Pollack 1994; Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019,
"Deep learning without weight transport")."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from fa_jax import _checks
from fa_jax.rules._base import Rule, register
from fa_jax.rules._draw import draw_or_key
from fa_jax.rules.fa import FA_DEFAULT_INIT


@register
@dataclasses.dataclass(frozen=True)
class KolenPollack(Rule):
    """Kolen–Pollack: FA whose B learns W's update plus its own decay (Akrout et al. 2019, eqs. 5–6)::

        W ← W + u              (u: the optimizer's update, W's own decay included)
        B ← B + u − λ (B − W)  ⇒  B − W ← (1 − λ)(B − W) → 0

    so B converges to W and the backward pass to BP's, with no weight transport: each
    synapse of B sees only quantities local to it. B never enters ``params``; only
    :meth:`update_feedback` (``fa_jax.update_feedback``) changes it.

    Attributes:
      init: ``init(key, (*window, fan_in, fan_out), dtype)`` for B at step 0.
      decay: λ, the per-step decay of ``B − W``. The default, 1e-3, halves ``B − W`` in
        about 700 steps; with λ = 0, B and W get the same updates and KP is FA.
    """

    init: Callable = FA_DEFAULT_INIT
    decay: float = 1e-3
    name = "kp"

    def __post_init__(self):
        _checks.check_callable(self.init, "KolenPollack.init")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 <= self.decay <= 1:
            raise ValueError(f"KolenPollack.decay: expected a number in [0, 1], given {self.decay!r}")

    def init_weight(self, spec, *, key):
        return draw_or_key(self, spec, key, self.init, regenerate=False)  # learned state: always stored

    def backward_matrix(self, weight, feedback, *, spec, step):
        return feedback

    def update_feedback(self, feedback, *, updates, params):
        """``B ← B + u − λ(B − W)`` for every weight with feedback; B keeps its dtype."""
        from fa_jax._feedback import by_path  # the path naming the engine keys feedback by

        u, w = by_path(updates), by_path(params)
        missing = [p for p in feedback.weights if p not in u or p not in w]
        if missing:
            raise ValueError(f"updates, params: expected entries for the weights {missing[:5]} of the feedback")

        def step(b, u, w):
            new = (
                b.astype(jnp.float32)
                + u.astype(jnp.float32)
                - self.decay * (b.astype(jnp.float32) - w.astype(jnp.float32))
            )
            return new.astype(b.dtype)

        weights = {p: step(b, u[p], w[p]) for p, b in feedback.weights.items()}
        return dataclasses.replace(feedback, weights=weights)
