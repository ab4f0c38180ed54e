import re

import matplotlib
import numpy as np
import pytest
from PIL import Image

import dcfeat.plots
from dcfeat.metrics import ece, reliability_bins, risk_coverage
from dcfeat.plots import (
    plot_error_cdf,
    plot_query_map,
    plot_reliability,
    plot_risk_coverage,
)

LONG_TITLE = "RANDOM BACKBONE — measures the pipeline, not DINOv2 — " * 3


def _is_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 0 and im.size[1] > 0


def test_error_cdf_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    backend = matplotlib.get_backend()
    errors = {
        "classify": rng.lognormal(3, 1.5, 200),
        "retrieve": np.concatenate([rng.lognormal(2, 1, 199), [0.0]]),
        "hybrid": np.concatenate([rng.lognormal(2, 1, 190), np.full(10, np.inf)]),
    }
    out = plot_error_cdf(errors, tmp_path / "cdf.png", title=LONG_TITLE)
    assert out == tmp_path / "cdf.png"
    _is_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdf.png"]
    assert matplotlib.get_backend() == backend


def test_query_map_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    qe, qn = 550_000 + rng.uniform(0, 500, 30), 4_180_000 + rng.uniform(0, 800, 30)
    pe, pn = qe + rng.normal(0, 40, 30), qn + rng.normal(0, 40, 30)
    pe[0] = np.nan  # a query without a prediction
    correct = np.hypot(pe - qe, pn - qn) <= 25
    bg = (550_000 + rng.uniform(0, 600, 500), 4_180_000 + rng.uniform(0, 900, 500))
    out = plot_query_map(qe, qn, correct, pe, pn, tmp_path / "map.png", title=LONG_TITLE, background=bg)
    _is_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


def test_mismatched_lengths_leave_no_file(tmp_path):
    z = np.zeros(3)
    with pytest.raises(ValueError, match="one entry per query"):
        plot_query_map(z, z, np.ones(3, bool), z, np.zeros(2), tmp_path / "map.png")
    with pytest.raises(ValueError, match="background"):
        plot_query_map(z, z, np.ones(3, bool), z, z, tmp_path / "map.png", background=(z, np.zeros(4)))
    with pytest.raises(ValueError):
        plot_error_cdf({"classify": np.array([])}, tmp_path / "cdf.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_removes_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_error_cdf({"classify": np.array([1.0, 30.0])}, tmp_path / "cdf.png")
    assert list(tmp_path.iterdir()) == []


def _figures_saved(monkeypatch):
    """Keep each figure the plots save, so a test can read its title and legend."""
    saved, save = [], dcfeat.plots._save_atomic

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(dcfeat.plots, "_save_atomic", keep)
    return saved


def _texts(fig):
    ax = fig.axes[0]
    legend = ax.get_legend()
    return ax.get_title().replace("\n", " "), [t.get_text() for t in legend.get_texts()] if legend else []


def _starts_as_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _confidence_case(n=300):
    rng = np.random.default_rng(3)
    confidence = rng.random(n)
    return confidence, rng.random(n) < confidence


def _lr1_in(text: str) -> float:
    """The LR@1 figure (%) a legend entry gives."""
    (figure,) = re.findall(r"LR@1 (\d+(?:\.\d+)?) ?%", text)
    return float(figure)


def test_risk_coverage_writes_png(tmp_path, monkeypatch):
    saved = _figures_saved(monkeypatch)
    confidence, correct = _confidence_case()
    other = np.random.default_rng(4).random(confidence.size) < 0.3  # another method's answers: another LR@1
    cases = {"calibrated": (confidence, correct), "cosine": (-confidence, correct), "retrieve": (confidence, other)}
    out = plot_risk_coverage({name: risk_coverage(*c) for name, c in cases.items()}, tmp_path / "risk.png",
                             title=LONG_TITLE)
    assert out == tmp_path / "risk.png"
    _starts_as_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["risk.png"]
    title, _ = _texts(saved[0])
    assert "RANDOM BACKBONE" in title
    ax = saved[0].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert sorted(legend) == sorted(lines) and len(legend) == len(cases)  # one entry per curve, nothing else
    for name, (scores, right) in cases.items():
        (text,) = [t for t in legend if name in t]  # each curve is named once
        # Its LR@1 over all queries, as rounded for the legend, and the line it labels is that curve.
        assert _lr1_in(text) == pytest.approx(100 * right.mean(), abs=0.05), text
        accuracy = np.cumsum(right[np.argsort(-scores, kind="stable")]) / np.arange(1, right.size + 1)
        assert np.allclose(lines[text].get_ydata(), 100 * accuracy)


def test_reliability_writes_png_with_ece(tmp_path, monkeypatch):
    saved = _figures_saved(monkeypatch)
    confidence, correct = _confidence_case()
    out = plot_reliability(reliability_bins(confidence, correct), tmp_path / "reliability.png",
                           title=LONG_TITLE, ece=ece(confidence, correct))
    _starts_as_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]
    title, legend = _texts(saved[0])
    assert "RANDOM BACKBONE" in title
    # 300 queries in 15 equal-count bins of 20; the ECE as rounded for the legend.
    (entry,) = [t for t in legend if "ECE" in t]
    (bins, per_bin, shown), = re.findall(r"(\d+) bins of (\d+) queries.*ECE (\d\.\d+)", entry)
    assert (int(bins), int(per_bin)) == (15, 20), entry
    assert float(shown) == pytest.approx(ece(confidence, correct), abs=5e-4), entry


