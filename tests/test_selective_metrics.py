"""Selective-prediction metrics on hand-made cases with exact answers (worked in the comments)."""

import json
import math

import numpy as np
import pytest

from dcfeat.metrics import (
    accuracy_at_coverage,
    auroc,
    average_precision,
    brier,
    ece,
    reliability_bins,
    risk_coverage,
    selective_report,
)

TIED_SCORES = np.array([0.9, 0.8, 0.8, 0.3])


def test_average_precision_with_a_tie():
    # 2 right. Threshold 0.9: P 1/1, R 1/2. Threshold 0.8 takes both 0.8s at once:
    # P 2/3, R 2/2. Threshold 0.3: R unchanged. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision(TIED_SCORES, np.array([1, 0, 1, 0], bool)) == pytest.approx(5 / 6)
    # Same, the tie now holding right before wrong in query order: still 5/6, since a
    # tie is one threshold. Taking queries one by one would give 1/2 * 1 + 1/2 * 2/2 = 1.
    assert average_precision(TIED_SCORES, np.array([1, 1, 0, 0], bool)) == pytest.approx(5 / 6)


def test_average_precision_is_the_step_sum_not_interpolated():
    # Ranked: wrong, right, wrong, right, right (3 right). Steps at ranks 2, 4, 5:
    # P 1/2, 2/4, 3/5, each with R +1/3. AP = (1/2 + 1/2 + 3/5) / 3 = 8/15.
    # (Interpolated precision would give (3/5 + 3/5 + 3/5) / 3 = 3/5.)
    scores, correct = np.array([5, 4, 3, 2, 1.0]), np.array([0, 1, 0, 1, 1], bool)
    assert average_precision(scores, correct) == pytest.approx(8 / 15)


def test_average_precision_perfect_and_degenerate():
    assert average_precision(np.array([0.9, 0.7, 0.4, 0.1]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert average_precision(np.array([0.9, 0.7]), np.array([1, 1], bool)) == 1.0
    assert math.isnan(average_precision(np.array([0.9, 0.7]), np.array([0, 0], bool)))


def test_auroc_counts_a_tie_as_half():
    # Right {0.9, 0.8}, wrong {0.8, 0.3}: pairs 0.9>0.8, 0.9>0.3, 0.8=0.8 (1/2), 0.8>0.3.
    # AUROC = 3.5 / 4 = 0.875.
    assert auroc(TIED_SCORES, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.875)
    # Constant scores: every pair is a tie.
    assert auroc(np.full(6, 0.4), np.array([1, 0, 1, 1, 0, 0], bool)) == pytest.approx(0.5)
    assert auroc(np.array([3, 2, 1.0]), np.array([1, 1, 0], bool)) == 1.0
    assert auroc(np.array([3, 2, 1.0]), np.array([0, 1, 1], bool)) == 0.0


def test_auroc_is_nan_without_both_classes():
    assert math.isnan(auroc(np.array([0.2, 0.9]), np.array([1, 1], bool)))
    assert math.isnan(auroc(np.array([0.2, 0.9]), np.array([0, 0], bool)))


def _thirty_queries() -> tuple[np.ndarray, np.ndarray]:
    """15 pairs: pair b has confidence 0.6 + 0.025 b; both right for even b, one of two for odd b."""
    confidence = np.repeat(0.6 + 0.025 * np.arange(15), 2)
    correct = np.tile([1, 1, 1, 0], 8)[:30].astype(bool)
    # Shuffled: the bins must come from sorting by confidence, not from query order.
    order = np.random.default_rng(0).permutation(30)
    return confidence[order], correct[order]


def test_ece_thirty_queries_fifteen_bins():
    # Equal-count bins hold one pair each. Even b (8 bins): |c_b - 1| = 0.40, 0.35, ..., 0.05,
    # sum 1.8. Odd b (7 bins): |c_b - 0.5| = 0.125, 0.175, ..., 0.425, sum 1.925.
    # Each bin weighs 2/30: ECE = 3.725 / 15 = 149/600.
    # (Equal-width bins of 1/15 would merge pairs and give less.)
    confidence, correct = _thirty_queries()
    assert ece(confidence, correct) == pytest.approx(149 / 600)


def test_ece_weighs_bins_by_size():
    # 5 queries, 2 bins of sizes 3 and 2 (array_split). Bin 1: conf 0.2, right 1/3, gap 2/15.
    # Bin 2: conf 0.85, right 1, gap 0.15. ECE = 3/5 * 2/15 + 2/5 * 0.15 = 0.08 + 0.06 = 0.14.
    confidence, correct = np.array([0.9, 0.1, 0.8, 0.3, 0.2]), np.array([1, 0, 1, 1, 0], bool)
    assert ece(confidence, correct, bins=2) == pytest.approx(0.14)
    b = reliability_bins(confidence, correct, bins=2)
    np.testing.assert_allclose(b["confidence"], [0.2, 0.85])
    np.testing.assert_allclose(b["accuracy"], [1 / 3, 1.0])
    assert b["count"].tolist() == [3, 2]


def test_ece_zero_when_every_bin_is_calibrated():
    # Pairs of 0.0 (both wrong), 0.5 (one right, one wrong: the stable sort keeps
    # the alternation) and 1.0 (both right): every bin's gap is 0.
    confidence = np.repeat([0.0, 0.5, 1.0], 10)
    correct = np.concatenate([np.zeros(10), np.tile([1, 0], 5), np.ones(10)]).astype(bool)
    assert ece(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_with_fewer_queries_than_bins_puts_one_query_per_bin():
    # Gaps 0.1, 0.2, 0.6, each weighing 1/3: ECE 0.3.
    confidence, correct = np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0], bool)
    assert ece(confidence, correct) == pytest.approx(0.3)
    assert reliability_bins(confidence, correct)["count"].tolist() == [1, 1, 1]


def test_brier():
    # (0.9 - 1)^2 + (0.2 - 0)^2 + (0.6 - 0)^2 = 0.01 + 0.04 + 0.36 = 0.41, over 3.
    assert brier(np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0], bool)) == pytest.approx(0.41 / 3)


