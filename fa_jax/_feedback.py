"""Feedback state: random matrices kept outside ``params``.

* FA: :class:`FAFeedback`, a pytree shaped like ``params`` with B (or its key)
  at every kernel and ``None`` elsewhere.
* DFA: :class:`DFAFeedback`, one concatenated projection ``[B_1 … B_L]`` of
  shape ``(output_features, Σ tap_features)`` (or one key), plus static tap specs.

Per-layer keys are ``fold_in(key, crc32(layer path))``: stable across processes,
unlike Python's ``hash()``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import _checks, _rules
from fa_jax._ops import is_key

KERNEL_NAMES = ("kernel", "w", "weight")


def layer_id(path: str) -> np.uint32:
    """A stable 32-bit id of a layer path (CRC32)."""
    return np.uint32(zlib.crc32(path.encode("utf-8")))


def layer_key(key: jax.Array, path: str) -> jax.Array:
    """The key of one layer: ``fold_in(key, crc32(path))``."""
    return jax.random.fold_in(key, layer_id(path))


path_str = _checks.path_str


def is_kernel(path: tuple, leaf: Any) -> bool:
    """Default selection of the leaves that get FA feedback: floating ≥2-d ``kernel``/``w``/``weight``."""
    name = path_str(path[-1:]) if path else ""
    return (
        name in KERNEL_NAMES
        and hasattr(leaf, "ndim")
        and leaf.ndim >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


class FAFeedback(NamedTuple):
    """FA feedback: ``kernels`` mirrors ``params``; B (or a key) at kernels, ``None`` elsewhere."""

    kernels: Any


class TapSpec(NamedTuple):
    """A DFA tap: its name (path) and its feature shape (without batch dims)."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DFAFeedback:
    """DFA feedback: the concatenated projection and the taps it serves.

    Attributes:
      projection: ``(output_features, Σ_l tap_features_l)``, or a typed key when
        the rule regenerates it.
      taps: static tap specs, in call order.
      output_shape: static feature shape of the model output (without batch dims).
    """

    projection: jax.Array
    taps: tuple[TapSpec, ...] = dataclasses.field(metadata=dict(static=True))
    output_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    # TinyDFA layout: projection is (output_features, widest tap); tap l reads columns [:d_l].
    shared_prefix: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def output_size(self) -> int:
        return math.prod(self.output_shape)


def fa_feedback(
    params: Any,
    *,
    key: jax.Array,
    init: Callable = _rules.FA_DEFAULT_INIT,
    regenerate: bool = False,
    select: Callable[[tuple, Any], bool] = is_kernel,
    dtype: Any = None,
) -> FAFeedback:
    """Draw one B per selected kernel of ``params``; ``None`` for every other leaf.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      key: the feedback key; layer ``path`` uses ``fold_in(key, crc32(path))``.
      init: ``init(key, shape, dtype)``.
      regenerate: store the per-layer key instead of B.
      select: ``select(path, leaf)`` picks the kernels.
      dtype: storage dtype of B (default: the kernel's dtype).
    """

    def draw(path, leaf):
        if not select(path, leaf):
            return None
        layer = layer_key(key, path_str(path))
        return layer if regenerate else init(layer, leaf.shape, dtype or leaf.dtype)

    kernels = jax.tree_util.tree_map_with_path(draw, params)
    if not any(leaf is not None for leaf in jax.tree_util.tree_leaves(kernels)):
        raise ValueError(
            "FA found no kernel in params: no floating leaf with ndim >= 2 named "
            f"{KERNEL_NAMES}; pass `select=` to choose the layers"
        )
    return FAFeedback(kernels)


def dfa_projection(
    key: jax.Array, taps: tuple[TapSpec, ...], output_size: int, init: Callable, dtype: Any = jnp.float32
) -> jax.Array:
    """``[B_1 … B_L]``, each ``B_l`` of shape ``(output_size, tap_size_l)`` drawn from its tap's key."""
    blocks = [init(layer_key(key, tap.name), (output_size, tap.size), dtype) for tap in taps]
    return jnp.concatenate(blocks, axis=1)


SHARED_PREFIX_PATH = "shared_prefix"  # the layer path whose key draws the one shared matrix


def shared_projection(key: jax.Array, taps: tuple[TapSpec, ...], output_size: int, init: Callable, dtype: Any = jnp.float32) -> jax.Array:
    """TinyDFA's single ``(output_size, max_l tap_size_l)`` matrix; tap ``l`` uses its first ``d_l`` columns."""
    widest = max(tap.size for tap in taps)
    return init(layer_key(key, SHARED_PREFIX_PATH), (output_size, widest), dtype)


