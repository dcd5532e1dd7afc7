"""Direct random target projection (Frenkel, Lefebvre & Bol 2021, "Learning without feedback")."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from fa_jax import _checks
from fa_jax.rules._base import register
from fa_jax.rules._projection import Projection


@register
@dataclasses.dataclass(frozen=True)
class DRTP(Projection):
    """Direct random target projection: every tap receives ``δh_l = (y*/N) B_l`` (Frenkel et al. 2021, eq. 6).

    A fixed random projection of the one-hot *target* ``y*``, not of the error, so the
    hidden signals need neither the output nor the error: each block can update as soon
    as its forward is done. The signal is divided by ``N``, the number of samples (or
    tokens) in the batch, as a mean loss divides the error: duplicating a batch leaves
    the update unchanged. The block after the last tap trains on its exact gradient.
    Options: as for :class:`fa_jax.DFA`.

    Targets are integer labels of the output's batch shape (one-hot encoded here) or an
    array with the output's shape (used as given, e.g. already one-hot).
    """

    name = "drtp"
    needs_targets = True

    def teaching_signal(self, outputs: jax.Array, targets: Any, batch_dims: int) -> jax.Array:
        """``y* / N`` shaped like ``outputs``: one-hot of integer labels, or the targets as given."""
        if targets is None:
            raise ValueError(
                "targets: rule 'drtp' sends the hidden taps a random projection of the targets (Frenkel et al. "
                "2021); expected targets on the call (fa_jax.nnx.call(..., targets=y), "
                "apply(..., targets=y)), given none"
            )
        targets = jnp.asarray(targets)
        if jnp.issubdtype(targets.dtype, jnp.integer) and targets.shape == outputs.shape[:-1]:
            signal = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
        elif targets.shape == outputs.shape:
            signal = targets.astype(outputs.dtype)
        else:
            raise ValueError(
                f"targets: DRTP projects the target, so it needs integer labels of shape {outputs.shape[:-1]} "
                f"or a one-hot array of shape {outputs.shape}; given {_checks.describe(targets)}"
            )
        samples = math.prod(outputs.shape[:batch_dims])
        return jax.lax.stop_gradient(signal) / samples

    def tap_signals(self, feedback, layout, *, error, outputs, targets, taps):
        return self.project(self.teaching_signal(outputs, targets, layout.batch_dims), feedback, layout, taps)
