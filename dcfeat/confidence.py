"""Confidence: how sure a classification answer is — query-time signals, a calibrated confidence, a 90 % radius.

The answer is a position (dcfeat.positions: the probability-weighted centroid of the top cells
near the best one, under a rule fitted here with the confidence; a calibration written before
positions existed answered with the cell centre, and still does). A confidence is the
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

A calibration is fitted for one scoring of the cells (`Calibrator.scoring`; `fit` fits for cosine, and a
calibration.json written before the field existed reads as cosine): its signals, position rule and
radius describe that ranking's answers. One ranking feeds an answer, its position, its confidence and
its radius, so answers ranked by another scoring (`--scoring group-softmax`) use no calibration
(`calibration_for`): they carry no confidence and no radius, their positions follow DEFAULT_RULE, and
an abstention threshold is refused (`scoring_note` says why).

The hybrid's posterior-mass gate is fitted here too: each query searches the database images of
the fewest top cells that hold a share q of the probability (at most `cap` cells), q chosen on the
held-out split against a database when one is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import torch

from dcfeat.choices import SCORINGS
from dcfeat.errors import BadInput
from dcfeat.geo import Places, metres_between
from dcfeat.model import SCORE_CHUNK, DCModel, Scores
from dcfeat.partition import centres_of, class_keys, label_keys, places_of
from dcfeat.positions import CENTRE, DEFAULT_RULE, PositionRule, fit_position_rule, positions, probabilities
from dcfeat.retrieval import CellIndex, normalised, topk_cosine, topk_in_cells
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
        "neighbourhood_mass": np.where(dist <= rule.radius_m + 1e-9, p_rule, 0.0).sum(1),
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
    fitted_on: dict = field(default_factory=dict)
    # The adaptive hybrid: below `fallback_below` (a val quantile of the confidence) the whole database
    # is searched. Calibrations written before the gate also hold `widen_below` and `widen_factor`.
    hybrid: dict = field(default_factory=dict)
    # Fitted with DATABASE_SIGNAL too, against the database split named in its `fitted_on`: used
    # where that database is searched (`dcfeat calibrate --database-split`).
    with_database: Calibrator | None = None
    # How answers are made (None: a calibration written before positions, whose answers are cell centres).
    position: PositionRule | None = None
    # The hybrid's posterior-mass gate: {"mass": q, "cap": cells} (None: DEFAULT_GATE).
    gate: dict | None = None
    # The ranking of the cells whose answers it was fitted for (dcfeat.choices.SCORINGS); a calibration
    # written before the field existed was fitted for cosine.
    scoring: str = "cosine"

    @property
    def rule(self) -> PositionRule:
        """The rule the confidence was fitted for: answers must be made by it."""
        return self.position if self.position is not None else CENTRE

    def confidence(self, values: dict[str, np.ndarray]) -> np.ndarray:
        x = (_features(values, self.signals) - np.asarray(self.mean)) / np.asarray(self.std)
        return 1 / (1 + np.exp(-np.clip(x @ np.asarray(self.weights) + self.bias, -50, 50)))

    def radius_m(self, base_radius_m: np.ndarray) -> np.ndarray:
        return self.radius_scale * np.asarray(base_radius_m)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_dict(self) -> dict:
        nested = self.with_database.to_dict() if self.with_database is not None else None
        return {**asdict(self), "signals": list(self.signals), "with_database": nested}  # position: a plain dict

    def for_database(self, database_split: str | None) -> Calibrator:
        """The calibrator to use when `database_split` is searched (itself when none was fitted for it)."""
        nested = self.with_database
        if database_split is not None and nested is not None and nested.fitted_on.get("database_split") == database_split:
            return nested
        return self

    @classmethod
    def from_dict(cls, d: dict, *, nested: bool = False) -> Calibrator:
        """Rebuilt from `to_json`'s object, every value checked; ValueError naming the field that is wrong.
        `nested`: the `with_database` calibrator, the only one that may use DATABASE_SIGNAL (and must)."""
        where = "`with_database`: " if nested else ""
        try:
            return cls._from_dict(d, nested)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    @classmethod
    def _from_dict(cls, d: dict, nested: bool) -> Calibrator:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        allowed = (*SIGNALS, DATABASE_SIGNAL) if nested else SIGNALS
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
        fitted_on = _checked_fitted_on(d.get("fitted_on"), nested)
        hybrid = _checked_hybrid(d.get("hybrid"))
        inner = d.get("with_database")
        if inner is not None and nested:
            raise ValueError("`with_database` cannot hold another `with_database`")
        position = PositionRule.from_dict(d["position"]) if d.get("position") is not None else None
        gate = _checked_gate(d["gate"]) if d.get("gate") is not None else None
        scoring = d.get("scoring", "cosine")
        if scoring not in SCORINGS:
            raise ValueError(f"`scoring` must be one of {', '.join(SCORINGS)}, not {scoring!r}")
        return cls(tuple(signals), d["mean"], d["std"], d["weights"], float(d["bias"]), float(d["radius_scale"]),
                   float(d["threshold_m"]), fitted_on, hybrid,
                   cls.from_dict(inner, nested=True) if inner is not None else None, position, gate, scoring)


def _checked_fitted_on(fitted_on, nested: bool) -> dict:
    """calibration.json's `fitted_on`: the held-out split and its query counts (fit writes them)."""
    if not isinstance(fitted_on, dict):
        raise ValueError(f"`fitted_on` must be an object with the held-out split's `queries` and `right`, not "
                         f"{fitted_on!r}")
    queries, right = fitted_on.get("queries"), fitted_on.get("right")
    if not (_count(queries) and _count(right) and right <= queries):
        raise ValueError(f"`fitted_on` must count the held-out `queries` and the `right` answers among them "
                         f"(counts, right <= queries), not {queries!r} and {right!r}")
    for key in ("split", "store", *(("database_split",) if nested else ())):
        if (key in fitted_on or (nested and key == "database_split")) and not isinstance(fitted_on.get(key), str):
            raise ValueError(f"`fitted_on.{key}` must name a {'store' if key == 'store' else 'split'}")
    return fitted_on