def test_confidence_plots_survive_no_queries(tmp_path):
    empty, none = np.array([]), np.array([], bool)
    _starts_as_png(plot_risk_coverage({}, tmp_path / "a.png", title="no methods"))
    _starts_as_png(plot_risk_coverage({"cosine": risk_coverage(empty, none)}, tmp_path / "b.png", title="t"))
    _starts_as_png(plot_reliability(reliability_bins(empty, none), tmp_path / "c.png", title="t", ece=float("nan")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]


def test_confidence_plots_reject_ragged_input(tmp_path):
    with pytest.raises(ValueError, match="differ in length"):
        plot_risk_coverage({"cosine": (np.ones(3), np.ones(2))}, tmp_path / "risk.png", title="t")
    bins = {"confidence": np.ones(3), "accuracy": np.ones(3), "count": np.ones(2)}
    with pytest.raises(ValueError, match="per bin"):
        plot_reliability(bins, tmp_path / "reliability.png", title="t")
    assert list(tmp_path.iterdir()) == []


def test_the_query_map_says_what_its_dots_and_lines_are(tmp_path, monkeypatch):
    saved = _figures_saved(monkeypatch)
    qe, qn = np.array([549_949.0, 550_010.0]), np.array([4_180_000.0, 4_180_050.0])
    plot_query_map(qe, qn, np.array([True, False]), qe + 5, qn + 5, tmp_path / "map.png")
    _, legend = _texts(saved[0])
    assert legend[:2] == ["where a query was taken, answer right (1)", "where a query was taken, answer wrong (1)"]
    assert "line: from the query to its top-1 answer" in legend
    ax = saved[0].axes[0]
    assert ax.get_xlabel() == "metres east of UTM easting 549,949"  # no "east - 549949", read as a dash
    assert ax.get_ylabel() == "metres north of UTM northing 4,180,000"


def _drawn_past_the_edge(fig) -> tuple[float, float, float, float]:
    """How far (inches) what the figure draws, texts included, reaches past its left, bottom, right and
    top edges: 0 where it stays inside."""
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    return max(0.0, -box.x0), max(0.0, -box.y0), max(0.0, box.x1 - width), max(0.0, box.y1 - height)


@pytest.mark.parametrize("title", ["short", LONG_TITLE])
def test_no_text_reaches_past_the_figure(tmp_path, monkeypatch, title):
    """The margins are fixed, not measured: a title wrapped to several lines, a map 150 km wide (6-digit
    tick labels) and the longest labels must still fit inside each figure."""
    saved = _figures_saved(monkeypatch)
    rng = np.random.default_rng(1)
    errors = {name: rng.lognormal(3, 3, 300) for name in ("classify", "classify-centre", "retrieve", "hybrid")}
    plot_error_cdf(errors, tmp_path / "cdf.png", title=title)
    qe, qn = 400000 + rng.uniform(0, 150000, 300), 4100000 + rng.uniform(0, 150000, 300)
    plot_query_map(qe, qn, rng.random(300) < 0.5, qe + 9, qn - 9, tmp_path / "map.png", title=title,
                   background=(qe, qn))
    confidence, correct = _confidence_case()
    plot_risk_coverage({"margin": risk_coverage(confidence, correct)}, tmp_path / "risk.png", title=title)
    plot_reliability(reliability_bins(confidence, correct), tmp_path / "rel.png", title=title, ece=0.5)
    assert len(saved) == 4
    for fig in saved:
        assert _drawn_past_the_edge(fig) == (0, 0, 0, 0), fig.axes[0].get_title()


def test_the_error_cdf_legend_sits_below_the_axes_and_names_identical_curves_once(tmp_path, monkeypatch):
    saved = _figures_saved(monkeypatch)
    rng = np.random.default_rng(2)
    position, retrieve = rng.lognormal(3, 1.5, 200), rng.lognormal(2, 1, 200)
    plot_error_cdf({"classify": position, "classify-centre": position.copy(), "retrieve": retrieve},
                   tmp_path / "cdf.png")
    (fig,) = saved
    ax = fig.axes[0]
    _, legend = _texts(fig)
    assert legend == [f"classify = classify-centre (LR@1 {100 * (position <= 25).mean():.1f} %)",
                      f"retrieve (LR@1 {100 * (retrieve <= 25).mean():.1f} %)", "25 m"]
    assert len(ax.get_lines()) == 3  # two curves and the threshold: none drawn under another
    renderer = fig.canvas.get_renderer()
    legend, axes = ax.get_legend(), ax.get_tightbbox(renderer, bbox_extra_artists=[])
    box = legend.get_window_extent(renderer)
    assert box.y1 < axes.y0 and box.y0 >= 0  # under the axes, their tick labels and axis label; inside the figure
    assert _drawn_past_the_edge(fig) == (0, 0, 0, 0)
