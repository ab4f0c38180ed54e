"""A seeded synthetic city of backbone *features* (no images) for tests and benchmarks.

Streets form a rotated square grid around San Francisco (UTM 10S). A capture
spot every `spacing_m` metres along the streets is one panorama, seen at
`headings` headings. A row's feature is the sum of three parts:

* place: landmarks (random positions, random directions in a `place_dim`
  subspace) seen through a visibility kernel, exp(-d²/2σ²) with σ =
  `visibility_m`, weighted towards landmarks in front of the camera. Nearby
  spots and similar headings share landmarks, so neighbouring cells alias.
* condition: one vector per capture (time of day, season, camera) from a bank
  of `conditions` plus jitter, in a `condition_dim` subspace orthogonal to the place one.
  It is large, so raw-feature retrieval and class means suffer, and linear, so
  a learned projection can remove it.
* noise: isotropic, per row.

Queries ("test", "val") are taken at random points and headings, under
condition banks never used in "train", behind an occluder that hides a random
sector of the view and replaces its share of the place signal, with more
noise. "test-db" is a second drive along the same streets under train-like
conditions. Embeddings are computed on demand, in blocks with their own
seeds, so any row range is reproducible without holding a split in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import utm

from dcfeat.labels import LABEL_SCHEMA
from dcfeat.shards import write_split

SPLITS = ("train", "val", "test", "test-db")
# A city small enough for unit tests: ~2.6 k train rows of dimension 64.
SMALL = {"streets": 5, "block_m": 80.0, "dim": 64, "place_dim": 32, "queries": 200, "val_queries": 100}
_BLOCK = 4096  # rows per noise seed; fixed so a row's noise does not depend on how it is read
_CUTOFF = 3.0  # landmarks further than 3σ (weight < 1.2 %) are ignored
_ROW = 2**32  # tile key = east index · _ROW + north index, so north neighbours are consecutive keys
LAYOUTS = ("grid", "irregular")
IRREGULAR_TURN_DEG = 12.0  # spread of each street's own turn in an irregular city
ALIAS_MIN_M = 200.0  # a repeated façade stands at least this far from its twin: another place, not a neighbour

# Cities of different difficulty: each turns a knob of make_city away from the default city ("grid").
# Quality is reported on each and their mean; defaults and the confidence are fitted on their val splits.
FAMILY: dict[str, dict] = {
    "grid": {},
    "aliased": {"aliasing": 0.3},
    "shifted": {"condition_strength": 3.0, "query_noise": 0.9},
    "sparse": {"train_keep": 0.4, "spacing_m": 8.0},
    "occluded": {"max_occlusion_deg": 240.0},
    "irregular": {"layout": "irregular", "seed": 1},
}


def _tile(east: np.ndarray, north: np.ndarray, visibility_m: float) -> np.ndarray:
    """Square tiles of side 3σ: every landmark a point sees lies in its tile's 3×3 block."""
    side = _CUTOFF * visibility_m
    return np.floor(east / side).astype(np.int64) * _ROW + np.floor(north / side).astype(np.int64)


@dataclass(frozen=True)
class _Rows:
    east: np.ndarray  # float64, UTM metres
    north: np.ndarray
    heading: np.ndarray  # float32, compass degrees
    capture: np.ndarray  # int64 row of `condition`: one capture = one panorama
    condition: np.ndarray  # float32 (captures, condition_dim)
    occlusion: np.ndarray  # float32 (rows, 2): hidden sector start and width, radians
    noise: float


