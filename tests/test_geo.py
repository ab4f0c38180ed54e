"""The one geography: distances and planes across UTM zone edges and the equator, and every caller
answering alike for places given in either zone."""

import numpy as np
import polars as pl
import pytest
import utm

from dcfeat.confidence import QueryScores, signals_of
from dcfeat.export import extent
from dcfeat.geo import Places, haversine_m, metres_between, on_plane, utm_to_latlon
from dcfeat.metrics import localisation_recall
from dcfeat.positions import PositionRule, answer
from dcfeat.predict import with_errors
from dcfeat.reports import nearest_photos

# WGS84, for a reference geodesic of short pairs: the ellipsoid's local radii at the mean latitude
# (meridian M and prime vertical N) are exact to ~1e-7 relative under 1 km.
_A, _F = 6_378_137.0, 1 / 298.257223563
_E2 = _F * (2 - _F)


def wgs84_m(lat1, lon1, lat2, lon2):
    phi = np.radians((np.asarray(lat1) + lat2) / 2)
    s = 1 - _E2 * np.sin(phi) ** 2
    M, N = _A * (1 - _E2) / s ** 1.5, _A / np.sqrt(s)
    return np.hypot(M * np.radians(np.asarray(lat2) - lat1), N * np.cos(phi) * np.radians(np.asarray(lon2) - lon1))


def place(lat, lon, zone=None, northern=None) -> Places:
    """Points (degrees) as Places, each in its own zone or in a forced zone/hemisphere."""
    lat, lon = np.atleast_1d(lat).astype(float), np.atleast_1d(lon).astype(float)
    if zone is None:
        zone = np.array([utm.latlon_to_zone_number(a, o) for a, o in zip(lat, lon)])
    zone = np.broadcast_to(zone, lat.shape)
    northern = np.broadcast_to(lat >= 0 if northern is None else northern, lat.shape)
    e, n = np.empty(lat.shape), np.empty(lat.shape)
    for i in range(lat.size):
        e[i], n[i], *_ = utm.from_latlon(lat[i], lon[i], force_zone_number=int(zone[i]),
                                         force_northern=bool(northern[i]))
    return Places(e, n, zone.copy(), np.where(northern, "S", "M"))


# Two points 10 m apart (WGS84) across the zone 10/11 edge at 120° W, 37° N.
LAT = 37.0
DLON = 10.0 / float(wgs84_m(LAT, 0.0, LAT, 1.0))
A, B = (LAT, -120.0 - DLON / 2), (LAT, -120.0 + DLON / 2)


@pytest.mark.parametrize("za", [10, 11])
@pytest.mark.parametrize("zb", [10, 11])
def test_ten_metres_across_a_zone_edge_whichever_zone(za, zb):
    d = metres_between(place(*A, zone=za), place(*B, zone=zb))
    # Measured: 10.0454..10.0461 m, the plane's scale factor (1.00047) at the edge.
    assert d[0] == pytest.approx(10.0, rel=6e-4)
    assert d[0] == pytest.approx(metres_between(place(*A, zone=10), place(*B, zone=10))[0], rel=1e-4)


def test_same_point_in_two_zones_is_zero_metres():
    # The neighbouring zone across the nearer edge, and (-117.1, 9.0) zone 10 / 31, 5.9° and 6° off.
    for lat, lon, other in [(LAT, -120.0001, 11), (LAT, -119.9, 10), (-33.9, 18.0, 33), (0.00001, 9.0, 31),
                            (LAT, -117.1, 10)]:
        z = utm.latlon_to_zone_number(lat, lon)
        d = metres_between(place(lat, lon, zone=z), place(lat, lon, zone=other))
        # Measured: 0.3–0.4 mm next to an edge; 6° from the other zone's meridian 0.5 mm on the equator and
        # 3.8 cm at 37° N (the `utm` package's series).
        assert d[0] < (5e-2 if lon == -117.1 else 1e-3)
    # Either side of the equator: one point in the northern and the southern hemisphere of its zone.
    assert metres_between(place(0.00001, 9.0, northern=True), place(0.00001, 9.0, northern=False))[0] < 1e-6


