"""The one projection the direct rules (DFA, DRTP) share: ``s [B_1 … B_L]`` in a single GEMM.

The feedback is one matrix of shape ``(output_features, Σ_l layers_l · d_l)``:
tap ``l`` (each layer of a scanned tap) owns a block of columns drawn from
``layer_key(key, tap name)`` (``fold_in`` by layer), or, in TinyDFA's shared
layout, the first ``d_l`` columns of one ``(output_features, widest tap)`` matrix.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from fa_jax import _checks
from fa_jax._engine._taps import TapLayout, to_tap
from fa_jax._specs import layer_key, map_stack, stack_keys

SHARED_PREFIX_PATH = "shared_prefix"  # the name whose key draws TinyDFA's one shared matrix


def draw(layout: TapLayout, key: jax.Array, init: Callable, *, shared_prefix: bool, dtype: Any = jnp.float32) -> jax.Array:
    """``[B_1 … B_L]`` of shape ``(output_features, columns)``; ``B_l`` of tap ``l`` is ``(output_features, d_l)`` per layer."""
    out = layout.output.size
    if shared_prefix:
        widest = max(tap.size for tap in layout.taps)
        return init(layer_key(key, SHARED_PREFIX_PATH), (out, widest), dtype)
    blocks = []
    for tap in layout.taps:
        keys = stack_keys(layer_key(key, tap.name), tap.stack)
        block = map_stack(lambda k, size=tap.size: init(k, (out, size), dtype), keys)  # (*stack, out, d)
        if tap.stack:
            block = jnp.moveaxis(block.reshape(tap.layers, out, tap.size), 0, 1).reshape(out, tap.columns)
        blocks.append(block)
    return jnp.concatenate(blocks, axis=1)


def matrix(feedback: Any, layout: TapLayout, init: Callable, *, shared_prefix: bool, dtype: Any) -> jax.Array:
    """The stored projection, or the one regenerated from its key."""
    if _checks.is_key(feedback):
        return draw(layout, feedback, init, shared_prefix=shared_prefix, dtype=dtype)
    want = (layout.output.size, max(t.size for t in layout.taps) if shared_prefix else sum(t.columns for t in layout.taps))
    if tuple(feedback.shape) != want:
        raise ValueError(f"feedback: the tap projection has shape {tuple(feedback.shape)}, expected {want}")
    return feedback


def project(source: jax.Array, feedback: Any, layout: TapLayout, init: Callable, *, shared_prefix: bool,
            taps: Sequence[Any]) -> list[jax.Array]:
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
    for spec, value in zip(layout.taps, taps):
        if shared_prefix:
            block = jnp.tile(signal[..., : spec.size], (1,) * len(batch) + (spec.layers,))
        else:
            block, start = signal[..., start : start + spec.columns], start + spec.columns
        signals.append(to_tap(block, spec, value))
    return signals
