import numpy as np
import pytest
import utm

from dcfeat.geo import haversine_m
from dcfeat.metrics import (
    correct_at_k,
    distances_m,
    error_stats,
    localisation_recall,
    recall_at_k,
)


def test_recall_at_k_four_queries_exact():
    hits = np.array(
        [
            [1, 0, 0, 0, 0],  # found at rank 1
            [0, 0, 1, 0, 0],  # found at rank 3
            [0, 0, 0, 0, 1],  # found at rank 5
            [0, 0, 0, 0, 0],  # never found
        ],
        dtype=bool,
    )
    assert recall_at_k(hits, ks=(1, 2, 3, 5)) == {1: 0.25, 2: 0.25, 3: 0.5, 5: 0.75}


def test_recall_k_beyond_columns_uses_all_columns():
    hits = np.array([[0, 1], [0, 0]], dtype=bool)
    assert recall_at_k(hits) == {1: 0.0, 5: 0.5, 10: 0.5, 20: 0.5}


def test_recall_rejects_empty_and_bad_k():
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((0, 3), dtype=bool))
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3), dtype=bool), ks=(0,))


def test_distance_345_same_zone():
    d = distances_m(np.array([100.0]), np.array([200.0]), 10, np.array([103.0]), np.array([204.0]), 10)
    assert d.shape == (1,)
    assert d[0] == 5.0


def test_distance_broadcasts_predictions_per_query():
    q_e, q_n = np.array([0.0, 10.0]), np.array([0.0, 0.0])
    p_e = np.array([[3.0, 0.0, 6.0], [10.0, 13.0, 10.0]])
    p_n = np.array([[4.0, 0.0, 8.0], [1.0, 4.0, 0.0]])
    np.testing.assert_array_equal(distances_m(q_e, q_n, 10, p_e, p_n, 10), [[5.0, 0.0, 10.0], [1.0, 5.0, 0.0]])


def test_threshold_is_inclusive():
    # Exactly 25.0 m counts as correct (<=); the next float above does not.
    dist = np.array([[25.0, np.nextafter(25.0, 26.0), 24.9, np.inf, np.nan]])
    np.testing.assert_array_equal(correct_at_k(dist), [[True, False, True, False, False]])


def _utm(lat, lon):
    e, n, z, letter = utm.from_latlon(np.array([lat]), np.array([lon]))
    return e[0], n[0], z, letter


def test_cross_zone_distance_matches_haversine():
    # Two points 0.01 deg either side of the zone 10 / 11 boundary (lon -120).
    a, b = (39.0, -120.01), (39.0, -119.99)
    ea, na, za, la = _utm(*a)
    eb, nb, zb, lb = _utm(*b)
    assert (za, zb) == (10, 11)
    truth = haversine_m(a[0], a[1], b[0], b[1])
    assert 1700 < truth < 1750
    # Planar distance across zones is nonsense (hundreds of km); the function must not use it.
    assert abs(ea - eb) > 100_000
    d = distances_m(np.array([ea]), np.array([na]), za, np.array([[eb, ea]]), np.array([[nb, na]]), np.array([[zb, za]]))
    assert d[0, 0] == pytest.approx(truth, rel=0.005)
    assert d[0, 1] == 0.0


def test_same_zone_across_equator_uses_letters():
    # Same zone, opposite hemispheres: northings differ by the 10 000 km false northing.
    a, b = (0.0001, 9.0), (-0.0001, 9.0)
    ea, na, za, la = _utm(*a)
    eb, nb, zb, lb = _utm(*b)
    assert za == zb and la != lb
    d = distances_m(np.array([ea]), np.array([na]), za, np.array([eb]), np.array([nb]), zb, q_letter=la, p_letter=lb)
    # WGS84's meridian degree at the equator is 110 574 m (a sphere's 111 195 m is 0.56 % long); the
    # plane's scale factor at the central meridian is 0.9996.
    assert d[0] == pytest.approx(0.0002 * 110_574.3 * 0.9996, rel=1e-4)


def test_missing_predictions_are_infinitely_far():
    # Padding as evaluate writes it: NaN coordinates and zone 0, which utm rejects.
    d = distances_m(
        np.array([500_000.0]), np.array([4_000_000.0]), 10,
        np.array([[500_003.0, np.nan]]), np.array([[4_000_004.0, np.nan]]), np.array([[10, 0]]),
    )
    np.testing.assert_array_equal(d, [[5.0, np.inf]])


def test_error_stats_and_localisation_recall():
    assert error_stats(np.array([1.0, 2.0, 9.0])) == {"median_m": 2.0, "mean_m": 4.0}
    q_e = np.zeros(4)
    q_n = np.zeros(4)
    p_e = np.array([[3.0, 100.0], [100.0, 25.0], [100.0, 200.0], [30.0, 0.0]])
    p_n = np.zeros((4, 2))
    p_n[0, 0] = 4.0
    res = localisation_recall(q_e, q_n, 33, p_e, p_n, 33, ks=(1, 2, 5))
    assert res.recall == {1: 0.25, 2: 0.75, 5: 0.75}
    np.testing.assert_array_equal(res.distances_m[:, 0], [5.0, 100.0, 100.0, 30.0])
    assert res.median_m == 65.0
    assert res.mean_m == 58.75
