"""The fused hybrid: one answer from both signals, classification's cell posterior and the database photos' similarity.

D&C's hybrid searches the database photos of the query's top cells and answers with the nearest one,
throwing away what classification knew. Here each candidate photo (the `CANDIDATES` most similar in
the candidate cells: the fewest top cells holding a share `mass` of the probability) is weighed by a
softmax of its cosine at `temperature`, times its cell's posterior to the power `posterior`:

    w_j ∝ exp(cos_j / temperature) · P(cell_j) ** posterior

(a photo whose cell is not one of the query's top cells has the posterior floor FLOOR). The answer is
the weighted centroid of the best-supported neighbourhood: of every candidate, the one whose
`radius_m` disc holds the most weight; the centroid of the candidates in that disc. It is the position
rule of dcfeat.positions with photos, whose places are exact, in place of cell centres. Ranked answers
stay distinct the same way (`positions.ranked`): each next rank is the candidate photo that covers the
most weight not yet within the threshold of an answer above it.

Queries whose classification confidence is below `fallback_below` search wider than their cells (classification
cannot say where they are: a city with few class cells sends most of its queries there, a dense one
few): the photos of their top `fallback_cells` cells by classification's score, or (0) every photo.
On a dense database the wide cells are the cheaper by far (a query of a 1.25 M-photo city reads ~6,000
rows of its top 64 cells instead of every row, as right on its val split within 0.1 point), and where
there are few classes they are every photo anyway.

The rule is fitted on a held-out split against a database (`fit_fused_rule`: the grid's best LR@1 at
the threshold, then the fewest rows searched within FALLBACK_TOLERANCE of it), with its own confidence
(`fused_signals`: classification's signals and the support of the answer's neighbourhood).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dcfeat.choices import THRESHOLD_M
from dcfeat.database import CellDatabase
from dcfeat.errors import OlderLayout
from dcfeat.geo import Places, best_zone, metres_between, on_plane

# Candidate photos weighed per query: the most similar of its candidate cells (or of the database).
CANDIDATES = 32
# The posterior of a candidate photo whose cell is not among the query's top cells.
FLOOR = 1e-6
# Searched on the held-out split.
TEMPERATURES = (0.03, 0.05, 0.1)
POSTERIOR_WEIGHTS = (0.0, 0.5, 1.0)
RADII_M = (25.0, 40.0, 60.0)
MASSES = (0.7, 0.9, 0.99)
# Shares of the held-out queries, least confident first, that search wider than their cells.
FALLBACK_SHARES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
# Where they search: their top cells by classification's score, so many; or (0) every photo.
FALLBACK_CELLS = (64, 256, 0)
# LR@1 on the held-out split given up for fewer rows searched (a whole-database search costs its size).
FALLBACK_TOLERANCE = 0.005
# Signals of the fused answer's confidence (besides classification's): the share of the weight in the
# answer's neighbourhood, the best candidate's cosine, and metres from classification's position.
FUSED_SIGNALS = ("fused_support", "fused_cosine", "fused_offset_m")


@dataclass(frozen=True)
class FusedRule:
    """How the fused answer weighs candidate photos (see the module docstring)."""

    temperature: float = 0.05
    posterior: float = 0.0
    radius_m: float = 40.0
    mass: float = 0.99
    # Confidence below which a query searches wider than its cells (0: never; above 1: always) ...
    fallback_below: float = 0.0
    # ... among the photos of its top `fallback_cells` cells by classification's score, or (0) every photo.
    fallback_cells: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FusedRule:
        """From `to_dict`'s object; ValueError naming what is wrong, OlderLayout for a rule an older dcfeat wrote."""
        fields = list(asdict(cls()))
        if isinstance(d, dict) and set(d) == set(fields) - {"fallback_cells"}:
            raise OlderLayout("`fused.rule` has no `fallback_cells`: written before the fallback could search a "
                              "query's top cells")
        if not isinstance(d, dict) or set(d) != set(fields):
            raise ValueError(f"`fused.rule` must hold {', '.join(fields)}, not {d!r}")
        for name, v in d.items():
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"`fused.rule.{name}` must be a finite number, not {v!r}")
        if d["temperature"] <= 0 or d["posterior"] < 0 or d["radius_m"] < 0 or not 0 < d["mass"] <= 1:
            raise ValueError("`fused.rule` needs temperature > 0, posterior >= 0, radius_m >= 0 and 0 < mass <= 1")
        if d["fallback_cells"] < 0 or d["fallback_cells"] != int(d["fallback_cells"]):
            raise ValueError(f"`fused.rule.fallback_cells` must be a whole number of cells >= 0, not {d['fallback_cells']!r}")
        return cls(**{k: int(v) if k == "fallback_cells" else float(v) for k, v in d.items()})


