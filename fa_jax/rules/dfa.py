"""Direct feedback alignment (Nøkland 2016; Launay, Poli, Boniface & Krzakala 2020, "Direct Feedback
Alignment Scales to Modern Deep Learning Tasks and Architectures"), and the shallow baseline."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fa_jax import _checks
from fa_jax.rules import _projection
from fa_jax.rules._base import Rule, register
from fa_jax.rules._draw import require_key

# B_l, shape (output_features, tap_features), has std 1/√tap_features: the scale of the transposed
# LeCun-initialised map from the tap to the output, so DFA's first update of the last hidden layer
# matches BP's in size.
DFA_DEFAULT_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_out", "truncated_normal")


def _check_taps(rule: Rule) -> None:
    if rule.taps not in ("auto", "layer", "marked"):
        raise ValueError(f"{type(rule).__name__}.taps: expected 'auto', 'layer' or 'marked', given {rule.taps!r}")
    if rule.batch_dims is not None:
        _checks.check_int(rule.batch_dims, f"{type(rule).__name__}.batch_dims", minimum=0)
    _checks.check_bool(rule.mix_batch, f"{type(rule).__name__}.mix_batch")


@register
@dataclasses.dataclass(frozen=True)
class DFA(Rule):
    """Direct feedback alignment: every tap ``h_l`` receives ``δ_l = e B_l``, ``e = ∂L/∂y`` (Nøkland 2016, eq. 3).

    The network is cut at every tap, so no ``g Wᵀ`` product is built; ``e`` reaches all
    taps through one GEMM with the concatenated ``[B_1 … B_L]``, and the block after the
    last tap trains on its exact gradient.

    Attributes:
      init: ``init(key, (output_features, tap_features), dtype)`` per tap.
      regenerate: store one key and redraw the projection in every step.
      taps: ``"auto"`` (the ``fa_jax.tap`` marks if any, else ``"layer"``), ``"layer"``
        (the activation entering every weight product: Nøkland's DFA for an MLP) or ``"marked"``.
      batch_dims: the leading dims shared by the output and every tap; ``None`` finds
        them (2 for a per-token language model, 1 for an MLP or a CNN).
      mix_batch: allow a ``batch_dims`` smaller than the found one (mixing samples or tokens).
      shared_prefix: TinyDFA's layout: one ``(output_features, widest tap)`` matrix, tap
        ``l`` using its first ``d_l`` columns.
    """

    init: Callable = DFA_DEFAULT_INIT
    regenerate: bool = False
    taps: str = "auto"
    batch_dims: int | None = None
    mix_batch: bool = False
    shared_prefix: bool = False
    name = "dfa"
    cuts = True
    projects_error = True

    def __post_init__(self):
        _checks.check_callable(self.init, "DFA.init")
        _checks.check_bool(self.regenerate, "DFA.regenerate")
        _checks.check_bool(self.shared_prefix, "DFA.shared_prefix")
        _check_taps(self)

    def init_taps(self, layout, *, key, dtype=None):
        require_key(self, key)
        if self.regenerate:
            return key
        return _projection.draw(layout, key, self.init, shared_prefix=self.shared_prefix, dtype=dtype or jnp.float32)

    def tap_signals(self, feedback, layout, *, error, outputs, targets, taps):
        return _projection.project(error, feedback, layout, self.init, shared_prefix=self.shared_prefix, taps=taps)


@register
@dataclasses.dataclass(frozen=True)
class Shallow(Rule):
    """The DFA papers' baseline: the network is cut at every tap and nothing reaches the blocks before the last.

    Only the block after the last tap trains. No ``dW`` product is built for the frozen
    blocks (their gradients are zeros by construction, not by computation).

    Attributes:
      taps: as for :class:`DFA`.
    """

    taps: str = "auto"
    name = "shallow"
    cuts = True

    def __post_init__(self):
        _check_taps(self)
