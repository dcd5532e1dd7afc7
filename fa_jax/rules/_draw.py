"""Helpers the rules share to draw, keep and rebuild their feedback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fa_jax import _checks
from fa_jax._specs import WeightSpec, stack_keys


def require_key(rule: Any, key: Any) -> None:
    """A rule that draws feedback needs one typed key; a missing or raw one would draw nothing reproducible."""
    if key is None:
        raise TypeError(
            f"key: rule {rule.name!r} draws feedback; expected a typed PRNG key, jax.random.key(seed), given None"
        )
    _checks.check_key(key, "key")


def draw_or_key(rule: Any, spec: WeightSpec, key: Any, init: Callable, regenerate: bool) -> jax.Array:
    """B drawn like the weight (one per scanned layer), or only its keys when the rule regenerates it."""
    require_key(rule, key)
    keys = stack_keys(key, spec.stack)
    return keys if regenerate else spec.draw(init, keys)


def materialize(leaf: Any, spec: WeightSpec, init: Callable, dtype: Any = None) -> jax.Array:
    """The stored matrix, or the one regenerated from its keys (same numbers as storing it)."""
    if _checks.is_key(leaf):
        return spec.draw(init, leaf, dtype)
    return leaf
