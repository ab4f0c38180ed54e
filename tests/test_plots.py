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


def test_risk_coverage_writes_png(tmp_path, monkeypatch):
    saved = _figures_saved(monkeypatch)
    confidence, correct = _confidence_case()
    curves = {"calibrated": risk_coverage(confidence, correct), "cosine": risk_coverage(-confidence, correct)}
    out = plot_risk_coverage(curves, tmp_path / "risk.png", title=LONG_TITLE)
    assert out == tmp_path / "risk.png"
    _starts_as_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["risk.png"]
    title, legend = _texts(saved[0])
    assert "RANDOM BACKBONE" in title
    overall = 100 * correct.mean()
    assert legend == [f"calibrated (LR@1 {overall:.1f} % at all)", f"cosine (LR@1 {overall:.1f} % at all)"]


def test_reliability_writes_png_with_ece(tmp_path, monkeypatch):
    saved = _figures_saved(monkeypatch)
    confidence, correct = _confidence_case()
    out = plot_reliability(reliability_bins(confidence, correct), tmp_path / "reliability.png",
                           title=LONG_TITLE, ece=ece(confidence, correct))
    _starts_as_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]
    title, legend = _texts(saved[0])
    assert "RANDOM BACKBONE" in title
    # 300 queries in 15 equal-count bins of 20.
    assert f"15 bins of 20 queries, ECE {ece(confidence, correct):.3f}" in legend


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