# The rule of a run calibrated without a database: what most of the synthetic cities' val splits chose
# (BENCHMARKS.md, "The fused hybrid"; five of the six fits took posterior 0, irregular 0.5), with no fallback.
DEFAULT_FUSED = FusedRule()


@dataclass
class Candidates:
    """Each query's candidate photos (n, R), most similar first: their cosines (-inf past the candidates),
    database rows (-1 there), the class their cell belongs to, and their places (NaN there)."""

    cosine: np.ndarray
    rows: np.ndarray
    cells: np.ndarray
    places: Places


def weights(candidates: Candidates, top_classes: np.ndarray, p: np.ndarray, rule: FusedRule) -> np.ndarray:
    """Each candidate photo's weight (n, R), summing to 1 per query (0 past the candidates): a softmax of its
    cosine at the rule's temperature times its cell's posterior (p over the query's top cells) to the
    rule's power."""
    cells = candidates.cells
    post = np.zeros(cells.shape)
    for j in range(top_classes.shape[1]):  # k columns; (n, R, k) at once would be large
        post += np.where(cells == top_classes[:, j:j + 1], p[:, j:j + 1], 0.0)
    valid = candidates.rows >= 0
    logw = np.where(valid, candidates.cosine.astype(np.float64) / rule.temperature
                    + rule.posterior * np.log(np.maximum(post, FLOOR)), -np.inf)
    top = np.max(logw, axis=1, keepdims=True) if logw.size else logw
    w = np.where(valid, np.exp(logw - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


def _plane(candidates: Candidates) -> tuple[np.ndarray, np.ndarray, Places]:
    """The candidates' east and north on the plane of each query's best candidate, and the candidates with
    padding (NaN places) moved far away so that no disc reaches them."""
    places = candidates.places
    east, north = on_plane(places, *best_zone(places))
    far = ~(np.isfinite(east) & np.isfinite(north))
    east, north = np.where(far, 1e12, east), np.where(far, 1e12, north)
    return east, north, Places(east, north, np.asarray(places.zone), np.asarray(places.letter))


def _best_disc(east: np.ndarray, north: np.ndarray, near: np.ndarray, w: np.ndarray):
    """Rank 1 of queries whose candidates (m, R) lie at (east, north), `near` (m, R, R) saying which lie within
    the disc of which: the candidate whose disc holds the most weight, that weight, and the weighted centroid
    of the candidates in it (NaN where no candidate has weight)."""
    held = np.matmul(near, w[:, :, None])[:, :, 0]  # (m, R): the weight of each candidate's disc
    best = held.argmax(1) if held.size else np.zeros(len(w), np.int64)
    rows = np.arange(len(w))
    inside = near[rows, best] * w
    total = inside.sum(1)
    ok = total > 0
    centre = lambda x: np.where(ok, (inside * x).sum(1) / np.where(ok, total, 1), np.nan)  # noqa: E731
    return best, (held[rows, best] if held.size else np.zeros(len(w))), centre(east), centre(north)


def answers(candidates: Candidates, w: np.ndarray, radius_m: float, ranks: int = 1,
            threshold_m: float = THRESHOLD_M) -> tuple[Places, np.ndarray, np.ndarray]:
    """The ranked answers (n, ranks), the candidate each answers (n, ranks: its column), and the weight of
    rank 1's neighbourhood (n,). Rank 1 is the centroid of the best-supported `radius_m` disc; each next
    rank the candidate photo whose `threshold_m` disc holds the most weight not yet within `threshold_m`
    of an answer above it (a photo's place is exact: no spread, unlike cell centres); past the distinct
    places, the unused photos in their order. A query with no candidate answers nothing (NaN); ranks past
    its candidates repeat its last answer."""
    n, r = w.shape
    ranks = max(1, min(ranks, r))
    east, north, places = _plane(candidates)
    support = np.zeros(n)
    index = np.zeros((n, ranks), np.int64)
    at_e, at_n = np.full((n, ranks), np.nan), np.full((n, ranks), np.nan)
    chunk = max(1, 1_000_000 // max(1, r * r))
    for lo in range(0, n, chunk):
        e, no, ww = east[lo:lo + chunk], north[lo:lo + chunk], w[lo:lo + chunk]
        m, rows = len(e), np.arange(len(e))
        d2 = (e[:, :, None] - e[:, None, :]) ** 2 + (no[:, :, None] - no[:, None, :]) ** 2
        b, held, fe, fn = _best_disc(e, no, (d2 <= radius_m ** 2 + 1e-6).astype(np.float64), ww)
        support[lo:lo + m], index[lo:lo + m, 0] = held, b
        at_e[lo:lo + m, 0], at_n[lo:lo + m, 0] = fe, fn
        if ranks == 1:
            continue
        reach = (d2 <= threshold_m ** 2 + 1e-6).astype(np.float64)
        open_ = ((e - fe[:, None]) ** 2 + (no - fn[:, None]) ** 2 > threshold_m ** 2) & (ww > 0)
        used = ~(ww > 0)
        for k in range(1, ranks):
            gain = np.matmul(reach, (ww * open_)[:, :, None])[:, :, 0]
            # Past the distinct places: the unused photos in their order (most similar first), which may still
            # be right where the answers above are not; past every candidate, the last answer again.
            gain = np.where(used, -np.inf, np.where(gain > 0, gain, -1.0 - np.arange(r) / r))
            pick = gain.argmax(1)
            fresh = np.isfinite(gain[rows, pick])
            used[rows, pick] = True
            open_ &= ~(reach[rows, pick] > 0)
            index[lo:lo + m, k] = np.where(fresh, pick, index[lo:lo + m, k - 1])
            at_e[lo:lo + m, k] = np.where(fresh, e[rows, pick], at_e[lo:lo + m, k - 1])
            at_n[lo:lo + m, k] = np.where(fresh, no[rows, pick], at_n[lo:lo + m, k - 1])
    zone = np.broadcast_to(np.asarray(places.zone)[:, :1], (n, ranks))
    letter = np.broadcast_to(np.asarray(places.letter)[:, :1], (n, ranks))
    return Places(at_e, at_n, zone, letter), index, support


def fused_signals(candidates: Candidates, w: np.ndarray, at: Places, support: np.ndarray,
                  position: Places) -> dict[str, np.ndarray]:
    """FUSED_SIGNALS of each query's fused answer `at` (its rank 1, (n,)); `position` is classification's."""
    offset = metres_between(position, at) if len(support) else np.zeros(0)
    best = candidates.cosine[:, 0] if candidates.cosine.shape[1] else np.full(len(support), -1.0)
    return {"fused_support": support, "fused_cosine": np.where(np.isfinite(best), best, -1.0).astype(np.float64),
            "fused_offset_m": np.nan_to_num(offset, nan=1e6, posinf=1e6)}


def photo_distances(candidates: Candidates, at: Places) -> np.ndarray:
    """Metres from each query's answer (n,) to each of its candidate photos (n, R); padding infinitely far."""
    return metres_between(at, candidates.places) if len(at.east) else np.zeros(candidates.rows.shape)


def fit_fused_rule(searched: dict[float, Candidates], wide: dict[int, Candidates], confidence: np.ndarray,
                   top_classes: np.ndarray, p: np.ndarray, truth: Places, *, threshold_m: float,
                   candidates_of: dict[float, np.ndarray], wide_rows: dict[int, np.ndarray]) -> tuple[FusedRule, dict]:
    """The rule whose rank-1 answers are right (within `threshold_m`) most often on held-out queries, and then
    the fewest rows searched within FALLBACK_TOLERANCE of that; with the grid's figures, for the record.
    `searched[mass]`: the queries' candidates in the cells of that gate; `wide[cells]`: in their top `cells`
    cells (0: the whole database); `confidence`: classification's calibrated confidence; `p`: the top cells'
    probabilities at the position rule's temperature; `candidates_of[mass]`, `wide_rows[cells]`: database
    rows each query searches there."""
    n = len(confidence)
    right = {}
    # Each candidate set's places and distances once; each radius's discs once; the weights per rule. The
    # wide candidates do not depend on the gate's mass.
    sets = {("cells", mass): cand for mass, cand in searched.items()} | {("wide", c): cand for c, cand in wide.items()}
    for (where, scope), cand in sets.items():
        east, north, places = _plane(cand)
        d2 = (east[:, :, None] - east[:, None, :]) ** 2 + (north[:, :, None] - north[:, None, :]) ** 2
        for radius in RADII_M:
            near = (d2 <= radius ** 2 + 1e-6).astype(np.float64)
            for temperature, posterior in itertools.product(TEMPERATURES, POSTERIOR_WEIGHTS):
                w = weights(cand, top_classes, p, FusedRule(temperature, posterior, radius))
                _, _, fe, fn = _best_disc(east, north, near, w)
                at = Places(fe, fn, np.asarray(places.zone)[:, 0], np.asarray(places.letter)[:, 0])
                right[(where, scope, temperature, posterior, radius)] = metres_between(truth, at) <= threshold_m
    order = np.argsort(confidence, kind="stable")
    grid = {}
    for mass, temperature, posterior, radius in itertools.product(searched, TEMPERATURES, POSTERIOR_WEIGHTS, RADII_M):
        ok = right[("cells", mass, temperature, posterior, radius)]
        for cells, share in itertools.product(wide, FALLBACK_SHARES):
            if share == 0 and cells != next(iter(wide)):
                continue  # no query searches wide: one rule, whatever the scope
            fallback = np.zeros(n, bool)
            fallback[order[:int(round(share * n))]] = True
            lr1 = float(np.where(fallback, right[("wide", cells, temperature, posterior, radius)], ok).mean()) if n else 0.0
            cost = float(np.where(fallback, wide_rows[cells], candidates_of[mass]).mean()) if n else 0.0
            grid[(mass, temperature, posterior, radius, share, cells)] = (lr1, cost)
    top = max(v[0] for v in grid.values())
    best = min((key for key, v in grid.items() if v[0] >= top - FALLBACK_TOLERANCE - 1e-12),
               key=lambda key: (grid[key][1], -grid[key][0], key))
    mass, temperature, posterior, radius, share, cells = best
    below = _fallback_threshold(confidence[order], share)
    scope = lambda c: f"{c} cells" if c else "everywhere"  # noqa: E731
    record = {"lr1": grid[best][0], "best_lr1": top, "mean_candidates": grid[best][1], "fallback_share": share,
              "grid_lr1": {f"q {k[0]:g}, T {k[1]:g}, a {k[2]:g}, {k[3]:g} m, fallback {k[4]:g} {scope(k[5])}": v[0]
                           for k, v in grid.items() if k[4] in (0.0, share)}}
    return FusedRule(temperature, posterior, radius, mass, below, cells if share else 0), record


def _fallback_threshold(sorted_confidence: np.ndarray, share: float) -> float:
    """The confidence below which `share` of these (ascending) confidences lie: midway between the last one in
    and the first one out; 0 for none, above every confidence (2) for all."""
    n = len(sorted_confidence)
    m = int(round(share * n))
    if m == 0:
        return 0.0
    if m >= n:
        return 2.0
    return float((sorted_confidence[m - 1] + sorted_confidence[m]) / 2)


def search(database: CellDatabase, queries, cells: np.ndarray, fallback: np.ndarray, wide: np.ndarray | None = None,
           k: int = CANDIDATES) -> Candidates:
    """Each query's `k` most similar photos (unit `queries`, (n, D)) among the rows of its `cells` (n, c; -1
    none), or for the queries of `fallback` (n,) among the rows of their `wide` cells (fallback.sum(), w; -1
    none), or of the whole database where `wide` is None."""
    cells = np.where(fallback[:, None], -1, cells)
    _, rows, cosine = database.search(queries, cells, k)
    if fallback.any():
        asked = queries[torch.as_tensor(fallback).to(queries.device)]
        if wide is None:
            wide_s, wide_r = database.search_all(asked, k)
        else:
            _, wide_r, wide_s = database.search(asked, wide, k)
        cosine[fallback], rows[fallback] = -np.inf, -1
        cosine[fallback, :wide_s.shape[1]], rows[fallback, :wide_r.shape[1]] = wide_s, wide_r
    valid = rows >= 0
    classes = database.table["class"].to_numpy()
    return Candidates(np.where(valid, cosine, -np.inf), rows, np.where(valid, classes[np.where(valid, rows, 0)], -1),
                      database.places(rows))


def rows_searched(database: CellDatabase, cells: np.ndarray, fallback: np.ndarray,
                  wide: np.ndarray | None = None) -> np.ndarray:
    """The database rows each query searches (n,) under `search`'s arguments."""
    out = database.counts_of(np.where(fallback[:, None], -1, cells)).sum(1)
    out[fallback] = database.rows if wide is None else database.counts_of(wide).sum(1)
    return out
