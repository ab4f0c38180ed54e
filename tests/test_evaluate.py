"""`dcfeat evaluate` and `dcfeat predict` on the synthetic city and on extracted images."""

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dcfeat.reports import recall_from_predictions
from dcfeat.shards import write_split
from dcfeat.store import read_split
from tests.conftest import invoke


@pytest.fixture(scope="module")
def evaluated(city_store, city_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--split", "test", "--database-split",
               "test-db", "--out", out, plots=True)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_all_modes_side_by_side(evaluated):
    out, output = evaluated
    for word in ("classify", "retrieve (projected)", "hybrid (projected)", "LR@1", "LR@20", "ms/query", "coverage"):
        assert word in output
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"classify", "classify-centre", "retrieve", "hybrid", "fused", "adaptive"}  # a calibrated run
    for m in report["methods"].values():
        assert set(m["recall"]) == {"1", "5", "10", "20"} and m["queries_per_s"] > 0
        assert m["recall"]["1"] <= m["recall"]["5"] <= m["recall"]["20"]
    # Learned classification and the hybrid are far above chance (134 classes); measured 0.62 / 0.67.
    assert report["methods"]["classify"]["recall"]["1"] > 0.4
    assert report["methods"]["hybrid"]["recall"]["1"] > 0.4
    assert 0.8 < report["coverage"] <= 1.0  # measured 0.90
    assert report["queries"] == 200 and report["database_rows"] == 1320 and not report["random_backbone"]
    for name in ("error_cdf.png", "map_classify.png", "map_retrieve.png", "map_hybrid.png"):
        assert Image.open(out / name).format == "PNG"


def test_recall_from_predictions_equals_the_report(evaluated):
    out, _ = evaluated
    report = json.loads((out / "report.json").read_text())
    frame = pl.read_parquet(out / "predictions.parquet")
    assert frame.height == 200
    for method in report["methods"]:
        assert recall_from_predictions(frame, method, report["ks"], report["threshold_m"]) == \
            report["methods"][method]["recall"]
    first = frame.row(0, named=True)
    centre = first["classify-centre_score"]
    assert len(first["classify_class"]) == 20 and centre == sorted(centre, reverse=True)
    # The position answers the best cell; ranks 2.. are candidate cells in the order positions.ranked gives.
    cells = first["classify-centre_db_row"]  # the centre's class ids (reports name every non-classify ref db_row)
    assert first["classify_class"][0] == cells[0] and set(first["classify_class"]) <= set(cells)


def test_no_plots_writes_the_same_report_without_a_figure_or_matplotlib(city_store, city_run, tmp_path, monkeypatch,
                                                                        request):
    import sys

    drawn = "matplotlib" in sys.modules  # by an earlier test of this process: then no plot function may be called
    if drawn:
        import dcfeat.plots

        for name in [n for n in vars(dcfeat.plots) if n.startswith("plot_")]:
            monkeypatch.setattr(dcfeat.plots, name, lambda *a, **k: pytest.fail("a figure was drawn"))
    out = tmp_path / "e"
    r = invoke("evaluate", "--no-plots", "--feats", city_store, "--run", city_run, "--split", "test",
               "--database-split", "test-db", "--out", out)
    assert r.exit_code == 0, r.output
    assert drawn or "matplotlib" not in sys.modules
    with_plots, _ = request.getfixturevalue("evaluated")  # drawn after: matplotlib is imported from here on
    assert sorted(p.name for p in out.iterdir()) == ["predictions.parquet", "report.json"]
    report, plotted = (json.loads((o / "report.json").read_text()) for o in (out, with_plots))
    assert report["files"] == {"predictions": "predictions.parquet"} and not report["options"]["plots"]
    assert plotted["options"]["plots"] and {"error_cdf", "map_classify", "reliability"} <= set(plotted["files"])

    def untimed(figures: dict) -> dict:
        return {k: v for k, v in figures.items() if not k.endswith(("seconds", "_per_s", "ms_per_query"))}

    assert {m: untimed(f) for m, f in report["methods"].items()} == \
        {m: untimed(f) for m, f in plotted["methods"].items()}
    assert report["confidence"] == plotted["confidence"]


