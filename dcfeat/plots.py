"""Evaluation figures: error CDF per method, a map of right and wrong queries, how
well a confidence sorts them (risk-coverage curve, reliability diagram), and a grid of
queries beside their answers' photos.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never
through pyplot, so importing or calling this module changes no global
backend or state (and works on machines without a display).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from PIL import Image as PILImage

from dcfeat.atomic import atomic_write
from dcfeat.choices import THRESHOLD_M
from dcfeat.metrics import correct_at_k

# Errors below this are drawn at it: a log axis cannot show an exact hit (0 m).
MIN_PLOTTED_ERROR_M = 0.1
TITLE_WIDTH_CHARS = 70


# Margins around the axes, in inches. They are fixed rather than measured by a layout engine: what
# sits in them is known (tick labels of at most 6 digits at 10 pt, one axis label, the title
# wrapped at TITLE_WIDTH_CHARS), and matplotlib's constrained layout spent a third of each figure's
# time measuring it again. tests/test_plots.py checks that nothing drawn reaches past the edge.
LEFT_IN, RIGHT_IN, BOTTOM_IN = 0.9, 0.25, 0.6
TITLE_LINE_IN, TITLE_PAD_IN = 0.19, 0.1


# A legend below the axes: a row of entries at 8 pt, and the gap above and below the block.
LEGEND_ROW_IN, LEGEND_PAD_IN = 0.19, 0.12


def _new_figure(title: str, size: tuple[float, float], below_in: float = 0.0) -> tuple[Figure, Axes]:
    """A figure of `size` (inches) for the axes and its title, `below_in` taller for what goes under them."""
    # Wrap rather than shrink: a notice such as "RANDOM BACKBONE ..." must stay readable.
    title = textwrap.fill(title, TITLE_WIDTH_CHARS)
    width, height = size[0], size[1] + below_in
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    top_in = TITLE_PAD_IN + TITLE_LINE_IN * (title.count("\n") + 1)
    fig.subplots_adjust(left=LEFT_IN / width, right=1 - RIGHT_IN / width, bottom=(BOTTOM_IN + below_in) / height,
                        top=1 - top_in / height)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    return fig, ax


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the PNG crash-safely. The file gets the umask's permissions (0644 as a rule): a plot is for sharing."""
    with atomic_write(Path(path)) as tmp:
        # zlib level 3, not 6: half the encoding time (28 -> 16 ms a figure), files 1-3 % larger.
        fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 3})
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
    on the curve, so such a curve ends below 1. The legend, below the axes so
    that it covers no curve, gives each method's LR@1 at ``threshold_m``;
    methods with identical errors share one curve, named "a = b".
    """
    if not errors_by_method:
        raise ValueError("no methods to plot: errors_by_method is empty")
    errors = {name: np.asarray(e, dtype=np.float64).ravel() for name, e in errors_by_method.items()}
    for name, e in errors.items():
        if e.size == 0:
            raise ValueError(f"method {name!r} has no errors to plot")
    # One curve per distinct error array: a second curve drawn on the first would hide under it.
    curves: dict[str, np.ndarray] = {}
    for name, e in errors.items():
        same = next((label for label, c in curves.items() if np.array_equal(c, e, equal_nan=True)), None)
        if same is None:
            curves[name] = e
        else:
            curves[f"{same} = {name}"] = curves.pop(same)

    columns = 2
    rows = -(-(len(curves) + 1) // columns)
    below_in = 2 * LEGEND_PAD_IN + rows * LEGEND_ROW_IN
    fig, ax = _new_figure(title, (7.0, 4.5), below_in)
    for label, e in curves.items():
        finite = np.sort(np.maximum(e[np.isfinite(e)], MIN_PLOTTED_ERROR_M))
        frac = np.arange(1, finite.size + 1) / e.size
        lr1 = correct_at_k(e, threshold_m).mean()
        ax.step(finite, frac, where="post", label=f"{label} (LR@1 {100 * lr1:.1f} %)")
    ax.axvline(threshold_m, color="0.3", linestyle="--", linewidth=1, label=f"{threshold_m:g} m")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 error (m)")
    ax.set_ylabel("fraction of queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, LEGEND_PAD_IN / fig.get_figheight()),
              bbox_transform=fig.transFigure, ncol=columns, fontsize=8, frameon=False)
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
    for mask, colour, label in ((correct, "tab:green", "right"), (~correct, "tab:red", "wrong")):
        ax.scatter(qe[mask] - e0, qn[mask] - n0, s=8, c=colour,
                   label=f"where a query was taken, answer {label} ({int(mask.sum())})")
    ax.plot([], [], color="0.3", linewidth=0.8, label="line: from the query to its top-1 answer")
    ax.set_aspect("equal", adjustable="datalim")
    ax.autoscale_view()
    ax.set_xlabel(f"metres east of UTM easting {e0:,.0f}")
    ax.set_ylabel(f"metres north of UTM northing {n0:,.0f}")
    ax.legend(loc="best", fontsize=8, markerscale=2)
    return _save_atomic(fig, path)


def _no_queries(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no queries", transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_risk_coverage(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str,
) -> Path:
    """LR@1 (%) of the most confident fraction of queries against the fraction kept, one line per signal.

    ``curves`` maps a name to ``metrics.risk_coverage``'s (coverage,
    accuracy). A dotted line in the curve's colour marks its LR@1 over all
    queries, which every curve reaches at coverage 1: the higher a curve
    stands above its line, the more keeping only confident answers pays.
    """
    arrays = {name: [np.asarray(a, dtype=np.float64).ravel() for a in c] for name, c in curves.items()}
    for name, (coverage, accuracy) in arrays.items():
        if coverage.size != accuracy.size:
            raise ValueError(f"curve {name!r}: coverage and accuracy differ in length: "
                             f"{coverage.size} vs {accuracy.size}")

    fig, ax = _new_figure(title, (7.0, 4.5))
    drawn = {name: c for name, c in arrays.items() if c[0].size}
    for name, (coverage, accuracy) in drawn.items():
        (line,) = ax.plot(coverage, 100 * accuracy, label=f"{name} (LR@1 {100 * accuracy[-1]:.1f} % at all)")
        ax.axhline(100 * accuracy[-1], color=line.get_color(), linestyle=":", linewidth=1)
    if not drawn:
        _no_queries(ax)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 101)
    ax.set_xlabel("fraction of queries kept (most confident first)")
    ax.set_ylabel("LR@1 of the kept queries (%)")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="lower left", fontsize=8)
    return _save_atomic(fig, path)


def plot_reliability(
    bins: dict[str, np.ndarray],
    path: str | os.PathLike,
    *,
    title: str,
    ece: float | None = None,
) -> Path:
    """Reliability diagram: fraction right against mean confidence per bin, with the diagonal.

    ``bins`` is ``metrics.reliability_bins``'s dict. A point on the
    diagonal is calibrated; the red stroke to it is the bin's gap, which ECE
    averages. Marker area follows the bin's query count, also given in the legend.
    """
    conf, acc, count = (np.asarray(bins[key], dtype=np.float64).ravel() for key in ("confidence", "accuracy", "count"))
    if not conf.size == acc.size == count.size:
        raise ValueError(f"bins need one confidence, accuracy and count per bin; got lengths "
                         f"{conf.size}, {acc.size}, {count.size}")

    # As wide as the other figures, so a wrapped notice in the title fits.
    fig, ax = _new_figure(title, (7.0, 6.5))
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="calibrated")
    if conf.size:
        ax.vlines(conf, np.minimum(conf, acc), np.maximum(conf, acc), colors="tab:red", linewidth=1.5, label="gap")
        sizes = 20 + 100 * count / count.max() if count.max() > 0 else 20
        lo, hi = int(count.min()), int(count.max())
        per_bin = f"{lo}" if lo == hi else f"{lo}-{hi}"
        ece_text = "" if ece is None else f", ECE {ece:.3f}"
        ax.scatter(conf, acc, s=sizes, c="tab:blue", zorder=3,
                   label=f"{conf.size} bins of {per_bin} queries{ece_text}")
    else:
        _no_queries(ax)
    # A little past [0, 1]: a bin at 0 or 1 would otherwise be cut in half by the frame.
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("fraction right (LR@1)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save_atomic(fig, path)


# The qualitative grid (`evaluate --grid`): square tiles with a line of title above each, fixed sizes (inches at
# GRID_DPI) so that a figure's pixel size follows from its rows and columns alone.
GRID_TILE_IN, GRID_LABEL_IN, GRID_GAP_IN, GRID_DPI = 1.2, 0.25, 0.1, 100


@dataclass(frozen=True)
class Tile:
    """One picture of the grid: `image` (H, W, 3) uint8 or None (drawn as a grey tile saying `missing`),
    its title, and whether the answer is right (green), wrong (red) or neither (the query: black)."""

    image: np.ndarray | None
    title: str
    right: bool | None = None
    missing: str = "no image"


def grid_size_in(rows: int, columns: int, title: str) -> tuple[float, float]:
    """(width, height) in inches of a grid of `rows` × `columns` tiles under `title` (wrapped as drawn)."""
    lines = textwrap.fill(title, TITLE_WIDTH_CHARS).count("\n") + 1
    width = GRID_GAP_IN + columns * (GRID_TILE_IN + GRID_GAP_IN)
    return width, TITLE_PAD_IN + TITLE_LINE_IN * lines + rows * (GRID_LABEL_IN + GRID_TILE_IN + GRID_GAP_IN)


def plot_grid(rows: list[list[Tile]], path: str | os.PathLike, *, title: str) -> Path:
    """Rows of tiles, one row per query (its photo first, then its answers' photos), each tile titled and
    framed in its colour; an image keeps its aspect ratio inside its square.

    The tiles are composed into one pixel canvas placed as it is (`figimage`, no resampling): one axes per
    tile cost 60 ms each, which a grid of dozens of tiles would spend for nothing."""
    if not rows:
        raise ValueError("no rows to draw")
    width, height = grid_size_in(len(rows), max(len(r) for r in rows), title)
    fig = Figure(figsize=(width, height), dpi=GRID_DPI)
    FigureCanvasAgg(fig)
    px = lambda inches: round(inches * GRID_DPI)  # noqa: E731
    canvas = np.full((px(height), px(width), 3), 255, np.uint8)
    fig.text(0.5, 1 - TITLE_PAD_IN / height, textwrap.fill(title, TITLE_WIDTH_CHARS), ha="center", va="top",
             fontsize=10)
    colours = {True: "tab:green", False: "tab:red", None: "black"}
    side = px(GRID_TILE_IN)
    for r, row in enumerate(rows):  # the first row on top, under the title
        bottom = (len(rows) - 1 - r) * (GRID_LABEL_IN + GRID_TILE_IN + GRID_GAP_IN) + GRID_GAP_IN
        for c, tile in enumerate(row):
            left = GRID_GAP_IN + c * (GRID_TILE_IN + GRID_GAP_IN)
            x, y, frame = px(left), px(height - bottom - GRID_TILE_IN), 1 if tile.right is None else 4
            colour = colours[tile.right]
            canvas[y:y + side, x:x + side] = np.round(255 * np.array(to_rgb(colour)))
            inner = canvas[y + frame:y + side - frame, x + frame:x + side - frame]
            inner[:] = 217  # grey 0.85 where the image does not reach
            if tile.image is not None:
                image = _fitted(tile.image, inner.shape[0])
                top, first = (inner.shape[0] - image.shape[0]) // 2, (inner.shape[1] - image.shape[1]) // 2
                inner[top:top + image.shape[0], first:first + image.shape[1]] = image
            else:
                fig.text((left + GRID_TILE_IN / 2) / width, (bottom + GRID_TILE_IN / 2) / height, tile.missing,
                         ha="center", va="center", fontsize=7, color="0.3")
            fig.text((left + GRID_TILE_IN / 2) / width, (bottom + GRID_TILE_IN + 0.03) / height, tile.title,
                     ha="center", va="bottom", fontsize=7, color=colour)
    fig.figimage(canvas, 0, 0, zorder=0)
    return _save_atomic(fig, path)


def _fitted(image: np.ndarray, side: int) -> np.ndarray:
    """`image` (H, W, 3) uint8 scaled to fit a square of `side` pixels, aspect ratio kept."""
    h, w = image.shape[:2]
    if max(h, w) == side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(PILImage.fromarray(image).resize(size, PILImage.Resampling.BICUBIC))
