"""Ranking cells across groups: cosine (dcfeat's default) or each group's softmax (D&C Eq. 4.19-4.20)."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from dcfeat.heads import GroupHeads
from tests.conftest import invoke, refused


def _heads() -> GroupHeads:
    """Group 0: two prototypes 60° apart; group 1: two prototypes 10° apart (an aliased pair)."""
    heads = GroupHeads([2, 2], head="aamc", dim=2, s=10.0, m=0.2)
    deg = [[0, 60], [25, 35]]
    with torch.no_grad():
        for g, angles in enumerate(deg):
            heads[str(g)].weight.copy_(torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))]
                                                     for a in angles]))
    return heads


def test_group_softmax_prefers_the_group_that_is_sure():
    h = torch.tensor([[math.cos(math.radians(20)), math.sin(math.radians(20))]])
    heads = _heads()
    cos = heads.scores(h, "cosine")[0]
    # Cosine: group 1's first cell (5° away) beats group 0's first cell (20° away).
    assert cos.argmax().item() == 2
    log_p = heads.scores(h, "group-softmax")[0]
    p = log_p.exp()
    assert torch.allclose(p[:2].sum(), torch.tensor(1.0)) and torch.allclose(p[2:].sum(), torch.tensor(1.0))
    expected = torch.softmax(10.0 * cos.view(2, 2), dim=1).flatten()
    assert torch.allclose(p, expected, atol=1e-6)
    # Group softmax: group 0 is sure of its cell (40° margin), group 1 torn between two cells 10° apart.
    assert log_p.argmax().item() == 0


def test_unknown_scoring_is_refused():
    with pytest.raises(ValueError, match="group-softmax"):
        _heads().scores(torch.ones(1, 2), "nope")


def test_evaluate_and_predict_record_the_scoring(city_store, city_run, tmp_path):
    for scoring in ("cosine", "group-softmax"):
        out = tmp_path / scoring
        r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", out, "--database-split", "test-db",
                   "--scoring", scoring)
        assert r.exit_code == 0, r.output
        report = json.loads((out / "report.json").read_text())
        assert report["scoring"] == scoring == report["options"]["scoring"]
        assert report["methods"]["classify"]["recall"]["1"] > 0.5
        r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--k", 3, "--scoring",
                   scoring, "--out", tmp_path / f"{scoring}.parquet")
        assert r.exit_code == 0, r.output
    cos, soft = (pl.read_parquet(tmp_path / f"{s}.parquet") for s in ("cosine", "group-softmax"))
    # Group softmax: every probability is one group's own, each group's sum to 1 over its cells.
    assert ((soft["probability"] > 0) & (soft["probability"] <= 1)).all()
    top = [cos.filter(pl.col("rank") == 1)["class"].to_numpy(), soft.filter(pl.col("rank") == 1)["class"].to_numpy()]
    assert 0.5 < float(np.mean(top[0] == top[1])) <= 1.0  # mostly the same top cell, not necessarily all
    for scoring in ("cosine", "group-softmax"):
        # One ranking, one answer: evaluate's predictions.parquet and predict's table agree, rank by rank.
        evaluated = pl.read_parquet(tmp_path / scoring / "predictions.parquet")
        predicted = pl.read_parquet(tmp_path / f"{scoring}.parquet")
        assert evaluated["image_id"].to_list() == predicted.filter(pl.col("rank") == 1)["image_id"].to_list()
        for column, table in (("class", "classify_class"), ("utm_east", "classify_east"),
                              ("utm_north", "classify_north")):
            said = np.array(evaluated[table].to_list())[:, :3]
            given = predicted[column].to_numpy().reshape(-1, 3)
            assert np.allclose(said, given, atol=1e-6), (scoring, column)


def test_group_softmax_positions_do_not_collapse_onto_the_centre(city_store, city_run, tmp_path):
    """Positions weighed by the group probabilities (not softmax(s · log p), which puts all the weight on the
    best cell) gain over the cell centres at rank 1 and lose no more than a query at rank 5."""
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path, "--scoring", "group-softmax",
               "--k", "1,5")
    assert r.exit_code == 0, r.output
    methods = json.loads((tmp_path / "report.json").read_text())["methods"]
    position, centre = methods["classify"]["recall"], methods["classify-centre"]["recall"]
    assert position["1"] > centre["1"] + 0.02
    assert position["5"] >= centre["5"] - 0.005


def test_group_softmax_answers_carry_no_confidence_of_the_cosine_answer(city_store, city_run, tmp_path):
    from dcfeat.errors import BadInput
    from dcfeat.localizer import Localizer
    from dcfeat.serve import Problem, ServeConfig, request_options
    from dcfeat.store import read_split

    feats = read_split(city_store, "test", dtype=np.float32).embeddings[:20]
    cosine = Localizer.from_run(city_run, device="cpu").locate_features(feats, k=3, as_frame=True)
    assert cosine["confidence"].null_count() == 0 and cosine["radius_m"].null_count() == 0  # a calibrated run
    localizer = Localizer.from_run(city_run, device="cpu", scoring="group-softmax")
    soft = localizer.locate_features(feats, k=3, as_frame=True)
    assert soft["confidence"].null_count() == soft["radius_m"].null_count() == soft["threshold_m"].null_count() \
        == soft.height
    assert (soft["run_status"] == "complete; NO CONFIDENCE UNDER GROUP-SOFTMAX SCORING (calibration fitted for cosine "
            "scoring)").all()
    assert not localizer.calibrated and "fitted for cosine scoring" in localizer.scoring_note
    # An abstention threshold means nothing without a confidence: refused, naming the scoring.
    with pytest.raises(BadInput, match="fitted for cosine scoring.*--scoring group-softmax"):
        localizer.locate_features(feats, min_confidence=0.5)
    with pytest.raises(Problem, match="group-softmax"):
        request_options({"min_confidence": "0.5"}, localizer, ServeConfig())
    out = tmp_path / "p.parquet"
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--scoring", "group-softmax",
               "--min-confidence", "0.5", "--out", out)
    refused(r, "bad input", "group-softmax", "fitted for cosine scoring")
    assert not out.exists()
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--scoring", "group-softmax",
               "--out", out)
    assert r.exit_code == 0 and "fitted for cosine scoring" in r.stderr, r.output
    assert json.loads(pl.read_parquet_metadata(out)["dcfeat"])["calibrated"] is False
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path / "e", "--scoring",
               "group-softmax", "--k", "1")
    assert r.exit_code == 0 and "fitted for cosine scoring" in r.stderr, r.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["confidence"] is None and any("fitted for cosine scoring" in w for w in report["warnings"])


def test_a_calibration_records_its_scoring_and_one_written_before_is_refused(city_run):
    from dcfeat.confidence import Calibrator
    from dcfeat.errors import OlderLayout

    written = json.loads((city_run / "calibration.json").read_text())
    assert written["scoring"] == "cosine"
    assert Calibrator.from_dict(written).to_json() == json.dumps(written, indent=1)
    old = {k: v for k, v in written.items() if k != "scoring"}
    with pytest.raises(OlderLayout, match="`scoring` missing"):
        Calibrator.from_dict(old)
    with pytest.raises(ValueError, match="`scoring` must be one of cosine, group-softmax"):
        Calibrator.from_dict({**written, "scoring": "nope"})


@pytest.mark.parametrize("prototypes", ["normalised", "raw"])
def test_one_scoring_pass_gives_what_each_scoring_of_every_cell_gives(city_store, city_run, prototypes, monkeypatch):
    """DCModel.score's one product per chunk: its top cells under either scoring, their cosines and the top
    cell's group and global softmax probabilities are those of GroupHeads.scores' full matrices."""
    from dcfeat.run import load_run
    from dcfeat.store import read_split

    monkeypatch.setattr("dcfeat.heads.LSE_ROWS", 5)  # each chunk's normalisers in blocks of 5, 5, 5 and 1 queries

    model = load_run(city_run, "cpu").model
    model.heads.test_prototypes = prototypes
    x = read_split(city_store, "val", dtype=np.float32).embeddings[:40]
    with torch.no_grad():
        h = model.embed(x)
        cos, log_group = model.heads.scores(h, "cosine"), model.heads.scores(h, "group-softmax")
    for scoring, full in (("cosine", cos), ("group-softmax", log_group)):
        got = model.score(x, 7, scoring=scoring, chunk=16, softmax=True)  # chunks of 16, 16 and 8 queries
        top = full.topk(7, dim=1)
        assert np.array_equal(got.top_classes, top.indices.numpy())
        assert np.allclose(got.score, top.values.numpy(), atol=1e-6)
        assert np.allclose(got.cos_top, cos.gather(1, top.indices).numpy(), atol=1e-6)
        first = top.indices[:, :1]
        assert np.allclose(got.group_top1, log_group.gather(1, first)[:, 0].exp().numpy(), atol=1e-6)
        softmax = torch.softmax(model.heads.logit_scale * cos, dim=1)
        assert np.allclose(got.softmax_top1, softmax.gather(1, first)[:, 0].numpy(), atol=1e-6)
        assert np.allclose(got.softmax, softmax.gather(1, top.indices).numpy(), atol=1e-6)
    assert model.score(x[:0], 7).top_classes.shape == (0, 7)