def test_a_grid_without_plots_is_refused(city_store, city_run, tmp_path):
    r = invoke("evaluate", "--no-plots", "--feats", city_store, "--run", city_run, "--grid", 2, "--out", tmp_path / "e")
    assert r.exit_code == 2 and "--grid 2" in r.output and "--no-plots" in r.output, r.output
    assert not (tmp_path / "e").exists()


def test_raw_space_and_classify_only(city_store, city_run, tmp_path):
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path / "a")
    assert r.exit_code == 0 and "retrieve" not in r.output
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--database-split", "test-db", "--mode",
               "retrieve", "--space", "raw", "--out", tmp_path / "b")
    assert r.exit_code == 0 and "retrieve (raw)" in r.output


def test_bad_inputs_fail_clearly(city_store, city_run, tmp_path):
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--split", "nope")
    assert r.exit_code != 0 and "no split 'nope'" in r.output
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--mode", "hybrid")
    assert r.exit_code != 0 and "--database-split" in r.output
    r = invoke("evaluate", "--feats", city_store, "--run", tmp_path / "norun")
    assert r.exit_code != 0 and "not a complete run folder" in r.output

    test = read_split(city_store, "test")
    other = tmp_path / "other.h5"
    write_split(other, "test", test.embeddings, test.labels.drop("row"),
                {"model": "another-backbone", "pooling": "cls", "image_size": 224})
    r = invoke("evaluate", "--feats", other, "--run", city_run)
    assert r.exit_code != 0 and "another backbone" in r.output and "another-backbone" in r.output

    far = tmp_path / "far.h5"
    write_split(far, "test", test.embeddings, test.labels.drop("row").with_columns(utm_zone=pl.lit(33, pl.Int8)),
                {"model": "synthetic-city", "pooling": "none", "image_size": 0,
                 "model_fingerprint": "synthetic-seed0-dim64"})
    r = invoke("evaluate", "--feats", far, "--run", city_run)
    assert r.exit_code != 0 and "UTM zone(s) [33]" in r.output and "[10]" in r.output


