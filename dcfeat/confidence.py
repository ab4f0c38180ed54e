"""Confidence: how sure a classification answer is — query-time signals, a calibrated confidence, a 90 % radius.

The answer is a position (dcfeat.positions: the probability-weighted centroid of the top cells
near the best one, under a rule fitted here with the confidence). A confidence is the
probability that the answer lies within the threshold (25 m) of where the photo was taken. It is
built from signals that the scores of every cell of every group give for free, with no database:

* ``top1_cosine``: cosine to the best cell's prototype;
* ``margin``: top-1 cosine minus the best cosine among the top-k cells that are not neighbours of
  the top-1 cell (aliasing between adjacent cells is not doubt about the place);
* ``group_probability``: the top cell's softmax probability within its own group at scale s,
  P(u, v) of D&C Eq. 4.19-4.20;
* ``softmax_probability``: softmax at scale s over every cell (`predict`'s top-1 `probability`
  under cosine scoring);
* ``entropy``: of the softmax at scale s over the top-k cells;
* ``spread``: probability-weighted RMS distance of the top-k cell centres from the top-1 centre
  (metres), as SUE weighs its retrieved images;
* ``offset_m``: metres between the position and the best cell's centre (an answer between cells);
* ``neighbourhood_mass``: the probability the top cells near the best one hold (what the position
  is weighed from).

`Calibrator` is a logistic regression on the standardised signals, fitted on a held-out split
(never the test split), stored as JSON in the run folder. The radius holding the true position with
probability 0.9 scales a base radius around the answer (the top-k cells' probability mass reaching
0.9, plus half a cell diagonal) by a split-conformal factor fitted on the same held-out split.

A calibration is fitted for one scoring of the cells (`Calibrator.scoring`; `fit` fits for cosine): its
signals, position rule and radius describe that ranking's answers. One ranking feeds an answer, its
position, its confidence and its radius, so answers ranked by another scoring (`--scoring group-softmax`)
use no calibration (`calibration_for`): they carry no confidence and no radius, their positions follow
DEFAULT_RULE, and an abstention threshold is refused (`scoring_note` says why).

The hybrid's posterior-mass gate is fitted here too: each query searches the database images of
the fewest top cells that hold a share q of the probability (at most `cap` cells), q chosen on the
held-out split against a database when one is given.

calibration.json is `Calibrator.to_json` (with its `format`, CALIBRATION_FORMAT); what it holds besides the
regression is typed records (RECORDS: `fitted_on`, `hybrid`, `position`, `gate`), each checked field by field
when read. A layout older dcfeats wrote (`hybrid` with `widen_below`/`widen_factor`, no `position`, no
`scoring`) is refused (OlderLayout): `dcfeat calibrate` fits it anew.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import polars as pl
import torch

from dcfeat.choices import SCORINGS, THRESHOLD_M
from dcfeat.database import CellDatabase, unit_rows
from dcfeat.errors import BadInput, OlderLayout, check_keys
from dcfeat.geo import Places, metres_between
from dcfeat.fusion import (DEFAULT_FUSED, FALLBACK_CELLS, FUSED_SIGNALS, Candidates, FusedRule, answers, fit_fused_rule,
                           fused_signals, photo_distances, rows_searched, search, weights)
from dcfeat.fusion import MASSES as FUSED_MASSES
from dcfeat.model import SCORE_CHUNK, DCModel, Scores
from dcfeat.partition import centres_of, filed_rows, places_of
from dcfeat.positions import DEFAULT_RULE, PositionRule, fit_position_rule, positions, probabilities
from dcfeat.retrieval import topk_cosine
from dcfeat.store import Split

SIGNALS = ("top1_cosine", "margin", "group_probability", "softmax_probability", "entropy", "spread", "offset_m",
           "neighbourhood_mass")
# Known only with a database: metres between classification's and exact retrieval's top-1 answers.
DATABASE_SIGNAL = "retrieval_disagreement_m"
PROBABILITY_SIGNALS = ("group_probability", "softmax_probability", "neighbourhood_mass")
DISTANCE_SIGNALS = ("spread", "offset_m", DATABASE_SIGNAL)
# Lower is surer for these: a ranking by confidence takes their negation.
LOWER_IS_SURER = ("entropy", "spread", "offset_m", DATABASE_SIGNAL)
TOP_K = 20
# The top cells (n, c) of the queries at an index, for the fused hybrid's fallback (`widen_by`).
Widen = Callable[[np.ndarray, int], np.ndarray]
RADIUS_COVERAGE = 0.9
# The adaptive hybrid's rule, fitted with the confidence: the least sure HYBRID_FALLBACK of val
# queries search the whole database (the others, the cells of the gate).
HYBRID_FALLBACK = 0.05
_TINY = 1e-12
# Below this many held-out queries the confidence's fit is loose and the reliability plot's 15 bins
# hold a handful of queries each: said, not refused.
FEW_QUERIES = 100


# What the model says of each query (one scoring pass, `DCModel.score`).
QueryScores = Scores


@dataclass
class QuerySignals:
    """Per query: the signals (name → (n,)), the top-k cells (n, k), the answer (a position, (n,))
    and the 90 % base radius around it (n,); the top cells' centres (n, k) and their probabilities under the
    rule (n, k) that weighed the answer."""

    values: dict[str, np.ndarray]
    top_classes: np.ndarray
    base_radius_m: np.ndarray
    answer: Places
    scores: QueryScores
    centres: Places
    weights: np.ndarray


def query_scores(model: DCModel, features, *, k: int = TOP_K, chunk: int = SCORE_CHUNK) -> QueryScores:
    """The model's top-k cells by cosine and their scores for cached features (one pass, chunk by chunk)."""
    return model.score(features, k, chunk=chunk)


