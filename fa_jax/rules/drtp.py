"""Direct random target projection (Frenkel, Lefebvre & Bol 2021, "Learning without feedback")."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fa_jax import _checks
from fa_jax.rules import _projection
from fa_jax.rules._base import Rule, register
from fa_jax.rules._draw import require_key
from fa_jax.rules.dfa import DFA_DEFAULT_INIT, _check_taps


@register
@dataclasses.dataclass(frozen=True)
class DRTP(Rule):
    """Direct random target projection: every tap receives ``δh_l = (y*/N) B_l`` (Frenkel et al. 2021, eq. 6).

    A fixed random projection of the one-hot *target* ``y*``, not of the error, so the
    hidden signals need neither the output nor the error: each block can update as soon
    as its forward is done. The signal is divided by ``N``, the number of samples (or
    tokens) in the batch, as a mean loss divides the error: duplicating a batch leaves
    the update unchanged. The block after the last tap trains on its exact gradient.

    Attributes:
      init, regenerate, taps, batch_dims, mix_batch, shared_prefix: as for :class:`fa_jax.DFA`.

    Targets are integer labels of the output's batch shape (one-hot encoded here) or an
    array with the output's shape (used as given, e.g. already one-hot).
    """

    init: Callable = DFA_DEFAULT_INIT
    regenerate: bool = False
    taps: str = "auto"
    batch_dims: int | None = None
    mix_batch: bool = False
    shared_prefix: bool = False
    name = "drtp"
    cuts = True
    needs_targets = True

    def __post_init__(self):
        _checks.check_callable(self.init, "DRTP.init")
        _checks.check_bool(self.regenerate, "DRTP.regenerate")
        _checks.check_bool(self.shared_prefix, "DRTP.shared_prefix")
        _check_taps(self)

    def init_taps(self, layout, *, key, dtype=None):
        require_key(self, key)
        if self.regenerate:
            return key
        return _projection.draw(layout, key, self.init, shared_prefix=self.shared_prefix, dtype=dtype or jnp.float32)

    def teaching_signal(self, outputs: jax.Array, targets: Any, batch_dims: int) -> jax.Array:
        """``y* / N`` shaped like ``outputs``: one-hot of integer labels, or the targets as given."""
        if targets is None:
            raise ValueError(
                "targets: rule 'drtp' sends the hidden taps a random projection of the targets (Frenkel et al. "
                "2021); expected targets on the call (fa_jax.nnx.call(..., targets=y), apply(..., targets=y)), given none"
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
        source = self.teaching_signal(outputs, targets, layout.batch_dims)
        return _projection.project(source, feedback, layout, self.init, shared_prefix=self.shared_prefix, taps=taps)
