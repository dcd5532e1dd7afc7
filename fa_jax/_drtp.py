"""Direct random target projection (Frenkel, Lefebvre & Bol 2021, "Learning without feedback").

Every hidden tap ``h_l`` receives a fixed random projection of the one-hot
*target* ``y*``, not of the error:

    δh_l = y* B_l,  B_l: (classes, d_l)       (Frenkel et al. 2021, eq. 6)

and the output block trains on its exact gradient ``e = ∂L/∂y``. The hidden
signals need neither the output nor the error, so each block can update as soon
as its forward is done: no backward dependency at all. It runs on DFA's tap
machinery: the same feedback (:class:`DFAFeedback`, one concatenated projection
or a shared prefix, stored or regenerated) and :func:`fa_jax.project_error`
with ``y*`` in place of ``e``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fa_jax import _rules


@dataclasses.dataclass(frozen=True)
class DRTP:
    """Direct random target projection (Frenkel et al. 2021): hidden taps get ``y* B_l``.

    Attributes:
      init: ``init(key, (classes, tap_features), dtype)`` per tap (DFA's default).
      regenerate: store one key and redraw the projection in every step.
      batch_dims: leading dims shared by the output, targets and every tap.
      shared_prefix: TinyDFA layout, one ``(classes, widest tap)`` matrix.

    Targets are integer labels of the output's batch shape (one-hot encoded here)
    or arrays with the output's shape (used as given, e.g. already one-hot).
    """

    init: Callable = _rules.DFA_DEFAULT_INIT
    regenerate: bool = False
    batch_dims: int = 1
    shared_prefix: bool = False
    name = "drtp"

    def teaching_signal(self, outputs: jax.Array, targets: Any) -> jax.Array:
        """``y*`` shaped like ``outputs``: one-hot of integer labels, or the targets as given."""
        targets = jnp.asarray(targets)
        if jnp.issubdtype(targets.dtype, jnp.integer) and targets.shape == outputs.shape[:-1]:
            signal = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
        elif targets.shape == outputs.shape:
            signal = targets.astype(outputs.dtype)
        else:
            raise ValueError(
                f"targets: DRTP projects the target, so it needs integer labels of shape {outputs.shape[:-1]} "
                f"or a one-hot array of shape {outputs.shape}; given {targets.dtype} {targets.shape}"
            )
        return jax.lax.stop_gradient(signal)

    def init_feedback(self, params, *, key, model=None, inputs=None, dtype=None, **_):
        from fa_jax._feedback import init_feedback  # the DFA layout, drawn by the core

        if model is None or inputs is None:
            raise ValueError("model, inputs: init_feedback('drtp', ...) needs model= and inputs= to find the taps")
        as_dfa = _rules.DFA(self.init, self.regenerate, self.batch_dims, self.shared_prefix)
        return init_feedback(as_dfa, params, key=key, model=model, inputs=inputs, dtype=dtype)


_rules.register(DRTP)
