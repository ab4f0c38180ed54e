"""The fused hybrid (dcfeat.fusion): weights, the best-supported neighbourhood, distinct ranks, its fit and its file."""

import json
import shutil

import numpy as np
import pytest

from conftest import invoke, refused
from dcfeat.confidence import Calibrator
from dcfeat.errors import OlderLayout
from dcfeat.fusion import Candidates, FusedRule, answers, fit_fused_rule, weights
from dcfeat.geo import Places


def candidates(east, north, cosine, cells=None) -> Candidates:
    east, north, cosine = (np.atleast_2d(np.asarray(a, np.float64)) for a in (east, north, cosine))
    n, r = east.shape
    cells = np.zeros((n, r), np.int64) if cells is None else np.atleast_2d(cells)
    return Candidates(cosine.astype(np.float32), np.arange(r)[None].repeat(n, 0), cells,
                      Places(east, north, np.full((n, r), 10), np.full((n, r), "S")))


def test_the_best_supported_neighbourhood_wins_over_the_single_most_similar_photo():
    # One photo 200 m away is the most similar; three photos within 10 m of each other are each a little less.
    cand = candidates([[200.0, 0.0, 5.0, 10.0]], [[0.0, 0.0, 5.0, 0.0]], [[0.90, 0.88, 0.88, 0.87]])
    w = weights(cand, np.array([[0]]), np.array([[1.0]]), FusedRule(temperature=0.05, posterior=0.0))
    at, index, support = answers(cand, w, radius_m=25.0)
    inside = w[0, 1:] / w[0, 1:].sum()
    assert at.east[0, 0] == pytest.approx((inside * [0.0, 5.0, 10.0]).sum())
    assert at.north[0, 0] == pytest.approx((inside * [0.0, 5.0, 0.0]).sum())
    assert support[0] == pytest.approx(w[0, 1:].sum()) and support[0] > w[0, 0]
    # With no neighbourhood the most similar photo answers, as the paper's hybrid does.
    at0, _, _ = answers(cand, w, radius_m=0.0)
    assert (at0.east[0, 0], at0.north[0, 0]) == pytest.approx((200.0, 0.0))


def test_the_posterior_moves_weight_to_photos_of_likely_cells():
    cand = candidates([[0.0, 100.0]], [[0.0, 0.0]], [[0.80, 0.80]], cells=[[3, 7]])
    top, p = np.array([[7, 3]]), np.array([[0.9, 0.1]])
    flat = weights(cand, top, p, FusedRule(posterior=0.0))
    assert flat[0] == pytest.approx([0.5, 0.5])
    w = weights(cand, top, p, FusedRule(posterior=1.0))
    assert w[0] == pytest.approx([0.1, 0.9])


def test_ranked_answers_are_distinct_places_and_padding_answers_nothing():
    # Two places 300 m apart (three photos and two), and a query with no candidate at all.
    east = [[0.0, 3.0, 6.0, 300.0, 303.0], [np.nan] * 5]
    cos = [[0.9, 0.9, 0.9, 0.85, 0.85], [-np.inf] * 5]
    cand = candidates(east, [[0.0] * 5, [np.nan] * 5], cos)
    cand.rows[1] = -1
    w = weights(cand, np.zeros((2, 1), np.int64), np.ones((2, 1)), FusedRule())
    at, index, _ = answers(cand, w, radius_m=25.0, ranks=3)
    assert abs(at.east[0, 0] - 3.0) < 1e-9 and at.east[0, 1] in (300.0, 303.0)
    assert at.east[0, 2] == 0.0  # no third place: the most similar photo not answered yet
    at, _, _ = answers(cand, w, radius_m=25.0, ranks=7)  # as many ranks as candidates at most
    assert at.east.shape == (2, 5) and np.isfinite(at.east[0]).all() and len(set(at.east[0, 1:])) == 4
    assert np.isnan(at.east[1]).all() and not w[1].any()



