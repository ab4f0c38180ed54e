"""A seeded synthetic city of streets, rendered as street-level views for demos and tests.

Streets form a rotated square grid around San Francisco (UTM 10S), lined on
both sides by procedurally textured buildings (colour, window grid, shop sign,
awning, door) drawn from the seed and the street. A view is ray-cast in the
street's corridor: each image column is a ray that meets the left or right
facade plane, or leaves through a crossing and meets a facade of the cross
street; rows below the horizon that meet the ground first show road or
sidewalk. A step along the street scrolls the facades (nearby spots alias, far
spots differ) and the heading chooses between looking down the street and at
a facade. dcfeat.synthetic.photos turns views into an SF-XL-named image set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORIGIN = (550_000.0, 4_180_000.0)  # UTM 10S, San Francisco
ROAD_M = 5.0  # half width of the carriageway
WALL_M = 8.0  # half width between facades: road plus a 3 m sidewalk
CAMERA_M = 2.5  # a car-roof camera, as in SF-XL
FOG_M = 150.0  # haze range: the far end of a long street fades instead of aliasing to pixel mush
SUN_DEG = 200.0  # afternoon sun: facades facing it are lit, the others shaded
SKY = np.array([[0.45, 0.65, 0.92], [0.86, 0.90, 0.95]], np.float32)  # zenith, horizon
GROUND = np.array([[0.33] * 3, [0.55] * 3, [0.68] * 3, [0.85, 0.75, 0.25]], np.float32)  # road, joint, paving, paint
HAZE_LEVELS = 64  # the ground's haze is looked up in steps of 1/63, invisible after JPEG
HAZY_GROUND = (GROUND[:, None] + (SKY[1] - GROUND)[:, None] * np.linspace(0, 1, HAZE_LEVELS)[:, None]).reshape(-1, 3)
DUSK = np.array([1.0, 0.78, 0.62])  # the queries' warm evening light
PALETTE = np.array([[0.70, 0.35, 0.28], [0.86, 0.80, 0.66], [0.92, 0.92, 0.88], [0.60, 0.62, 0.64],
                    [0.62, 0.75, 0.86], [0.58, 0.72, 0.55], [0.93, 0.83, 0.50]], np.float32)
# One row per building along a side of a street, sorted by start (metres along the street). Sign and
# awning spans are metres from the building's start, empty when a == b; colours are RGB in [0, 1].
BUILDING = np.dtype([
    ("start", "f8"), ("end", "f8"), ("height", "f4"), ("floor_m", "f4"), ("door_at", "f4"),
    ("pitch_m", "f4"), ("window_w", "f4"), ("window_h", "f4"),  # window columns; window share of a pitch, a floor
    ("sign_a", "f4"), ("sign_b", "f4"), ("awning_a", "f4"), ("awning_b", "f4"),
    ("base", "f4", 3), ("window", "f4", 3), ("sign", "f4", 3), ("awning", "f4", 3),
])


@dataclass(frozen=True)
class Street:
    origin: tuple[float, float]  # UTM east, north of along = 0
    bearing: float  # compass degrees of the along direction; the right side is bearing + 90
    length: float
    left: np.ndarray  # BUILDING rows
    right: np.ndarray

    def locate(self, east: np.ndarray, north: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(along, across) of UTM points in this street's frame; across is positive to the right."""
        b = np.radians(self.bearing)
        de, dn = np.asarray(east) - self.origin[0], np.asarray(north) - self.origin[1]
        return de * np.sin(b) + dn * np.cos(b), de * np.cos(b) - dn * np.sin(b)

    def utm_of(self, along: np.ndarray, across: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = np.radians(self.bearing)
        return (self.origin[0] + along * np.sin(b) + across * np.cos(b),
                self.origin[1] + along * np.cos(b) - across * np.sin(b))


@dataclass(frozen=True)
class City:
    """Two families of parallel streets; street k of one family crosses the others at along = k·block_m."""

    streets: tuple[Street, ...]
    block_m: float

    def crossing(self, index: int) -> tuple[Street, ...]:
        """The streets that cross street `index`, in the order of their crossings."""
        n = len(self.streets) // 2
        return self.streets[n:] if index < n else self.streets[:n]


def saturated(rng: np.random.Generator, n: int) -> np.ndarray:
    c = rng.random((n, 3))
    return (c - c.min(1, keepdims=True)) / np.ptp(c, axis=1, keepdims=True).clip(1e-6)


def _buildings(rng: np.random.Generator, length: float, block_m: float) -> np.ndarray:
    """Buildings 7-18 m wide filling each block; the street runs one block past its ends."""
    crossings = np.arange(0.0, length + 1e-6, block_m)
    edges = np.r_[-block_m, np.repeat(crossings, 2) + np.tile([-WALL_M, WALL_M], crossings.size), length + block_m]
    start: list[float] = []
    end: list[float] = []
    for first, last in edges.reshape(-1, 2):
        cuts = first + np.cumsum(rng.uniform(7.0, 18.0, int((last - first) / 7) + 1))
        cuts = cuts[cuts < last - 5.0]  # a sliver under 5 m joins its neighbour
        start.extend(np.r_[first, cuts])
        end.extend(np.r_[cuts, last])
    out = np.zeros(len(start), BUILDING)
    n, out["start"], out["end"] = len(out), start, end
    width = out["end"] - out["start"]
    for part, widest, share in (("sign", 0.9, 0.7), ("awning", 0.8, 0.4)):  # `share` of buildings have one
        span = rng.uniform(0.3, widest, n) * width * (rng.random(n) < share)
        out[f"{part}_a"] = rng.uniform(0, 1, n) * (width - span)
        out[f"{part}_b"] = out[f"{part}_a"] + span
    out["height"], out["floor_m"] = rng.uniform(8.0, 30.0, n), rng.uniform(3.0, 3.8, n)
    out["door_at"] = rng.uniform(0.5, 1.0, n) * (width - 1.5)
    out["pitch_m"], out["window_w"], out["window_h"] = rng.uniform([2.5, 0.35, 0.4], [4.0, 0.7, 0.7], (n, 3)).T
    out["base"] = (PALETTE[rng.integers(0, len(PALETTE), n)] * rng.uniform(0.8, 1.1, (n, 1))).clip(0, 1)
    out["window"] = np.array([0.15, 0.2, 0.28]) + rng.uniform(-0.08, 0.25, (n, 3))
    out["sign"], out["awning"] = saturated(rng, n), saturated(rng, n) * 0.8
    return out


def make_streets(*, seed: int = 0, streets: int = 4, block_m: float = 60.0, rotation_deg: float = 17.0) -> City:
    """`streets` north-south-ish then `streets` east-west-ish streets, each (streets-1)·block_m long.

    Each side's buildings have their own seed [seed, family, index, side], so a
    street looks the same whatever else is rendered.
    """
    if streets < 2:
        raise ValueError(f"streets={streets}: a grid needs at least 2 streets each way")
    length, turn = (streets - 1) * block_m, np.radians(rotation_deg)
    out = []
    for family, bearing in enumerate((-rotation_deg, 90.0 - rotation_deg)):
        for i in range(streets):
            # Family 0 runs along the grid's v axis and is spaced along u, family 1 the other way round.
            u, v = (i * block_m, 0.0) if family == 0 else (0.0, i * block_m)
            origin = (ORIGIN[0] + u * np.cos(turn) - v * np.sin(turn), ORIGIN[1] + u * np.sin(turn) + v * np.cos(turn))
            left, right = (_buildings(np.random.default_rng([seed, family, i, side]), length, block_m)
                           for side in (0, 1))
            out.append(Street(origin, bearing % 360, length, left, right))
    return City(tuple(out), block_m)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _haze(distance: np.ndarray) -> np.ndarray:
    return 1 - np.exp(distance * np.float32(-1 / FOG_M))


def _walls(city: City, index: int, along: float, across: float, sin: np.ndarray, cos: np.ndarray) -> tuple:
    """Per image column: the building its ray meets, whether there is one, how many metres into it,
    the horizontal range and the compass bearing the facade faces.

    A ray that leaves the street through a crossing runs on down the cross
    street to one of its facade planes, so a crossing shows the cross street.
    """
    street = city.streets[index]
    right = sin > 0
    reach = np.where(right, WALL_M - across, WALL_M + across) / np.maximum(np.abs(sin), 1e-6)
    s = along + reach * cos
    facing = street.bearing + np.where(right, 270.0, 90.0)
    cross = city.crossing(index)
    k = np.clip(np.rint(s / city.block_m), 0, len(cross) - 1).astype(int)
    gap = np.abs(s - k * city.block_m) < WALL_M
    forward = np.where(np.abs(cos) < 1e-6, 1e-6, cos)
    plane = k * city.block_m + np.copysign(WALL_M, forward)
    far = (plane - along) / forward
    reach, facing = np.where(gap, far, reach), np.where(gap, street.bearing + np.where(cos > 0, 180.0, 0.0), facing)
    sources = [(street.left, ~gap & ~right, s), (street.right, ~gap & right, s)]
    for j, other in enumerate(cross):
        if (gap & (k == j)).any():
            there, side = other.locate(*street.utm_of(plane, across + far * sin))
            hit = gap & (k == j)
            sources += [(other.left, hit & (side < 0), there), (other.right, hit & (side > 0), there)]
    found, wall, u = np.zeros(sin.size, BUILDING), np.zeros(sin.size, bool), np.zeros(sin.size)
    for buildings, mask, coord in sources:
        if mask.any():
            at = buildings[np.clip(np.searchsorted(buildings["start"], coord, side="right") - 1, 0, len(buildings) - 1)]
            found, u = np.where(mask, at, found), np.where(mask, coord - at["start"], u)
            wall |= mask & (coord >= at["start"]) & (coord < at["end"])
    return found, wall, u.astype(np.float32), reach.astype(np.float32), facing


def palette_view(city: City, index: int, along: float, across: float, heading: float, size: int,
                  horizon_px: float = 0.0, fov_deg: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """A view as a colour table (n, 3) and a (size, size) index into it.

    Colours are looked up, not blended: the table holds sky rows, hazed
    per-column facade colours and hazed ground paints. Blending whole RGB
    images per material was 10x slower (numpy's length-3 inner loops), and a
    daylight photo only has to rescale the table.
    """
    f = size / 2 / np.tan(np.radians(fov_deg) / 2)
    centre, cy = (size - 1) / 2, (size - 1) / 2 + horizon_px
    col = np.arange(size, dtype=np.int32)
    alpha = np.arctan((col - centre) / f)  # column ray offset from the optical axis
    theta = np.radians(heading - city.streets[index].bearing) + alpha  # ray angle from the along direction, clockwise
    sin, cos = np.sin(theta).astype(np.float32), np.cos(theta).astype(np.float32)
    p, wall, u, reach, facing = _walls(city, index, along, across, sin, cos)
    width = (p["end"] - p["start"]).astype(np.float32)

    rows = np.arange(size, dtype=np.float32)[:, None]
    z = CAMERA_M + (cy - rows) * (reach * np.cos(alpha) / f).astype(np.float32)  # height where the ray meets the wall
    facade = wall & (z >= 0) & (z <= p["height"])
    shop = z - 4.0  # a 4 m shop floor below the window grid
    window = ((shop > 0) & (z < p["height"] - 1.0) & (_frac(shop / p["floor_m"]) < p["window_h"])
              & ((u > 1.0) & (u < width - 1.0) & (_frac((u - 1.0) / p["pitch_m"]) < p["window_w"])))
    material = window.astype(np.int32)
    material[(z > 3.0) & (z < 3.8) & ((u > p["sign_a"]) & (u < p["sign_b"]))] = 2
    material[(z > 2.3) & (z < 2.9) & ((u > p["awning_a"]) & (u < p["awning_b"]))] = 3
    material[(z < 2.3) & ((u > p["door_at"]) & (u < p["door_at"] + 1.4))] = 4
    shade = 0.85 + 0.15 * np.cos(np.radians(facing - SUN_DEG))
    stripes = np.where(_frac(u / 0.8) < 0.5, 1.0, 0.7)[:, None]
    facade_rgb = np.stack([p["base"] * shade[:, None], p["window"], p["sign"], p["awning"] * stripes, p["base"] * 0.3])
    facade_rgb += (SKY[1] - facade_rgb) * _haze(reach)[:, None]
    lookup = np.where(facade, (material + 1) * size + col, np.arange(size)[:, None])  # sky: a colour per row

    first = min(max(int(np.floor(cy)) + 1, 0), size)  # the ground lies below the horizon only
    ground_reach = f * CAMERA_M / (rows[first:] - np.float32(cy)) / np.cos(alpha).astype(np.float32)
    side, ahead = across + ground_reach * sin, along + ground_reach * cos
    crossing = np.abs(ahead - np.clip(np.rint(ahead / city.block_m), 0, len(city.streets) // 2 - 1) * city.block_m)
    road = (np.abs(side) < ROAD_M) | (crossing < ROAD_M)
    paint = np.where(road, 0, np.where(_frac(ahead * (1 / 1.5)) < 0.05, 1, 2)).astype(np.int32)
    paint[(np.abs(side) < 0.12) & (_frac(ahead * (1 / 6.0)) < 0.5)] = 3  # dashed centre line
    level = np.rint(_haze(ground_reach) * (HAZE_LEVELS - 1)).astype(np.int32)
    lookup[first:] = np.where(facade[first:], lookup[first:], 6 * size + paint * HAZE_LEVELS + level)

    sky_rgb = SKY[1] + (SKY[0] - SKY[1]) * np.clip((cy - rows) / size * 2, 0, 1)
    return np.concatenate([sky_rgb, facade_rgb.reshape(-1, 3), HAZY_GROUND]).astype(np.float32), lookup


def render_view(city: City, index: int, along: float, across: float, heading: float, *, size: int = 224,
                horizon_px: float = 0.0, fov_deg: float = 90.0) -> np.ndarray:
    """A (size, size, 3) float32 RGB view in [0, 1] from a point of street `index` at a compass heading."""
    table, pixels = palette_view(city, index, along, across, heading, size, horizon_px, fov_deg)
    return np.take(table, pixels, axis=0)