HYBRID_KEYS = ("fallback_below", "widen_below", "widen_factor")  # before the gate; now only the first
MAX_WIDEN_FACTOR = 100
# The hybrid's gate where the calibration fitted none (no database at calibration): the cells holding
# 90 % of the probability, at most TOP_K.
DEFAULT_GATE = {"mass": 0.9, "cap": TOP_K}
GATE_MASSES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def _checked_gate(gate) -> dict:
    if not (isinstance(gate, dict) and set(gate) == {"mass", "cap"} and _finite(gate["mass"])
            and 0 < gate["mass"] <= 1 and _count(gate["cap"]) and 1 <= gate["cap"] <= TOP_K):
        raise ValueError(f"`gate` must hold `mass` (0 < q <= 1) and `cap` (1 to {TOP_K} cells), not {gate!r}")
    return gate


def _checked_hybrid(hybrid) -> dict:
    """calibration.json's `hybrid`: the adaptive hybrid's fallback threshold (and, written before the
    gate, the widening rule)."""
    if isinstance(hybrid, dict) and set(hybrid) == {"fallback_below"}:
        if not (_finite(hybrid["fallback_below"]) and 0 <= hybrid["fallback_below"] <= 1):
            raise ValueError(f"`hybrid.fallback_below` must be a confidence from 0 to 1, not {hybrid!r}")
        return hybrid
    if not (isinstance(hybrid, dict) and set(hybrid) == set(HYBRID_KEYS)):
        raise ValueError(f"`hybrid` must hold fallback_below (the adaptive hybrid's rule), not {hybrid!r}")
    low, wide, factor = (hybrid[k] for k in HYBRID_KEYS)
    if not (_finite(low) and _finite(wide) and 0 <= low <= wide <= 1):
        raise ValueError(f"`hybrid.fallback_below` and `hybrid.widen_below` must be confidences from 0 to 1, the "
                         f"first no higher, not {low!r} and {wide!r}")
    if not (_finite(factor) and factor == int(factor) and 1 <= factor <= MAX_WIDEN_FACTOR):
        raise ValueError(f"`hybrid.widen_factor` must be a whole number from 1 to {MAX_WIDEN_FACTOR}, not {factor!r}")
    return hybrid


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def few_queries_warning(calibrator: Calibrator) -> str | None:
    """A warning for a confidence fitted on fewer than FEW_QUERIES held-out queries (None otherwise)."""
    n = calibrator.fitted_on.get("queries", 0)
    if n >= FEW_QUERIES:
        return None
    split = calibrator.fitted_on.get("split")
    return (f"the confidence was fitted on only {n} held-out queries{f' of split {split!r}' if split else ''}: its "
            f"probabilities are loose, and the reliability plot's 15 bins hold {max(1, n // 15)}-"
            f"{max(1, -(-n // 15))} queries each (~{FEW_QUERIES} or more make it dependable). Calibrate on a larger "
            "held-out split")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fit(values: dict[str, np.ndarray], correct: np.ndarray, base_radius_m: np.ndarray, true_dist_m: np.ndarray, *,
        threshold_m: float, signals: tuple[str, ...] = SIGNALS, l2: float = 1.0, fitted_on: dict | None = None,
        hybrid_fallback: float = HYBRID_FALLBACK) -> Calibrator:
    """Fit the confidence on held-out queries (`correct`: top-1 within `threshold_m`) and the radius
    scale (split conformal: the ⌈0.9 (n + 1)⌉-th smallest ratio of true distance to base radius)."""
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
    cal = Calibrator(tuple(signals), mean.tolist(), std.tolist(), weights.tolist(), bias, max(scale, 1e-6),
                     float(threshold_m), {**(fitted_on or {}), "queries": n, "right": int(correct.sum())})
    conf = cal.confidence(values)
    cal.hybrid = {"fallback_below": float(np.quantile(conf, hybrid_fallback))}
    return cal


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


