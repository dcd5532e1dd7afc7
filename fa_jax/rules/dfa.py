"""Direct feedback alignment (Nøkland 2016; Launay, Poli, Boniface & Krzakala 2020, "Direct Feedback
Alignment Scales to Modern Deep Learning Tasks and Architectures"), and the shallow baseline."""

from __future__ import annotations

import dataclasses

from fa_jax.rules._base import Rule, register
from fa_jax.rules._projection import DFA_DEFAULT_INIT, Projection, check_taps

__all__ = ["DFA", "Shallow", "DFA_DEFAULT_INIT"]


@register
@dataclasses.dataclass(frozen=True)
class DFA(Projection):
    """Direct feedback alignment: every tap ``h_l`` receives ``δ_l = e B_l``, ``e = ∂L/∂y`` (Nøkland 2016, eq. 3).

    The network is cut at every tap, so no ``g Wᵀ`` product is built; ``e`` reaches all
    taps through one GEMM with the concatenated ``[B_1 … B_L]``, and the block after the
    last tap trains on its exact gradient. Options: see :class:`fa_jax.rules._projection.Projection`
    (``init``, ``regenerate``, ``taps``, ``batch_dims``, ``mix_batch``, ``shared_prefix``).
    """

    name = "dfa"
    projects_error = True

    def tap_signals(self, feedback, layout, *, error, outputs, targets, taps):
        return self.project(error, feedback, layout, taps)


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
        check_taps(self)
