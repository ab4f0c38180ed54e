"""The family of synthetic cities: each turns one knob of what makes VPR hard, the default city unchanged."""

import numpy as np
import pytest

from dcfeat.synthetic.features import ALIAS_MIN_M, FAMILY, SMALL, make_city


@pytest.mark.parametrize("name", FAMILY)
def test_every_city_of_the_family_builds_every_split(name):
    city = make_city(**{**SMALL, **FAMILY[name]})
    for split in ("train", "val", "test", "test-db"):
        e = city.embeddings(split, 0, 50)
        assert e.shape == (min(50, city.size(split)), SMALL["dim"]) and np.isfinite(e).all()


def test_aliased_landmarks_repeat_far_away():
    plain, aliased = make_city(**SMALL), make_city(**{**SMALL, "aliasing": 0.3})
    v = aliased.landmark_vector
    _, first = np.unique(v, axis=0, return_index=True)
    twins = len(v) - len(first)
    assert twins == int(0.3 * len(v))  # each copy repeats an unchanged landmark
    assert len(np.unique(plain.landmark_vector, axis=0)) == len(plain.landmark_vector)
    groups = {}
    for i, row in enumerate(map(bytes, v)):
        groups.setdefault(row, []).append(i)
    east, north = aliased.landmark_east, aliased.landmark_north
    for members in (g for g in groups.values() if len(g) > 1):
        d = np.hypot(east[members][:, None] - east[members], north[members][:, None] - north[members])
        assert (d.max(1) >= ALIAS_MIN_M).all()  # every copy has a twin in another place


def test_a_sparse_city_keeps_a_share_of_the_training_panoramas():
    dense = make_city(**{**SMALL, "spacing_m": 8.0})
    sparse = make_city(**{**SMALL, "spacing_m": 8.0, "train_keep": 0.4})
    assert sparse.size("train") / dense.size("train") == pytest.approx(0.4, abs=0.05)
    assert sparse.size("test-db") == dense.size("test-db")  # the database drive is whole


def test_an_irregular_city_turns_its_streets():
    grid, irregular = make_city(**SMALL), make_city(**{**SMALL, "layout": "irregular"})
    turn = np.mod(grid.rows["train"].heading - irregular.rows["train"].heading, 90)
    assert np.mean(np.minimum(turn, 90 - turn) > 1.0) > 0.5  # most streets off the grid's bearings
    for city in (grid, irregular):  # the same district
        assert abs(np.median(city.rows["train"].east) - np.median(grid.rows["train"].east)) < SMALL["block_m"]
    with pytest.raises(ValueError, match="layout"):
        make_city(**{**SMALL, "layout": "radial"})


def test_occlusion_hides_up_to_the_widest_sector():
    city = make_city(**{**SMALL, "max_occlusion_deg": 240.0})
    widths = np.degrees(city.rows["test"].occlusion[:, 1])
    assert widths.max() > 200 and widths.max() <= 240 and (city.rows["train"].occlusion == 0).all()
