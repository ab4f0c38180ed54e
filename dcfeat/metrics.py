"""How good answers are: localisation recall, and how well a confidence sorts right answers from wrong.

Localisation: distances between positions, then recall at k. The two steps
stay apart (as in faiss ``contrib/evaluation.py``): deciding which predictions
are correct (``correct_at_k``) knows nothing of k, and ``recall_at_k`` knows
nothing of metres.

Selective prediction (the second half of the module): a VPR answer is only
usable with a measure of when to trust it. These functions judge such a
measure against what actually happened: ``correct`` says, per query, whether
the top-1 answer lies within the threshold (``correct_at_k`` on the top-1
distance). Two kinds of signal are judged, and the functions say which they take:

* ``scores``: any real number where higher means more sure (a cosine, a
  margin, a negative spread). Only their order matters: AUC-PR and AUROC
  (does the signal rank right answers above wrong ones?), and LR@1 among the
  most confident queries when the rest are set aside (risk-coverage).
* ``confidence``: a probability in [0, 1] that the answer is right. Its value
  matters too: ECE and the reliability bins (do answers given 0.8 come out
  right 80 % of the time?) and the Brier score.

In this half, no queries give NaN (or empty arrays), as a class that is absent
does for the metrics that need both classes; the localisation functions refuse
them. Everything here is pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dcfeat.choices import DEFAULT_KS, THRESHOLD_M
from dcfeat.geo import Places, metres_between


def distances_m(
    q_east: np.ndarray,
    q_north: np.ndarray,
    q_zone: np.ndarray | int,
    p_east: np.ndarray,
    p_north: np.ndarray,
    p_zone: np.ndarray | int,
    *,
    q_letter: np.ndarray | str | None = None,
    p_letter: np.ndarray | str | None = None,
) -> np.ndarray:
    """Metres between each query (n,) and its predictions, shape (n,) or (n, k): `geo.metres_between` on
    flat arrays (the planar distance on the query's UTM plane, predictions of other zones re-expressed
    there). Letters only decide the hemisphere; without them every point counts as northern. Zones and
    letters may be scalars or broadcast like the points. A prediction with non-finite coordinates
    (padding) gets distance inf.
    """
    return metres_between(
        Places(q_east, q_north, q_zone, True if q_letter is None else q_letter),
        Places(p_east, p_north, p_zone, True if p_letter is None else p_letter),
    )


def correct_at_k(dist: np.ndarray, threshold_m: float = THRESHOLD_M) -> np.ndarray:
    """Whether each prediction lies within ``threshold_m`` metres, shape of ``dist``.

    Inclusive (``<=``): a prediction exactly 25.0 m away counts, matching the
    "within 25 m" wording of the VPR benchmarks. NaN and inf (padding for
    missing predictions) are never correct.
    """
    return np.asarray(dist) <= threshold_m


def recall_at_k(hits: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction (0..1) of queries with at least one hit among their first k columns.

    ``hits`` is (n, K) bool, ranked best first. A k above K uses all K columns,
    so LR@20 of a method that ranks only 10 candidates is its LR@10.
    """
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[0] == 0:
        raise ValueError(f"hits must have shape (n_queries > 0, K); got {hits.shape}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1; got {list(ks)}")
    n, width = hits.shape
    if width == 0:
        return {int(k): 0.0 for k in ks}
    found = np.logical_or.accumulate(hits, axis=1)
    return {int(k): float(found[:, min(k, width) - 1].sum() / n) for k in ks}


def error_stats(dist_top1: np.ndarray) -> dict[str, float]:
    """Median and mean top-1 error in metres (an inf from a missing prediction makes the mean inf)."""
    dist_top1 = np.asarray(dist_top1, dtype=np.float64)
    if dist_top1.size == 0:
        raise ValueError("no errors to summarise")
    return {"median_m": float(np.median(dist_top1)), "mean_m": float(np.mean(dist_top1))}