@dataclass(frozen=True)
class SyntheticCity:
    """Geometry, landmarks and conditions of a city; features are computed on demand."""

    seed: int
    dim: int
    visibility_m: float
    landmark_east: np.ndarray  # sorted by _tile, for neighbourhood look-ups
    landmark_north: np.ndarray
    landmark_vector: np.ndarray  # float32 (landmarks, place_dim)
    basis: np.ndarray  # float32 (dim, place_dim + condition_dim): orthonormal, place columns first
    rows: dict[str, _Rows]

    @property
    def condition_basis(self) -> np.ndarray:
        """The subspace conditions live in; projecting it out is what training should learn."""
        return self.basis[:, self.landmark_vector.shape[1] :]

    def size(self, name: str) -> int:
        """Rows in a split."""
        return self.rows[name].east.size

    def place(self, east, north, heading, occlusion=None) -> tuple[np.ndarray, np.ndarray]:
        """Unit place vectors (k, place_dim) of views, and the share of each view occluded.

        `occlusion` (k, 2) gives a hidden sector per view (start, width, radians
        clockwise from the heading); landmarks in it are not seen.
        """
        east, north = np.asarray(east, np.float64), np.asarray(north, np.float64)
        phi = np.radians(np.asarray(heading, np.float32))
        occlusion = np.zeros((east.size, 2), np.float32) if occlusion is None else occlusion
        keys = _tile(self.landmark_east, self.landmark_north, self.visibility_m)
        tiles = _tile(east, north, self.visibility_m)
        order = np.argsort(tiles, kind="stable")
        bounds = np.flatnonzero(np.diff(tiles[order])) + 1
        place = np.zeros((east.size, self.landmark_vector.shape[1]), np.float32)
        hidden = np.zeros(east.size, np.float32)
        for at in np.split(order, bounds) if east.size else []:
            # The 3×3 block is three runs of three consecutive keys.
            column = tiles[at[0]] + np.array([-_ROW, 0, _ROW])
            near = np.concatenate([
                np.arange(lo, hi) for lo, hi in zip(np.searchsorted(keys, column - 1), np.searchsorted(keys, column + 2))
            ])
            dx = (self.landmark_east[near][None, :] - east[at, None]).astype(np.float32)
            dy = (self.landmark_north[near][None, :] - north[at, None]).astype(np.float32)
            d2 = dx * dx + dy * dy
            view = phi[at, None]
            ahead = (dx * np.sin(view) + dy * np.cos(view)) / np.sqrt(d2 + 1e-6)  # cos of bearing − heading
            # Heading weight 1 ahead, 1/2 to the side, 0 behind. Its square made
            # the headings of one spot too unlike to share a class (measured).
            w = np.exp(d2 / (-2 * self.visibility_m**2)) * ((1 + ahead) / 2)
            w[d2 > (_CUTOFF * self.visibility_m) ** 2] = 0
            start, width = occlusion[at, :1], occlusion[at, 1:]
            if width.any():
                blocked = np.mod(np.arctan2(dx, dy) - view - start, 2 * np.pi) < width
                total = w.sum(axis=1)
                w[blocked] = 0
                hidden[at] = 1 - w.sum(axis=1) / np.maximum(total, 1e-12)
            # einsum, not matmul: thousands of tiny BLAS calls stall on waking
            # BLAS threads when the CPUs are shared (measured 10x slower).
            place[at] = np.einsum("rl,ld->rd", w, self.landmark_vector[near])
        place /= np.maximum(np.linalg.norm(place, axis=1, keepdims=True), 1e-12)
        return place, hidden

    def clean_features(self, east, north, heading, condition) -> np.ndarray:
        """Noise-free, unoccluded features (k, dim) of views under conditions (k, condition_dim)."""
        place, _ = self.place(east, north, heading)
        return np.concatenate([place, np.asarray(condition, np.float32)], axis=1) @ self.basis.T

    def embeddings(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of a split's features, float32 (rows, dim)."""
        r = self.rows[name]
        stop = r.east.size if stop is None else min(stop, r.east.size)
        out = np.empty((max(stop - start, 0), self.dim), np.float32)
        for block in range(start // _BLOCK, -(-stop // _BLOCK)):
            lo, hi = block * _BLOCK, min((block + 1) * _BLOCK, r.east.size)
            a, b = max(lo, start), min(hi, stop)
            rng = np.random.default_rng([self.seed, SPLITS.index(name), block])
            occluder = rng.standard_normal((hi - lo, self.landmark_vector.shape[1]), np.float32)[a - lo : b - lo]
            # Uniform noise with the variance of N(0, noise²/dim): four times
            # cheaper to draw, and Gaussian again along any direction (CLT).
            noise = rng.random((hi - lo, self.dim), np.float32)[a - lo : b - lo]
            noise -= 0.5
            noise *= r.noise * np.sqrt(12 / self.dim)
            place, hidden = self.place(r.east[a:b], r.north[a:b], r.heading[a:b], r.occlusion[a:b])
            occluder /= np.linalg.norm(occluder, axis=1, keepdims=True)
            place += hidden[:, None] * (occluder - place)  # the occluder takes the hidden share
            rows = out[a - start : b - start]
            np.matmul(np.concatenate([place, r.condition[r.capture[a:b]]], axis=1), self.basis.T, out=rows)
            rows += noise
        return out

    def label_frame(self, name: str) -> pl.DataFrame:
        """The split's labels in the feature-store column order and types (without `row`)."""
        r = self.rows[name]
        lat, lon = utm.to_latlon(r.east, r.north, 10, "S")
        image_id = [
            f"@{e:010.2f}@{n:010.2f}@10@S@{la:09.5f}@{lo:010.5f}@{name}{c:07d}@@{h:03.0f}@@@@@@.jpg"
            for e, n, la, lo, c, h in zip(r.east, r.north, lat, lon, r.capture, r.heading)
        ]
        return pl.DataFrame(
            {
                "image_id": image_id,
                "utm_east": r.east,
                "utm_north": r.north,
                "utm_zone": np.full(r.east.size, 10, np.int8),
                "utm_letter": ["S"] * r.east.size,
                "lat": lat,
                "lon": lon,
                "heading": r.heading,
            },
            schema=LABEL_SCHEMA,
        )

    def split(self, name: str) -> dict[str, np.ndarray]:
        """Embeddings and every label column of a split as numpy arrays."""
        columns = {c: s.to_numpy() for c, s in self.label_frame(name).to_dict().items()}
        return {"embeddings": self.embeddings(name), **columns}


def _conditions(rng, bank: np.ndarray, captures: int, jitter: float) -> np.ndarray:
    picked = bank[rng.integers(0, len(bank), captures)]
    return (picked + rng.standard_normal(picked.shape) * jitter / np.sqrt(bank.shape[1])).astype(np.float32)


def make_city(
    *,
    seed: int = 0,
    streets: int = 10,
    block_m: float = 100.0,
    spacing_m: float = 5.0,
    db_spacing_m: float = 10.0,
    headings: int = 4,
    rotation_deg: float = 17.0,
    dim: int = 768,
    place_dim: int = 64,
    condition_dim: int = 16,
    conditions: int = 32,
    query_conditions: int = 4,
    condition_strength: float = 1.5,
    condition_jitter: float = 0.5,
    landmark_spacing_m: float = 15.0,
    visibility_m: float = 20.0,
    queries: int = 500,
    val_queries: int = 200,
    max_occlusion_deg: float = 120.0,
    noise: float = 0.3,
    query_noise: float = 0.6,
    aliasing: float = 0.0,
    layout: str = "grid",
    train_keep: float = 1.0,
    origin: tuple[float, float] = (550_000.0, 4_180_000.0),
) -> SyntheticCity:
    """A `streets` × `streets` city; train rows ≈ 2·streets·(streets − 1)·block_m/spacing_m·headings·train_keep.

    What makes it hard, each a knob (FAMILY names cities that turn them):
    `aliasing`: the share of landmarks that look exactly like one at least ALIAS_MIN_M away (repeated
    façades: distant places that the place signal cannot tell apart); `condition_strength` and
    `query_noise`: how far the queries' capture conditions shift from the training drive's; `train_keep`:
    the share of training panoramas kept (sparse cells, below min_images_per_class); `max_occlusion_deg`:
    the widest sector an occluder hides from a query; `layout`: "grid", or "irregular" (every street
    turned by its own angle and shifted: blocks of unequal shapes, cells cut at every angle).
    """
    if place_dim + condition_dim > dim:
        raise ValueError(f"place_dim + condition_dim = {place_dim + condition_dim} exceeds dim = {dim}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    rng = np.random.default_rng(seed)
    side = (streets - 1) * block_m
    turn = np.radians(rotation_deg)
    rotate = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    # Streets as (origin u, origin v, direction u, direction v), in local metres: along v, then along u.
    line = np.arange(streets) * block_m
    streets_uv = np.r_[np.stack([line, np.zeros(streets), np.zeros(streets), np.ones(streets)], 1),
                       np.stack([np.zeros(streets), line, np.ones(streets), np.zeros(streets)], 1)]
    if layout == "irregular":
        street_rng = np.random.default_rng([seed, 1])  # its own stream: the grid city's draws stay as they were
        angle = street_rng.normal(0.0, np.radians(IRREGULAR_TURN_DEG), len(streets_uv))
        cos, sin = np.cos(angle), np.sin(angle)
        du, dv = streets_uv[:, 2] * cos + streets_uv[:, 3] * sin, streets_uv[:, 3] * cos - streets_uv[:, 2] * sin
        mid = streets_uv[:, :2] + side / 2 * streets_uv[:, 2:]  # turned about its middle, then shifted
        shift = street_rng.normal(0.0, block_m / 4, len(streets_uv))
        mid += shift[:, None] * np.stack([dv, -du], 1)
        streets_uv = np.stack([mid[:, 0] - side / 2 * du, mid[:, 1] - side / 2 * dv, du, dv], 1)

    def to_utm(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, n = rotate @ np.stack([u, v])
        return origin[0] + e, origin[1] + n

    # "Across" points to +u from the streets along v, to +v from those along u (whatever their turn).
    across_sign = np.r_[np.ones(streets), -np.ones(streets)]

    def on_street(street: np.ndarray, along: np.ndarray, across: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, across = streets_uv[street], across * across_sign[street]
        return s[:, 0] + along * s[:, 2] + across * s[:, 3], s[:, 1] + along * s[:, 3] - across * s[:, 2]

    def drive(step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spots every `step` metres along every street: (u, v, street direction in degrees)."""
        t = np.arange(0.0, side + 1e-9, step)
        street = np.repeat(np.arange(len(streets_uv)), t.size)
        u, v = on_street(street, np.tile(t, len(streets_uv)), np.zeros(street.size))
        return u, v, np.degrees(np.arctan2(streets_uv[street, 2], streets_uv[street, 3]))

    def panoramas(step: float, bank: np.ndarray, keep: float = 1.0) -> _Rows:
        u, v, direction = drive(step)
        if keep < 1.0:
            kept = np.random.default_rng([seed, 2]).random(u.size) < keep  # its own stream, as above
            u, v, direction = u[kept], v[kept], direction[kept]
        # Local axes v and u point at compass bearings -rotation and 90 - rotation.
        compass = (direction - rotation_deg)[:, None] + np.arange(headings) * 360.0 / headings
        e, n = to_utm(u, v)
        captures = u.size
        return _Rows(np.repeat(e, headings), np.repeat(n, headings), np.mod(compass, 360).ravel().astype(np.float32),
                     np.repeat(np.arange(captures), headings), _conditions(rng, bank, captures, condition_jitter),
                     np.zeros((captures * headings, 2), np.float32), noise)

    def snapshots(count: int, bank: np.ndarray) -> _Rows:
        along, street = rng.uniform(0, side, count), rng.integers(0, streets, count)
        across = rng.normal(0.0, 2.0, count)  # a pedestrian is not on the centre line
        vertical = rng.random(count) < 0.5
        e, n = to_utm(*on_street(np.where(vertical, street, streets + street), along, across))
        occlusion = np.stack([rng.uniform(0, 2 * np.pi, count), rng.uniform(0, np.radians(max_occlusion_deg), count)], 1)
        return _Rows(e, n, rng.uniform(0, 360, count).astype(np.float32), np.arange(count),
                     _conditions(rng, bank, count, condition_jitter), occlusion.astype(np.float32), query_noise)

    def bank(count: int) -> np.ndarray:
        return rng.standard_normal((count, condition_dim)) * condition_strength / np.sqrt(condition_dim)

    basis = np.linalg.qr(rng.standard_normal((dim, place_dim + condition_dim)))[0].astype(np.float32)
    margin = _CUTOFF * visibility_m
    corners = np.array(to_utm(np.array([0, side, 0, side]), np.array([0, 0, side, side])))
    low, high = corners.min(axis=1) - margin, corners.max(axis=1) + margin
    count = int(np.prod(high - low) / landmark_spacing_m**2)
    landmarks = rng.uniform(low, high, (count, 2))
    vectors = rng.standard_normal((count, place_dim)).astype(np.float32)
    if aliasing > 0:
        _alias(vectors, landmarks, aliasing, np.random.default_rng([seed, 3]))
    train_bank = bank(conditions)
    rows = {
        "train": panoramas(spacing_m, train_bank, train_keep),
        "val": snapshots(val_queries, bank(query_conditions)),
        "test": snapshots(queries, bank(query_conditions)),
        "test-db": panoramas(db_spacing_m, train_bank),
    }
    order = np.argsort(_tile(landmarks[:, 0], landmarks[:, 1], visibility_m), kind="stable")
    return SyntheticCity(seed, dim, visibility_m, landmarks[order, 0], landmarks[order, 1], vectors[order], basis, rows)


def _alias(vectors: np.ndarray, landmarks: np.ndarray, share: float, rng: np.random.Generator) -> None:
    """Make `share` of the landmarks look exactly like another, unchanged one at least ALIAS_MIN_M away, in place."""
    copies = rng.choice(len(vectors), size=int(share * len(vectors)), replace=False)
    originals = np.setdiff1d(np.arange(len(vectors)), copies)
    sources = originals[rng.integers(0, len(originals), copies.size)]
    for _ in range(8):  # redraw sources that are too near; a handful of rounds leaves none in practice
        near = np.hypot(*(landmarks[copies] - landmarks[sources]).T) < ALIAS_MIN_M
        if not near.any():
            break
        sources[near] = originals[rng.integers(0, len(originals), int(near.sum()))]
    far = np.hypot(*(landmarks[copies] - landmarks[sources]).T) >= ALIAS_MIN_M
    vectors[copies[far]] = vectors[sources[far]]


def write_city(city: SyntheticCity, store, *, splits: tuple[str, ...] = SPLITS, seed: int = 0,
               dtype: str = "float16") -> None:
    """Write the city as a format-v1 store (one split at a time), labelled as synthetic."""
    attrs = {"model": "synthetic-city", "model_fingerprint": f"synthetic-seed{seed}-dim{city.dim}",
             "pooling": "none", "image_size": 0, "backbone_random_init": False, "dtype": dtype}
    for name in splits:
        write_split(store, name, city.embeddings(name), city.label_frame(name), attrs)
