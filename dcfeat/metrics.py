"""Localisation metrics: distances between positions, then recall at k.

The two steps stay apart (as in faiss ``contrib/evaluation.py``): deciding
which predictions are correct (``correct_at_k``) knows nothing of k, and
``recall_at_k`` knows nothing of metres. Everything here is pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dcfeat.geo import is_northern, utm_to_latlon

# Mean Earth radius (IUGG R1). The spherical error against the ellipsoid is
# below 0.5 %, far under the 25 m threshold at city scale.
EARTH_RADIUS_M = 6_371_008.8

# Recall is reported at these k, and a prediction within THRESHOLD_M metres is right (the VPR literature's).
DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
THRESHOLD_M = 25.0


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres between points given in degrees (broadcasts)."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    dphi = phi2 - phi1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(dlmb / 2) ** 2
    # clip: rounding can push `a` a hair above 1 for antipodal points.
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _northern(letter: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if letter is None:
        return np.ones(shape, dtype=bool)
    return np.broadcast_to(is_northern(letter), shape)


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
    q_lat: np.ndarray | None = None,
    q_lon: np.ndarray | None = None,
    p_lat: np.ndarray | None = None,
    p_lon: np.ndarray | None = None,
) -> np.ndarray:
    """Metres between each query (n,) and its predictions, shape (n,) or (n, k).

    Pairs in the same UTM zone (and hemisphere) use the planar Euclidean
    distance, which is what the 25 m threshold of the VPR literature means.
    Pairs across zones have no common plane, so they use the great-circle
    distance, from the given lat/lon or else converted from UTM. Letters only
    decide the hemisphere; without them every point counts as northern.
    Zones, letters and lat/lon may be scalars or broadcast like the points.
    A prediction with non-finite coordinates (padding) gets distance inf.
    """
    p_east = np.asarray(p_east, dtype=np.float64)
    shape = p_east.shape
    if len(shape) not in (1, 2) or np.shape(q_east) != shape[:1]:
        raise ValueError(
            f"queries must have shape (n,) and predictions (n,) or (n, k); got {np.shape(q_east)} and {shape}"
        )

    def per_query(x: np.ndarray | int | str | None) -> np.ndarray | None:
        # Query-side arrays are (n,): add a column axis so they meet (n, k).
        if x is None:
            return None
        x = np.asarray(x)
        return np.broadcast_to(x[:, None] if x.ndim == 1 and len(shape) == 2 else x, shape)

    def per_pred(x: np.ndarray | int | str | None) -> np.ndarray | None:
        return None if x is None else np.broadcast_to(np.asarray(x), shape)

    qe, qn = per_query(np.asarray(q_east, dtype=np.float64)), per_query(np.asarray(q_north, dtype=np.float64))
    pn = per_pred(np.asarray(p_north, dtype=np.float64))
    qz, pz = per_query(q_zone), per_pred(p_zone)
    q_hemi = _northern(per_query(q_letter), shape)
    p_hemi = _northern(per_pred(p_letter), shape)

    out = np.hypot(p_east - qe, pn - qn)
    # A missing prediction (NaN/inf coordinates, whatever its zone says) is
    # infinitely far: never correct, and never handed to the UTM conversion.
    missing = ~np.isfinite(out)
    out[missing] = np.inf
    cross = ((qz != pz) | (q_hemi != p_hemi)) & ~missing
    if not cross.any():
        return out

    if q_lat is None or q_lon is None:
        la, lo = utm_to_latlon(qe[cross], qn[cross], qz[cross], q_hemi[cross])
    else:
        la, lo = per_query(q_lat)[cross], per_query(q_lon)[cross]
    if p_lat is None or p_lon is None:
        lb, lob = utm_to_latlon(p_east[cross], pn[cross], pz[cross], p_hemi[cross])
    else:
        lb, lob = per_pred(p_lat)[cross], per_pred(p_lon)[cross]
    out[cross] = haversine_m(la, lo, lb, lob)
    return out


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