@dataclass(frozen=True)
class LocalisationRecall:
    """Result of ``localisation_recall``: recall per k plus the raw distances."""

    recall: dict[int, float]
    distances_m: np.ndarray  # (n, k), best prediction first
    correct: np.ndarray  # (n, k) bool
    median_m: float
    mean_m: float


def localisation_recall(
    q_east: np.ndarray,
    q_north: np.ndarray,
    q_zone: np.ndarray | int,
    p_east: np.ndarray,
    p_north: np.ndarray,
    p_zone: np.ndarray | int,
    *,
    threshold_m: float = THRESHOLD_M,
    ks: Sequence[int] = DEFAULT_KS,
    q_letter: np.ndarray | str | None = None,
    p_letter: np.ndarray | str | None = None,
) -> LocalisationRecall:
    """LR@k of ranked predicted positions (n, k) against true positions (n,)."""
    dist = distances_m(
        q_east, q_north, q_zone, p_east, p_north, p_zone, q_letter=q_letter, p_letter=p_letter
    )
    dist = dist[:, None] if dist.ndim == 1 else dist
    if dist.shape[1] == 0:
        raise ValueError("need at least one predicted position per query")
    correct = correct_at_k(dist, threshold_m)
    stats = error_stats(dist[:, 0])
    return LocalisationRecall(
        recall=recall_at_k(correct, ks),
        distances_m=dist,
        correct=correct,
        median_m=stats["median_m"],
        mean_m=stats["mean_m"],
    )


# Selective prediction: how well a confidence sorts right answers from wrong ones.

# Equal-count bins for ECE, as STUN reports it (equal-width bins leave most empty when confidences cluster).
ECE_BINS = 15
COVERAGES: tuple[float, ...] = (0.5, 0.75, 0.9)


def _as_inputs(values: np.ndarray, correct: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """1-D float64 values and bool correct of one length; values finite."""
    values = np.asarray(values, dtype=np.float64)
    correct = np.asarray(correct)
    if values.ndim != 1 or correct.ndim != 1 or values.size != correct.size:
        raise ValueError(f"{what} and correct must be 1-D with one entry per query; got shapes "
                         f"{values.shape} and {correct.shape}")
    if correct.dtype != bool:
        if not np.isin(correct, (0, 1)).all():
            raise ValueError("correct must be bool (or 0/1): whether each top-1 answer is within the threshold")
        correct = correct.astype(bool)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} must be finite; {int((~np.isfinite(values)).sum())} of {values.size} are not")
    return values, correct


def _as_probabilities(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    confidence, correct = _as_inputs(confidence, correct, "confidence")
    if confidence.size and (confidence.min() < 0 or confidence.max() > 1):
        raise ValueError(f"confidence must be a probability in [0, 1]; got values in "
                         f"[{confidence.min():g}, {confidence.max():g}] (a raw score belongs in `scores`)")
    return confidence, correct


def average_precision(scores: np.ndarray, correct: np.ndarray) -> float:
    """AUC-PR of right-vs-wrong as average precision: sum of (R_n - R_{n-1}) P_n.

    Thresholds run down the distinct scores, so queries with equal scores are
    accepted together (as sklearn's ``average_precision_score``). NaN when no
    answer is right: recall is undefined.
    """
    scores, correct = _as_inputs(scores, correct, "scores")
    positives = int(correct.sum())
    if positives == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], correct[order]
    # The last query of each run of equal scores closes one threshold.
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(tp, prepend=0) / positives
    return float(np.sum(recall_step * precision))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n in ascending order, equal values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    s = values[order]
    starts = np.flatnonzero(np.insert(s[1:] != s[:-1], 0, True))
    ends = np.append(starts[1:], s.size)
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def auroc(scores: np.ndarray, correct: np.ndarray) -> float:
    """Chance that a right answer outscores a wrong one (Mann-Whitney), a tie counting 1/2.

    NaN when all answers are right or all wrong.
    """
    scores, correct = _as_inputs(scores, correct, "scores")
    n_pos = int(correct.sum())
    n_neg = correct.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _average_ranks(scores)[correct].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Mean confidence, fraction right and size of each equal-count confidence bin.

    Queries are sorted by confidence (stable: equal confidences keep their
    order) and split into ``bins`` groups whose sizes differ by at most one
    (``numpy.array_split``). With fewer queries than bins each query is a bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    confidence, correct = _as_probabilities(confidence, correct)
    order = np.argsort(confidence, kind="stable")
    groups = np.array_split(order, min(bins, confidence.size)) if confidence.size else []
    return {
        "confidence": np.array([confidence[g].mean() for g in groups]),
        "accuracy": np.array([correct[g].mean() for g in groups]),
        "count": np.array([g.size for g in groups], dtype=np.int64),
    }


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (n_b / N) |mean confidence_b - fraction right_b|.

    Bins as in ``reliability_bins`` (equal-count, 15 by default).
    """
    b = reliability_bins(confidence, correct, bins)
    n = b["count"].sum()
    if n == 0:
        return math.nan
    return float(np.sum(b["count"] / n * np.abs(b["confidence"] - b["accuracy"])))


def brier(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Mean squared gap between confidence and outcome (1 right, 0 wrong)."""
    confidence, correct = _as_probabilities(confidence, correct)
    if confidence.size == 0:
        return math.nan
    return float(np.mean((confidence - correct) ** 2))