def test_across_the_equator_letters_n_and_m():
    a, b = (0.00005, 9.0), (-0.00005, 9.0)
    truth = wgs84_m(*a, *b)
    for north_a in (True, False):
        for north_b in (True, False):
            d = metres_between(place(*a, northern=north_a), place(*b, northern=north_b))[0]
            # The plane's scale factor at the central meridian is 0.9996.
            assert d == pytest.approx(truth * 0.9996, rel=1e-5)
    assert place(*a).letter[0] != place(*b).letter[0]


@pytest.mark.parametrize("lat0", [37.0, 0.0, 60.0])
def test_random_pairs_near_an_edge_agree_with_a_geodesic(lat0):
    rng = np.random.default_rng(int(lat0) + 1)
    n = 300
    lat1 = lat0 + rng.uniform(-0.005, 0.005, n)
    lon1 = -120.0 + rng.uniform(-0.01, 0.01, n)
    angle, r = rng.uniform(0, 2 * np.pi, n), rng.uniform(1.0, 1000.0, n)
    lat2 = lat1 + r * np.sin(angle) / 111_000
    lon2 = lon1 + r * np.cos(angle) / (111_000 * np.cos(np.radians(lat1)))
    d = metres_between(place(lat1, lon1), place(lat2, lon2))
    assert (np.array([utm.latlon_to_zone_number(a, o) for a, o in zip(lat2, lon2)]) == 11).any()
    # Measured: ≤ 0.048 % (37° N), 0.098 % (equator), 0.008 % (60° N) against WGS84; the sphere's
    # great circle is itself 0.23–0.56 % off, within 0.6 % of both.
    np.testing.assert_allclose(d, wgs84_m(lat1, lon1, lat2, lon2), rtol=1.2e-3)
    np.testing.assert_allclose(d, haversine_m(lat1, lon1, lat2, lon2), rtol=6e-3)
    np.testing.assert_allclose(metres_between(place(lat2, lon2), place(lat1, lon1)), d, rtol=1e-4)


def test_pairs_no_plane_holds_are_great_circles_and_padding_is_infinite():
    far = metres_between(place(LAT, -120.0001), Places(np.array([[*place(LAT, 60.0).east, np.nan]]),
                                                       np.array([[*place(LAT, 60.0).north, np.nan]]),
                                                       np.array([[41, 0]]), np.array([["S", "S"]])))
    assert far[0, 0] == pytest.approx(haversine_m(LAT, -120.0001, LAT, 60.0), rel=1e-9)
    assert far[0, 1] == np.inf


def test_on_plane_re_expresses_only_other_zones():
    p = place(np.array([LAT, LAT]), np.array([-120.001, -119.999]))
    assert p.zone.tolist() == [10, 11]
    east, north = on_plane(p, 10, True)
    assert east[0] == p.east[0] and north[0] == p.north[0]
    lat, lon = utm_to_latlon(east, north, 10, True)
    np.testing.assert_allclose(lon, [-120.001, -119.999], atol=1e-9)


# Every caller: the same places given in zone 10 or 11 give the same answers.

def test_localisation_recall_either_zone():
    truth = place(np.full(3, LAT), np.array([-120.0001, -119.9999, -120.0002]), zone=10)
    answers = [place(np.full(3, LAT + 0.0001), np.array([-119.9999, -120.0001, -119.9998]), zone=z) for z in (10, 11)]
    got = [localisation_recall(truth.east, truth.north, truth.zone, a.east[:, None], a.north[:, None],
                               a.zone[:, None], q_letter=truth.letter, p_letter=a.letter[:, None]) for a in answers]
    np.testing.assert_allclose(got[0].distances_m, got[1].distances_m, rtol=1e-4)
    # 20.9, 20.9 and 37.2 m: the third is wrong whichever zone its answer is given in.
    assert got[0].recall == got[1].recall == {1: 2 / 3, 5: 2 / 3, 10: 2 / 3, 20: 2 / 3}


