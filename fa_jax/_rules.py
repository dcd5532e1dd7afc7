"""Learning rules as static, hashable values.

A rule says how error reaches hidden layers. It holds configuration only; the
random matrices live in a separate feedback pytree (see ``init_feedback``), so
no optimizer, weight decay or checkpoint of ``params`` can touch them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import jax

# B for FA is drawn exactly like a LeCun-normal forward kernel, N(0, 1/fan_in)
# truncated at 2σ: at step 0 ‖B‖ ≈ ‖W‖, so an FA update has the size of a BP
# update and the learning rate tuned for BP carries over.
FA_DEFAULT_INIT = jax.nn.initializers.lecun_normal()
# B_l for DFA, shape (output_features, tap_features), has std 1/√tap_features:
# the scale of the transposed LeCun-initialised map from the tap to the output,
# so the first DFA update of the last hidden layer matches BP's in size.
DFA_DEFAULT_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_out", "truncated_normal")


@dataclasses.dataclass(frozen=True)
class BP:
    """Backpropagation: the identity rule, exactly ``jax.value_and_grad``."""

    name = "bp"


@dataclasses.dataclass(frozen=True)
class FA:
    """Feedback alignment (Lillicrap et al. 2016): ``δ_l = (Bᵀ δ_{l+1}) ⊙ f'(a_l)``.

    Attributes:
      init: ``init(key, shape, dtype)`` drawing each B with its kernel's shape.
      regenerate: keep only a key per layer and redraw B inside the backward,
        trading compute for memory. Gives the same numbers as storing B.
    """

    init: Callable = FA_DEFAULT_INIT
    regenerate: bool = False
    name = "fa"


@dataclasses.dataclass(frozen=True)
class DFA:
    """Direct feedback alignment (Nøkland 2016, eq. 3; Launay et al. 2020).

    Every tap ``h_l`` receives ``δ_l = e B_l`` with ``e = ∂L/∂y``, through one
    GEMM of ``e`` with the concatenated ``[B_1 … B_L]``. Blocks are cut by a
    stop-gradient at each tap, so no ``g Wᵀ`` product is ever built; the
    output block trains on its exact gradient.

    Attributes:
      init: ``init(key, (output_features, tap_features), dtype)`` per tap.
      regenerate: store one key and redraw the projection in every step.
      batch_dims: leading dims shared by the output and every tap (2 for a
        ``(batch, seq, ·)`` language model); the rest are flattened.
      shared_prefix: TinyDFA's layout: one ``(output_features, widest tap)`` matrix,
        tap ``l`` using its first ``tap_features_l`` columns (one GEMM, less memory).
    """

    init: Callable = DFA_DEFAULT_INIT
    regenerate: bool = False
    batch_dims: int = 1
    # TinyDFA's layout: one (output_features, widest tap) matrix, each tap a prefix slice.
    shared_prefix: bool = False
    name = "dfa"


@dataclasses.dataclass(frozen=True)
class Shallow:
    """Only the block after the last tap trains: the baseline of the DFA papers' tables."""

    batch_dims: int = 1
    name = "shallow"


Rule = Union[BP, FA, DFA, Shallow]
RULES: dict[str, type] = {cls.name: cls for cls in (BP, FA, DFA, Shallow)}


def get_rule(rule: Rule | str) -> Rule:
    """Resolve a rule name (``"bp"``, ``"fa"``, ``"dfa"``, ``"shallow"``) or pass a rule through."""
    if isinstance(rule, str):
        try:
            return RULES[rule.lower()]()
        except KeyError:
            raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(RULES)}") from None
    if isinstance(rule, tuple(RULES.values())):
        return rule
    raise TypeError(f"rule must be a name in {sorted(RULES)} or a rule value, got {type(rule).__name__}")


def uses_taps(rule: Rule) -> bool:
    """True for rules that cut the network at taps (DFA and its relatives, e.g. DRTP)."""
    return isinstance(rule, (DFA, Shallow)) or projects_target(rule)


def projects_to_taps(rule: Rule) -> bool:
    """DFA (projects the error) and DRTP (projects the target): taps fed by a random projection."""
    return isinstance(rule, DFA) or projects_target(rule)


def projects_target(rule: Rule) -> bool:
    """DRTP-like rules send hidden taps a projection of ``rule.teaching_signal(outputs, targets)``, not of the error."""
    return hasattr(rule, "teaching_signal")


def register(cls: type) -> type:
    """Add a rule class to :data:`RULES` so ``get_rule(cls.name)`` finds it (used by the rule family)."""
    RULES[cls.name] = cls
    return cls


def uses_backward_matrix(rule: Rule) -> bool:
    """True for FA-family rules that build their backward matrix from ``(W, feedback, step)``."""
    return hasattr(rule, "backward_matrix")


def is_fa_family(rule: Rule) -> bool:
    """FA and the rules that run its op with another B (uSF, frSF, brSF, Kolen–Pollack): per-layer feedback."""
    return isinstance(rule, FA) or uses_backward_matrix(rule)


def needs_step(rule: Rule) -> bool:
    """Rules that redraw feedback every batch (brSF: ``M_t = init(fold_in(k, t))``) need the step ``t``."""
    return bool(getattr(rule, "needs_step", False))
