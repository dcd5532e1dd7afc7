"""The one projection the direct rules (DFA, DRTP) share: ``s [B_1 … B_L]`` in a single GEMM.

The feedback is one matrix of shape ``(output_features, Σ_l layers_l · d_l)``:
tap ``l`` (each layer of a scanned tap) owns a block of columns drawn from
``layer_key(key, tap name)`` (``fold_in`` by layer), or, in TinyDFA's shared
layout, the first ``d_l`` columns of one ``(output_features, widest tap)`` matrix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fa_jax import _checks
from fa_jax._engine._taps import TapLayout, to_tap
from fa_jax._specs import layer_key, map_stack, stack_keys
from fa_jax.rules._base import Rule
from fa_jax.rules._draw import require_key

SHARED_PREFIX_PATH = "shared_prefix"  # the name whose key draws TinyDFA's one shared matrix

# B_l, shape (output_features, tap_features), has std 1/√tap_features: the scale of the transposed
# LeCun-initialised map from the tap to the output, so DFA's first update of the last hidden layer
# matches BP's in size.
DFA_DEFAULT_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_out", "truncated_normal")


def check_taps(rule: Rule) -> None:
    """A cutting rule's placement options, checked when the rule is made."""
    if rule.taps not in ("auto", "layer", "marked"):
        raise ValueError(f"{type(rule).__name__}.taps: expected 'auto', 'layer' or 'marked', given {rule.taps!r}")
    if rule.batch_dims is not None:
        _checks.check_int(rule.batch_dims, f"{type(rule).__name__}.batch_dims", minimum=0)
    _checks.check_bool(rule.mix_batch, f"{type(rule).__name__}.mix_batch")


@dataclasses.dataclass(frozen=True)
class Projection(Rule):
    """What the direct rules (DFA, DRTP) share: cut at every tap, one random projection feeds them all.

    A subclass says what is projected, in :meth:`Rule.tap_signals`, through :meth:`project`.

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
    cuts = True

    def __post_init__(self):
        _checks.check_callable(self.init, f"{type(self).__name__}.init")
        _checks.check_bool(self.regenerate, f"{type(self).__name__}.regenerate")
        _checks.check_bool(self.shared_prefix, f"{type(self).__name__}.shared_prefix")
        check_taps(self)

    def init_taps(self, layout, *, key, dtype=None):
        require_key(self, key)
        if self.regenerate:
            return key
        return draw(layout, key, self.init, shared_prefix=self.shared_prefix, dtype=dtype or jnp.float32)

    def project(self, source: jax.Array, feedback: Any, layout: TapLayout, taps: Sequence[Any]) -> list[jax.Array]:
        """``source [B_1 … B_L]`` in one GEMM, laid out like each tap (:func:`project`)."""
        return project(source, feedback, layout, self.init, shared_prefix=self.shared_prefix, taps=taps)


def draw(
    layout: TapLayout, key: jax.Array, init: Callable, *, shared_prefix: bool, dtype: Any = jnp.float32
) -> jax.Array:
    """``[B_1 … B_L]`` of shape ``(output_features, columns)``.

    ``B_l`` of tap ``l`` is ``(output_features, d_l)`` per layer.
    """
    out = layout.output.size
    if shared_prefix:
        widest = max(tap.size for tap in layout.taps)
        return init(layer_key(key, SHARED_PREFIX_PATH), (out, widest), dtype)
    blocks = []
    for tap in layout.taps:
        keys = stack_keys(layer_key(key, tap.name), tap.stack)

        def draw(k: jax.Array, size: int = tap.size) -> jax.Array:
            return init(k, (out, size), dtype)

        block = map_stack(draw, keys)  # (*stack, out, d)
        if tap.stack:
            block = jnp.moveaxis(block.reshape(tap.layers, out, tap.size), 0, 1).reshape(out, tap.columns)
        blocks.append(block)
    return jnp.concatenate(blocks, axis=1)


def matrix(feedback: Any, layout: TapLayout, init: Callable, *, shared_prefix: bool, dtype: Any) -> jax.Array:
    """The stored projection, or the one regenerated from its key."""
    if _checks.is_key(feedback):
        return draw(layout, feedback, init, shared_prefix=shared_prefix, dtype=dtype)
    want = (
        layout.output.size,
        max(t.size for t in layout.taps) if shared_prefix else sum(t.columns for t in layout.taps),
    )
    if tuple(feedback.shape) != want:
        raise ValueError(f"feedback: the tap projection has shape {tuple(feedback.shape)}, expected {want}")
    return feedback


def project(
    source: jax.Array, feedback: Any, layout: TapLayout, init: Callable, *, shared_prefix: bool, taps: Sequence[Any]
) -> list[jax.Array]:
    """``δ_l = s B_l`` for every tap with **one** GEMM of ``s`` and ``[B_1 … B_L]``.

    Args:
      source: ``(*batch, *output)``: the error ``e`` (DFA) or the teaching signal (DRTP).
      taps: each tap's value ``(*stack, *batch, *features)``.

    Returns:
      One signal per tap with the tap's shape and dtype (Nøkland 2016, eq. 3).
    """
    batch = source.shape[: layout.batch_dims]
    flat = source.reshape(*batch, layout.output.size)  # only the output's feature axes merge
    projection = jax.lax.stop_gradient(matrix(feedback, layout, init, shared_prefix=shared_prefix, dtype=source.dtype))
    signal = flat @ projection.astype(source.dtype)  # (*batch, columns)
    signals, start = [], 0
    for spec, value in zip(layout.taps, taps, strict=True):
        if shared_prefix:
            block = jnp.tile(signal[..., : spec.size], (1,) * len(batch) + (spec.layers,))
        else:
            block, start = signal[..., start : start + spec.columns], start + spec.columns
        signals.append(to_tap(block, spec, value))
    return signals