@pytest.mark.parametrize("wide_right", [True, False])
def test_the_fit_falls_back_to_the_cheapest_scope_that_is_as_right(wide_right):
    # Ten queries; their cells' photos stand 500 m from the truth for the three least confident. Their top 256
    # cells (1,000 rows) hold a right photo or not; every photo (a million rows) does.
    n, truth = 10, Places(np.zeros(10), np.zeros(10), np.full(10, 10), np.full(10, "S"))
    confidence = np.linspace(0.1, 0.9, n)
    wrong = np.arange(n) < 3
    cells = candidates(np.where(wrong, 500.0, 0.0)[:, None], np.zeros((n, 1)), np.full((n, 1), 0.9))
    near = candidates(np.where(wrong & ~wide_right, 500.0, 0.0)[:, None], np.zeros((n, 1)), np.full((n, 1), 0.9))
    everywhere = candidates(np.zeros((n, 1)), np.zeros((n, 1)), np.full((n, 1), 0.9))
    top, p = np.zeros((n, 1), np.int64), np.ones((n, 1))
    rule, record = fit_fused_rule({0.9: cells}, {256: near, 0: everywhere}, confidence, top, p, truth, threshold_m=25.0,
                                  candidates_of={0.9: np.full(n, 100)},
                                  wide_rows={256: np.full(n, 1000), 0: np.full(n, 1_000_000)})
    assert record["lr1"] == 1.0 and record["fallback_share"] == 0.3
    assert rule.fallback_cells == (256 if wide_right else 0)
    assert confidence[2] < rule.fallback_below < confidence[3]
    assert FusedRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="fallback_cells"):
        FusedRule.from_dict({**rule.to_dict(), "fallback_cells": 2.5})

