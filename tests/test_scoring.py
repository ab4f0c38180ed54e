"""Ranking cells across groups: cosine (dcfeat's default) or each group's softmax (D&C Eq. 4.19-4.20)."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from dcfeat.heads import GroupHeads
from tests.conftest import invoke


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
