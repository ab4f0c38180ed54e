import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dcfeat.errors import BadInput
from dcfeat.partition import (
    CLASS_SCHEMA,
    cell_centre,
    cell_keys,
    cell_of,
    group_of,
    load_classes,
    partition,
    save_classes,
)

coords = hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e7, allow_nan=False))
cell_sides = st.sampled_from([0.5, 1.0, 7.3, 20.0, 25.0, 100.0])


def sf(n: int, east: float = 550_000.0, north: float = 4_180_000.0):
    """n points at one place in zone 10S, as partition() takes them."""
    return np.full(n, east), np.full(n, north), np.full(n, 10, np.int8), np.full(n, "S")


@settings(max_examples=60, deadline=None)
@given(coords, cell_sides)
def test_every_point_lies_within_half_a_diagonal_of_its_cell_centre(east, M):
    north = east[::-1].copy()
    e, n = cell_centre(*cell_of(east, north, M), M)
    tolerance = 1e-9 * max(1.0, np.abs(east).max())
    assert np.all(np.hypot(e - east, n - north) <= M / math.sqrt(2) + tolerance)
    assert np.all(np.abs(e - east) <= M / 2 + tolerance)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.int64, 30, elements=st.integers(-1000, 1000)),
    hnp.arrays(np.int64, 30, elements=st.integers(-1000, 1000)),
    st.integers(2, 5),
)
def test_two_cells_of_one_group_are_never_neighbours(p, q, N):
    g = group_of(p, q, N)
    assert g.min() >= 0 and g.max() < N * N
    same_group = g[:, None] == g[None, :]
    neighbours = (np.abs(p[:, None] - p[None, :]) <= 1) & (np.abs(q[:, None] - q[None, :]) <= 1)
    distinct = (p[:, None] != p[None, :]) | (q[:, None] != q[None, :])
    assert not np.any(same_group & neighbours & distinct)


@pytest.mark.parametrize(
    ("N", "expected"),
    [
        (1, [0, 0, 0, 0]),
        (2, [0, 3, 2, 1]),  # (0,0) (1,1) (-1,0)→(1,0) (2,-1)→(0,1)
        (3, [0, 4, 6, 8]),  # (0,0) (1,1) (2,0) (2,2)
    ],
)
def test_group_ids_by_hand(N, expected):
    p = np.array([0, 1, -1, 2])
    q = np.array([0, 1, 0, -1])
    assert group_of(p, q, N).tolist() == expected


def test_negative_coordinates_floor_towards_minus_infinity():
    p, q = cell_of(np.array([-0.1, -20.0, 19.99, 20.0]), np.array([0.0, -20.1, -40.0, 39.9]), 20.0)
    assert p.tolist() == [-1, -1, 0, 1]
    assert q.tolist() == [0, -2, -2, 1]
    east, north = cell_centre(np.array([-1]), np.array([-2]), 20.0)
    assert (east.tolist(), north.tolist()) == ([-10.0], [-30.0])


def test_cells_below_min_images_are_dropped():
    a, b = sf(10, 550_005.0), sf(9, 550_025.0)  # cells p = 27500 and 27501
    part = partition(*(np.concatenate(pair) for pair in zip(a, b)), M=20.0, N=2, min_images_per_class=10)
    assert part.classes["p"].to_list() == [27500]
    assert part.classes["images"].to_list() == [10]
    assert part.class_index.tolist() == [0] * 10 + [-1] * 9
    assert part.group.tolist() == [0] * 10 + [2] * 9  # (27501 mod 2, 209000 mod 2) → 1·2 + 0
    assert part.classes_per_group == [1, 0, 0, 0]
    assert part.global_class().tolist() == [0] * 10 + [-1] * 9
    assert sorted(part.cell_images.tolist()) == [9, 10]
    assert "1 cells hold at least min_images_per_class=10" in part.cell_stats()


def test_same_cell_numbers_in_two_zones_are_two_classes():
    e, n, z, letter = sf(4)
    z = np.array([10, 11, 10, 11], np.int8)
    part = partition(e, n, z, letter, M=20.0, N=1, min_images_per_class=2)
    assert part.classes["utm_zone"].to_list() == [10, 11]
    assert part.classes["p"].n_unique() == 1
    assert part.class_index.tolist() == [0, 1, 0, 1]


def test_hemispheres_split_but_latitude_bands_do_not():
    e, n, z, _ = sf(6)
    letter = np.array(["S", "T", "T", "M", "N", "N"])  # M is southern, N northern
    part = partition(e, n, z, letter, M=20.0, N=1, min_images_per_class=1)
    assert part.classes["images"].to_list() == [1, 5]  # southern first: (zone, hemisphere, p, q)
    assert part.classes["utm_letter"].to_list() == ["M", "N"]  # the majority letter (N: 2, S: 1, T: 2 → tie to N)
    assert part.class_index.tolist() == [1, 1, 1, 0, 1, 1]


