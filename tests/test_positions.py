"""Positions from the top cells: exact centroids on hand-made cells, across a UTM zone boundary too; ranked
answers that stay distinct."""

import numpy as np
import pytest
import utm
from hypothesis import given, settings
from hypothesis import strategies as st

from dcfeat.metrics import localisation_recall
from dcfeat.geo import Places
from dcfeat.positions import (CENTRE, RADII_M, SPREAD_M, PositionRule, answer, fit_position_rule, positions,
                              probabilities, ranked)


def row(east, north=(0.0, 0.0, 0.0), zone=10, letter="S") -> Places:
    k = len(east)
    return Places(np.array([east], float) + 500_000, np.array([north], float)[:, :k] + 4_000_000,
                  np.full((1, k), zone), np.full((1, k), letter))


def test_the_centroid_weighs_the_cells_within_the_radius():
    top = row([10.0, 30.0, 50.0])
    p = np.array([[0.5, 0.3, 0.2]])
    at = positions(top, p, radius_m=25.0)
    assert at.east[0] - 500_000 == pytest.approx([(0.5 * 10 + 0.3 * 30) / 0.8, 24.0, (0.3 * 30 + 0.2 * 50) / 0.5])
    assert at.north[0] == pytest.approx([4_000_000] * 3)
    assert positions(top, p, radius_m=0.0).east[0] - 500_000 == pytest.approx([10, 30, 50])  # the paper's centres
    assert positions(top, p, radius_m=1e9, ranks=1).east[0, 0] - 500_000 == pytest.approx(5 + 9 + 10)


def test_a_neighbour_across_a_zone_boundary_is_weighed_in_the_best_cells_zone():
    # Two cells 20 m apart across lon -120 (zone 10 | 11), the best one in zone 10.
    e10, n10, *_ = utm.from_latlon(37.0, -120.0001, force_zone_number=10)
    e11, n11, *_ = utm.from_latlon(37.0, -119.9999, force_zone_number=11)
    top = Places(np.array([[e10, e11]]), np.array([[n10, n11]]), np.array([[10, 11]]), np.array([["S", "S"]]))
    at = positions(top, np.array([[0.75, 0.25]]), radius_m=50.0, ranks=1)
    e11_in_10, n11_in_10, *_ = utm.from_latlon(37.0, -119.9999, force_zone_number=10)
    assert (at.zone[0, 0], at.letter[0, 0]) == (10, "S")
    assert at.east[0, 0] == pytest.approx(0.75 * e10 + 0.25 * e11_in_10, abs=1e-3)
    assert at.north[0, 0] == pytest.approx(0.75 * n10 + 0.25 * n11_in_10, abs=1e-3)
    assert np.hypot(e11_in_10 - e10, n11_in_10 - n10) == pytest.approx(17.8, abs=0.5)  # neighbours indeed
    # Ranked: rank 2 is the zone-11 cell's centre, given on the best cell's plane (zone 10).
    at, index = ranked(at, top, np.array([[0.75, 0.25]]), 2)
    assert index.tolist() == [[0, 1]] and at.zone.tolist() == [[10, 10]] and at.letter.tolist() == [["S", "S"]]
    assert (at.east[0, 1], at.north[0, 1]) == pytest.approx((e11_in_10, n11_in_10), abs=1e-3)


def test_ranked_answers_stay_distinct_where_centroids_collapse():
    # Two neighbours 20 m apart nearly as likely, a far cell unlikely: every centroid within 45 m of
    # either neighbour is the same point, so the old ranks 1 and 2 coincided 9.5 m east of the best
    # cell and missed a photo 20 m west of it, which the centres' list hits. Ranked, rank 2 is the best
    # cell's centre (the side of its probability the position left uncovered), then the neighbour.
    top = row([0.0, 20.0, 200.0])
    p = np.array([[0.5, 0.45, 0.05]])
    collapsed = positions(top, p, radius_m=45.0)
    assert collapsed.east[0, 0] == collapsed.east[0, 1] == pytest.approx(500_000 + 0.45 * 20 / 0.95)
    at, index = ranked(positions(top, p, radius_m=45.0, ranks=1), top, p, 3)
    assert at.east[0] - 500_000 == pytest.approx([0.45 * 20 / 0.95, 0.0, 20.0]) and index.tolist() == [[0, 0, 1]]
    truth = [np.array([500_000.0 - 20]), np.array([4_000_000.0]), np.array([10]), np.array(["S"])]

    def lr2(a):
        return localisation_recall(*truth[:2], truth[2], a.east[:, :2], a.north[:, :2], a.zone[:, :2],
                                   q_letter=truth[3], p_letter=a.letter[:, :2], ks=(1, 2)).recall
    assert lr2(top) == {1: 1.0, 2: 1.0} and lr2(collapsed) == {1: 0.0, 2: 0.0} and lr2(at) == {1: 0.0, 2: 1.0}
    # The paper's rule (radius 0): the position is the best centre, answered once; the others follow.
    centre, index = answer(top, np.array([[0.9, 0.8, 0.5]]), 10.0, CENTRE)
    assert centre.east[0] - 500_000 == pytest.approx([0.0, 20.0, 200.0]) and index.tolist() == [[0, 1, 2]]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.sampled_from(RADII_M), st.booleans())
def test_ranked_answers_are_the_position_then_distinct_centres(seed, k, radius, apart):
    """What `ranked` guarantees for any top-k cells: rank 1 is the position; ranks 2.. are distinct
    candidate centres, none at the position. Where the candidates lie farther apart than the radius plus
    the threshold plus SPREAD_M (no answer's reach touches another candidate's probability), the answers
    are the centres' list with the best centre as the position: LR@k equals the centres' for every k and
    any truth."""
    rng = np.random.default_rng(seed)
    step = 20.0 if not apart else radius + 25.0 + SPREAD_M + 1.0
    cells = rng.choice(np.arange(-6, 7), size=(2, 49), replace=True)  # a 13 × 13 block of cells around the best
    cells = np.unique(cells.T, axis=0)[:k]
    k = len(cells)
    n = 1
    top = Places(500_000 + step * cells[None, :, 0], 4_000_000 + step * cells[None, :, 1], np.full((n, k), 10),
                 np.full((n, k), "S"))
    scores = -np.sort(-rng.random((n, k)))
    at, index = answer(top, scores, 30.0, PositionRule(radius, 2.0))
    rule_p = probabilities(scores, 30.0, 2.0)
    first = positions(top, rule_p, radius, ranks=1)
    assert (at.east[:, 0], at.north[:, 0]) == (first.east[:, 0], first.north[:, 0])
    assert len(set(index[0, 1:])) == k - 1 and index[0, 0] == 0
    assert at.east[0, 1:] == pytest.approx(top.east[0, index[0, 1:]]) and at.north[0, 1:] == pytest.approx(
        top.north[0, index[0, 1:]])
    points = np.stack([at.east[0], at.north[0]], 1)
    assert (np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1)) + np.eye(k) > 1e-6).all()
    if apart:
        truth = (500_000 + rng.uniform(-7, 7, 50) * step, 4_000_000 + rng.uniform(-7, 7, 50) * step)
        ks = tuple(range(1, k + 1))

        def lr(a):
            return localisation_recall(*truth, 10, np.repeat(a.east, 50, 0), np.repeat(a.north, 50, 0), 10,
                                       ks=ks).recall
        assert index.tolist() == [list(range(k))] and lr(at) == lr(top)


def test_probabilities_are_a_softmax_at_scale_over_temperature():
    p = probabilities(np.array([[0.9, 0.8, 0.5]]), logit_scale=10.0, temperature=2.0)
    e = np.exp(5.0 * np.array([0.9, 0.8, 0.5]))
    assert p[0] == pytest.approx(e / e.sum())
    assert answer(row([10.0, 30.0, 50.0]), np.array([[0.9, 0.8, 0.5]]), 10.0, CENTRE)[0].east[0, 0] == 500_010


def test_the_fitted_rule_is_the_one_that_answers_best_on_held_out_queries():
    # Every query's best two cells are neighbours with equal scores, the truth between them: a
    # centroid is right, a centre is 10 m off; at a 5 m threshold only a radius > 0 wins.
    n = 20
    top = Places(np.tile([[500_010.0, 500_030.0, 500_090.0]], (n, 1)), np.full((n, 3), 4_000_010.0),
                 np.full((n, 3), 10), np.full((n, 3), "S"))
    scores = np.tile([[0.8, 0.8, 0.1]], (n, 1))
    truth = Places(np.full(n, 500_020.0), np.full(n, 4_000_010.0), np.full(n, 10), np.full(n, "S"))
    rule, grid = fit_position_rule(top, scores, 30.0, truth, threshold_m=5.0)
    assert rule == PositionRule(30.0, 0.5) and grid["30 m, T 0.5"] == 1.0 and grid["0 m, T 1"] == 0.0
    at_centres = Places(truth.east - 10, truth.north, truth.zone, truth.letter)
    rule, _ = fit_position_rule(top, scores, 30.0, at_centres, threshold_m=5.0)
    assert rule == CENTRE  # the truth at the best cell's centre: no radius pays


@pytest.mark.parametrize("bad", [{"radius_m": -1, "temperature": 1}, {"radius_m": 30, "temperature": 0},
                                 {"radius_m": "x", "temperature": 1}, {"radius_m": float("nan"), "temperature": 1},
                                 []])