def gate_cells(scores: QueryScores, temperature: float, gate: dict) -> np.ndarray:
    """Each query's top cells (n, k) cut to the fewest that hold `gate["mass"]` of the probability (at
    most `gate["cap"]`); the cells cut are -1."""
    p = probabilities(scores.cos_top, scores.logit_scale, temperature)
    held = np.cumsum(p, axis=1) - p  # the mass before each cell
    keep = (held < gate["mass"] - 1e-12) & (np.arange(p.shape[1]) < gate["cap"])
    return np.where(keep, scores.top_classes, -1)


def fit_gate(model: DCModel, classes: pl.DataFrame, M: float, sig: QuerySignals, queries: Split, database: Split,
             q: torch.Tensor, db: torch.Tensor, *, threshold_m: float, rule: PositionRule) -> tuple[dict, dict]:
    """The gate whose hybrid answers held-out queries best (LR@1 at the threshold; fewer database images
    searched on ties), and per mass its LR@1 and mean candidates, for the record. `q`, `db`: the queries
    and the database embedded by the model."""
    device = model.device
    unit_db = normalised(db, device)
    index = CellIndex.build(class_keys(classes, M), label_keys(database.labels, M), device)
    q = torch.nn.functional.normalize(q.float(), dim=1)
    truth = places_of(queries.labels)
    grid = {}
    for mass in GATE_MASSES:
        gate = {"mass": mass, "cap": TOP_K}
        cells = gate_cells(sig.scores, rule.temperature, gate)
        rows = topk_in_cells(q, unit_db, index, cells, 1)[1][:, 0]
        found = places_of(database.labels, np.where(rows >= 0, rows, 0))
        right = np.where(rows >= 0, metres_between(truth, found) <= threshold_m, False)
        grid[mass] = (float(right.mean()), float(index.counts_of(cells).sum(1).double().mean()))
    best = max(grid, key=lambda m: (grid[m][0], -grid[m][1]))
    return {"mass": best, "cap": TOP_K}, {f"{m:g}": {"lr1": v[0], "mean_candidates": v[1]} for m, v in grid.items()}


def fit_confidence(model: DCModel, classes: pl.DataFrame, M: float, split: Split, *, threshold_m: float,
                   fitted_on: dict | None = None, database: Split | None = None) -> Calibrator:
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
    plan = {"plan_id": split.attrs["plan_id"]} if split.attrs.get("plan_id") else {}  # the images, not the name
    fitted_on = {"split": split.name, **plan, **(fitted_on or {}), "position_lr1": grid}
    try:
        cal = fit(sig.values, err <= threshold_m, sig.base_radius_m, err, threshold_m=threshold_m, fitted_on=fitted_on)
        cal.position = rule
        if database is not None:
            db = model.embed(database.embeddings)
            cal.gate, gates = fit_gate(model, classes, M, sig, split, database, q, db, threshold_m=threshold_m,
                                       rule=rule)
            cal.fitted_on["gate_lr1"] = gates
            values = {**sig.values, DATABASE_SIGNAL: retrieval_disagreement_m(model, sig, q, db, database)}
            cal.with_database = fit(values, err <= threshold_m, sig.base_radius_m, err, threshold_m=threshold_m,
                                    signals=(*SIGNALS, DATABASE_SIGNAL),
                                    fitted_on={**fitted_on, "database_split": database.name})
            cal.with_database.position, cal.with_database.gate = rule, cal.gate
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
    """How a run answers: its calibration's rule (the cell centre for one written before positions), or
    DEFAULT_RULE for an uncalibrated run."""
    return calibration.rule if calibration is not None else DEFAULT_RULE