def projection_matrix(feedback: DFAFeedback, init: Callable, dtype: Any = jnp.float32) -> jax.Array:
    """The stored projection, or the one regenerated from its key (per-tap blocks or shared prefix)."""
    projection = feedback.projection
    if not is_key(projection):
        return projection
    draw = shared_projection if feedback.shared_prefix else dfa_projection
    return draw(projection, feedback.taps, feedback.output_size, init, dtype)


def split_taps(signal: jax.Array, feedback: DFAFeedback) -> list[jax.Array]:
    """Split ``(..., columns)`` into one block per tap: consecutive blocks, or prefixes when shared."""
    sizes = [tap.size for tap in feedback.taps]
    if feedback.shared_prefix:
        return [signal[..., :size] for size in sizes]
    return jnp.split(signal, np.cumsum(sizes)[:-1], axis=-1)


def dfa_matrices(feedback: DFAFeedback, rule: _rules.DFA | None = None) -> list[jax.Array]:
    """The per-tap ``B_l``, each ``(output_features, tap_features)``, materialized from a key if needed."""
    projection = projection_matrix(feedback, (rule or _rules.DFA()).init)
    return split_taps(projection, feedback)


def materialize_fa(feedback: FAFeedback, params: Any, rule: _rules.FA | None = None) -> Any:
    """FA feedback with every key replaced by its B (for analysis; shaped like the kernels)."""
    init = (rule or _rules.FA()).init

    def draw(matrix, weight):
        if matrix is None or not is_key(matrix):
            return matrix
        return init(matrix, weight.shape, weight.dtype)

    return jax.tree.map(draw, feedback.kernels, params, is_leaf=lambda x: x is None)


def trace_taps(model: Callable, params: Any, inputs: Any, batch_dims: int) -> tuple[tuple[TapSpec, ...], tuple[int, ...]]:
    """Tap specs and output feature shape of ``model``, found by abstract evaluation (no FLOPs)."""
    from fa_jax._model import TapOps  # local: _model is the model-facing layer above this one

    found: dict[str, Any] = {}

    def run(p, x):
        ops = TapOps()
        out = model(p, x, ops)
        found["names"] = tuple(ops.names)
        return out, tuple(ops.values)

    out, values = jax.eval_shape(run, params, inputs)
    if not values:
        raise ValueError("the model calls ops.tap nowhere; DFA needs at least one tap to reach hidden layers")
    taps = tuple(TapSpec(name, tuple(v.shape[batch_dims:])) for name, v in zip(found["names"], values))
    return taps, tuple(out.shape[batch_dims:])


def init_feedback(
    rule: Any,
    params: Any,
    *,
    key: jax.Array,
    model: Callable | None = None,
    inputs: Any = None,
    dtype: Any = None,
    select: Callable[[tuple, Any], bool] = is_kernel,
) -> Any:
    """Feedback state for ``rule``, kept outside ``params``.

    Args:
      rule: a rule or its name.
      params: the model's params (arrays or ``ShapeDtypeStruct``).
      key: typed PRNG key (``jax.random.key(seed)``); keyword-only.
      model, inputs: for DFA, the model and an example batch, traced abstractly
        to find the taps ``(batch, *tap_shape)`` and the output.
      dtype: storage dtype of B (default: kernel dtype for FA, float32 for DFA).
      select: FA only, ``select(path, leaf)`` picks the kernels.

    Returns:
      ``None`` for BP and shallow, :class:`FAFeedback` for FA, :class:`DFAFeedback` for DFA.
    """
    rule = _rules.get_rule(rule)
    if isinstance(rule, (_rules.BP, _rules.Shallow)):
        return None
    _checks.check_key(key, "key")
    _checks.check_array_tree(params, "params")
    if dtype is not None:
        _checks.check_dtype(dtype, "dtype")
    _checks.check_callable(select, "select")
    if isinstance(rule, _rules.FA):
        return fa_feedback(params, key=key, init=rule.init, regenerate=rule.regenerate, select=select, dtype=dtype)
    if isinstance(rule, _rules.DFA):
        if model is None or inputs is None:
            raise ValueError("model, inputs: init_feedback('dfa', ...) needs model= and inputs= to find the taps")
        _checks.check_callable(model, "model")
        _checks.check_array_tree(inputs, "inputs")
        taps, output_shape = trace_taps(model, params, inputs, rule.batch_dims)
        output_size = math.prod(output_shape)
        shared = getattr(rule, "shared_prefix", False)
        draw = shared_projection if shared else dfa_projection
        projection = key if rule.regenerate else draw(key, taps, output_size, rule.init, dtype or jnp.float32)
        return DFAFeedback(projection, taps, output_shape, shared)
    if hasattr(rule, "init_feedback"):  # the rule family: sign symmetry, Kolen–Pollack, DRTP
        return rule.init_feedback(params, key=key, model=model, inputs=inputs, dtype=dtype, select=select)
    raise TypeError(f"init_feedback does not know rule {rule!r}")
