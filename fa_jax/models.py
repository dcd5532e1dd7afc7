"""Small plain-JAX models used in the examples, the runner and the tests.

They are ordinary functions ``model(params, inputs)``: nothing in them is specific
to fa_jax except :func:`fa_jax.tap`, which names the hidden activations (the
identity under every rule that does not cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fa_jax import _checks
from fa_jax._engine._taps import tap

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "linear": lambda x: x,
}


def init_mlp(sizes: Sequence[int], *, key: jax.Array, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """LeCun-normal kernels ``(sizes[i], sizes[i+1])`` and zero biases, one dict per layer."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2:
        raise ValueError(f"sizes: expected a sequence of at least 2 layer widths, given {sizes!r}")
    for index, size in enumerate(sizes):
        _checks.check_int(size, f"sizes[{index}]", minimum=1)
    _checks.check_key(key, "key")
    _checks.check_dtype(dtype, "dtype")
    keys = jax.random.split(key, len(sizes) - 1)
    init = jax.nn.initializers.lecun_normal()
    return [
        {"kernel": init(k, (fan_in, fan_out), dtype), "bias": jnp.zeros((fan_out,), dtype)}
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(activation: str = "tanh") -> Callable:
    """``model(params, x)`` for an MLP: ``h_l = tap(f(h_{l-1} W_l + b_l), "layer_<l>")``, linear output.

    Shapes: ``x (*batch, sizes[0]) -> (*batch, sizes[-1])``.
    """
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]

    def model(params, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch d_out"]:
        _check_mlp(params, x)
        *hidden, last = params
        for index, layer in enumerate(hidden):
            x = tap(act(x @ layer["kernel"] + layer["bias"]), name=f"layer_{index}")
        return x @ last["kernel"] + last["bias"]

    return model


def _check_mlp(params, x) -> None:
    """``params`` is a list of ``{"kernel", "bias"}`` layers chained in width, fed by ``x (*batch, d_in)``."""
    if not isinstance(params, (list, tuple)) or not params:
        raise TypeError(f"params: expected a non-empty list of layers from init_mlp, given {_checks.describe(params)}")
    for index, layer in enumerate(params):
        if not isinstance(layer, dict) or set(layer) != {"kernel", "bias"}:
            raise ValueError(
                f"params[{index}]: expected a dict with 'kernel' and 'bias', given {_checks.describe(layer)}"
            )
        if getattr(layer["kernel"], "ndim", None) != 2:
            raise ValueError(
                f"params[{index}]['kernel']: expected shape (fan_in, fan_out), "
                f"given {_checks.describe(layer['kernel'])}"
            )
    if not _checks.is_array(x):
        raise TypeError(f"inputs: expected an array (*batch, d_in), given {_checks.describe(x)}")
    width = params[0]["kernel"].shape[0]
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(
            f"inputs: expected shape (*batch, {width}) for params[0]['kernel'], given {_checks.describe(x)}"
        )
    for index in range(1, len(params)):
        want, got = params[index - 1]["kernel"].shape[1], params[index]["kernel"].shape[0]
        if want != got:
            raise ValueError(
                f"params[{index}]['kernel']: expected fan_in {want} (params[{index - 1}]'s fan_out), given "
                f"{_checks.describe(params[index]['kernel'])}"
            )
