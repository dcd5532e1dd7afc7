"""Matplotlib helpers for the alignment metrics of :mod:`fa_jax.alignment`.

matplotlib is imported on first use, so ``import fa_jax`` does not need it.
Every helper draws on ``ax`` (a new figure if ``None``) and returns the axes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fa_jax.alignment import Cosine, DeltaAlignment

__all__ = ["plot_angles", "plot_alignment_vs_width", "plot_alignment_vs_performance"]


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
    curves = values if isinstance(values, Mapping) else {None: values}
    errs = errors if isinstance(errors, Mapping) or errors is None else {None: errors}
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