def test_a_damaged_rule_is_refused(bad):
    with pytest.raises(ValueError):
        PositionRule.from_dict(bad)
    assert PositionRule.from_dict(PositionRule(45.0, 2.0).to_dict()) == PositionRule(45.0, 2.0)


def test_predict_writes_the_position_and_the_top_cell_beside_it(city_run, city_store, tmp_path):
    import json
    import shutil

    import polars as pl

    from dcfeat.predict import predict_files
    from dcfeat.run import load_run

    rule = load_run(city_run).calibration.rule
    frame = predict_files(city_run, tmp_path / "p.parquet", feats=city_store, split="test", k=3, device="cpu").frame
    first = frame.filter(pl.col("rank") == 1)
    offset = np.hypot(first["utm_east"] - first["cell_east"], first["utm_north"] - first["cell_north"]).to_numpy()
    assert (offset <= rule.radius_m + 1e-6).all() and (offset > 0).any() == (rule.radius_m > 0)
    assert {"class", "cell_east", "cell_north", "lat", "lon", "utm_zone"} <= set(frame.columns)
    # A calibration whose rule is the cell centre answers with the centre, exactly.
    run = tmp_path / "centre"
    shutil.copytree(city_run, run)
    cal = json.loads((run / "calibration.json").read_text())
    cal["position"] = {"radius_m": 0.0, "temperature": 1.0}
    (run / "calibration.json").write_text(json.dumps(cal))
    frame = predict_files(run, tmp_path / "q.parquet", feats=city_store, split="test", k=3, device="cpu").frame
    assert frame["utm_east"].to_list() == frame["cell_east"].to_list()


def test_evaluate_reports_the_position_beside_the_paper_cell_centre(city_run, city_store, tmp_path):
    from dcfeat.evaluate import evaluate
    from dcfeat.run import load_run
    from dcfeat.store import read_split

    run = load_run(city_run)
    report = evaluate(run, read_split(city_store, "test", dtype=np.float32), ks=(1, 5), repeats=1).report
    assert list(report["methods"]) == ["classify", "classify-centre"]
    assert report["methods"]["classify"]["position"] == run.calibration.rule.to_dict()
    assert report["confidence"]["answer"].startswith("classification's position")


def test_the_gate_keeps_the_fewest_top_cells_holding_its_share_of_the_probability():
    from dcfeat.confidence import Gate, QueryScores, gate_cells

    # Probabilities at s = 1, T = 1 from log-probabilities: 0.5, 0.3, 0.15, 0.05 (and 0.6/0.4 for the second).
    p = np.array([[0.5, 0.3, 0.15, 0.05], [0.6, 0.4, 1e-9, 1e-9]])
    scores = QueryScores(np.array([[7, 3, 9, 1], [2, 5, 8, 4]]), np.log(p), np.zeros(2), np.zeros(2), 1.0, np.zeros(2))
    assert gate_cells(scores, 1.0, Gate(0.8, 20)).tolist() == [[7, 3, -1, -1], [2, 5, -1, -1]]
    assert gate_cells(scores, 1.0, Gate(0.9, 20)).tolist() == [[7, 3, 9, -1], [2, 5, -1, -1]]
    assert gate_cells(scores, 1.0, Gate(0.5, 20)).tolist() == [[7, -1, -1, -1], [2, -1, -1, -1]]
    assert gate_cells(scores, 1.0, Gate(1.0, 2)).tolist() == [[7, 3, -1, -1], [2, 5, -1, -1]]  # the cap


def test_the_rule_and_gate_travel_with_the_calibration(city_run):
    import json

    from dcfeat.confidence import Calibrator
    from dcfeat.run import load_run

    cal = load_run(city_run).calibration
    assert cal.position is not None and cal.rule == cal.position  # fitted at training's end, on val
    back = Calibrator.from_dict(json.loads(cal.to_json()))
    assert back.position == cal.position and back.gate == cal.gate and back.to_dict() == cal.to_dict()


def test_ranks_past_the_window_follow_the_candidates_order(monkeypatch):
    import dcfeat.positions

    # Five cells in a row 100 m apart, the third the likeliest after the best: within a window of 3
    # candidates the coverage rule answers the third before the second; past it, the rest in order.
    top = row([0.0, 100.0, 200.0, 300.0, 400.0], north=[0.0] * 5)
    p = np.array([[0.4, 0.1, 0.3, 0.15, 0.05]])
    first = positions(top, p, radius_m=45.0, ranks=1)
    assert ranked(first, top, p, 5)[1].tolist() == [[0, 2, 3, 1, 4]]
    monkeypatch.setattr(dcfeat.positions, "WINDOW", 3)
    at, index = ranked(first, top, p, 5)
    assert index.tolist() == [[0, 2, 1, 3, 4]] and at.east[0] - 500_000 == pytest.approx([0, 200, 100, 300, 400])
