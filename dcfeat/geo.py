"""UTM helpers: the latitude bands, the hemisphere of a band letter, UTM → lat/lon across zones.

Shared by labels, cells (dcfeat.partition), metrics and predictions.
"""

from __future__ import annotations

import numpy as np
import utm

# The UTM latitude bands C..X (I and O are not used); "N" onwards is northern.
UTM_LETTERS = "CDEFGHJKLMNPQRSTUVWX"


def is_northern(letter) -> np.ndarray:
    """Per UTM band letter (upper or lower case): True north of the equator (N..X)."""
    # One character per point, compared as code points: np.char.upper is ~60x slower
    # on millions of letters. `& ~0x20` folds a..z onto A..Z.
    codes = np.asarray(letter, dtype="U1").view(np.uint32)
    return (codes & ~np.uint32(0x20)) >= ord("N")


def utm_to_latlon(east, north, zone, letter_or_northern) -> tuple[np.ndarray, np.ndarray]:
    """Degrees (lat, lon) of UTM points, each in its own zone and hemisphere.

    `zone` and `letter_or_northern` (band letters, or booleans: northern) may be
    scalars or arrays shaped like the points. Points just outside their zone's
    easting range (a cell centre on a zone edge) are converted, not refused.
    """
    east = np.asarray(east, dtype=np.float64)
    north = np.broadcast_to(np.asarray(north, dtype=np.float64), east.shape)
    zone = np.broadcast_to(np.asarray(zone).astype(np.int64), east.shape)
    hemi = np.asarray(letter_or_northern)
    northern = np.broadcast_to(hemi if hemi.dtype == bool else is_northern(hemi), east.shape)
    lat, lon = np.empty(east.shape), np.empty(east.shape)
    key = zone * 2 + northern
    # `utm.to_latlon` takes one zone per call, so convert zone by zone.
    for k in np.unique(key):
        sel = key == k
        lat[sel], lon[sel] = utm.to_latlon(east[sel], north[sel], int(k // 2), northern=bool(k % 2), strict=False)
    return lat, lon


def in_zone(east, north, zone, letter_or_northern, to_zone: int, to_northern: bool) -> tuple[np.ndarray, np.ndarray]:
    """UTM points re-expressed in one given zone and hemisphere (UTM runs on past a zone's edge): how
    points on both sides of a zone boundary meet on one plane. Points already there are returned as they are."""
    east = np.asarray(east, dtype=np.float64)
    north = np.asarray(north, dtype=np.float64)
    zone = np.broadcast_to(np.asarray(zone).astype(np.int64), east.shape)
    hemi = np.asarray(letter_or_northern)
    northern = np.broadcast_to(hemi if hemi.dtype == bool else is_northern(hemi), east.shape)
    other = (zone != to_zone) | (northern != to_northern)
    if not other.any():
        return east, north
    east, north = east.copy(), north.copy()
    lat, lon = utm_to_latlon(east[other], north[other], zone[other], northern[other])
    east[other], north[other], *_ = utm.from_latlon(lat, lon, force_zone_number=int(to_zone),
                                                    force_northern=bool(to_northern))
    return east, north