def test_accuracy_at_coverage_rounds_up():
    # Ranked by score, the outcomes are 1 1 1 1 1 1 1 0 1 0 (N = 10), shuffled in query order.
    ranked = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1, 0], bool)
    order = np.random.default_rng(1).permutation(10)
    scores, correct = (10.0 - np.arange(10))[order], ranked[order]
    assert accuracy_at_coverage(scores, correct, 0.75) == pytest.approx(7 / 8)  # ceil 7.5 = 8 queries
    assert accuracy_at_coverage(scores, correct, 0.85) == pytest.approx(8 / 9)  # ceil 8.5 = 9
    assert accuracy_at_coverage(scores, correct, 0.7) == 1.0  # exactly 7
    assert accuracy_at_coverage(scores, correct, 1.0) == pytest.approx(0.8)


def test_accuracy_at_coverage_survives_rounding_error():
    # 0.55 * 100 is 55.00000000000001 in floating point; the top 55 (all right) must be kept, not 56.
    correct = np.arange(100) < 55
    assert accuracy_at_coverage(100.0 - np.arange(100), correct, 0.55) == 1.0


def test_accuracy_at_coverage_breaks_ties_by_query_order():
    # Coverage 1/2 keeps 2: the 1.0, then the earlier of the two 0.5s (wrong).
    scores, correct = np.array([1.0, 0.5, 0.5, 0.0]), np.array([1, 0, 1, 0], bool)
    assert accuracy_at_coverage(scores, correct, 0.5) == 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="coverage"):
            accuracy_at_coverage(scores, correct, bad)


def test_risk_coverage():
    # By score: 0.9 (right), 0.7 (right), 0.5 (wrong), 0.2 (wrong).
    coverage, accuracy = risk_coverage(np.array([0.2, 0.9, 0.5, 0.7]), np.array([0, 1, 0, 1], bool))
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy, [1.0, 1.0, 2 / 3, 0.5])


def test_selective_report():
    correct = np.array([1, 0, 1, 0], bool)
    signals = {"cosine": TIED_SCORES, "probability": np.array([0.9, 0.2, 0.6, 0.4])}
    report = selective_report(signals, correct, probabilities=["probability"])
    assert set(report) == {"cosine", "probability"}
    cosine, probability = report["cosine"], report["probability"]
    assert set(cosine) == {"auc_pr", "auroc", "lr1_at_coverage", "ece", "brier"}
    assert cosine["ece"] is None and cosine["brier"] is None
    assert cosine["auc_pr"] == pytest.approx(5 / 6) and cosine["auroc"] == pytest.approx(0.875)
    # Coverage 0.5, 0.75, 0.9 keep 2, 3, 4 queries: 1 wrong in the first 2, then the right 0.8.
    assert cosine["lr1_at_coverage"] == pytest.approx({"50": 0.5, "75": 2 / 3, "90": 0.5})
    # Probability ranks right, wrong as 0.9, 0.6 | 0.4, 0.2: perfect. Brier (0.01 + 0.04 + 0.16 + 0.16) / 4.
    assert probability["auroc"] == 1.0
    assert probability["brier"] == pytest.approx(0.37 / 4)
    # One query per bin (4 < 15): gaps 0.1, 0.2, 0.4, 0.4, mean 0.275.
    assert probability["ece"] == pytest.approx(0.275)
    json.dumps(report, allow_nan=False)


def test_selective_report_turns_nan_into_none():
    report = selective_report({"p": np.array([0.9, 0.8])}, np.array([1, 1], bool), probabilities=["p"])
    assert report["p"]["auroc"] is None and report["p"]["auc_pr"] == 1.0
    with pytest.raises(ValueError, match="not given"):
        selective_report({"p": np.array([0.9])}, np.array([True]), probabilities=["calibrated"])


def test_no_queries():
    empty, none = np.array([]), np.array([], bool)
    for f in (average_precision, auroc, ece, brier):
        assert math.isnan(f(empty, none))
    assert math.isnan(accuracy_at_coverage(empty, none, 0.5))
    assert all(a.size == 0 for a in risk_coverage(empty, none))
    assert all(a.size == 0 for a in reliability_bins(empty, none).values())


def test_input_errors():
    correct = np.array([1, 0, 1], bool)
    with pytest.raises(ValueError, match="one entry per query"):
        auroc(np.array([0.1, 0.2]), correct)
    with pytest.raises(ValueError, match="one entry per query"):
        average_precision(np.ones((3, 1)), correct)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            risk_coverage(np.array([0.1, bad, 0.3]), correct)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier(np.array([0.1, 1.2, 0.3]), correct)
    with pytest.raises(ValueError, match="bool"):
        ece(np.array([0.1, 0.2, 0.3]), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="bins"):
        ece(np.array([0.1, 0.2, 0.3]), correct, bins=0)

