"""Neural field: a Fourier-feature coordinate MLP regressing a scikit-image bundled image.

The cheap analogue of the NeRF MLP of Launay et al. (2020): input ``(x, y) ∈ [0, 1]²``,
features ``[sin 2πBv, cos 2πBv]`` with a fixed ``B ~ N(0, σ²)`` of shape ``(2, F)``
(Tancik et al. 2020), then a ReLU MLP to the grey level. Loss: MSE on a random
minibatch of pixels. Metric: PSNR (dB) of the whole image, ``-10 log10(MSE)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import apply
from fa_jax.experiments import data as datasets
from fa_jax.experiments._task import (
    Task,
    check_count,
    check_positive_float,
    check_runner_defaults,
    check_sizes,
    check_split,
    describe_optimizer,
    holdout,
    make_optimizer,
    protocol_options,
    row_batches,
)
from fa_jax.models import init_mlp, mlp

#: The default recipe (Adam 1e-3 for every rule).
DEFAULTS = {"learning_rate": 1e-3, "b2": 0.999, "weight_decay": 0.0, "plateau": 1.0}


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
    *,
    image: str = "camera",
    size: int = 64,
    frequencies: int = 64,
    sigma: float = 8.0,
    hidden: Sequence[int] = (128, 128),
    batch_size: int = 256,
    learning_rate: float | None = None,
    b2: float | None = None,
    weight_decay: float | None = None,
    plateau: float | None = None,
    recipe: str = "default",
    rule=None,
    split: str = "test",
    steps: int = 600,
    eval_every: int = 100,
    seeds: int = 4,
) -> Task:
    """The field task: ``camera`` at 64×64, 128 Fourier features, ReLU MLP 128-128-128-1, Adam 1e-3, 256 pixels a batch.

    ``split="test"`` fits every pixel and scores the whole image (a fitting metric: the
    scored pixels are the trained ones). ``split="validation"`` holds out a fixed random
    10% of the pixels (``RandomState(0)``), fits the rest and scores the held-out ones
    (interpolation), the split a learning rate is chosen on. Optimizer options: see
    :func:`fa_jax.experiments._task.protocol_options` (default recipe only).

    Raises:
      TypeError, ValueError: a bad option, named.
    """
    if not isinstance(image, str):
        raise TypeError(f"image: expected the name of a scikit-image bundled image, given {image!r}")
    size, frequencies = check_count(size, "size"), check_count(frequencies, "frequencies")
    sigma = check_positive_float(sigma, "sigma")
    hidden = check_sizes(hidden, "hidden")
    batch_size = check_count(batch_size, "batch_size")
    steps, eval_every, seeds = check_runner_defaults(steps=steps, eval_every=eval_every, seeds=seeds)
    split = check_split(split)
    optimizer = protocol_options(
        "field",
        recipe=recipe,
        rule=rule,
        learning_rate=learning_rate,
        b2=b2,
        weight_decay=weight_decay,
        plateau=plateau,
        eval_every=eval_every,
        default=DEFAULTS,
    )
    pixels = datasets.load_image(image, size=size).reshape(-1, 1)
    features = fourier_features(size, frequencies, sigma)
    if split == "test":
        arrays = {"x": jnp.asarray(features), "y": jnp.asarray(pixels)}
        eval_keys, scored = ("x", "y"), "PSNR of the whole image"
    else:
        order = np.random.RandomState(0).permutation(len(pixels))
        held = holdout(len(pixels), "split='validation'")
        fit, valid = order[:-held], order[-held:]
        arrays = {
            "x": jnp.asarray(features[fit]),
            "y": jnp.asarray(pixels[fit]),
            "x_valid": jnp.asarray(features[valid]),
            "y_valid": jnp.asarray(pixels[valid]),
        }
        eval_keys, scored = ("x_valid", "y_valid"), f"PSNR of {held} held-out pixels"
    sizes = (2 * frequencies, *hidden, 1)
    net = mlp("relu")
    n = arrays["y"].shape[0]

    def evaluate(params, data):
        return psnr(apply(net, params, data[eval_keys[0]]), data[eval_keys[1]])

    return Task(
        name="field",
        metric="psnr_db" if split == "test" else "validation_psnr_db",
        higher_is_better=True,
        data=arrays,
        init_params=lambda *, key: init_mlp(sizes, key=key),
        model=net,
        loss=lambda out, y: jnp.mean((out - y) ** 2),
        batch=row_batches("x", "y", n, batch_size),
        evaluate=evaluate,
        optimizer=make_optimizer(optimizer),
        steps=steps,
        eval_every=eval_every,
        seeds=seeds,
        baselines={"mean-grey": float(-10 * np.log10(pixels.var()))},
        description=f"scikit-image {image!r} {size}x{size} ({n} pixels fitted, {scored}), Fourier features "
        f"{2 * frequencies} (σ={sigma}), ReLU MLP {'-'.join(map(str, sizes))}, {describe_optimizer(optimizer)}, "
        f"batch {batch_size} pixels",
        options={
            "image": image,
            "size": size,
            "frequencies": frequencies,
            "sigma": sigma,
            "hidden": list(hidden),
            "batch_size": batch_size,
            "split": split,
            **optimizer,
        },
    )
