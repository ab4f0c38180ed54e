import matplotlib
import numpy as np
import pytest
from PIL import Image

from dcfeat.plots import plot_error_cdf, plot_query_map

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