@pytest.fixture(scope="module")
def fused_run(city_run, city_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("fused") / "run"
    shutil.copytree(city_run, run)
    r = invoke("calibrate", "--feats", city_store, "--run", run, "--split", "val", "--database-split", "test-db")
    assert r.exit_code == 0, r.output
    return run


def test_the_fused_answer_beats_both_signals_on_the_small_city(fused_run, city_store, tmp_path):
    r = invoke("evaluate", "--feats", city_store, "--run", fused_run, "--split", "test", "--database-split",
               "test-db", "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    lr = {m: v["recall"] for m, v in report["methods"].items()}
    # Measured: 73.0 against 65.5 (position) and 60.0 (retrieval) on 200 queries.
    assert lr["fused"]["1"] >= max(lr["classify"]["1"], lr["retrieve"]["1"]) + 0.03
    assert all(lr["fused"][k] >= lr["hybrid"][k] for k in lr["hybrid"])
    assert report["methods"]["fused"]["fitted_against"] == "test-db" and "confidence" in report["methods"]["fused"]


def test_the_fused_calibration_round_trips_and_names_a_bad_field(fused_run):
    d = json.loads((fused_run / "calibration.json").read_text())
    cal = Calibrator.from_dict(d)
    assert cal.fused is not None and cal.fused.database_split == "test-db"
    assert Calibrator.from_dict(json.loads(cal.to_json())) == cal
    d["fused"]["rule"]["temperature"] = -1
    with pytest.raises(ValueError, match="fused.rule"):
        Calibrator.from_dict(d)
    del d["fused"]["rule"]["fallback_cells"]  # a rule written before the fallback could search top cells
    with pytest.raises(OlderLayout, match="fallback_cells"):
        Calibrator.from_dict(d)


def test_predict_and_the_localizer_answer_with_a_database_as_evaluate_does(fused_run, city_store, tmp_path):
    import polars as pl

    from dcfeat.localizer import Localizer
    from dcfeat.store import read_split

    db = tmp_path / "db"
    assert invoke("index", "--run", fused_run, "--feats", city_store, "--split", "test-db", "--out", db).exit_code == 0
    r = invoke("evaluate", "--feats", city_store, "--run", fused_run, "--split", "test", "--database", db, "--mode",
               "fused", "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    lr1 = json.loads((tmp_path / "eval" / "report.json").read_text())["methods"]["fused"]["recall"]["1"]
    out = tmp_path / "p.parquet"
    r = invoke("predict", "--run", fused_run, "--feats", city_store, "--split", "test", "--database", db, "--out", out)
    assert r.exit_code == 0, r.output
    first = pl.read_parquet(out).filter(pl.col("rank") == 1)
    assert (first["error_m"] <= 25).mean() == pytest.approx(lr1)
    assert first["confidence"].is_not_null().all() and first["database_image"].is_not_null().all()
    # The Localizer (serve's core) gives the same answers from the same features.
    test = read_split(city_store, "test", dtype=np.float32)
    answers_ = Localizer.from_run(fused_run, device="cpu", database=db).locate_features(test.embeddings[:5], k=3)
    assert [a.utm_east for a in answers_] == pytest.approx(first["utm_east"][:5].to_list())
    assert all(len(a.top_k) == 3 and a.top_k[0]["database_image"] for a in answers_)
    # More answers than candidate photos: as many as there are, and predict says why.
    r = invoke("predict", "--run", fused_run, "--feats", city_store, "--split", "test", "--database", db, "--out", out,
               "--k", "100")
    assert r.exit_code == 0 and "32 fused-hybrid answers each (it weighs 32 candidate photos at most)" in r.output
    # The service answers descriptors with the same answers, each rank naming its database photo.
    from fastapi.testclient import TestClient

    from dcfeat.serve import ServeConfig, create_app

    localizer = Localizer.from_run(fused_run, device="cpu", database=db)
    with TestClient(create_app(localizer, ServeConfig(max_wait_ms=1))) as client:
        got = client.post("/v1/locate", json={"descriptors": test.embeddings[:2].tolist(), "k": 2})
    assert got.status_code == 200, got.text
    served = got.json()["answers"]
    assert [a["utm"]["east"] for a in served] == pytest.approx(first["utm_east"][:2].to_list())
    assert all(len(a["top_k"]) == 2 and a["top_k"][0]["database_image"] for a in served)


def test_a_database_under_group_softmax_scoring_is_refused_and_writes_nothing(fused_run, city_store, tmp_path):
    db = tmp_path / "db"
    assert invoke("index", "--run", fused_run, "--feats", city_store, "--split", "test-db", "--out", db).exit_code == 0
    r = invoke("predict", "--run", fused_run, "--feats", city_store, "--split", "test", "--database", db, "--out",
               tmp_path / "p.parquet", "--scoring", "group-softmax")
    refused(r, "bad input", "--scoring group-softmax", "cosine")
    assert not (tmp_path / "p.parquet").exists()


def test_answers_improve_where_photos_are_added_to_the_database(fused_run, city_store, tmp_path):
    import polars as pl

    db = tmp_path / "db"
    # A thin database first (the 100 val photos), then the database split's 1,320 photos added to their cells.
    assert invoke("index", "--run", fused_run, "--feats", city_store, "--split", "val", "--out", db).exit_code == 0

    def right() -> float:
        out = tmp_path / "p.parquet"
        r = invoke("predict", "--run", fused_run, "--feats", city_store, "--split", "test", "--database", db, "--out",
                   out)
        assert r.exit_code == 0, r.output
        return float((pl.read_parquet(out).filter(pl.col("rank") == 1)["error_m"] <= 25).mean())

    thin = right()
    r = invoke("index", "--run", fused_run, "--feats", city_store, "--split", "test-db", "--out", db, "--add")
    assert r.exit_code == 0, r.output
    # Measured: 0.46 with the val photos alone, 0.735 after the append.
    assert right() >= thin + 0.2


def test_a_fused_confidence_that_cannot_be_fitted_leaves_the_rest_calibrated_and_says_so(city_run, city_store,
                                                                                          tmp_path, monkeypatch):
    import dcfeat.confidence
    from dcfeat.calibrate import calibrate_files

    def all_right(*args, **kwargs):  # what fit raises when every held-out answer is right
        raise ValueError("calibration needs at least 10 held-out queries with right and wrong answers")

    run = tmp_path / "run"
    shutil.copytree(city_run, run)
    monkeypatch.setattr(dcfeat.confidence, "fit_fused", all_right)
    result = calibrate_files(city_store, run, "val", device="cpu", database_split="test-db")
    assert result.calibrator.fused is None and result.calibrator.with_database is not None
    assert any("fused hybrid" in w and "uncalibrated" in w for w in result.warnings)