def _most_confident_first(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """``correct`` reordered by decreasing score; equal scores keep query order."""
    scores, correct = _as_inputs(scores, correct, "scores")
    return correct[np.argsort(-scores, kind="stable")]


def accuracy_at_coverage(scores: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """LR@1 among the ceil(coverage * N) highest-scoring queries, the rest abstained on.

    Ties at the cut go to the earlier queries (a stable sort on -score), so
    the answer is reproducible but depends on query order when scores tie.
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage}")
    hits = _most_confident_first(scores, correct)
    # Rounded first: 0.55 * 100 is 55.00000000000001 in floating point, and must keep 55 queries, not 56.
    k = math.ceil(round(coverage * hits.size, 6))
    return float(hits[:k].mean()) if k else math.nan


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/N and LR@1 among the k most confident queries, for k = 1..N.

    The same order as ``accuracy_at_coverage``; the last point is the overall LR@1.
    """
    hits = _most_confident_first(scores, correct)
    k = np.arange(1, hits.size + 1)
    return k / hits.size, np.cumsum(hits) / k


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def coverage_key(coverage: float) -> str:
    """Report key of a coverage: 0.75 -> "75"."""
    return f"{100 * coverage:.6g}"


def selective_report(
    signals: dict[str, np.ndarray],
    correct: np.ndarray,
    probabilities: Iterable[str],
    coverages: Iterable[float] = COVERAGES,
) -> dict[str, dict]:
    """Per signal: AUC-PR, AUROC, LR@1 at each coverage, and for probabilities ECE and Brier.

    ``probabilities`` names the signals that are probabilities in [0, 1]; the
    others get None for ``ece`` and ``brier``, since a raw score has no
    calibration to measure. NaN (e.g. AUROC when every answer is right)
    becomes None, so the result goes straight into ``report.json``.
    """
    probabilities = set(probabilities)
    unknown = probabilities - signals.keys()
    if unknown:
        raise ValueError(f"probabilities name signals that are not given: {sorted(unknown)}; "
                         f"signals are {sorted(signals)}")
    coverages = tuple(coverages)
    report = {}
    for name, values in signals.items():
        is_probability = name in probabilities
        report[name] = {
            "auc_pr": _json_float(average_precision(values, correct)),
            "auroc": _json_float(auroc(values, correct)),
            "lr1_at_coverage": {
                coverage_key(c): _json_float(accuracy_at_coverage(values, correct, c)) for c in coverages
            },
            "ece": _json_float(ece(values, correct)) if is_probability else None,
            "brier": _json_float(brier(values, correct)) if is_probability else None,
        }
    return report
