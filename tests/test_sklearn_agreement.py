"""dcfeat's own metrics and logistic calibrator against scikit-learn's, on random data with ties.

dcfeat computes these in numpy so that it needs no scikit-learn; the tests do (the `test` extra
installs it), and skip where it is missing.
"""

import numpy as np
import pytest

from dcfeat.confidence import _fit_logistic
from dcfeat.metrics import auroc, average_precision, brier

# Measured over 200 random cases (1-2000 queries, 1-50 distinct score levels or continuous scores):
# at most 3.3e-16 apart for AUC-PR, 2.2e-16 for AUROC, 0 for Brier; the rest is summation order.
METRIC_ATOL = 1e-12
# Measured over 80 fits (20 data sets × l2 in 0.01, 0.1, 1, 10): weights and bias at most 2.5e-7 from
# lbfgs at tol 1e-12, which is lbfgs's own precision; Newton's method converges far below it.
LOGISTIC_ATOL = 1e-5


@pytest.fixture(scope="module")
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics")


def _ranking_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores on a few levels (many ties, right and wrong answers sharing a score) or continuous."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 2000))
    if seed % 3 == 2:
        scores = rng.normal(size=n)
        correct = rng.random(n) < 0.3
    else:
        levels = int(rng.integers(2, 30))
        scores = rng.integers(0, levels, n) / levels
        correct = rng.random(n) < scores
    correct[:2] = [True, False]  # both classes, or the metrics are NaN
    return scores, correct


@pytest.mark.parametrize("seed", range(12))
def test_average_precision_is_sklearns(sklearn_metrics, seed):
    scores, correct = _ranking_case(seed)
    want = sklearn_metrics.average_precision_score(correct, scores)
    assert average_precision(scores, correct) == pytest.approx(want, abs=METRIC_ATOL)


@pytest.mark.parametrize("seed", range(12))
def test_auroc_is_sklearns(sklearn_metrics, seed):
    scores, correct = _ranking_case(seed)
    want = sklearn_metrics.roc_auc_score(correct, scores)
    assert auroc(scores, correct) == pytest.approx(want, abs=METRIC_ATOL)


def test_ties_matter_and_are_counted_as_sklearn_does(sklearn_metrics):
    # All ties broken in the right answers' favour would give AP 1 and AUROC 1; a shared score does not.
    scores = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.1])
    correct = np.array([1, 0, 1, 1, 0, 0], bool)
    assert average_precision(scores, correct) == pytest.approx(
        sklearn_metrics.average_precision_score(correct, scores), abs=METRIC_ATOL)
    assert auroc(scores, correct) == pytest.approx(sklearn_metrics.roc_auc_score(correct, scores), abs=METRIC_ATOL)
    assert auroc(scores, correct) < 1 and average_precision(scores, correct) < 1


@pytest.mark.parametrize("seed", range(6))
def test_brier_is_sklearns(sklearn_metrics, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 1000))
    confidence = np.round(rng.random(n), 2)  # ties, and 0 and 1 themselves
    correct = rng.random(n) < confidence
    want = sklearn_metrics.brier_score_loss(correct, confidence)
    assert brier(confidence, correct) == pytest.approx(want, abs=METRIC_ATOL)


def _logistic_case(seed: int, n: int = 400, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Features of unequal scales and non-zero means, labels from a logistic model with an intercept."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    y = rng.random(n) < 1 / (1 + np.exp(-(x @ rng.normal(size=d) + 0.5)))
    return x, y.astype(np.float64)


@pytest.mark.parametrize("l2", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("seed", range(3))
def test_logistic_calibrator_is_sklearns_l2_logistic_regression(seed, l2):
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = _logistic_case(seed)
    w, b = _fit_logistic(x, y, l2)
    # sklearn minimises C·Σ log-loss + ||w||²/2, i.e. Σ log-loss + l2·||w||²/2 with C = 1/l2; lbfgs leaves
    # the intercept unpenalised, as dcfeat does.
    sk = linear_model.LogisticRegression(C=1 / l2, fit_intercept=True, solver="lbfgs", tol=1e-12,
                                         max_iter=100_000).fit(x, y)
    assert np.allclose(w, sk.coef_[0], rtol=0, atol=LOGISTIC_ATOL), (w, sk.coef_[0])
    assert b == pytest.approx(sk.intercept_[0], abs=LOGISTIC_ATOL)


def test_logistic_calibrator_leaves_the_intercept_unpenalised_under_a_huge_penalty():
    # The weights go to 0; the bias alone is then the log-odds of the base rate, as if it had no penalty.
    x, y = _logistic_case(7)
    w, b = _fit_logistic(x, y, l2=1e9)
    assert np.abs(w).max() < 1e-6
    assert b == pytest.approx(np.log(y.mean() / (1 - y.mean())), abs=1e-6)
