"""What the engine finds in a model's program, as static descriptions a rule draws feedback for.

* :class:`WeightSpec`: one parameter leaf that enters a weight product
  (``dot_general`` or ``conv_general_dilated`` against an activation), with the
  role of each of its axes in that product: ``"in"`` (contracted with the
  activation), ``"out"``, ``"window"`` (a convolution's spatial axes) or
  ``"stack"`` (one layer per index: a ``lax.scan`` over stacked layers, a batch
  dimension of the product, an axis indexed away before the product).
* :class:`TapSpec`: one activation that a tap rule (DFA, DRTP, shallow) cuts
  and feeds: its name, its feature shape and the stack of layers it repeats over.

Feedback is keyed by the parameter path (or the tap name) through
``layer_key(key, path) = fold_in(key, crc32(path))``: stable across processes
and across programs, unlike Python's ``hash()``; layer ``i`` of a stack uses
``fold_in(layer_key, i)``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Init = Callable[..., jax.Array]


def layer_id(path: str) -> np.uint32:
    """A stable 32-bit id of a parameter path or tap name (CRC32)."""
    return np.uint32(zlib.crc32(path.encode("utf-8")))


def layer_key(key: jax.Array, path: str) -> jax.Array:
    """The key of one parameter or tap: ``fold_in(key, crc32(path))``."""
    return jax.random.fold_in(key, layer_id(path))


def stack_keys(key: jax.Array, stack: tuple[int, ...]) -> jax.Array:
    """Keys of shape ``stack``: index ``(i, j, …)`` holds ``fold_in(fold_in(key, i), j)…``; ``key`` for ``()``."""
    if not stack:
        return key
    inner = jax.vmap(lambda i: stack_keys(jax.random.fold_in(key, i), stack[1:]))
    return inner(jnp.arange(stack[0], dtype=jnp.uint32))


def map_stack(fn: Callable[[jax.Array], jax.Array], keys: jax.Array) -> jax.Array:
    """``fn`` over every key of a key array (``vmap`` per axis); ``fn(keys)`` for one key."""
    if keys.ndim == 0:
        return fn(keys)
    return jax.vmap(lambda k: map_stack(fn, k))(keys)


ROLES = ("in", "out", "window", "stack")


class WeightSpec(NamedTuple):
    """A parameter leaf used as the weight of a product.

    Attributes:
      path: the parameter path, ``"layers/0/kernel"`` (what its key is folded from).
      shape, dtype: the leaf's.
      roles: one of :data:`ROLES` per axis, or ``None`` where the engine could not
        map the product's axes back to the leaf (B is then drawn at the leaf's shape).
      depth: leading axes sliced off by ``lax.scan`` (one layer per index); a
        regenerated feedback leaf holds one key per layer of these axes.
      kind: how the product reads it, for :func:`fa_jax.plan` (``"dense"``, ``"conv"``, …).
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    roles: tuple[str, ...] | None
    depth: int = 0
    kind: str = "dense"

    @property
    def stack(self) -> tuple[int, ...]:
        """The scanned leading axes, one layer per index."""
        return self.shape[: self.depth]

    def layer(self, depth: int | None = None) -> WeightSpec:
        """The spec of one layer: the first ``depth`` (default all scanned) axes sliced off."""
        depth = self.depth if depth is None else depth
        roles = None if self.roles is None else self.roles[depth:]
        return self._replace(shape=self.shape[depth:], roles=roles, depth=self.depth - depth)

    def fans(self) -> tuple[int, int]:
        """``(fan_in, fan_out)`` of one layer: the window multiplies both, like Flax and PyTorch."""
        layer = self.layer()
        if layer.roles is None:
            receptive = math.prod(layer.shape[:-2])
            return layer.shape[-2] * receptive if len(layer.shape) > 1 else 1, layer.shape[-1] * receptive
        size = dict.fromkeys(ROLES, 1)
        for n, role in zip(layer.shape, layer.roles, strict=True):
            size[role] *= n
        return size["in"] * size["window"], size["out"] * size["window"]

    def draw(self, init: Init, keys: jax.Array, dtype: Any = None) -> jax.Array:
        """B with this leaf's shape from ``keys`` (shape :attr:`stack`, one per scanned layer).

        Each layer is drawn by ``init(key, (*window, fan_in, fan_out), dtype)``, the
        layout every JAX initializer reads its fans from, then laid out like the
        leaf; axes with role ``"stack"`` inside a layer get ``fold_in(key, index)``.
        For a plain ``(in, out)`` kernel that is ``init(key, kernel.shape)``.
        """
        dtype = self.dtype if dtype is None else dtype
        layer = self.layer()
        return map_stack(lambda key: _draw_layer(init, key, layer.shape, layer.roles, dtype), keys)


def _draw_layer(
    init: Init, key: jax.Array, shape: tuple[int, ...], roles: tuple[str, ...] | None, dtype: Any
) -> jax.Array:
    if roles is None or all(r == "stack" for r in roles):
        return init(key, shape, dtype)
    order = [[i for i, r in enumerate(roles) if r == role] for role in ("stack", "window", "in", "out")]
    stacked, window, inputs, outputs = order
    canonical = (
        *[shape[i] for i in window],
        math.prod(shape[i] for i in inputs),
        math.prod(shape[i] for i in outputs),
    )

    def one(k):
        return init(k, canonical, dtype)

    drawn = map_stack(one, stack_keys(key, tuple(shape[i] for i in stacked)))
    full = drawn.reshape(*[shape[i] for i in stacked + window + inputs + outputs])
    permutation = stacked + window + inputs + outputs
    return jnp.transpose(full, tuple(int(i) for i in np.argsort(permutation)))


class TapSpec(NamedTuple):
    """One tap: its name, its feature shape (after the batch dims) and its stack of layers.

    A tap inside a ``lax.scan`` body repeats once per iteration: ``stack`` holds
    those leading axes, and each layer gets its own block of the projection.
    """

    name: str
    shape: tuple[int, ...]
    stack: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Features of one layer."""
        return math.prod(self.shape)

    @property
    def layers(self) -> int:
        return math.prod(self.stack)

    @property
    def columns(self) -> int:
        """Columns this tap takes in a concatenated projection."""
        return self.layers * self.size


class OutputSpec(NamedTuple):
    """The model output a tap rule projects from: its feature shape after the batch dims."""

    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)
