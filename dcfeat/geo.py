"""Places on the Earth and the one way dcfeat measures between them: UTM bands, zone changes, distances.

A place is a UTM point (east, north, zone, band letter or hemisphere). Every distance and every
plane that several places share comes from here (metrics' LR@k, cells and their neighbours,
positions, confidence, predict's `error_m`, reports, export), under ONE policy:

    Two places are measured on the UTM plane of the first (the query, or a query's best cell);
    a place of another zone or hemisphere is first re-expressed in that zone (transverse Mercator
    runs on past a zone's edge), then the distance is the planar Euclidean one.

Within one zone this is the planar distance the 25 m threshold of the VPR literature means, and
across an edge it measures as it does on either side: a pair 10.041 m apart (WGS84 geodesic)
straddling the zone 10/11 edge at 37° N, 120° W measures 10.0454–10.0461 m whichever zone each
point is given in (+0.045…0.051 %, the plane's scale factor there, as for a pair inside one zone).
The great circle on a sphere that metrics used before gave 10.0176 m (−0.23 %), and jumped at the
edge against the plane positions used. On 2,000 random pairs of 1 m–1 km around the 10/11 edge:
|plane − WGS84| ≤ 0.048 % at 37° N, ≤ 0.098 % across the equator (bands N/M), ≤ 0.008 % at
60° N; the sphere's great circle ≤ 0.23 %, 0.56 % and 0.36 %.

Beyond REACH_DEG of longitude from the plane's central meridian no UTM plane holds a point
(transverse Mercator distorts by percents, then folds): such a pair, at least 3° of longitude
apart and wrong at any threshold, is measured by the great circle instead, only so that error
statistics stay in sensible metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import utm

# The UTM latitude bands C..X (I and O are not used); "N" onwards is northern.
UTM_LETTERS = "CDEFGHJKLMNPQRSTUVWX"
# Mean Earth radius (IUGG R1), for the great circle of pairs no plane holds.
EARTH_RADIUS_M = 6_371_008.8
# How far (degrees of longitude) from a zone's central meridian its plane still holds a place: half the
# next zone past its edge. The `utm` package's series moves a place re-expressed there by 4 cm (0.3 mm at
# 3°, the edge; 0.7 m at 9°, measured as the round trip's drift), and the scale factor is under 0.6 %.
REACH_DEG = 6.0


@dataclass(frozen=True)
class Places:
    """UTM positions, each array of one shape: (n,) for one answer per query, (n, k) for top-k lists.
    `letter`: band letters, or booleans (True: northern) where only the hemisphere is known."""

    east: np.ndarray
    north: np.ndarray
    zone: np.ndarray
    letter: np.ndarray

    def __iter__(self):
        """east, north, zone, letter: `Places(*(f(a) for a in places))` maps every array."""
        return iter((self.east, self.north, self.zone, self.letter))


def is_northern(letter) -> np.ndarray:
    """Per UTM band letter (upper or lower case): True north of the equator (N..X)."""
    # One character per point, compared as code points: np.char.upper is ~60x slower
    # on millions of letters. `& ~0x20` folds a..z onto A..Z.
    codes = np.asarray(letter, dtype="U1").view(np.uint32)
    return (codes & ~np.uint32(0x20)) >= ord("N")


def hemisphere(letter_or_northern) -> np.ndarray:
    """True where northern, from band letters or from booleans already."""
    hemi = np.asarray(letter_or_northern)
    return hemi if hemi.dtype == bool else is_northern(hemi)


def central_meridian(zone) -> np.ndarray:
    """Longitude (degrees) of the central meridian of UTM zones."""
    return np.asarray(zone) * 6.0 - 183.0


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres between points given in degrees (broadcasts)."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    dphi = phi2 - phi1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(dlmb / 2) ** 2
    # clip: rounding can push `a` a hair above 1 for antipodal points.
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def utm_to_latlon(east, north, zone, letter_or_northern) -> tuple[np.ndarray, np.ndarray]:
    """Degrees (lat, lon) of UTM points, each in its own zone and hemisphere.

    `zone` and `letter_or_northern` (band letters, or booleans: northern) may be
    scalars or arrays shaped like the points. Points just outside their zone's
    easting range (a cell centre on a zone edge) are converted, not refused.
    """
    east = np.asarray(east, dtype=np.float64)
    north = np.broadcast_to(np.asarray(north, dtype=np.float64), east.shape)
    zone = np.broadcast_to(np.asarray(zone).astype(np.int64), east.shape)
    northern = np.broadcast_to(hemisphere(letter_or_northern), east.shape)
    lat, lon = np.empty(east.shape), np.empty(east.shape)
    key = zone * 2 + northern
    # `utm.to_latlon` takes one zone per call, so convert zone by zone.
    for k in np.unique(key):
        sel = key == k
        lat[sel], lon[sel] = utm.to_latlon(east[sel], north[sel], int(k // 2), northern=bool(k % 2), strict=False)
    return lat, lon


def _moved(places: Places, zone, northern) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`on_plane`'s work: (east, north) of `places` on the planes given per place, and where the plane's
    reach ends (`REACH_DEG`) the places' (lat, lon), NaN elsewhere."""
    east = np.array(places.east, dtype=np.float64)
    north = np.array(np.broadcast_to(np.asarray(places.north, dtype=np.float64), east.shape))
    zones = np.broadcast_to(np.asarray(places.zone).astype(np.int64), east.shape)
    hemis = np.broadcast_to(hemisphere(places.letter), east.shape)
    to_zone = np.broadcast_to(np.asarray(zone).astype(np.int64), east.shape)
    to_north = np.broadcast_to(np.asarray(northern, dtype=bool), east.shape)
    lat, lon = np.full(east.shape, np.nan), np.full(east.shape, np.nan)
    # Missing places (NaN/inf, whatever zone they name) are never converted.
    other = ((zones != to_zone) | (hemis != to_north)) & np.isfinite(east) & np.isfinite(north)
    if not other.any():
        return east, north, lat, lon
    la, lo = utm_to_latlon(east[other], north[other], zones[other], hemis[other])
    key = to_zone[other] * 2 + to_north[other]
    e, n = np.empty(la.shape), np.empty(la.shape)
    # `utm.from_latlon` forces one zone per call: one call per target plane, vectorised within it.
    for k in np.unique(key):
        sel = key == k
        e[sel], n[sel], *_ = utm.from_latlon(la[sel], lo[sel], force_zone_number=int(k // 2),
                                             force_northern=bool(k % 2))
    off = np.abs((lo - central_meridian(to_zone[other]) + 180.0) % 360.0 - 180.0) > REACH_DEG
    east[other], north[other] = e, n
    lat[other], lon[other] = np.where(off, la, np.nan), np.where(off, lo, np.nan)
    return east, north, lat, lon


def on_plane(places: Places, zone, northern) -> tuple[np.ndarray, np.ndarray]:
    """East and north of `places` on the UTM plane of `zone` and hemisphere `northern` (each broadcast like
    the places: one plane for all, or one per row with shape (n, 1)). Places already there come back as
    they are; the others are re-expressed (UTM runs on past a zone's edge). Vectorised: one conversion per
    zone met, never per point."""
    east, north, *_ = _moved(places, zone, northern)
    return east, north


def best_zone(top: Places) -> tuple[np.ndarray, np.ndarray]:
    """The zone (n, 1) and hemisphere (n, 1) of each query's best place (column 0 of (n, k)): the plane its
    answers are given on."""
    return np.asarray(top.zone)[:, :1], hemisphere(np.asarray(top.letter)[:, :1])


def metres_between(queries: Places, answers: Places) -> np.ndarray:
    """Metres from each query place (n,) to its answer(s), (n,) or (n, k), under the module's policy: on the
    query's UTM plane, answers of other zones or hemispheres re-expressed there; the great circle for a pair
    no plane holds (`REACH_DEG`). An answer with non-finite coordinates (padding) is infinitely far."""
    shape = np.shape(answers.east)
    if len(shape) not in (1, 2) or np.shape(queries.east) != shape[:1]:
        raise ValueError(
            f"queries must have shape (n,) and answers (n,) or (n, k); got {np.shape(queries.east)} and {shape}")

    def per_query(x) -> np.ndarray:
        # Query-side arrays are (n,): a column axis meets (n, k).
        x = np.asarray(x)
        return np.broadcast_to(x[:, None] if x.ndim == 1 and len(shape) == 2 else x, shape)

    q = Places(*(per_query(a) for a in (queries.east, queries.north, queries.zone, hemisphere(queries.letter))))
    east, north, lat, lon = _moved(answers, q.zone, q.letter)
    out = np.hypot(east - np.asarray(q.east, np.float64), north - np.asarray(q.north, np.float64))
    out[~np.isfinite(out)] = np.inf
    far = np.isfinite(lat) & np.isfinite(out)
    if far.any():
        q_lat, q_lon = utm_to_latlon(q.east[far], q.north[far], q.zone[far], q.letter[far])
        out[far] = haversine_m(q_lat, q_lon, lat[far], lon[far])
    return out