def query_signals(model: DCModel, features, classes: pl.DataFrame, *, M: float, rule: PositionRule = DEFAULT_RULE,
                  k: int = TOP_K) -> QuerySignals:
    """The answers (positions under `rule`) and signals of every query (see the module docstring), at
    the model's logit scale (s of margin heads, 1 for the softmax head)."""
    return signals_of(model.score(features, k), classes, M=M, rule=rule)


def signals_of(scores: QueryScores, classes: pl.DataFrame, *, M: float, rule: PositionRule) -> QuerySignals:
    """The signals, the answers under `rule` and their base radii, from the model's scores (no model run)."""
    ids, cos_top, s = scores.top_classes, scores.cos_top, scores.logit_scale
    p = probabilities(cos_top, s)
    top = centres_of(classes, ids)
    dist = metres_between(centres_of(classes, ids[:, 0]), top) if len(ids) else np.zeros_like(cos_top)
    # Neighbours: cells whose centres lie within 1.5 cell diagonals (2.12 M) of the top one's: the
    # 8 around it and the 4 two cells away in a straight line.
    far = dist > 1.5 * M * math.sqrt(2) - 1e-6
    far[:, -1] = True  # no non-neighbour among the top k: the k-th cosine bounds the margin
    first_far = far.argmax(1)
    p_rule = probabilities(cos_top, s, rule.temperature)
    answer = positions(top, p_rule, rule.radius_m, ranks=1) if len(ids) else top
    answer = Places(answer.east[:, 0], answer.north[:, 0], answer.zone[:, 0], answer.letter[:, 0])
    from_answer = metres_between(answer, top) if len(ids) else np.zeros_like(cos_top)
    values = {
        "top1_cosine": cos_top[:, 0].astype(np.float64),
        "margin": (cos_top[:, 0] - cos_top[np.arange(len(ids)), first_far]).astype(np.float64),
        "group_probability": scores.group_top1,
        "softmax_probability": scores.softmax_top1,
        "entropy": -(p * np.log(np.clip(p, _TINY, None))).sum(1),
        "spread": np.sqrt((p * dist ** 2).sum(1)),
        "offset_m": from_answer[:, 0] if len(ids) else np.zeros(0),
        # A sum of probabilities that sum to 1 can round past 1 (1 + 2e-16), which no probability may.
        "neighbourhood_mass": np.minimum(np.where(dist <= rule.radius_m + 1e-9, p_rule, 0.0).sum(1), 1.0),
    }
    return QuerySignals(values, ids, base_radius(from_answer, p_rule, M), answer, scores, top, p_rule)


def base_radius(dist: np.ndarray, p: np.ndarray, M: float, coverage: float = RADIUS_COVERAGE) -> np.ndarray:
    """Smallest distance from the answer (`dist`: to each top cell's centre) within which the top-k cells
    hold `coverage` of their probability, plus half a cell diagonal (the photo can be anywhere in its cell)."""
    order = np.argsort(dist, axis=1, kind="stable")
    d, mass = np.take_along_axis(dist, order, 1), np.take_along_axis(p, order, 1).cumsum(1)
    reach = np.minimum((mass < coverage - 1e-9).sum(1), d.shape[1] - 1) if d.size else np.zeros(0, int)
    return (d[np.arange(len(d)), reach] if d.size else np.zeros(0)) + M * math.sqrt(2) / 2


