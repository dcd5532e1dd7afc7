"""The feedback-matrix conventions in use, as ``init(key, shape, dtype)`` initializers.

Pass one as ``init=`` of a rule (``FA``, ``DFA``, ``DRTP``, ``FRSF``, ``KolenPollack``).
For DFA-style rules the shape is ``(output_features, tap_features)`` = ``(c, d)``; for
FA-style rules it is ``(*window, fan_in, fan_out)``, whatever the weight's own layout.

* :func:`tinydfa_uniform`: ``U[−1, 1) / √d_max`` (TinyDFA, Launay et al. 2020).
* :func:`launay2019`: ``N(0, 1) / √(d c) · √(d_max / d)`` (Launay et al. 2019).
* :func:`xavier`, :func:`kaiming`: like a forward kernel (biotorch's ``init`` option).
* :func:`nokland_zero_hidden`: not a B but the forward init DFA allows, hidden W = 0 (Nøkland 2016).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fa_jax._engine import _program

Init = Callable[[jax.Array, tuple, Any], jax.Array]


def _check_width(widest: Any, name: str) -> None:
    if widest is not None and (not isinstance(widest, int) or isinstance(widest, bool) or widest < 1):
        raise ValueError(f"{name}: expected a positive int (the widest tap's features), given {widest!r}")


def tinydfa_uniform(widest: int | None = None) -> Init:
    """TinyDFA's B: ``U[−1, 1)``, the projection divided by ``√(widest tap)``.

    TinyDFA (Launay et al. 2020) draws one uniform matrix and divides the projected
    error by ``√d_max``; by linearity that is ``B = U[−1, 1) / √d_max``.

    Args:
      widest: ``d_max``. ``None`` divides by the matrix's own width, which *is*
        ``d_max`` in the shared-prefix layout (``DFA(shared_prefix=True)``).
    """
    _check_width(widest, "widest")

    def init(key, shape, dtype=jnp.float32):
        width = widest if widest is not None else shape[-1]
        return (jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) / math.sqrt(width)).astype(dtype)

    return init


def launay2019(widest: int) -> Init:
    """Launay et al. 2019 ("Principled training of NNs with DFA"): ``B_l = N(0,1)/√(d c) · √(d_max/d)``.

    For a tap of ``d`` features and ``c`` outputs the entries have std ``1/√(d c)``,
    rescaled per layer by ``√(d_max / d)`` so narrow layers are not under-driven.

    Args:
      widest: ``d_max``, the widest tap (see :func:`widest_tap`).
    """
    _check_width(widest, "widest")

    def init(key, shape, dtype=jnp.float32):
        c, d = shape[0], math.prod(shape[1:])
        std = math.sqrt(widest / d) / math.sqrt(d * c)
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def xavier() -> Init:
    """Xavier/Glorot uniform, ``U[±√(6/(fan_in + fan_out))]`` (biotorch ``init="xavier"``).

    Fans follow JAX's kernel layout: ``fan_in = shape[-2]·window``, ``fan_out = shape[-1]·window``;
    for a DFA matrix ``(c, d)`` that is ``fan_in = c``, ``fan_out = d``.
    """
    return jax.nn.initializers.glorot_uniform()


def kaiming() -> Init:
    """Kaiming/He uniform, ``U[±√(6/fan_in)]`` (biotorch ``init="kaiming"``, torch's ReLU gain)."""
    return jax.nn.initializers.he_uniform()


def widest_tap(model: Callable, params: Any, inputs: Any, *, taps: str = "auto") -> int:
    """``d_max``: the largest tap's feature count (one layer), found from the program (no FLOPs).

    Args:
      taps: the placement, as a cutting rule's ``taps`` option.
    """
    program = _program.analyse(model, params, inputs)
    rule_taps = program.taps(taps)
    if not rule_taps:
        raise ValueError(f"model: no tap for placement {taps!r}")
    batch_dims = _program.find_batch_dims(model, params, inputs, program, taps, exact=(), asked=None, mix=False)
    return max(t.size for t in _program.tap_layout(program, taps, batch_dims).taps)


def nokland_zero_hidden(params: Any, *, model: Callable, inputs: Any) -> Any:
    """Zero every weight but the output layer's (Nøkland 2016: DFA trains from zero hidden weights).

    With BP or FA a zero W blocks the backward signal; DFA's ``δ_l = e B_l`` does not
    pass through W, so hidden layers can start at 0. The weights are those of the
    model's weight products, the output layer's being the last product in the program.
    Biases and other parameters are left as they are.
    """
    program = _program.analyse(model, params, inputs)
    weights = list(program.specs)
    if len(weights) < 2:
        raise ValueError(
            f"params: nokland_zero_hidden needs at least two weights (hidden + output), found {len(weights)}"
        )
    hidden = {program.paths[i] for i in weights[:-1]}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _program.param_path(p) in hidden else x, params
    )


