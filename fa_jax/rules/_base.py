"""The rule protocol: one object says everything a learning rule decides.

Like optax's ``base.py``, this file is the extension point. A rule is a frozen
(hashable, static) dataclass deriving from :class:`Rule`; the engine, the Flax
adapters, the optax transform, the experiment runner and the diagnostics ask it
through these methods and never test its type. A new rule is one module plus its
closed-form test; :func:`register` makes ``get_rule(name)`` find it.

What a rule decides, and where:

* **Weight products** (every ``dot_general`` / ``conv_general_dilated`` of an
  activation with a parameter): :meth:`Rule.init_weight` draws the feedback
  leaf stored for one weight (``None``: its products stay exact), and
  :meth:`Rule.backward_matrix` builds the matrix that stands for ``W`` in the
  input gradient, ``dx = g Bᵀ`` (Lillicrap et al. 2016, eq. 2), from ``W``, that
  leaf and the step. ``dW = xᵀ g`` is always exact. :meth:`Rule.input_gradient`
  may compute ``dx`` without a whole B (tiled regeneration).
* **Taps** (rules with ``cuts = True``): every tap is cut, so no error passes
  through it by backpropagation; :meth:`Rule.init_taps` draws the feedback for
  the taps found in the program and :meth:`Rule.tap_signals` says what each tap
  receives instead (DFA: ``e B_l``; DRTP: ``y* B_l / N``; shallow: nothing).
* **After an optimizer step**: :meth:`Rule.update_feedback` (identity unless
  the rule learns its feedback, as Kolen–Pollack does).
* **What a call needs** besides params and data: ``needs_step``, ``needs_targets``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax

from fa_jax._engine._taps import TapLayout
from fa_jax._specs import WeightSpec


class Rule:
    """Base class of every learning rule; its defaults are backpropagation's.

    Subclasses are frozen dataclasses with a class attribute ``name``.
    """

    name: ClassVar[str] = ""
    #: Rules that redraw feedback every batch (brSF) need ``step=`` on every call.
    needs_step: ClassVar[bool] = False
    #: Rules whose tap signals project the targets (DRTP) need ``targets`` in the backward.
    needs_targets: ClassVar[bool] = False
    #: :meth:`backward_matrix` reads ``W`` itself (sign symmetry), so W is kept for the backward.
    reads_weight: ClassVar[bool] = False
    #: Taps are cut: no error crosses them by backpropagation; :meth:`tap_signals` feeds them.
    cuts: ClassVar[bool] = False
    # taps, batch_dims and mix_batch are not ClassVars: tap rules (DFA, DRTP, Shallow) make them
    # dataclass fields, options set per instance.
    #: Where a cutting rule cuts: ``"auto"`` (the ``fa_jax.tap`` marks if the model has any, else
    #: ``"layer"``), ``"layer"`` (the activation entering every weight product) or ``"marked"``.
    taps: str = "auto"
    #: Leading dims shared by the output and every tap; ``None`` finds them (see ``fa_jax.plan``).
    batch_dims: int | None = None
    #: Allow a ``batch_dims`` smaller than the found one (a projection mixing samples or tokens).
    mix_batch: bool = False
    #: Tap signals are computed from the output error ``e`` (DFA), so a loss linear in the
    #: outputs (whose ``e`` never changes) is reported.
    projects_error: ClassVar[bool] = False

    # --- weight products ----------------------------------------------------------------

    def init_weight(self, spec: WeightSpec, *, key: jax.Array | None) -> Any:
        """The feedback stored for one weight: a pytree of arrays (``()`` when nothing needs
        storing), or ``None``, which keeps ``Wᵀ`` in its products.

        Args:
          spec: the weight, with the roles of its axes in its product.
          key: ``layer_key(feedback key, spec.path)``; ``None`` when no key was given
            (a rule that draws raises, naming ``key``).
        """
        del spec, key
        return None

    def backward_matrix(self, weight: jax.Array, feedback: Any, *, spec: WeightSpec, step: Any) -> jax.Array:
        """The matrix standing for ``W`` in ``dx``, shaped like ``weight`` (one layer or a stack).

        Args:
          weight: ``W`` (a ``ShapeDtypeStruct`` unless ``reads_weight``).
          feedback: this weight's leaf from :meth:`init_weight` (sliced like ``W``).
          spec: the weight's spec at this slicing (``spec.stack`` layers left).
          step: the training step (``None`` when the call gave none).
        """
        raise NotImplementedError(f"rule {self.name!r} keeps Wᵀ, so it has no backward matrix")

    def input_gradient(
        self, g: jax.Array, *, weight: Any, feedback: Any, spec: WeightSpec, step: Any, product: Any
    ) -> jax.Array | None:
        """``dx`` computed without a whole B (e.g. drawn in tiles), or ``None`` to use :meth:`backward_matrix`."""
        del g, weight, feedback, spec, step, product
        return None

    # --- taps ----------------------------------------------------------------------------

    def init_taps(self, layout: TapLayout, *, key: jax.Array | None, dtype: Any = None) -> Any:
        """Feedback for the taps found in the program (``None`` when the rule needs none).

        Args:
          layout: the taps (names, feature shapes, stacks), the output and the batch dims.
          key: the feedback key; tap ``name`` draws from ``layer_key(key, name)``.
          dtype: storage dtype of what is drawn (``None``: float32).
        """
        del layout, key, dtype
        return None

    def tap_signals(
        self,
        feedback: Any,
        layout: TapLayout,
        *,
        error: jax.Array,
        outputs: jax.Array,
        targets: Any,
        taps: Sequence[jax.ShapeDtypeStruct],
    ) -> list[jax.Array | None]:
        """What each tap receives in place of its backpropagated error (``None``: nothing, it stays frozen).

        Args:
          feedback: what :meth:`init_taps` returned.
          layout: as given to :meth:`init_taps`.
          error: ``e = ∂L/∂y``, shape ``(*batch, *output)``, scaled like the loss.
          outputs: the model outputs ``y`` (same shape).
          targets: the targets given to the call (``None`` when none were given).
          taps: each tap's value ``(*stack, *batch, *features)``; a signal has that shape.
        """
        del feedback, layout, error, outputs, targets
        return [None] * len(taps)

    # --- after an optimizer step ---------------------------------------------------------

    def update_feedback(self, feedback: Any, *, updates: Any, params: Any) -> Any:
        """The feedback after one training step; fixed feedback is returned unchanged.

        Args:
          feedback: a :class:`fa_jax.Feedback`.
          updates: what the optimizer adds to ``params`` this step (optax's ``updates``).
          params: the params *before* the update.
        """
        del updates, params
        return feedback

    # --- identity ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The rule's options by field name (what a checkpoint records as its identity)."""
        return (
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}
        )


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Add a rule class to :data:`RULES` under ``cls.name`` (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Rule)) or not cls.name:
        raise TypeError(f"register: expected a Rule subclass with a name, given {cls!r}")
    RULES[cls.name] = cls
    return cls


def get_rule(rule: Rule | str) -> Rule:
    """A rule value from its name (``"fa"``, ``"dfa"``, …) or the value itself.

    Raises:
      ValueError: an unknown name (the message lists the registered ones).
      TypeError: anything that is neither a name nor a :class:`Rule`.
    """
    if isinstance(rule, str):
        try:
            return RULES[rule.lower()]()
        except KeyError:
            raise ValueError(f"rule: unknown rule {rule!r}; expected one of {sorted(RULES)}") from None
    if isinstance(rule, Rule):
        return rule
    raise TypeError(f"rule: expected a rule name in {sorted(RULES)} or a fa_jax Rule, given {type(rule).__name__}")