def _features(values: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """Signals as the calibrator's inputs: probabilities as logs, distances in metres as log1p."""
    cols = []
    for name in names:
        v = np.asarray(values[name], np.float64)
        cols.append(np.log(np.clip(v, _TINY, None)) if name in PROBABILITY_SIGNALS else
                    np.log1p(v) if name in DISTANCE_SIGNALS else v)
    return np.stack(cols, axis=1) if cols else np.zeros((0, 0))


def _logistic(values: dict[str, np.ndarray], signals: tuple[str, ...], mean, std, weights, bias: float) -> np.ndarray:
    x = (_features(values, signals) - np.asarray(mean)) / np.asarray(std)
    return 1 / (1 + np.exp(-np.clip(x @ np.asarray(weights) + bias, -50, 50)))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 100) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (the intercept is not penalised)."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        prob = 1 / (1 + np.exp(-np.clip(a @ w, -50, 50)))
        grad = a.T @ (prob - y) + penalty * w
        hess = (a * (prob * (1 - prob))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[:-1], float(w[-1])


# calibration.json's format: a file without `format` is read as this one. Another dcfeat's newer format is refused.
CALIBRATION_FORMAT = 1


@dataclass(frozen=True)
class FittedOn:
    """calibration.json's `fitted_on`: the held-out split the confidence was fitted on, its query counts, and
    for the record the grids its rules were chosen on."""

    queries: int
    right: int  # queries whose answer lay within the threshold
    split: str | None = None
    plan_id: str | None = None  # the split's images (dcfeat.shards), whatever its name
    store: str | None = None
    database_split: str | None = None  # the database of the `with_database` confidence
    position_lr1: dict[str, float] | None = None  # LR@1 per position rule of the grid ("45 m, T 1")
    gate_lr1: dict[str, dict[str, float]] | None = None  # per gate mass: its `lr1` and `mean_candidates`
    fused_lr1: dict[str, float] | None = None  # LR@1 per fused rule of the grid (dcfeat.fusion.fit_fused_rule)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d) -> FittedOn:
        """From `to_dict`'s object; ValueError naming the field that is wrong."""
        check_keys(d, _names(cls), "fitted_on")
        queries, right = d.get("queries"), d.get("right")
        if not (_count(queries) and _count(right) and right <= queries):
            raise ValueError(f"`fitted_on` must count the held-out `queries` and the `right` answers among them "
                             f"(counts, right <= queries), not {queries!r} and {right!r}")
        for key in ("split", "plan_id", "store", "database_split"):
            if d.get(key) is not None and not isinstance(d[key], str):
                what = "store" if key == "store" else key.replace("_", " ")
                raise ValueError(f"`fitted_on.{key}` must name a {what}, not {d[key]!r}")
        for key in ("position_lr1", "fused_lr1"):
            grid = d.get(key)
            if grid is not None and not (isinstance(grid, dict) and all(_share(v) for v in grid.values())):
                raise ValueError(f"`fitted_on.{key}` must map {key.split('_')[0]} rules to an LR@1 from 0 to 1, not "
                                 f"{grid!r}")
        gates = d.get("gate_lr1")
        if gates is not None and not (isinstance(gates, dict) and all(
                isinstance(v, dict) and set(v) == {"lr1", "mean_candidates"} and _share(v["lr1"])
                and _finite(v["mean_candidates"]) and v["mean_candidates"] >= 0 for v in gates.values())):
            raise ValueError(f"`fitted_on.gate_lr1` must map gate masses to their `lr1` (0 to 1) and "
                             f"`mean_candidates`, not {gates!r}")
        return cls(**d)


@dataclass(frozen=True)
class AdaptiveRule:
    """calibration.json's `hybrid`: the adaptive hybrid's rule. Queries whose confidence lies below
    `fallback_below` (the HYBRID_FALLBACK quantile of the held-out split's) search the whole database."""

    fallback_below: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> AdaptiveRule:
        if isinstance(d, dict) and {"widen_below", "widen_factor"} & set(d):
            raise OlderLayout("`hybrid` holds `widen_below`/`widen_factor`, the adaptive hybrid's rule before the "
                              "gate")
        check_keys(d, _names(cls), "hybrid")
        if not (_finite(d.get("fallback_below")) and 0 <= d["fallback_below"] <= 1):
            raise ValueError(f"`hybrid.fallback_below` must be a confidence from 0 to 1, not "
                             f"{d.get('fallback_below')!r}")
        return cls(float(d["fallback_below"]))


@dataclass(frozen=True)
class Gate:
    """calibration.json's `gate`: the hybrid searches the database images of each query's fewest top cells
    that hold `mass` of the probability, at most `cap` cells."""

    mass: float
    cap: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> Gate:
        check_keys(d, _names(cls), "gate")
        mass, cap = d.get("mass"), d.get("cap")
        if not (_finite(mass) and 0 < mass <= 1):
            raise ValueError(f"`gate.mass` must be a share of the probability (0 < q <= 1), not {mass!r}")
        if not (_count(cap) and 1 <= cap <= TOP_K):
            raise ValueError(f"`gate.cap` must be a number of cells from 1 to {TOP_K}, not {cap!r}")
        return cls(float(mass), cap)


# The hybrid's gate where the calibration fitted none (no database at calibration): the cells holding
# 90 % of the probability, at most TOP_K.
DEFAULT_GATE = Gate(mass=0.9, cap=TOP_K)
GATE_MASSES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
# calibration.json's records, each a typed field of Calibrator with to_dict/from_dict (one more fitted rule:
# one more line here, and its field). `gate` alone may be null (no database to fit it on).
RECORDS = {"fitted_on": FittedOn, "hybrid": AdaptiveRule, "position": PositionRule, "gate": Gate}
OPTIONAL_RECORDS = ("gate",)


@dataclass
class Calibrator:
    """Signals → probability that the top-1 answer is right, and the 90 % radius; stored as JSON."""

    signals: tuple[str, ...]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    radius_scale: float
    threshold_m: float
    fitted_on: FittedOn
    # How answers are made: the confidence and radius describe answers made by this rule.
    position: PositionRule
    # The adaptive hybrid's rule, fitted with the confidence.
    hybrid: AdaptiveRule
    # Fitted with DATABASE_SIGNAL too, against the database split named in its `fitted_on`: used
    # where that database is searched (`dcfeat calibrate --database-split`).
    with_database: Calibrator | None = None
    # The hybrid's posterior-mass gate (None: DEFAULT_GATE).
    gate: Gate | None = None
    # The ranking of the cells whose answers it was fitted for (dcfeat.choices.SCORINGS).
    scoring: str = "cosine"
    # The fused hybrid's rule and confidence, fitted against the database split it names (dcfeat.fusion).
    fused: FusedCalibration | None = None

    @property
    def rule(self) -> PositionRule:
        """The rule the confidence was fitted for: answers must be made by it."""
        return self.position

    def confidence(self, values: dict[str, np.ndarray]) -> np.ndarray:
        return _logistic(values, self.signals, self.mean, self.std, self.weights, self.bias)

    def radius_m(self, base_radius_m: np.ndarray) -> np.ndarray:
        return self.radius_scale * np.asarray(base_radius_m)

    def to_json(self) -> str:
        """calibration.json: the calibrator's object, and the format it is written in."""
        return json.dumps({"format": CALIBRATION_FORMAT, **self.to_dict()}, indent=1)

    def to_dict(self) -> dict:
        records = {k: None if getattr(self, k) is None else getattr(self, k).to_dict() for k in RECORDS}
        nested = self.with_database.to_dict() if self.with_database is not None else None
        fused = self.fused.to_dict() if self.fused is not None else None
        return {"signals": list(self.signals), "mean": list(self.mean), "std": list(self.std),
                "weights": list(self.weights), "bias": self.bias, "radius_scale": self.radius_scale,
                "threshold_m": self.threshold_m, **records, "with_database": nested, "scoring": self.scoring,
                "fused": fused}

    def for_database(self, database_split: str | None) -> Calibrator:
        """The calibrator to use when `database_split` is searched (itself when none was fitted for it)."""
        nested = self.with_database
        if database_split is not None and nested is not None and nested.fitted_on.database_split == database_split:
            return nested
        return self

    @classmethod
    def from_dict(cls, d: dict, *, nested: bool = False, fused: bool = False) -> Calibrator:
        """Rebuilt from `to_dict`'s object (or calibration.json's, its `format` checked by the reader), every value
        checked; ValueError naming the field that is wrong, OlderLayout for a layout an older dcfeat wrote.
        `nested`: the `with_database` calibrator, the only one that may use DATABASE_SIGNAL (and must);
        `fused`: the fused hybrid's (`fused.confidence`), the only one that may use FUSED_SIGNALS."""
        where = "`with_database`: " if nested else "`fused.confidence`: " if fused else ""
        try:
            return cls._from_dict(d, nested, fused)
        except ValueError as e:
            raise type(e)(f"{where}{e}") from None

    @classmethod
    def _from_dict(cls, d: dict, nested: bool, fused: bool = False) -> Calibrator:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        for key, what in (("position", "positions"), ("scoring", "its scoring")):
            if d.get(key) is None:
                raise OlderLayout(f"`{key}` missing: a calibration written before {what} existed")
        check_keys(d, (*_names(cls), "format") if not (nested or fused) else _names(cls), "calibration")
        allowed = (*SIGNALS, DATABASE_SIGNAL) if nested else (*SIGNALS, *FUSED_SIGNALS) if fused else SIGNALS
        signals = d.get("signals")
        if not (isinstance(signals, list) and signals and all(isinstance(s, str) and s in allowed for s in signals)
                and len(set(signals)) == len(signals) and (DATABASE_SIGNAL in signals) == nested):
            only = (f", with {DATABASE_SIGNAL}" if nested else
                    f" ({DATABASE_SIGNAL} only in `with_database`, the confidence fitted with a database)")
            raise ValueError(f"`signals` must list some of {', '.join(allowed)}, each once{only}")
        n = len(signals)
        for key in ("mean", "std", "weights"):
            v = d.get(key)
            if not (isinstance(v, list) and len(v) == n and all(_finite(x) for x in v)):
                raise ValueError(f"`{key}` must hold {n} finite numbers")
        if not all(x > 0 for x in d["std"]):
            raise ValueError("`std` must be positive")
        for key in ("bias", "radius_scale", "threshold_m"):
            if not _finite(d.get(key)):
                raise ValueError(f"`{key}` must be a finite number")
        if d["radius_scale"] <= 0 or d["threshold_m"] <= 0:
            raise ValueError("`radius_scale` and `threshold_m` must be positive")
        records = {k: None if k in OPTIONAL_RECORDS and d.get(k) is None else record.from_dict(d.get(k))
                   for k, record in RECORDS.items()}
        if nested and records["fitted_on"].database_split is None:
            raise ValueError("`fitted_on.database_split` must name a split (the database it was fitted with)")
        inner = d.get("with_database")
        if inner is not None and (nested or fused):
            raise ValueError("a nested calibration cannot hold a `with_database`")
        fused_cal = FusedCalibration.from_dict(d["fused"]) if d.get("fused") is not None else None
        if fused_cal is not None and (nested or fused):
            raise ValueError("a nested calibration cannot hold `fused`")
        if d["scoring"] not in SCORINGS:
            raise ValueError(f"`scoring` must be one of {', '.join(SCORINGS)}, not {d['scoring']!r}")
        return cls(tuple(signals), d["mean"], d["std"], d["weights"], float(d["bias"]), float(d["radius_scale"]),
                   float(d["threshold_m"]), with_database=cls.from_dict(inner, nested=True) if inner is not None
                   else None, scoring=d["scoring"], fused=fused_cal, **records)


@dataclass
class FusedCalibration:
    """The fused hybrid's rule (dcfeat.fusion) and the confidence of its answers, fitted on a held-out split
    against the database split it names (and used with any database in the run's projected space)."""

    rule: FusedRule
    confidence: Calibrator
    database_split: str

    def to_dict(self) -> dict:
        return {"rule": self.rule.to_dict(), "confidence": self.confidence.to_dict(),
                "database_split": self.database_split}

    @classmethod
    def from_dict(cls, d) -> FusedCalibration:
        if not (isinstance(d, dict) and set(d) == {"rule", "confidence", "database_split"}
                and isinstance(d["database_split"], str)):
            raise ValueError("`fused` must hold `rule`, `confidence` and `database_split` (a split name)")
        return cls(FusedRule.from_dict(d["rule"]), Calibrator.from_dict(d["confidence"], fused=True),
                   d["database_split"])


def _names(record) -> tuple[str, ...]:
    return tuple(f.name for f in fields(record))


def _share(v) -> bool:
    return _finite(v) and 0 <= v <= 1


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def few_queries_warning(calibrator: Calibrator) -> str | None:
    """A warning for a confidence fitted on fewer than FEW_QUERIES held-out queries (None otherwise)."""
    n = calibrator.fitted_on.queries
    if n >= FEW_QUERIES:
        return None
    split = calibrator.fitted_on.split
    return (f"the confidence was fitted on only {n} held-out queries{f' of split {split!r}' if split else ''}: its "
            f"probabilities are loose, and the reliability plot's 15 bins hold {max(1, n // 15)}-"
            f"{max(1, -(-n // 15))} queries each (~{FEW_QUERIES} or more make it dependable). Calibrate on a larger "
            "held-out split")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fit(values: dict[str, np.ndarray], correct: np.ndarray, base_radius_m: np.ndarray, true_dist_m: np.ndarray, *,
        threshold_m: float, position: PositionRule, signals: tuple[str, ...] = SIGNALS, l2: float = 1.0,
        fitted_on: FittedOn | None = None, hybrid_fallback: float = HYBRID_FALLBACK) -> Calibrator:
    """Fit the confidence on held-out queries (`correct`: top-1 within `threshold_m`) whose answers `position`
    made, and the radius scale (split conformal: the ⌈0.9 (n + 1)⌉-th smallest ratio of true distance to
    base radius). `fitted_on`: what to record of the split; its counts are this fit's."""
    correct = np.asarray(correct, bool)
    n = len(correct)
    if n < 10 or correct.all() or not correct.any():
        raise ValueError(f"calibration needs at least 10 held-out queries with right and wrong answers; got {n} "
                         f"queries, {int(correct.sum())} right")
    x = _features(values, signals)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    weights, bias = _fit_logistic((x - mean) / std, correct.astype(np.float64), l2)
    ratio = np.sort(np.asarray(true_dist_m, np.float64) / np.asarray(base_radius_m, np.float64))
    rank = min(n, math.ceil(RADIUS_COVERAGE * (n + 1))) - 1
    scale = float(ratio[rank]) if np.isfinite(ratio[rank]) else float(np.nanmax(ratio[np.isfinite(ratio)]))
    mean, std, weights = mean.tolist(), std.tolist(), weights.tolist()
    conf = _logistic(values, tuple(signals), mean, std, weights, bias)
    counted = replace(fitted_on or FittedOn(0, 0), queries=n, right=int(correct.sum()))
    return Calibrator(tuple(signals), mean, std, weights, bias, max(scale, 1e-6), float(threshold_m), counted,
                      position, AdaptiveRule(float(np.quantile(conf, hybrid_fallback))))


def errors_m(sig: QuerySignals, places: Places) -> np.ndarray:
    """Metres between each query's answer (its position) and a point given per query."""
    return metres_between(sig.answer, places)


def disagreement_m(sig: QuerySignals, other: Places) -> np.ndarray:
    """Metres between each query's answer and another answer (retrieval's top 1); a query that other
    answer left empty counts as far away (1e9 m)."""
    return np.nan_to_num(errors_m(sig, other), nan=1e9, posinf=1e9)


def retrieval_disagreement_m(model: DCModel, sig: QuerySignals, q: torch.Tensor, db: torch.Tensor,
                             database: Split) -> np.ndarray:
    """DATABASE_SIGNAL of queries embedded as `q`: exact retrieval in the model's space against `database`
    (embedded as `db`), top 1."""
    rows = topk_cosine(q, db, 1, device=model.device)[1][:, 0]
    return disagreement_m(sig, places_of(database.labels, rows))


def gate_cells(scores: QueryScores, temperature: float, gate: Gate) -> np.ndarray:
    """Each query's top cells (n, k) cut to the fewest that hold `gate.mass` of the probability (at
    most `gate.cap`); the cells cut are -1."""
    p = probabilities(scores.cos_top, scores.logit_scale, temperature)
    held = np.cumsum(p, axis=1) - p  # the mass before each cell
    keep = (held < gate.mass - 1e-12) & (np.arange(p.shape[1]) < gate.cap)
    return np.where(keep, scores.top_classes, -1)


def filed_database(model: DCModel, classes: pl.DataFrame, M: float, database: Split, db: torch.Tensor) -> CellDatabase:
    """A database split (embedded by the model as `db`) filed under the cells in memory, as the hybrids search
    it (dcfeat.database)."""
    return CellDatabase.build(filed_rows(classes, M, database.labels, [unit_rows(db)]), num_classes=len(classes),
                              space="projected", built_for={}, device=model.device)


def fit_gate(sig: QuerySignals, queries: Split, searched: CellDatabase, q: torch.Tensor, *, threshold_m: float,
             rule: PositionRule) -> tuple[Gate, dict]:
    """The gate whose hybrid answers held-out queries best (LR@1 at the threshold; fewer database images
    searched on ties), and per mass its LR@1 and mean candidates, for the record. `q`: the queries embedded
    by the model, unit rows; `searched`: the database filed under the cells (`filed_database`)."""
    truth = places_of(queries.labels)
    grid = {}
    for mass in GATE_MASSES:
        cells = gate_cells(sig.scores, rule.temperature, Gate(mass, TOP_K))
        rows = searched.search(q, cells, 1)[1][:, 0]
        right = metres_between(truth, searched.places(rows)) <= threshold_m  # no row found: NaN, never right
        grid[mass] = (float(right.mean()), float(searched.counts_of(cells).sum(1).mean()))
    best = max(grid, key=lambda m: (grid[m][0], -grid[m][1]))
    return Gate(best, TOP_K), {f"{m:g}": {"lr1": v[0], "mean_candidates": v[1]} for m, v in grid.items()}


def fit_confidence(model: DCModel, classes: pl.DataFrame, M: float, split: Split, *, threshold_m: float,
                   store: str | None = None, database: Split | None = None) -> Calibrator:
    """Fit, on a held-out `split` with the model in hand: the position rule (dcfeat.positions), then the
    confidence (right = the position within `threshold_m`) and the radius around it; with a `database`,
    also the hybrid's gate and a second confidence that uses retrieval's agreement
    (`Calibrator.with_database`). BadInput when the split cannot be calibrated on."""
    if len(split.embeddings) == 0:
        raise BadInput(f"split '{split.name}' holds no queries to calibrate on")
    # The queries embedded once: for their scores, and with a database for the gate and retrieval's agreement.
    q = model.embed(split.embeddings)
    scores = model.score(q, TOP_K, embedded=True)
    truth = places_of(split.labels)
    rule, grid = fit_position_rule(centres_of(classes, scores.top_classes), scores.cos_top, scores.logit_scale,
                                   truth, threshold_m=threshold_m)
    sig = signals_of(scores, classes, M=M, rule=rule)
    err = errors_m(sig, truth)
    # The split's images by plan id, not by name.
    fitted_on = FittedOn(0, 0, split=split.name, plan_id=split.attrs.get("plan_id") or None, store=store,
                         position_lr1=grid)
    try:
        cal = fit(sig.values, err <= threshold_m, sig.base_radius_m, err, threshold_m=threshold_m, position=rule,
                  fitted_on=fitted_on)
        if database is not None:
            db = model.embed(database.embeddings)
            searched, unit = filed_database(model, classes, M, database, db), torch.nn.functional.normalize(q.float(), dim=1)
            cal.gate, gates = fit_gate(sig, split, searched, unit, threshold_m=threshold_m, rule=rule)
            cal.fitted_on = replace(cal.fitted_on, gate_lr1=gates)
            values = {**sig.values, DATABASE_SIGNAL: retrieval_disagreement_m(model, sig, q, db, database)}
            cal.with_database = fit(values, err <= threshold_m, sig.base_radius_m, err, threshold_m=threshold_m,
                                    position=rule, signals=(*SIGNALS, DATABASE_SIGNAL),
                                    fitted_on=replace(fitted_on, database_split=database.name))
            cal.with_database.gate = cal.gate
            try:
                fused, confidence = fit_fused(sig, cal, searched, unit, truth, widen_by(model, q), M=M,
                                              threshold_m=threshold_m)
                cal.fused = FusedCalibration(fused, confidence, database.name)
            except ValueError:  # its answers all right (or all wrong) on these queries: no confidence to fit
                cal.fused = None  # the fused hybrid answers by DEFAULT_FUSED, uncalibrated (calibrate says so)
        return cal
    except ValueError as e:
        raise BadInput(f"split '{split.name}': {e}. Calibrate on a larger held-out split") from None


def calibration_for(calibration: Calibrator | None, scoring: str) -> Calibrator | None:
    """The calibration that answers ranked by `scoring` use: the run's where it was fitted for that scoring,
    else None (they are then an uncalibrated run's: DEFAULT_RULE positions, no confidence, no radius)."""
    return calibration if calibration is not None and calibration.scoring == scoring else None


def scoring_note(calibration: Calibrator | None, scoring: str) -> str | None:
    """Why a calibrated run's answers under `scoring` carry no confidence (None where they do, or the run has
    no calibration at all)."""
    if calibration is None or calibration.scoring == scoring:
        return None
    return (f"the run's calibration was fitted for {calibration.scoring} scoring, so answers ranked by --scoring "
            f"{scoring} carry no confidence and no 90 % radius, and their positions follow the default rule. Use "
            f"--scoring {calibration.scoring} for calibrated answers")


def answer_rule(calibration: Calibrator | None) -> PositionRule:
    """How a run answers: its calibration's rule, or DEFAULT_RULE for an uncalibrated run."""
    return calibration.rule if calibration is not None else DEFAULT_RULE


@dataclass
class FusedAnswers:
    """The fused hybrid's ranked answers (n, ranks), each query's candidates and their weights, the candidate
    each rank answers, its signals (classification's and FUSED_SIGNALS), its base radius, which queries
    searched wider than their cells, and how many database rows each searched."""

    at: Places
    candidates: Candidates
    weights: np.ndarray
    index: np.ndarray
    values: dict[str, np.ndarray]
    base_radius_m: np.ndarray
    fallback: np.ndarray
    rows_searched: np.ndarray

    @property
    def first(self) -> Places:
        return Places(*(np.asarray(a)[:, 0] for a in self.at))


def fused_answers(sig: QuerySignals, confidence: np.ndarray, database, unit_queries: torch.Tensor,
                  rule: FusedRule, position: PositionRule, M: float, widen: Widen, ranks: int = 1,
                  threshold_m: float = THRESHOLD_M) -> FusedAnswers:
    """The fused hybrid's answers for queries with classification signals `sig` (under `position`) and
    `confidence` (the classification confidence, for the fallback), searching `database` (see dcfeat.fusion);
    `widen(index, c)`: the top c cells of the queries at `index` (n_index, c), for the fallback. A query whose
    cells hold no photo answers with classification's position."""
    scores = sig.scores
    p = probabilities(scores.cos_top, scores.logit_scale, position.temperature)
    cells = gate_cells(scores, position.temperature, Gate(rule.mass, TOP_K))
    fallback = np.asarray(confidence) < rule.fallback_below
    wide = widen(np.flatnonzero(fallback), rule.fallback_cells) if rule.fallback_cells and fallback.any() else None
    cand = search(database, unit_queries, cells, fallback, wide)
    w = weights(cand, scores.top_classes, p, rule)
    at, index, support = answers(cand, w, rule.radius_m, ranks, threshold_m)
    # A query no database photo answers (its cells hold none) keeps classification's position, at every rank.
    none = ~np.isfinite(np.asarray(at.east)[:, 0])
    if none.any():
        at = Places(*(np.where(none[:, None], np.asarray(b)[:, None], np.asarray(a))
                      for a, b in zip(at, sig.answer)))
    first = Places(*(np.asarray(a)[:, 0] for a in at))
    values = {**sig.values, **fused_signals(cand, w, first, support, sig.answer)}
    base = np.where(none, sig.base_radius_m, base_radius(photo_distances(cand, first), w, M))
    return FusedAnswers(at, cand, w, index, values, base, fallback, rows_searched(database, cells, fallback, wide))


def fused_for_features(model: DCModel, classes: pl.DataFrame, M: float, calibration: Calibrator | None,
                       database: CellDatabase, features, k: int) -> tuple[FusedAnswers, FusedCalibration | None]:
    """The fused hybrid's k ranked answers for cached features searching `database`, and the calibration they
    are answered by (None: DEFAULT_FUSED, no confidence of their own): what `evaluate --mode fused`, `predict`
    and `serve --database` answer. `calibration`: the run's, fitted for cosine scoring (or None). The rule
    fitted against the calibration's database split serves any database in the projected space."""
    rule = answer_rule(calibration)
    fc = calibration.fused if calibration is not None and database.space == "projected" else None
    q = model.embed(features)  # once: for the scores, the fallback's wide cells and (projected) the search
    sig = signals_of(model.score(q, TOP_K, embedded=True), classes, M=M, rule=rule)
    unit = torch.nn.functional.normalize((q if database.space == "projected" else model.embedded(features, "raw"))
                                         .float(), dim=1)
    conf = calibration.confidence(sig.values) if calibration is not None else np.ones(len(features))
    out = fused_answers(sig, conf, database, unit, fc.rule if fc else DEFAULT_FUSED, rule, M, widen_by(model, q),
                        ranks=k, threshold_m=calibration.threshold_m if calibration is not None else THRESHOLD_M)
    return out, fc


def widen_by(model: DCModel, embedded: torch.Tensor) -> Widen:
    """`fused_answers`' `widen` for queries `model` embedded: their top cells by a ranking of every cell
    (no normaliser: the ranking alone), for those that fall back only."""
    def widen(index: np.ndarray, cells: int) -> np.ndarray:
        rows = torch.as_tensor(index, dtype=torch.int64, device=embedded.device)
        return model.score(embedded[rows], cells, embedded=True, normalisers=False).top_classes
    return widen


def fit_fused(sig: QuerySignals, cal: Calibrator, database, unit_queries: torch.Tensor, truth: Places, widen: Widen,
              *, M: float, threshold_m: float) -> tuple[FusedRule, Calibrator]:
    """The fused hybrid's rule (dcfeat.fusion.fit_fused_rule) and its confidence, fitted on held-out queries
    against `database` (`cal`: the classification confidence fitted on them, whose rule answers; `widen`: as
    `fused_answers`')."""
    scores, rule = sig.scores, cal.rule
    confidence = cal.confidence(sig.values)
    p = probabilities(scores.cos_top, scores.logit_scale, rule.temperature)
    none, every = np.zeros(len(confidence), bool), np.arange(len(confidence))
    searched, counts = {}, {}
    for mass in FUSED_MASSES:
        cells = gate_cells(scores, rule.temperature, Gate(mass, TOP_K))
        searched[mass], counts[mass] = search(database, unit_queries, cells, none), rows_searched(database, cells, none)
    wide, wide_rows = {}, {}
    for c in FALLBACK_CELLS:
        cells = widen(every, c) if c else None
        nowhere = np.full((len(none), 1), -1)
        wide[c], wide_rows[c] = (search(database, unit_queries, nowhere, ~none, cells),
                                 rows_searched(database, nowhere, ~none, cells))
    fused, record = fit_fused_rule(searched, wide, confidence, scores.top_classes, p, truth,
                                   threshold_m=threshold_m, candidates_of=counts, wide_rows=wide_rows)
    out = fused_answers(sig, confidence, database, unit_queries, fused, rule, M, widen, threshold_m=threshold_m)
    err = metres_between(truth, out.first)
    fitted = fit(out.values, err <= threshold_m, out.base_radius_m, err, threshold_m=threshold_m, position=rule,
                 signals=(*SIGNALS, *FUSED_SIGNALS), fitted_on=replace(cal.fitted_on, fused_lr1=record["grid_lr1"]))
    return fused, fitted
