"""Evaluation figures: error CDF per method and a map of right and wrong queries.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never
through pyplot, so importing or calling this module changes no global
backend or state (and works on machines without a display).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from dcfeat.atomic import atomic_write
from dcfeat.metrics import THRESHOLD_M, correct_at_k

# Errors below this are drawn at it: a log axis cannot show an exact hit (0 m).
MIN_PLOTTED_ERROR_M = 0.1
TITLE_WIDTH_CHARS = 70


def _new_figure(title: str, size: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Wrap rather than shrink: a notice such as "RANDOM BACKBONE ..." must stay readable.
    ax.set_title(textwrap.fill(title, TITLE_WIDTH_CHARS), fontsize=10)
    return fig, ax


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the PNG crash-safely. The file gets the umask's permissions (0644 as a rule): a plot is for sharing."""
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def plot_error_cdf(
    errors_by_method: dict[str, np.ndarray],
    path: str | os.PathLike,
    *,
    threshold_m: float = THRESHOLD_M,
    title: str = "Top-1 localisation error",
) -> Path:
    """Cumulative fraction of queries against top-1 error (m, log axis), one curve per method.

    Missing predictions (inf or NaN error) count in the denominator but never
    on the curve, so such a curve ends below 1. The legend gives each
    method's LR@1 at ``threshold_m``.
    """
    if not errors_by_method:
        raise ValueError("no methods to plot: errors_by_method is empty")
    errors = {name: np.asarray(e, dtype=np.float64).ravel() for name, e in errors_by_method.items()}
    for name, e in errors.items():
        if e.size == 0:
            raise ValueError(f"method {name!r} has no errors to plot")

    fig, ax = _new_figure(title, (7.0, 4.5))
    for name, e in errors.items():
        finite = np.sort(np.maximum(e[np.isfinite(e)], MIN_PLOTTED_ERROR_M))
        frac = np.arange(1, finite.size + 1) / e.size
        lr1 = correct_at_k(e, threshold_m).mean()
        ax.step(finite, frac, where="post", label=f"{name} (LR@1 {100 * lr1:.1f} %)")
    ax.axvline(threshold_m, color="0.3", linestyle="--", linewidth=1, label=f"{threshold_m:g} m")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 error (m)")
    ax.set_ylabel("fraction of queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save_atomic(fig, path)


def plot_query_map(
    q_east: np.ndarray,
    q_north: np.ndarray,
    correct: np.ndarray,
    pred_east: np.ndarray,
    pred_north: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str = "Queries and their top-1 predictions",
    background: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Map of queries, green where top-1 is correct and red where not, each tied to its prediction.

    All coordinates are UTM metres of one zone; axes start at the smallest
    east/north shown. ``background`` (east, north) draws e.g. database images in grey.
    """
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in (q_east, q_north, pred_east, pred_north)]
    correct = np.asarray(correct, dtype=bool).ravel()
    n = correct.size
    if any(a.size != n for a in arrays):
        raise ValueError(
            "q_east, q_north, correct, pred_east and pred_north need one entry per query; got lengths "
            + ", ".join(str(a.size) for a in (arrays[0], arrays[1], correct, arrays[2], arrays[3]))
        )
    qe, qn, pe, pn = arrays
    bg = None
    if background is not None:
        bg = [np.asarray(a, dtype=np.float64).ravel() for a in background]
        if bg[0].size != bg[1].size:
            raise ValueError(f"background east and north differ in length: {bg[0].size} vs {bg[1].size}")

    shown_e = [qe, pe[np.isfinite(pe)]] + ([bg[0]] if bg else [])
    shown_n = [qn, pn[np.isfinite(pn)]] + ([bg[1]] if bg else [])
    e0 = min((a.min() for a in shown_e if a.size), default=0.0)
    n0 = min((a.min() for a in shown_n if a.size), default=0.0)

    fig, ax = _new_figure(title, (7.0, 7.0))
    if bg:
        ax.scatter(bg[0] - e0, bg[1] - n0, s=1, c="0.85", linewidths=0, label="database", rasterized=True)
    # A query without a prediction (inf, NaN) keeps its dot but gets no line.
    tied = np.isfinite(pe) & np.isfinite(pn)
    segments = np.stack([np.column_stack([qe - e0, qn - n0]), np.column_stack([pe - e0, pn - n0])], axis=1)[tied]
    colours = np.where(correct[tied, None], [[0.1, 0.6, 0.1, 0.6]], [[0.8, 0.1, 0.1, 0.6]])
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.5))
    for mask, colour, label in ((correct, "tab:green", "correct"), (~correct, "tab:red", "wrong")):
        ax.scatter(qe[mask] - e0, qn[mask] - n0, s=8, c=colour, label=f"{label} ({int(mask.sum())})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.autoscale_view()
    ax.set_xlabel(f"east - {e0:.0f} (m)")
    ax.set_ylabel(f"north - {n0:.0f} (m)")
    ax.legend(loc="best", fontsize=8, markerscale=2)
    return _save_atomic(fig, path)
