"""Kolen–Pollack learning (Kolen & Pollack 1994; Akrout et al. 2019, "Deep learning without weight transport").

The backward pass is FA's, ``δ_l = (δ_{l+1} Bᵀ) ⊙ f'(a_l)`` with B stored in the
kernel's shape. B is *learned*: it receives the same update as W plus the same
weight decay (Akrout et al. 2019, eqs. 5–6, in the kernel layout)::

    W ← W − η ∂W − λ W
    B ← B − η ∂W − λ B          ⇒  B − W ← (1 − λ)(B − W) → 0

so B converges to W and the backward pass to BP's, with no weight transport:
each synapse of B sees only quantities local to it.

"Feedback is not a parameter" still holds. B never enters ``params``, so no
optimizer state, weight decay or checkpoint restore of ``params`` reaches it.
It changes only through :func:`kolen_pollack_update`, a pure function of
``(feedback, updates, params)`` that the training loop calls beside the optimizer.
:func:`update_feedback` returns every other rule's feedback unchanged, so one loop
serves the whole family and all other rules keep fixed feedback.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fa_jax import _rules
from fa_jax._feedback import FAFeedback, fa_feedback, is_kernel
from fa_jax._ops import is_key


@dataclasses.dataclass(frozen=True)
class KolenPollack:
    """Kolen–Pollack (Akrout et al. 2019): FA whose B learns with W's update and decay.

    Attributes:
      init: ``init(key, shape, dtype)`` for B at step 0 (default: FA's LeCun normal).

    B is learned state, so it cannot be regenerated from a key.
    """

    init: Callable = _rules.FA_DEFAULT_INIT
    name = "kp"

    def backward_matrix(self, weight, feedback: tuple):
        """The stored, learned B."""
        leaf, _ = feedback
        if is_key(leaf):
            raise ValueError("Kolen–Pollack feedback is learned state and cannot be regenerated from a key")
        return leaf

    def init_feedback(self, params, *, key, select=is_kernel, dtype=None, **_):
        return fa_feedback(params, key=key, init=self.init, regenerate=False, select=select, dtype=dtype)


def kolen_pollack_update(feedback: FAFeedback, updates: Any, params: Any, *, decay: float = 0.0) -> FAFeedback:
    """One Kolen–Pollack step of B: ``B ← B + u − decay·(B − W)``.

    Args:
      feedback: :class:`FAFeedback` of rule ``KolenPollack``.
      updates: what is added to W this step (optax's ``updates``, shaped like ``params``),
        *including* W's own weight-decay term ``−decay·W`` if the optimizer applies one.
      params: W *before* the update.
      decay: the per-step decay factor ``λ`` (``learning_rate × weight_decay``). With it,
        B gets ``u + decay·W − decay·B``: W's gradient step plus B's own decay, Akrout's
        eq. 6, and ``B − W`` shrinks by ``(1 − decay)`` every step.

    Returns:
      The new feedback, B kept in its stored dtype. Leaves without B are unchanged.
    """
    if not isinstance(feedback, FAFeedback):
        raise ValueError(f"feedback: expected FAFeedback from init_feedback('kp', ...), given {type(feedback).__name__}")

    def step(b, u, w):
        if b is None:
            return None
        if is_key(b):
            raise ValueError("feedback: Kolen–Pollack B is learned state; a regenerated key cannot be updated")
        new = b.astype(jnp.float32) + u.astype(jnp.float32) - decay * (b.astype(jnp.float32) - w.astype(jnp.float32))
        return new.astype(b.dtype)

    kernels = jax.tree.map(step, feedback.kernels, updates, params, is_leaf=lambda x: x is None)
    return FAFeedback(kernels)


def update_feedback(rule: Any, feedback: Any, updates: Any, params: Any, *, decay: float = 0.0) -> Any:
    """The feedback after one training step: learned for Kolen–Pollack, unchanged for every other rule."""
    rule = _rules.get_rule(rule)
    if isinstance(rule, KolenPollack):
        return kolen_pollack_update(feedback, updates, params, decay=decay)
    return feedback


_rules.register(KolenPollack)