def _cells(zone):
    """Four cell centres 20 m apart straddling the 10/11 edge, ranked for one query, given in `zone`."""
    lon = -120.0 + np.array([-0.0001, 0.0001, -0.0003, 0.0003])
    return place(np.full(4, LAT), lon, zone=zone)


def test_positions_either_zone():
    scores = np.array([[0.9, 0.85, 0.6, 0.5]])
    out = []
    for zone in (10, 11, np.array([10, 11, 10, 11])):
        c = _cells(zone)
        at, index = answer(Places(*(np.asarray(a)[None] for a in (c.east, c.north, c.zone, c.letter))),
                           scores, 30.0, PositionRule(45.0, 1.0), ranks=4)
        lat, lon = utm_to_latlon(at.east, at.north, at.zone, at.letter)
        out.append((lat, lon, index))
    for lat, lon, index in out[1:]:
        np.testing.assert_allclose(lat, out[0][0], atol=1e-9)  # ~0.1 mm
        np.testing.assert_allclose(lon, out[0][1], atol=1e-9)
        np.testing.assert_array_equal(index, out[0][2])
    assert abs(out[0][1][0, 0] + 120.0) < 0.0001  # the position lies between the two best cells


def test_confidence_signals_either_zone():
    scores = QueryScores(np.array([[0, 1, 2, 3]]), np.array([[0.9, 0.85, 0.6, 0.5]], np.float32), np.array([0.5]),
                         np.array([0.5]), 30.0, np.array([1.0]))
    sig = []
    for zone in (10, 11, np.array([11, 10, 11, 10])):
        c = _cells(zone)
        classes = pl.DataFrame({"cell_east": c.east, "cell_north": c.north, "utm_zone": c.zone.astype(np.int8),
                                "utm_letter": c.letter})
        sig.append(signals_of(scores, classes, M=20.0, rule=PositionRule(45.0, 1.0)))
    for s in sig[1:]:
        for name in ("spread", "margin"):
            np.testing.assert_allclose(s.values[name], sig[0].values[name], rtol=1e-4)
    assert sig[0].values["spread"][0] > 5


def test_predict_errors_either_zone():
    truth = place(np.array([LAT, LAT]), np.array([-120.0001, -119.9999]), zone=np.array([10, 11]))
    errors = []
    for zone in (10, 11):
        a = place(np.array([LAT, LAT]), np.array([-119.9999, -120.0001]), zone=zone)
        frame = pl.DataFrame({"rank": [1, 1], "utm_east": a.east, "utm_north": a.north, "utm_zone": a.zone,
                              "utm_letter": a.letter})
        t = pl.DataFrame({"utm_east": truth.east, "utm_north": truth.north, "utm_zone": truth.zone,
                          "utm_letter": truth.letter})
        errors.append(with_errors(frame, t)["error_m"].to_numpy())
    np.testing.assert_allclose(errors[0], errors[1], rtol=1e-4)
    np.testing.assert_allclose(errors[0], wgs84_m(LAT, -120.0001, LAT, -119.9999), rtol=1e-3)


def test_nearest_photos_either_zone():
    lon = -120.0 + np.array([-0.0004, -0.00005, 0.0002])
    at = place(np.full(1, LAT), np.array([-119.99998]))
    for zone in (10, 11):
        p = place(np.full(3, LAT), lon, zone=zone)
        photos = pl.DataFrame({"utm_east": p.east, "utm_north": p.north, "utm_zone": p.zone, "utm_letter": p.letter})
        # Zone 10's nearest by raw eastings would be the farthest photo (a 500 km jump at the edge).
        assert nearest_photos(photos, at.east, at.north, at.zone, at.letter).tolist() == [1]


def test_export_extent_either_zone():
    boxes = []
    for zone in (10, 11):
        c = _cells(zone)
        boxes.append(extent(pl.DataFrame({"cell_east": c.east, "cell_north": c.north, "utm_zone": c.zone,
                                          "utm_letter": c.letter})))
    assert boxes[0] == pytest.approx(boxes[1], abs=1e-7)  # 1e-7° ≈ 1 cm; measured 7e-9° (utm's round trip)
    assert boxes[0]["lon_min"] == pytest.approx(-120.0003, abs=1e-7)
