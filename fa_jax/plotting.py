"""Matplotlib helpers for the alignment metrics of :mod:`fa_jax.alignment`.

matplotlib is imported on first use, so ``import fa_jax`` does not need it.
Every helper draws on ``ax`` (a new figure if ``None``) and returns the axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fa_jax.alignment import Cosine, DeltaAlignment

__all__ = [
    "plot_angles",
    "plot_alignment_vs_width",
    "plot_alignment_vs_performance",
    "plot_spectrum",
    "plot_perturbation",
]


def _axes(ax):
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("fa_jax.plotting needs matplotlib: pip install matplotlib") from error
    return plt.subplots(figsize=(5, 3.5))[1]


def _series(value: Any, field: str) -> np.ndarray:
    if isinstance(value, Cosine):
        value = getattr(value, field)
    elif isinstance(value, DeltaAlignment):
        value = value.mean
    return np.asarray(value, dtype=np.float64)


def plot_angles(
    history: Mapping[str, Any],
    *,
    steps: Sequence[float] | None = None,
    field: str = "angle",
    ax=None,
    title: str | None = None,
):
    """One line per layer: ``field`` of the alignment against the training step.

    Args:
      history: ``{layer: (steps,)}``, or ``{layer: Cosine}`` with a leading step
        axis (what ``lax.scan`` returns for ``Alignment.gradient``), or
        ``{tap: DeltaAlignment}`` (plots the mean).
      steps: x values (default ``0 … steps-1``).
      field: ``"angle"`` (degrees), ``"cosine"`` or ``"norm_ratio"`` for :class:`Cosine`.
    """
    ax = _axes(ax)
    for name, value in history.items():
        y = _series(value, field)
        x = np.arange(len(y)) if steps is None else np.asarray(steps)
        ax.plot(x, y, label=name)
    if field == "angle":
        ax.axhline(90.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("angle to BP (degrees)")
    else:
        ax.set_ylabel(field)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def plot_alignment_vs_width(
    widths: Sequence[int],
    values: Mapping[str, Sequence[float]] | Sequence[float],
    *,
    errors: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    ax=None,
    ylabel: str = "cosine with BP",
    title: str | None = None,
):
    """Alignment against layer width on a log axis (the bottleneck effect, Launay et al. 2019).

    ``values``: one sequence per curve (``{label: (len(widths),)}``) or a single
    sequence; ``errors`` the same shape, drawn as error bars (e.g. the std over samples).
    """
    ax = _axes(ax)
    # Keyed by label, None for a single unlabelled curve (a comprehension: dict(values) would keep the key type str).
    Curves = dict[str | None, Sequence[float]]
    curves: Curves = {k: v for k, v in values.items()} if isinstance(values, Mapping) else {None: values}
    errs: Curves | None = None
    if isinstance(errors, Mapping):
        errs = {k: v for k, v in errors.items()}
    elif errors is not None:
        errs = {None: errors}
    for label, y in curves.items():
        yerr = None if errs is None else errs.get(label)
        ax.errorbar(widths, np.asarray(y, np.float64), yerr=yerr, marker="o", capsize=2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("layer width")
    ax.set_ylabel(ylabel)
    if any(label is not None for label in curves):
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def plot_alignment_vs_performance(
    alignment: Sequence[float],
    performance: Sequence[float],
    *,
    color: Sequence[float] | None = None,
    color_label: str | None = None,
    ax=None,
    xlabel: str = "gradient alignment (cosine with BP)",
    ylabel: str = "test accuracy",
    title: str | None = None,
):
    """Scatter of alignment against performance (or stability), one point per run."""
    ax = _axes(ax)
    points = ax.scatter(np.asarray(alignment), np.asarray(performance), c=color, cmap="viridis")
    if color is not None:
        bar = ax.figure.colorbar(points, ax=ax)
        if color_label:
            bar.set_label(color_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def plot_spectrum(
    spectra: Mapping[str, Sequence[complex]],
    *,
    ax=None,
    title: str | None = "Update Jacobian eigenvalues",
    linthresh: float = 1e-3,
):
    """Eigenvalues of update Jacobians in the complex plane, one colour per entry (``{label: eigenvalues}``).

    The real axis is symmetric-log (eigenvalues span decades, and the sign is the
    point: a negative real part of ``J`` is a direction the rule leaves); a
    vertical line marks ``Re λ = 0``. ``StabilityReport.eigenvalues`` fits.
    """
    ax = _axes(ax)
    for label, values in spectra.items():
        points = np.asarray(values, np.complex128)
        ax.scatter(points.real, points.imag, s=10, label=label)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlabel("Re λ of J = ∂g/∂θ")
    ax.set_ylabel("Im λ")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def plot_perturbation(
    results: Mapping[str, Any],
    *,
    ax=None,
    title: str | None = "Kicked fixed points",
):
    """``‖g‖`` after a kick, relative to just after it, for every direction of every perturbation test.

    ``results``: ``{label: Perturbation}`` from :func:`~fa_jax.stability.perturbation_test`.
    One colour per entry; eigen-directions solid, random ones dotted. Falling lines: the
    rule returns; rising: it leaves.
    """
    ax = _axes(ax)
    for label, result in results.items():
        history = np.asarray(result.history, np.float64)
        relative = history / history[:, :1]
        color = None
        for row, name in zip(relative, result.labels, strict=True):
            eigen = str(name).startswith("eigen")
            line = ax.semilogy(
                row,
                color=color,
                ls="-" if eigen else ":",
                lw=1.5 if eigen else 0.8,
                label=label if color is None else None,
            )[0]
            color = line.get_color()
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("record")
    ax.set_ylabel("‖g‖ / ‖g‖ just after the kick")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax
