"""Calibrated confidence: signals on hand-made models, the calibrator's fit and file, the 90 % radius,
`dcfeat calibrate`, the confidence in evaluate and predict, and the adaptive hybrid."""

import json
import math
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from dcfeat.confidence import (SIGNALS, AdaptiveRule, Calibrator, FittedOn, QueryScores, base_radius, fit,
                               query_signals, signals_of)
from dcfeat.positions import DEFAULT_RULE, PositionRule, probabilities
from dcfeat.model import DCModel
from tests.conftest import FAST_TRAIN, invoke, refused


def _signals(n, rng, right):
    """Signals where top1_cosine alone separates right from wrong by a wide gap; the rest is noise."""
    values = {name: rng.uniform(0.2, 0.8, n) for name in SIGNALS}
    values["top1_cosine"] = np.where(right, rng.uniform(0.7, 0.9, n), rng.uniform(0.1, 0.3, n))
    values["spread"] = rng.uniform(0, 100, n)
    return values


def test_separable_signals_rank_every_right_answer_above_every_wrong_one():
    rng = np.random.default_rng(0)
    right = rng.random(400) < 0.7
    values = _signals(400, rng, right)
    cal = fit(values, right, np.full(400, 20.0), rng.uniform(0, 30, 400), threshold_m=25, position=DEFAULT_RULE)
    test_right = rng.random(300) < 0.5
    conf = cal.confidence(_signals(300, rng, test_right))
    assert conf[test_right].min() > conf[~test_right].max()
    assert ((conf > 0.5) == test_right).all()


def test_the_calibrator_survives_its_json_file_exactly():
    rng = np.random.default_rng(1)
    right = rng.random(200) < 0.6
    values = _signals(200, rng, right)
    cal = fit(values, right, rng.uniform(10, 50, 200), rng.uniform(0, 60, 200), threshold_m=25,
              position=DEFAULT_RULE, fitted_on=FittedOn(0, 0, split="val"))
    back = Calibrator.from_dict(json.loads(cal.to_json()))
    np.testing.assert_array_equal(back.confidence(values), cal.confidence(values))
    assert back.radius_scale == cal.radius_scale and back.hybrid == cal.hybrid
    assert back.fitted_on == FittedOn(200, int(right.sum()), split="val") and back == cal


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d.pop("signals"), "`signals`"),
    (lambda d: d.update(signals=["top1_cosine", "psychic"]), "`signals`"),
    (lambda d: d["weights"].pop(), "`weights`"),
    (lambda d: d.update(bias=float("nan")), "`bias`"),
    (lambda d: d["std"].__setitem__(0, 0.0), "`std`"),
    (lambda d: d.update(radius_scale=-1.0), "`radius_scale`"),
])
def test_a_calibration_that_dcfeat_did_not_write_is_refused(edit, words):
    rng = np.random.default_rng(2)
    right = rng.random(50) < 0.5
    d = json.loads(fit(_signals(50, rng, right), right, np.ones(50), np.ones(50), threshold_m=25, position=DEFAULT_RULE).to_json())
    edit(d)
    with pytest.raises(ValueError, match=words):
        Calibrator.from_dict(d)


def test_fit_needs_right_and_wrong_answers():
    values = _signals(30, np.random.default_rng(3), np.ones(30, bool))
    with pytest.raises(ValueError, match="right and wrong"):
        fit(values, np.ones(30, bool), np.ones(30), np.ones(30), threshold_m=25, position=DEFAULT_RULE)


def test_the_base_radius_reaches_90_percent_of_the_top_cells_mass():
    # Sorted by distance the masses add up 0.5, 0.8, 1.0: 0.9 is reached at the cell 40 m away.
    dist = np.array([[0.0, 40.0, 20.0], [0.0, 5.0, 10.0]])
    p = np.array([[0.5, 0.2, 0.3], [0.95, 0.03, 0.02]])
    np.testing.assert_allclose(base_radius(dist, p, M=20), [40 + 10 * math.sqrt(2), 0 + 10 * math.sqrt(2)])


def test_the_radius_scale_is_the_split_conformal_quantile():
    # 19 queries: the ceil(0.9 * 20) = 18th smallest ratio true distance / base radius, here 18 / 10.
    true = np.arange(1.0, 20.0)
    right = true <= 9
    cal = fit(_signals(19, np.random.default_rng(4), right), right, np.full(19, 10.0), true, threshold_m=25, position=DEFAULT_RULE)
    assert cal.radius_scale == pytest.approx(1.8)


def test_the_margin_skips_the_neighbouring_cells():
    """Three cells in a row (20 m): the top cell, its neighbour, and one 40 m off. The margin is taken to
    the far one, though the neighbour scores second."""
    model = DCModel(3, 3, [3], head="aamc", s=10.0, m=0.2)
    with torch.no_grad():
        model.projection.linear.weight.copy_(torch.eye(3))
        model.projection.linear.bias.zero_()
        model.heads["0"].weight.copy_(torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0.6, 0, 0.8]]))
    classes = pl.DataFrame({"cell_east": [10.0, 30.0, 50.0], "cell_north": [10.0] * 3, "utm_zone": [10] * 3,
                            "utm_letter": ["S"] * 3, "group": [0, 0, 0]})
    sig = query_signals(model, np.array([[1.0, 0.0, 0.0]], np.float32), classes, M=20.0)
    assert sig.top_classes[0].tolist() == [0, 1, 2]
    assert sig.values["top1_cosine"][0] == pytest.approx(1.0)
    assert sig.values["margin"][0] == pytest.approx(1.0 - 0.6)  # not 1.0 - 0.8
    p = np.exp(10 * np.array([1.0, 0.8, 0.6]))
    p /= p.sum()
    assert sig.values["softmax_probability"][0] == pytest.approx(p[0], rel=1e-5)
    assert sig.values["group_probability"][0] == pytest.approx(p[0], rel=1e-5)  # one group: the same
    assert sig.values["entropy"][0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)
    assert sig.values["spread"][0] == pytest.approx(math.sqrt(p[1] * 400 + p[2] * 1600), rel=1e-5)


def test_the_neighbourhood_mass_stays_a_probability_where_its_sum_rounds_past_1():
    """An evaluation of a dc-paper run stopped: 4 of its 500 queries had a neighbourhood mass of 1 + 2e-16 (the
    sum of probabilities that sum to 1), which ECE refuses as no probability."""
    rng = np.random.default_rng(0)
    cos = -np.sort(-rng.uniform(0.5, 0.9, (2000, 4)), axis=1).astype(np.float32)
    assert (probabilities(cos, 30.0).sum(1) > 1).any()  # rows whose probabilities add up past 1 in float64
    n = len(cos)
    scores = QueryScores(np.tile(np.arange(4), (n, 1)), cos, np.full(n, 0.5), np.full(n, 0.5), 30.0, np.ones(n))
    classes = pl.DataFrame({"cell_east": [10.0, 30.0, 50.0, 70.0], "cell_north": [10.0] * 4, "utm_zone": [10] * 4,
                            "utm_letter": ["S"] * 4})
    mass = signals_of(scores, classes, M=20.0, rule=PositionRule(1000.0, 1.0)).values["neighbourhood_mass"]
    assert mass.max() <= 1.0 and mass.min() > 1 - 1e-12  # every cell within 1 km: all of the probability


@pytest.fixture
def uncalibrated(city_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(city_run, run)
    (run / "calibration.json").unlink()
    return run


def test_train_with_val_leaves_a_calibrated_run(city_run):
    cal = json.loads((city_run / "calibration.json").read_text())
    assert cal["fitted_on"]["split"] == "val" and cal["fitted_on"]["queries"] == 100
    assert set(cal["signals"]) == set(SIGNALS)


def test_calibrate_refits_a_run_and_refuses_its_training_split(city_store, uncalibrated):
    refused(invoke("calibrate", "--feats", city_store, "--run", uncalibrated, "--split", "train"), "bad input",
            "training split")
    assert not (uncalibrated / "calibration.json").exists()
    r = invoke("calibrate", "--feats", city_store, "--run", uncalibrated, "--split", "val")
    assert r.exit_code == 0, r.output
    assert "calibrated on 'val' (100 queries" in r.output and (uncalibrated / "calibration.json").is_file()


def test_a_damaged_calibration_is_refused_and_calibrate_replaces_it(city_store, city_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(city_run, run)
    (run / "calibration.json").write_text('{"signals": ["top1_cosine"], "mean": [0.5]}')
    refused(invoke("evaluate", "--feats", city_store, "--run", run), "damaged run", "calibration.json",
            "dcfeat calibrate")
    assert invoke("calibrate", "--feats", city_store, "--run", run).exit_code == 0
    r = invoke("evaluate", "--feats", city_store, "--run", run, "--out", tmp_path / "e")
    assert r.exit_code == 0 and "CALIBRATED ON THIS SPLIT" not in r.output, r.output
    # Calibrated on the very split it is evaluated on: only with --allow-test-split, and said.
    assert invoke("calibrate", "--feats", city_store, "--run", run, "--split", "test",
                  "--allow-test-split").exit_code == 0
    r = invoke("evaluate", "--feats", city_store, "--run", run, "--out", tmp_path / "e2")
    assert r.exit_code == 0 and "CALIBRATED ON THIS SPLIT" in r.output, r.output


def test_evaluate_reports_the_confidence_and_writes_both_plots(city_store, city_run, uncalibrated, tmp_path):
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path / "cal", plots=True)
    assert r.exit_code == 0, r.output
    assert "AUC-PR" in r.output and "90 % radius" in r.output
    report = json.loads((tmp_path / "cal" / "report.json").read_text())
    sec = report["confidence"]
    assert sec["calibrated"] and list(sec["signals"])[0] == "confidence"
    assert set(sec["signals"]) == {"confidence", *SIGNALS}
    for name in ("risk_coverage", "reliability"):
        assert (tmp_path / "cal" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["files"][name] == f"{name}.png"
    # Measured on this small city (fitted on 100 val queries, 200 test queries): ECE 0.13, true position
    # inside the 90 % radius for 95.5 % of queries.
    assert sec["signals"]["confidence"]["ece"] < 0.25
    assert 0.8 < sec["radius_90"]["inside"] <= 1.0
    r = invoke("evaluate", "--feats", city_store, "--run", uncalibrated, "--out", tmp_path / "uncal")
    assert r.exit_code == 0 and "UNCALIBRATED RUN" in r.output, r.output
    sec = json.loads((tmp_path / "uncal" / "report.json").read_text())["confidence"]
    assert not sec["calibrated"] and "confidence" not in sec["signals"]


def test_predict_writes_confidence_radius_and_abstentions(city_store, city_run, uncalibrated, tmp_path):
    out = tmp_path / "p.parquet"
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--out", out,
               "--min-confidence", 0.8)
    assert r.exit_code == 0, r.output
    frame = pl.read_parquet(out)
    first = frame.filter(pl.col("rank") == 1)
    assert first["confidence"].is_between(0, 1).all() and (first["radius_m"] > 0).all()
    assert (first["abstained"] == (first["confidence"] < 0.8)).all()
    assert 0 < first["abstained"].sum() < first.height  # both kinds occur (measured: 158 of 200 abstained)
    assert f"{first['abstained'].sum()} abstained (confidence < 0.8)" in r.output
    # Every rank row of an image carries the image's confidence.
    assert frame.group_by("image_id").agg(pl.col("confidence").n_unique())["confidence"].max() == 1
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--out", tmp_path / "p.geojson")
    doc = json.loads((tmp_path / "p.geojson").read_text())
    props = doc["features"][0]["properties"]
    assert {"confidence", "radius_m", "abstained"} <= set(props) and doc["dcfeat"]["calibrated"]
    refused(invoke("predict", "--run", uncalibrated, "--feats", city_store, "--split", "test", "--out",
                   tmp_path / "u.parquet", "--min-confidence", 0.5), "bad input", "calibrat")
    r = invoke("predict", "--run", uncalibrated, "--feats", city_store, "--split", "test", "--out", tmp_path / "u.csv")
    assert r.exit_code == 0 and "UNCALIBRATED RUN" in r.output
    assert pl.read_csv(tmp_path / "u.csv")["confidence"].null_count() == 200 * 5


@pytest.mark.parametrize("rule", ["everything falls back", "nothing falls back"])
def test_the_adaptive_hybrid_is_retrieval_or_the_hybrid_at_its_extremes(city_store, city_run, rule):
    from dcfeat.evaluate import adaptive, cell_database, hybrid, retrieve
    from dcfeat.run import load_run
    from dcfeat.store import read_split

    run = load_run(city_run)
    q, db = read_split(city_store, "test", dtype=np.float32), read_split(city_store, "test-db", dtype=np.float32)
    dev = torch.device("cpu")
    if rule == "everything falls back":
        run.calibration.hybrid = AdaptiveRule(2.0)
        searched, _ = cell_database(run, db, "projected", dev)  # the database the adaptive hybrid searches
        want = retrieve(run, q, searched, 10, dev)
        want.ref = searched.source_rows(want.ref)  # the split's rows, as the adaptive hybrid names them
    else:
        run.calibration.hybrid = AdaptiveRule(-1.0)
        want = hybrid(run, q, db, 10, None, dev)  # the gated hybrid
    got = adaptive(run, q, db, 10, 5, dev)
    np.testing.assert_array_equal(got.ref, want.ref)
    assert got.extra["fallback_share"] == (1.0 if rule == "everything falls back" else 0.0)
    assert got.extra["mean_candidates"] == (len(db.embeddings) if rule == "everything falls back"
                                            else want.extra["mean_candidates"])


def test_confidence_options_are_refused_before_anything_is_written(city_store, uncalibrated, tmp_path):
    refused(invoke("evaluate", "--feats", city_store, "--run", uncalibrated, "--database-split", "test-db", "--mode",
                   "adaptive", "--out", tmp_path / "e"), "bad input", "calibration.json", "dcfeat calibrate")
    for bad in ("1.5", "0", "nan", "-0.2"):
        r = invoke("predict", "--run", uncalibrated, "--feats", city_store, "--split", "test", "--out",
                   tmp_path / "p.parquet", "--min-confidence", bad)
        assert r.exit_code == 2 and "--min-confidence" in r.output, (bad, r.output)
    refused(invoke("calibrate", "--feats", city_store, "--run", uncalibrated, "--split", "nope"), "bad input", "nope")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and not (uncalibrated / "calibration.json").exists()


def test_a_confidence_fitted_with_retrievals_agreement_is_used_where_that_database_is(city_store, uncalibrated,
                                                                                       tmp_path):
    r = invoke("calibrate", "--feats", city_store, "--run", uncalibrated, "--database-split", "test-db")
    assert r.exit_code == 0 and "retrieval's agreement against 'test-db'" in r.output, r.output
    cal = json.loads((uncalibrated / "calibration.json").read_text())
    nested = cal["with_database"]
    assert nested["fitted_on"]["database_split"] == "test-db" and nested["signals"][-1] == "retrieval_disagreement_m"
    back = Calibrator.from_dict(cal)
    assert back.for_database("test-db") is back.with_database and back.for_database("other") is back
    r = invoke("evaluate", "--feats", city_store, "--run", uncalibrated, "--database-split", "test-db", "--out",
               tmp_path / "e")
    assert r.exit_code == 0, r.output
    sec = json.loads((tmp_path / "e" / "report.json").read_text())["confidence"]
    assert sec["uses_database"] and {"confidence", "confidence_without_database"} <= set(sec["signals"])
    r = invoke("evaluate", "--feats", city_store, "--run", uncalibrated, "--out", tmp_path / "f")  # no database
    sec = json.loads((tmp_path / "f" / "report.json").read_text())["confidence"]
    assert not sec["uses_database"] and "confidence_without_database" not in sec["signals"]
    nested["fitted_on"].pop("database_split")
    with pytest.raises(ValueError, match="with_database"):
        Calibrator.from_dict(cal)


# --- held out, or said: item 1 (test splits), D20 (a copy of the store), D21 (another threshold), D28 ----------

def test_calibrate_refuses_a_test_split_unless_allowed(city_store, city_run, tmp_path):
    """`calibrate --split test` was accepted and silently replaced calibration.json."""
    run = tmp_path / "run"
    shutil.copytree(city_run, run)
    before = (run / "calibration.json").read_bytes()
    r = invoke("calibrate", "--feats", city_store, "--run", run, "--split", "test")
    refused(r, "bad input", "--split test", "test split", "--allow-test-split")
    assert (run / "calibration.json").read_bytes() == before
    # A split this run was evaluated on is a test split too, whatever its name.
    assert invoke("evaluate", "--feats", city_store, "--run", run, "--split", "val").exit_code == 0
    r = invoke("calibrate", "--feats", city_store, "--run", run, "--split", "val")
    refused(r, "bad input", "evaluated on it", str(run / "eval" / "val" / "report.json"), "--allow-test-split")
    assert (run / "calibration.json").read_bytes() == before
    r = invoke("calibrate", "--feats", city_store, "--run", run, "--split", "test", "--allow-test-split")
    assert r.exit_code == 0 and json.loads((run / "calibration.json").read_text())["fitted_on"]["split"] == "test"


def test_calibrate_knows_the_training_split_in_a_copy_of_the_store(city_store, uncalibrated, tmp_path):
    """D20: the guard compared store paths, so a byte-identical copy of the store let the training split through."""
    copy = tmp_path / "copy"
    shutil.copytree(city_store.parent, copy)
    r = invoke("calibrate", "--feats", copy / city_store.name, "--run", uncalibrated, "--split", "train")
    refused(r, "bad input", "training split")
    assert not (uncalibrated / "calibration.json").exists()
    assert invoke("calibrate", "--feats", copy / city_store.name, "--run", uncalibrated).exit_code == 0  # val


def test_evaluate_says_when_its_threshold_is_not_the_confidences(city_store, uncalibrated, tmp_path):
    """D21: a confidence fitted at 50 m was applied at 25 m without a word."""
    assert invoke("calibrate", "--feats", city_store, "--run", uncalibrated, "--threshold", 50).exit_code == 0
    r = invoke("evaluate", "--feats", city_store, "--run", uncalibrated, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "fitted at 50 m" in r.stderr and "--threshold is 25 m" in r.stderr and "fitted at" not in r.stdout
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["threshold_m"] == 25 and report["confidence"]["threshold_m"] == 50
    assert any("fitted at 50 m" in w for w in report["warnings"])
    r = invoke("evaluate", "--feats", city_store, "--run", uncalibrated, "--threshold", 50, "--out", tmp_path / "f")
    assert r.exit_code == 0 and "fitted at" not in r.output


@pytest.fixture
def small_val(city_store, tmp_path):
    """A copy of the city store with `val-small`: 60 of val's queries."""
    from dcfeat.shards import write_split
    from dcfeat.store import read_split

    copy = tmp_path / "store"
    shutil.copytree(city_store.parent, copy)
    store = copy / city_store.name
    val = read_split(store, "val")
    write_split(store, "val-small", val.embeddings[:60], val.labels.drop("row").head(60),
                {k: val.attrs[k] for k in ("model", "model_fingerprint", "pooling", "image_size")})
    return store


def test_a_confidence_fitted_on_few_queries_is_said_on_stderr(small_val, uncalibrated, tmp_path):
    """D28: a reliability plot of 2-4 queries a bin, without a word."""
    r = invoke("calibrate", "--feats", small_val, "--run", uncalibrated, "--split", "val-small")
    assert r.exit_code == 0, r.output
    assert "only 60 held-out queries" in r.stderr and "only 60" not in r.stdout
    r = invoke("train", "--feats", small_val, "--val-split", "val-small", "--out", tmp_path / "r", *FAST_TRAIN)
    assert r.exit_code == 0 and "only 60 held-out queries" in r.stderr, r.output
    r = invoke("calibrate", "--feats", small_val, "--run", uncalibrated, "--split", "val")
    assert r.exit_code == 0 and "held-out queries" not in r.output