def test_classes_are_ordered_by_group_then_position():
    p = np.array([3, 0, 1, 2, 0, 1])
    q = np.array([0, 0, 0, 0, 1, 1])
    e, n = cell_centre(p, q, 10.0)
    part = partition(e, n, np.full(6, 10), np.full(6, "S"), M=10.0, N=2, min_images_per_class=1)
    table = part.classes
    assert table["group"].to_list() == [0, 0, 1, 2, 2, 3]
    assert list(zip(table["p"], table["q"])) == [(0, 0), (2, 0), (0, 1), (1, 0), (3, 0), (1, 1)]
    assert table["index"].to_list() == [0, 1, 0, 0, 1, 0]
    assert part.global_class().tolist() == [4, 0, 3, 1, 2, 5]


def test_polars_string_column_and_bad_letters():
    e, n, z, _ = sf(3)
    letters = pl.Series(["S", "S", "T"]).to_numpy()  # object dtype
    assert partition(e, n, z, letters, min_images_per_class=1).classes["utm_letter"].to_list() == ["S"]
    with pytest.raises(ValueError, match="one of"):
        partition(e, n, z, np.array(["S", "s", "I"]))
    with pytest.raises(ValueError, match="one letter"):
        partition(e, n, z, np.array(["S", "ST", "S"]))


def test_empty_partition_has_a_typed_empty_table():
    part = partition(*sf(0))
    assert part.classes.schema == pl.Schema(CLASS_SCHEMA)
    assert part.classes_per_group == [0, 0, 0, 0]
    assert part.cell_stats() == "no images, hence no cells"


@settings(max_examples=15, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-500, 500)),
    st.integers(1, 3),
    st.integers(1, 3),
)
def test_class_table_round_trips_through_parquet(tmp_path_factory, offsets, N, min_images):
    rng = np.random.default_rng(offsets.size)
    east, north = 550_000 + offsets, 4_180_000 + offsets[::-1]
    zone = rng.choice(np.array([10, 11], np.int8), offsets.size)
    letter = rng.choice(np.array(list("RST")), offsets.size)
    part = partition(east, north, zone, letter, M=25.0, N=N, min_images_per_class=min_images)
    assert int(part.classes["images"].sum()) == int((part.class_index >= 0).sum())
    path = tmp_path_factory.mktemp("classes") / "classes.parquet"
    save_classes(part.classes, path)
    back = load_classes(path)
    assert back.schema == part.classes.schema
    assert back.equals(part.classes)


def test_load_names_the_file_and_the_missing_columns(tmp_path):
    path = tmp_path / "classes.parquet"
    pl.DataFrame({"group": [0], "index": [0]}).write_parquet(path)
    with pytest.raises(ValueError, match=r"classes\.parquet.*lacks columns \['utm_zone'"):
        load_classes(path)


def test_load_refuses_an_unsorted_table(tmp_path):
    part = partition(*cell_centre(np.arange(4), np.zeros(4), 20.0), np.full(4, 10), np.full(4, "S"),
                     min_images_per_class=1)
    path = tmp_path / "classes.parquet"
    part.classes.reverse().write_parquet(path)
    with pytest.raises(ValueError, match="sorted by group"):
        load_classes(path)


def test_cell_keys_by_hand():
    # M = 20: the first two points share cell (0, 1) of zone 10 north (letters S and t); the others
    # differ by zone, by hemisphere (M is southern), and by p either side of zero.
    zone = np.array([10, 10, 11, 10, 10, 10])
    letter = np.array(["S", "t", "S", "M", "S", "S"])
    east = np.array([19.9, 0.0, 19.9, 19.9, -0.1, 40.0])
    north = np.array([20.0, 39.9, 20.0, 20.0, 20.0, 20.0])
    keys = cell_keys(zone, letter, east, north, 20.0)

    def key(band, p, q):  # band = zone * 2 + northern; p and q offset by 2^27 in 28 bits each
        return (band << 56) + ((p + (1 << 27)) << 28) + (q + (1 << 27))

    assert keys.dtype == np.int64
    assert keys.tolist() == [key(21, 0, 1), key(21, 0, 1), key(23, 0, 1), key(20, 0, 1), key(21, -1, 1),
                             key(21, 2, 1)]
    # sorted keys follow (zone, hemisphere, p, q)
    assert np.argsort(keys, kind="stable").tolist() == [3, 4, 0, 1, 5, 2]


def test_cell_keys_refuse_cells_beyond_their_bits():
    with pytest.raises(BadInput, match="cell side is too small.*Raise --M"):
        cell_keys(np.array([10]), np.array(["S"]), np.array([500_000.0]), np.array([9e6]), 0.01)
