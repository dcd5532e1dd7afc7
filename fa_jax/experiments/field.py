"""Neural field: a Fourier-feature coordinate MLP regressing a scikit-image bundled image.

The cheap analogue of the NeRF MLP of Launay et al. (2020): input ``(x, y) ∈ [0, 1]²``,
features ``[sin 2πBv, cos 2πBv]`` with a fixed ``B ~ N(0, σ²)`` of shape ``(2, F)``
(Tancik et al. 2020), then a ReLU MLP to the grey level. Loss: MSE on a random
minibatch of pixels. Metric: PSNR (dB) of the whole image, ``-10 log10(MSE)``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fa_jax import apply
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import (
    Task, check_count, check_positive_float, check_runner_defaults, check_sizes, row_batches,
)
from fa_jax.models import init_mlp, mlp


def fourier_features(size: int, frequencies: int, sigma: float, seed: int = 0) -> np.ndarray:
    """``(size², 2·frequencies)`` features of the pixel grid; ``B`` drawn once with ``RandomState(seed)``."""
    grid = (np.arange(size) + 0.5) / size
    coords = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    projection = 2 * np.pi * coords @ np.random.RandomState(seed).normal(0.0, sigma, (2, frequencies))
    return np.concatenate([np.sin(projection), np.cos(projection)], -1).astype(np.float32)


def psnr(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB for values in ``[0, 1]``."""
    return -10.0 * jnp.log10(jnp.mean((prediction - target) ** 2))


def make_task(
    *, image: str = "camera", size: int = 64, frequencies: int = 64, sigma: float = 8.0, hidden: Sequence[int] = (128, 128),
    batch_size: int = 256, learning_rate: float = 1e-3, steps: int = 600, eval_every: int = 100, seeds: int = 4,
) -> Task:
    """The field task: ``camera`` at 64×64, 128 Fourier features, ReLU MLP 128-128-128-1, Adam 1e-3, 256 pixels a batch.

    Raises:
      TypeError, ValueError: a bad option, named.
    """
    if not isinstance(image, str):
        raise TypeError(f"image: expected the name of a scikit-image bundled image, given {image!r}")
    size, frequencies = check_count(size, "size"), check_count(frequencies, "frequencies")
    sigma = check_positive_float(sigma, "sigma")
    hidden = check_sizes(hidden, "hidden")
    batch_size = check_count(batch_size, "batch_size")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    pixels = datasets.load_image(image, size=size).reshape(-1, 1)
    arrays = {"x": jnp.asarray(fourier_features(size, frequencies, sigma)), "y": jnp.asarray(pixels)}
    sizes = (2 * frequencies, *hidden, 1)
    net = mlp("relu")
    n = pixels.shape[0]

    def evaluate(params, data):
        return psnr(apply(net, params, data["x"]), data["y"])

    return Task(
        name="field", metric="psnr_db", higher_is_better=True, data=arrays,
        init_params=lambda *, key: init_mlp(sizes, key=key), model=net,
        loss=lambda out, y: jnp.mean((out - y) ** 2), batch=row_batches("x", "y", n, batch_size), evaluate=evaluate,
        optimizer=optax.adam(learning_rate), steps=steps, eval_every=eval_every, seeds=seeds,
        baselines={"mean-grey": float(-10 * np.log10(pixels.var()))},
        description=f"scikit-image {image!r} {size}x{size}, Fourier features {2 * frequencies} (σ={sigma}), "
        f"ReLU MLP {'-'.join(map(str, sizes))}, Adam {learning_rate}, batch {batch_size} pixels",
        options={"image": image, "size": size, "frequencies": frequencies, "sigma": sigma, "hidden": list(hidden),
                 "batch_size": batch_size, "learning_rate": learning_rate},
    )
