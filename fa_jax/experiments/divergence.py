"""Diverged seeds: detect NaN/Inf inside the jitted loop, freeze that seed, report it apart.

A seed whose loss or gradients stop being finite at step ``t`` is marked with
``diverged_at = t`` and its state is frozen from then on (a ``where``-select of
the old state), so the NaN never reaches its params or optimizer state. Under
``vmap`` every seed carries its own flag: the other seeds train on unchanged.
Frozen seeds still run through the batched step (a ``vmap`` cannot skip one
lane); they just discard the result.

Summaries (:func:`summarize`) average only the seeds that did not diverge and
list the others with the step they diverged at.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: ``diverged_at`` of a seed that has not diverged.
NOT_DIVERGED = -1


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating leaf of ``tree`` is free of NaN and Inf."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def guard(old: Any, new: Any, *, finite: jax.Array, step: jax.Array, diverged_at: jax.Array) -> tuple[Any, jax.Array]:
    """Take ``new`` unless this seed has diverged; record the first non-finite step.

    Args:
      old: the state before the update (e.g. ``(params, opt_state)``).
      new: the state after it, same structure.
      finite: scalar bool, the step's loss and gradients were finite.
      step: scalar int, the step that produced ``new``.
      diverged_at: scalar int32, ``-1`` or the step the seed diverged at.

    Returns:
      ``(state, diverged_at)``: ``new`` while the seed is healthy, ``old`` from
      its first non-finite step on (so it stays frozen at the last finite state).
    """
    diverged_at = jnp.where((diverged_at < 0) & ~finite, jnp.asarray(step, diverged_at.dtype), diverged_at)
    frozen = diverged_at >= 0
    state = jax.tree_util.tree_map(lambda o, n: jnp.where(frozen, o, n), old, new)
    return state, diverged_at


class Summary(NamedTuple):
    """Mean and std over the seeds that did not diverge; the diverged ones listed apart.

    Attributes:
      mean, std: over healthy seeds (NaN when none is left).
      healthy: how many seeds entered the mean.
      diverged: ``{seed: step}`` of every seed that diverged.
    """

    mean: float
    std: float
    healthy: int
    diverged: dict[int, int]


def summarize(values: np.ndarray, diverged_at: np.ndarray, seeds: np.ndarray | None = None) -> Summary:
    """Summarize per-seed ``values`` ``(n_seeds,)`` without folding diverged seeds into the mean."""
    values, diverged_at = np.asarray(values, np.float64), np.asarray(diverged_at)
    if values.shape != diverged_at.shape:
        raise ValueError(f"diverged_at: expected shape {values.shape} like values, given {diverged_at.shape}")
    seeds = np.arange(len(values)) if seeds is None else np.asarray(seeds)
    healthy = diverged_at < 0
    kept = values[healthy]
    mean = float(np.mean(kept)) if kept.size else float("nan")
    std = float(np.std(kept)) if kept.size else float("nan")
    diverged = {int(s): int(t) for s, t in zip(seeds[~healthy], diverged_at[~healthy], strict=True)}
    return Summary(mean, std, int(healthy.sum()), diverged)


def describe(summary: Summary) -> str:
    """``"7 of 8 seeds; diverged: seed 3 at step 12"`` (for results tables)."""
    total = summary.healthy + len(summary.diverged)
    if not summary.diverged:
        return f"{total} seeds"
    listed = ", ".join(f"seed {s} at step {t}" for s, t in summary.diverged.items())
    return f"{summary.healthy} of {total} seeds; diverged: {listed}"
