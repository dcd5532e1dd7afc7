"""Small functional models written against ``ops`` (usable with every rule)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "linear": lambda x: x,
}


def init_mlp(sizes: Sequence[int], *, key: jax.Array, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """LeCun-normal kernels ``(sizes[i], sizes[i+1])`` and zero biases, one dict per layer."""
    keys = jax.random.split(key, len(sizes) - 1)
    init = jax.nn.initializers.lecun_normal()
    return [
        {"kernel": init(k, (fan_in, fan_out), dtype), "bias": jnp.zeros((fan_out,), dtype)}
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(activation: str = "tanh") -> Callable:
    """``model(params, x, ops)`` for an MLP: ``h_{l} = ops.tap(f(h_{l-1} W_l + b_l))``, linear output.

    Shapes: ``x (*batch, sizes[0]) -> (*batch, sizes[-1])``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]

    def model(params, x: Float[Array, "*batch d_in"], ops) -> Float[Array, "*batch d_out"]:
        *hidden, last = params
        for index, layer in enumerate(hidden):
            x = ops.tap(act(ops.dense(x, layer["kernel"], layer["bias"])), name=f"layer_{index}")
        return ops.dense(x, last["kernel"], last["bias"])

    return model