def test_predict_from_cached_features_writes_latlon(city_store, city_run, tmp_path):
    for name in ("p.parquet", "p.csv", "p.geojson"):
        r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--k", "3",
                   "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    frame = pl.read_parquet(tmp_path / "p.parquet")
    assert frame.height == 600 and frame["rank"].to_list()[:3] == [1, 2, 3]
    assert frame["lat"].is_between(37.0, 38.5).all() and frame["lon"].is_between(-123.5, -121.5).all()
    # The best cell may come back below rank 1 as its centre (positions.ranked): its probability counts once.
    probs = frame.unique(["image_id", "class"]).group_by("image_id").agg(pl.col("probability").sum())["probability"]
    assert ((probs > 0) & (probs <= 1.0 + 1e-5)).all()
    assert pl.read_csv(tmp_path / "p.csv").height == 600
    geo = json.loads((tmp_path / "p.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 200  # one per image, its top 3 inside
    assert all(len(f["properties"]["top_k"]) == 3 for f in geo["features"])
    lon, lat = geo["features"][0]["geometry"]["coordinates"]
    assert lat == pytest.approx(frame["lat"][0]) and lon == pytest.approx(frame["lon"][0])


def test_predict_new_images_through_the_backbone(images, tiny_model, tmp_path):
    store = tmp_path / "f.h5"
    assert invoke("extract", "--images", images, "--out", store, "--model", tiny_model, "--image-size", 56,
                  "--workers", 0, "--no-progress").exit_code == 0
    assert invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8,
                  "--out", tmp_path / "run", "--no-progress").exit_code == 0
    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        Image.fromarray(np.full((70, 90, 3), 60 * i, np.uint8)).save(new / f"photo{i}.jpg")
    (new / "broken.jpg").write_bytes(b"nope")
    r = invoke("predict", "--run", tmp_path / "run", "--images", new, "--out", tmp_path / "p.geojson", "--k", "1",
               "--no-progress")
    assert r.exit_code == 0, r.output
    assert "skipped broken.jpg" in r.output and "RANDOM BACKBONE" in r.output
    geo = json.loads((tmp_path / "p.geojson").read_text())
    assert len(geo["features"]) == 3 and "RANDOM BACKBONE" in geo["dcfeat_notice"]
    # The run's features came from tiny-dinov2; another random model is refused.
    from dcfeat.backbone import save_random_dinov2
    other = save_random_dinov2(tmp_path / "other", hidden_size=32, layers=2, heads=2, image_size=56, seed=5)
    r = invoke("predict", "--run", tmp_path / "run", "--images", new, "--model", other, "--out", tmp_path / "q.csv")
    assert r.exit_code != 0 and "model_fingerprint" in r.output and not (tmp_path / "q.csv").exists()


def test_extract_train_evaluate_with_default_paths(images, tiny_model, tmp_path, monkeypatch):
    """`dcfeat evaluate --split test` needs no other option after `extract` and `train`."""
    monkeypatch.chdir(tmp_path)
    assert invoke("extract", "--images", images, "--model", tiny_model, "--image-size", 56, "--workers", 0,
                  "--no-progress").exit_code == 0
    assert invoke("extract", "--images", images, "--split", "test", "--model", tiny_model, "--image-size", 56,
                  "--workers", 0, "--no-progress").exit_code == 0
    r = invoke("train", "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8, "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "runs" / "latest" / "model.safetensors").is_file()
    r = invoke("evaluate", "--split", "test")
    assert r.exit_code == 0, r.output
    assert "LR@1" in r.output and "RANDOM BACKBONE" in r.output
    assert (tmp_path / "data" / "runs" / "latest" / "eval" / "test" / "report.json").is_file()


def test_more_bad_options_fail_clearly(city_store, city_run, images, tiny_model, tmp_path):
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--out", tmp_path / "p.txt")
    assert r.exit_code != 0 and ".geojson" in r.output and not (tmp_path / "p.txt").exists()
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--out", tmp_path / "p.csv")
    assert r.exit_code != 0 and "--split" in r.output
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--k", "1,five")
    assert r.exit_code != 0 and "comma-separated integers" in r.output
    r = invoke("extract", "--images", images, "--out", tmp_path / "f.h5", "--model", tiny_model, "--image-size", 100,
               "--no-progress")
    assert r.exit_code != 0 and "multiple of 14" in r.output and not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("space", ["projected", "raw"])
def test_the_hybrid_is_exact_retrieval_among_the_top_cells_images(city_store, city_run, space):
    """Brute force: every query's top-5 classes, the database rows filed under those cells (their own cell's
    class, else the nearest class's), cosine with the float16 unit rows a database holds, top-k."""
    import torch

    from dcfeat.database import unit_rows
    from dcfeat.evaluate import hybrid
    from dcfeat.partition import assign_classes
    from dcfeat.run import load_run

    run = load_run(city_run, torch.device("cpu"))
    q, db = read_split(city_store, "test", dtype=np.float32), read_split(city_store, "test-db", dtype=np.float32)
    got = hybrid(run, q, db, 10, 5, torch.device("cpu"), space)
    with torch.no_grad():
        qe = run.model.embedded(q.embeddings, space).double().numpy()
        de = unit_rows(run.model.embedded(db.embeddings, space)).double().numpy()
    cos = (qe / np.linalg.norm(qe, axis=1, keepdims=True)) @ de.T
    filed, outside, _ = assign_classes(run.classes, db.labels, run.M)
    top = run.model.topk(q.embeddings, 5)[0]
    filled = 0
    for qi in range(len(qe)):
        cand = np.concatenate([np.flatnonzero(filed == c) for c in top[qi]])
        want = cand[np.argsort(-cos[qi, cand], kind="stable")][:10]
        np.testing.assert_array_equal(got.ref[qi, :len(want)], want)
        np.testing.assert_allclose(got.score[qi, :len(want)], cos[qi, want], atol=1e-5)
        assert (got.ref[qi, len(want):] == -1).all()
        filled += len(want) == 10
    assert filled > len(qe) // 2  # most queries have 10 candidates or more: the comparison is not vacuous
    assert np.isin(np.flatnonzero(outside), got.ref).any()  # photos outside every class cell are found too


# --- outputs that stay true, and inputs that are said ------------------------------------------------------------

CITY_ATTRS = ("model", "model_fingerprint", "pooling", "image_size")


def test_the_adaptive_hybrid_pads_a_database_smaller_than_k(city_store, city_run, tmp_path):
    """D15: fallback queries got min(k, rows) columns, the rest k: a shape mismatch."""
    import shutil

    store = tmp_path / "store" / city_store.name
    shutil.copytree(city_store.parent, store.parent)
    db = read_split(store, "test-db")
    write_split(store, "tiny-db", db.embeddings[:5], db.labels.drop("row").head(5),
                {k: db.attrs[k] for k in CITY_ATTRS})
    run = tmp_path / "run"
    shutil.copytree(city_run, run)
    cal = json.loads((run / "calibration.json").read_text())
    cal["hybrid"].update(fallback_below=1.0)  # every query falls back to exact retrieval
    (run / "calibration.json").write_text(json.dumps(cal))
    r = invoke("evaluate", "--feats", store, "--run", run, "--database-split", "tiny-db", "--mode", "adaptive",
               "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    frame = pl.read_parquet(tmp_path / "e" / "predictions.parquet")
    rows = np.array(frame["adaptive_db_row"].to_list())
    assert rows.shape == (200, 20) and (rows[:, 5:] == -1).all() and (rows[:, :5] >= 0).all()
    assert np.isnan(np.array(frame["adaptive_east"].to_list())[:, 5:]).all()


def test_evaluate_refuses_an_out_that_is_a_file(city_store, city_run, tmp_path):
    """D16: FileExistsError after the whole evaluation."""
    out = tmp_path / "report.txt"
    out.write_text("mine")
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", out)
    assert r.exit_code == 2 and "--out" in r.output and str(out) in r.output and "Traceback" not in r.output
    assert out.read_text() == "mine"


def test_reevaluating_leaves_only_this_evaluations_files(city_store, city_run, tmp_path):
    """D26: plots of the modes of an earlier evaluation stayed beside a report that no longer lists them."""
    out = tmp_path / "e"
    assert invoke("evaluate", "--feats", city_store, "--run", city_run, "--database-split", "test-db",
                  "--out", out, plots=True).exit_code == 0
    assert (out / "map_hybrid.png").is_file()
    (out / "notes.txt").write_text("mine")
    assert invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", out, plots=True).exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*report["files"].values(), "report.json", "notes.txt"])
    assert not (out / "map_hybrid.png").exists() and list(report["methods"]) == ["classify", "classify-centre"]


def test_a_full_disk_while_evaluating_leaves_the_folder_as_it_was(city_store, city_run, tmp_path, monkeypatch):
    """D26: predictions.parquet was replaced, then the disk filled up: no report beside it, or an old one."""
    import errno

    import dcfeat.plots

    out = tmp_path / "e"
    assert invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcfeat.plots, "plot_error_cdf", full)  # after predictions.parquet is written
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--database-split", "test-db", "--out", out,
               plots=True)
    assert r.exit_code == 6 and str(out) in r.output and "no space left" in r.output, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path / "new", plots=True)
    assert r.exit_code == 6 and not (tmp_path / "new").exists()


def test_k_and_cells_are_capped_at_what_a_run_can_answer(city_store, city_run, tmp_path):
    """D27: LR@100000 of a run of 134 classes."""
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--k", "1,100000", "--cells", 100000,
               "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["ks"] == [1, 134] and report["cells"] == 134 and "100000" not in r.stdout
    assert report["options"]["ks"] == [1, 100000]  # what was asked, recorded beside


def test_inputs_accepted_with_a_warning_on_stderr(city_store, city_run, tmp_path):
    """D28: a database that is the query split itself, and --space without a database, said nothing."""
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--database-split", "test", "--mode",
               "retrieve", "--out", tmp_path / "a")
    assert r.exit_code == 0 and "is the query split 'test' itself" in r.stderr, r.output
    assert "itself" not in r.stdout
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--space", "raw", "--out", tmp_path / "b")
    assert r.exit_code == 0 and "--space raw has no effect without --database-split" in r.stderr, r.output
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--database-split", "test-db", "--mode",
               "retrieve", "--out", tmp_path / "c")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