@dataclasses.dataclass(frozen=True)
class Tiled:
    """A dense B drawn in row tiles, so a regenerated B is drawn and used one tile at a time.

    ``B[i·r : (i+1)·r] = std(shape) · unit(fold_in(key, i), (r, fan_out))``, with
    ``std = √(scale / fan)`` for the *whole* kernel (LeCun normal by default, FA's
    default distribution). Stored (``init(key, shape)``) and regenerated B are equal.
    Regenerating through the core's dense op (FA, and frSF/brSF for their M) then
    computes ``dx = g Bᵀ`` tile by tile in a ``lax.scan``: only one ``(rows, fan_out)``
    tile and its random bits are ever live, instead of a full B (see ``benchmarks/memory.py``).

    Attributes:
      rows: rows of B per tile.
      distribution: unit-variance draws, ``"truncated_normal"`` (±2σ), ``"normal"`` or ``"uniform"``.
      mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``, as in variance scaling.
      scale: variance scale (1 = LeCun, 2 = He).
    """

    rows: int = 256
    distribution: str = "truncated_normal"
    mode: str = "fan_in"
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"Tiled.rows: expected a positive int, given {self.rows!r}")
        if self.distribution not in ("truncated_normal", "normal", "uniform"):
            raise ValueError(
                f"Tiled.distribution: expected 'truncated_normal', 'normal' or 'uniform', given {self.distribution!r}"
            )
        if self.mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"Tiled.mode: expected 'fan_in', 'fan_out' or 'fan_avg', given {self.mode!r}")

    def std(self, shape: tuple[int, ...]) -> float:
        fan_in, fan_out = shape[-2], shape[-1]
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        return math.sqrt(self.scale / fan)

    def tile(self, key: jax.Array, index: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """Rows ``[index·rows, (index+1)·rows)`` of B (past the last row: unused padding)."""
        tile_key, tile_shape = jax.random.fold_in(key, index), (self.rows, shape[-1])
        if self.distribution == "truncated_normal":
            unit = jax.random.truncated_normal(tile_key, -2.0, 2.0, tile_shape, jnp.float32) / _TRUNCATED_STD
        elif self.distribution == "normal":
            unit = jax.random.normal(tile_key, tile_shape, jnp.float32)
        else:
            unit = jax.random.uniform(tile_key, tile_shape, jnp.float32, -math.sqrt(3.0), math.sqrt(3.0))
        return (unit * self.std(shape)).astype(dtype)

    def tiles(self, shape: tuple[int, ...]) -> int:
        return -(-shape[-2] // self.rows)

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        if len(shape) != 2:
            raise ValueError(f"Tiled init draws dense kernels (fan_in, fan_out); given shape {shape}")
        blocks = jax.lax.map(lambda i: self.tile(key, i, shape, dtype), jnp.arange(self.tiles(shape)))
        return blocks.reshape(-1, shape[-1])[: shape[-2]]

    def dense_input_gradient(
        self, key: jax.Array, g: jax.Array, shape: tuple[int, ...], transform: Callable | None = None
    ) -> jax.Array:
        """``dx = g Bᵀ`` with B regenerated tile by tile: ``(*batch, fan_out) -> (*batch, fan_in)``.

        Each tile's ``g B_iᵀ`` is written in place into the ``dx`` carried by the loop,
        so besides ``dx`` only one tile and its random bits are ever live.
        ``transform(tile, first_row)`` maps a drawn tile to the rows of B it stands for
        (the sign rules' ``|M| ⊙ sign(W)``); rows past ``fan_in`` are padding, cut off.
        """
        fan_in, tiles, axis = shape[-2], self.tiles(shape), g.ndim - 1
        # A partial last tile needs padding: dynamic_update_slice clamps, it does not clip.
        padded = tiles * self.rows

        def product(index):
            block = self.tile(key, index, shape, g.dtype)
            block = jax.lax.stop_gradient(block if transform is None else transform(block, index * self.rows))
            return jax.lax.dot_general(g, block, (((axis,), (1,)), ((), ())))  # (*batch, rows)

        def one_tile(dx, index):
            return jax.lax.dynamic_update_slice_in_dim(dx, product(index), index * self.rows, axis=axis), None

        # dx starts from the first tile's product, not from a zeros constant: XLA would
        # share one zeros buffer between layers and copy it into every loop.
        first = product(jnp.int32(0))
        dx = jax.lax.pad(first, jnp.zeros((), g.dtype), [(0, 0, 0)] * axis + [(0, padded - self.rows, 0)])
        dx, _ = jax.lax.scan(one_tile, dx, jnp.arange(1, tiles))
        return dx if padded == fan_in else dx[..., :fan_in]


# Standard deviation of a standard normal truncated to ±2 (what jax's variance scaling divides by).
_TRUNCATED_STD = 0.87962566103423978
