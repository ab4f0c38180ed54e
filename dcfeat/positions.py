"""Positions: the answer as a point, weighed from the top cells' probabilities, instead of one cell's centre.

D&C answers with the centre of the best cell, so a photo taken near a cell's border whose
neighbour wins lands 25–30 m off. Here the answer for the best cell is the centroid of the
centres of the candidate cells within `radius_m` of it (itself included), each weighed by
its probability: a softmax at the model's logit scale s divided by `temperature` over the
query's top-k cells (under --scoring group-softmax, each cell's probability within its own group,
normalised over the top-k: `weighing_scale`). Radius 0 is the paper's cell centre.

Ranked answers stay distinct (`ranked`): rank 1 is that position, and each next rank is the
candidate cell centre that brings the most probability not yet within the threshold of an
answer above it, a candidate's probability spread evenly over the disc of SPREAD_M around its
centre. So ranks 2..k are other places, not the rank-1 centroid again, and the best centre
comes back below rank 1 where the position leaves some of its probability uncovered.

Centres are compared on one plane, as `geo` measures every distance: a candidate in another UTM
zone (or hemisphere) than the query's best cell is re-expressed in that cell's zone (`geo.on_plane`),
and every answer is given in the best cell's zone.

The rule is fitted on a held-out split with the confidence (`fit_position_rule`: the grid's
best LR@1 at the threshold, smaller radius on ties) and stored in calibration.json; a run
without one uses DEFAULT_RULE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dcfeat.choices import THRESHOLD_M
from dcfeat.geo import Places, best_zone, metres_between, on_plane

# Searched on the held-out split: neighbourhood radii (0: the cell centre) and temperatures.
RADII_M = (0.0, 30.0, 45.0, 60.0)
TEMPERATURES = (0.5, 1.0, 2.0)
# Where a photo ranked to a cell may have been taken: within 1.5 cells (M = 20 m) of its centre, its own
# cell or a neighbour. Chosen on the synthetic cities' val splits among 10, 20, 30 and 45 m: the
# smallest loss of LR@5/10/20 against the centres (BENCHMARKS.md, "Positions").
SPREAD_M = 30.0
# The disc of SPREAD_M as points (a 7 × 7 grid of the square around it, those inside): its probability's carriers.
_GRID = np.stack(np.meshgrid(np.linspace(-1, 1, 7), np.linspace(-1, 1, 7)), -1).reshape(-1, 2)
DISC = _GRID[np.hypot(*_GRID.T) <= 1 + 1e-9]
# The candidates `ranked` chooses among, and the ranks it chooses (the rest follow the candidates' order):
# its cost grows as the square of the candidates, and the 40th holds next to no probability.
WINDOW = 40


@dataclass(frozen=True)
class PositionRule:
    """How a position is weighed from the top cells: their neighbourhood and the softmax temperature."""

    radius_m: float = 45.0
    temperature: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PositionRule:
        """From `to_dict`'s object; ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("`position` must be an object")
        radius, temperature = d.get("radius_m"), d.get("temperature")
        for name, v in (("radius_m", radius), ("temperature", temperature)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
                raise ValueError(f"`position.{name}` must be a finite number")
        if radius < 0 or temperature <= 0:
            raise ValueError("`position.radius_m` must be >= 0 and `position.temperature` > 0")
        return cls(float(radius), float(temperature))


# The rule of a run whose calibration holds none: the middle of the grid, measured on the synthetic
# cities' val splits (BENCHMARKS.md, "Positions").
DEFAULT_RULE = PositionRule()
CENTRE = PositionRule(radius_m=0.0)


def probabilities(scores: np.ndarray, logit_scale: float, temperature: float = 1.0) -> np.ndarray:
    """Softmax over each query's top-k scores (n, k) at scale s / temperature."""
    z = (logit_scale / temperature) * (np.asarray(scores, np.float64) - np.asarray(scores, np.float64)[:, :1])
    e = np.exp(z)
    return e / e.sum(1, keepdims=True) if e.size else e


def weighing_scale(logit_scale: float, scoring: str) -> float:
    """The scale at which a ranking's scores weigh its candidates (`probabilities`): the model's logit scale s
    for cosines; 1 for log-probabilities (--scoring group-softmax, and every score of a softmax head), so
    each candidate weighs its own probability, normalised over the candidates (to the power 1 / temperature)."""
    return logit_scale if scoring == "cosine" else 1.0


def positions(top: Places, p: np.ndarray, radius_m: float, ranks: int | None = None) -> Places:
    """Centroid around each of a query's first `ranks` candidates (n, ranks): the p-weighted centroid of the
    candidates (n, k) within `radius_m` of it; in the zone and hemisphere of the query's best cell. Its
    first column is the position (rank 1); the ranked answers are `ranked`'s."""
    ranks = np.shape(top.east)[1] if ranks is None else min(ranks, np.shape(top.east)[1])
    return positions_of(Places(*(np.asarray(a)[:, :ranks] for a in (top.east, top.north, top.zone, top.letter))),
                        top, p, radius_m)


def positions_of(cells: Places, top: Places, p: np.ndarray, radius_m: float) -> Places:
    """Centroid of given cells (n, r) of each query, weighed from its candidates (n, k) with probabilities
    p (n, k): the centroid of the candidates within `radius_m` of the cell (the cell itself when none
    is, e.g. a cell ranked by another rule outside the candidates); in the zone of the best candidate.
    Rank 1's position (`ranked` makes ranks 2..k)."""
    n, k = np.shape(top.east)
    r = np.shape(cells.east)[1]
    zone0, north0 = best_zone(top)
    east, north = on_plane(top, zone0, north0)
    cell_east, cell_north = on_plane(cells, zone0, north0)
    # (n, r, k): which candidates are within the radius of each cell.
    near = np.hypot(east[:, None, :] - cell_east[:, :, None], north[:, None, :] - cell_north[:, :, None])
    w = np.where(near <= radius_m + 1e-9, np.asarray(p, np.float64)[:, None, :], 0.0)
    total = w.sum(2)
    alone = total <= 0
    w /= np.where(alone, 1.0, total)[:, :, None]
    at_east = np.where(alone, cell_east, (w * east[:, None, :]).sum(2))
    at_north = np.where(alone, cell_north, (w * north[:, None, :]).sum(2))
    zone = np.broadcast_to(zone0, (n, r))
    letter = np.broadcast_to(np.asarray(top.letter)[:, :1], (n, r))
    return Places(at_east, at_north, zone, letter)


def ranked(first: Places, cells: Places, p: np.ndarray, ranks: int, threshold_m: float = THRESHOLD_M,
           spread_m: float = SPREAD_M) -> tuple[Places, np.ndarray]:
    """The ranked answers (n, ranks) of each query and the candidate each answers (n, ranks), an index into
    `cells`' columns: rank 1 is `first` (n, 1), the position of the best cell (column 0); each next rank
    is the unused candidate centre that brings the most probability not yet within `threshold_m` of an
    answer above it, a candidate's probability p (n, k) spread evenly over the disc of `spread_m` around
    its centre (ties: the better-ranked candidate). A centre at the first position is that position
    already, and is not answered again. The choice is among the first WINDOW candidates, for the first
    WINDOW ranks; later ranks take the unused candidates in their order. In the zone of the best cell."""
    n, k = np.shape(cells.east)
    ranks, w = min(ranks, k), min(k, WINDOW)
    zone0, north0 = best_zone(cells)
    east, north = on_plane(cells, zone0, north0)
    first_east, first_north = on_plane(first, zone0, north0)
    p = np.asarray(p, np.float64)
    index = np.zeros((n, ranks), np.int64)
    # Queries at a time: the (chunk, w, w · |DISC|) coverage table stays under ~4 M entries.
    chunk = max(1, 4_000_000 // (w * w * len(DISC)))
    for lo in range(0, n, chunk):
        e, no = east[lo:lo + chunk], north[lo:lo + chunk]
        fe, fn = first_east[lo:lo + chunk, :1], first_north[lo:lo + chunk, :1]
        m, rows = len(e), np.arange(len(e))
        # The window's probability as points of its candidates' discs: (m, w · |DISC|) places and weights.
        he = (e[:, :w, None] + spread_m * DISC[:, 0]).reshape(m, -1)
        hn = (no[:, :w, None] + spread_m * DISC[:, 1]).reshape(m, -1)
        hw = np.repeat(p[lo:lo + chunk, :w] / len(DISC), len(DISC), axis=1)
        # Squared distances: hypot is several times slower, and float32 sums of the masses twice as fast.
        reach = (e[:, :w, None] - he[:, None, :]) ** 2 + (no[:, :w, None] - hn[:, None, :]) ** 2 <= threshold_m ** 2
        mass = (reach * hw[:, None, :]).astype(np.float32)  # what each candidate's answer would cover, point by point
        open_ = ((fe - he) ** 2 + (fn - hn) ** 2 > threshold_m ** 2).astype(np.float32)[:, :, None]  # not yet covered
        used = np.hypot(e - fe, no - fn) < 1e-6
        chosen = min(ranks, w)
        for r in range(1, chosen):
            gain = np.matmul(mass, open_)[:, :, 0]
            best = np.where(used[:, :w], -np.inf, gain).argmax(1)
            used[rows, best] = True
            open_[reach[rows, best]] = 0.0
            index[lo + rows, r] = best
        # Past the window: the unused candidates, in their order (a stable sort puts them first).
        index[lo:lo + m, chosen:] = np.argsort(used, axis=1, kind="stable")[:, :ranks - chosen]
    at_east, at_north = np.take_along_axis(east, index, 1), np.take_along_axis(north, index, 1)
    at_east[:, :1], at_north[:, :1] = first_east[:, :1], first_north[:, :1]
    zone = np.broadcast_to(zone0, (n, ranks))
    letter = np.broadcast_to(np.asarray(cells.letter)[:, :1], (n, ranks))
    return Places(at_east, at_north, zone, letter), index


def answer(top: Places, scores: np.ndarray, logit_scale: float, rule: PositionRule, ranks: int | None = None,
           threshold_m: float = THRESHOLD_M) -> tuple[Places, np.ndarray]:
    """A query's ranked answers under `rule` and the candidate (a column of `top`) each answers (see the
    module docstring): rank 1 the position, ranks 2.. as `ranked` orders the candidates' centres."""
    p = probabilities(scores, logit_scale, rule.temperature)
    ranks = np.shape(top.east)[1] if ranks is None else ranks
    first = positions(top, p, rule.radius_m, ranks=1)
    return ranked(first, top, p, ranks, threshold_m)


def fit_position_rule(top: Places, scores: np.ndarray, logit_scale: float, truth: Places, *,
                      threshold_m: float, radii: tuple[float, ...] = RADII_M,
                      temperatures: tuple[float, ...] = TEMPERATURES) -> tuple[PositionRule, dict]:
    """The rule of the grid whose rank-1 positions are right (within `threshold_m`) most often on held-out
    queries, the smaller radius and then temperature on ties; and the grid's LR@1, for the record."""
    grid = {}
    for radius in sorted(radii):
        for temperature in sorted(temperatures) if radius > 0 else [1.0]:
            at = answer(top, scores, logit_scale, PositionRule(radius, temperature), ranks=1)[0]
            dist = metres_between(truth, Places(at.east[:, 0], at.north[:, 0], at.zone[:, 0], at.letter[:, 0]))
            grid[(radius, temperature)] = float((dist <= threshold_m).mean()) if len(dist) else 0.0
    best = max(grid, key=lambda key: (grid[key], -key[0], -key[1]))
    return PositionRule(*best), {f"{r:g} m, T {t:g}": v for (r, t), v in grid.items()}
