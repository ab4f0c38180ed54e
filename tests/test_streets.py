import re

import numpy as np
import pytest
import utm
from PIL import Image

from dcfeat.labels import find_images, parse_sfxl_names
from dcfeat.synthetic.photos import render_city
from dcfeat.synthetic.streets import ROAD_M, make_streets, render_view

# Two streets each way, 120 m long: pairs 100+ m apart exist, and it renders in ~0.4 s.
SMALL = {"streets": 2, "block_m": 120.0, "headings": (0, 90), "size": 96, "queries": 8, "val_queries": 4}
SPLITS = ("train", "test-db", "test", "val")
NAME = re.compile(r"@\d{7}\.\d{2}@\d{7}\.\d{2}@10@S@\d+\.\d{5}@-\d+\.\d{5}@p\d{6}@@\d{1,3}@@@@@@\.jpg")


@pytest.fixture(scope="module")
def city_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("city")
    render_city(out, seed=0, **SMALL)
    return out


def labels(root, split):
    return parse_sfxl_names(find_images(root / split))


def pixels(root, split, ids) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / split / i), np.float32) for i in ids])


def test_every_split_holds_sfxl_named_jpegs_of_the_size(city_dir):
    counts = {}
    for split in SPLITS:
        ids = find_images(city_dir / split)
        counts[split] = len(ids)
        assert all(NAME.fullmatch(i) for i in ids), ids[:3]
        frame = parse_sfxl_names(ids)
        assert frame["image_id"].n_unique() == len(ids)
        assert set(frame["utm_zone"]) == {10} and set(frame["utm_letter"]) == {"S"}
        east, north, _, _ = utm.from_latlon(frame["lat"].to_numpy(), frame["lon"].to_numpy(), force_zone_number=10)
        assert np.abs(east - frame["utm_east"].to_numpy()).max() < 1.5  # lat/lon have 5 decimals: ~1 m
        assert np.abs(north - frame["utm_north"].to_numpy()).max() < 1.5
        assert ((frame["heading"] >= 0) & (frame["heading"] < 360)).all()
        for i in ids[:5]:
            with Image.open(city_dir / split / i) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 96))
    # 2 + 2 streets of 31 spots, the 4 crossings kept once, 2 headings; the database every 8 m.
    assert counts == {"train": (4 * 31 - 4) * 2, "test-db": (4 * 16 - 4) * 2, "test": 8, "val": 4}


def test_same_seed_same_bytes_other_seed_other_city(city_dir, tmp_path):
    again = render_city(tmp_path / "again", seed=0, **SMALL)
    for split, paths in again.items():
        assert sorted(p.name for p in paths) == find_images(city_dir / split)
        assert all(p.read_bytes() == (city_dir / split / p.name).read_bytes() for p in paths)
    other = render_city(tmp_path / "other", seed=1, **{**SMALL, "headings": (90,), "queries": 1, "val_queries": 1})
    same_place = [p for p in other["train"] if (city_dir / "train" / p.name).exists()]
    assert len(same_place) == len(other["train"])  # the streets and spots depend on the geometry only
    assert not any(p.read_bytes() == (city_dir / "train" / p.name).read_bytes() for p in same_place)


def test_refuses_a_folder_with_images_and_oversized_images(city_dir, tmp_path):
    with pytest.raises(FileExistsError, match="empty or new folder"):
        render_city(city_dir, **SMALL)
    with pytest.raises(ValueError, match="16 to 512"):
        render_city(tmp_path, size=1024)


def test_positions_lie_on_the_streets_and_queries_look_anywhere(city_dir):
    streets = make_streets(seed=0, streets=2, block_m=120.0).streets
    for split, off_centre in (("train", 0.01), ("test-db", 0.01), ("test", 0.6 * ROAD_M), ("val", 0.6 * ROAD_M)):
        frame = labels(city_dir, split)
        east, north = frame["utm_east"].to_numpy(), frame["utm_north"].to_numpy()
        frames = [s.locate(east, north) for s in streets]
        on_street = [(np.abs(across) <= off_centre) & (along > -0.01) & (along < s.length + 0.01)
                     for s, (along, across) in zip(streets, frames)]
        assert np.any(on_street, axis=0).all(), split
    train_headings = set(labels(city_dir, "train")["heading"])
    assert len(train_headings) == 3  # 0 and 90 relative to the two street directions: 343, 73, 163
    assert set(labels(city_dir, "test")["heading"]) - train_headings


def test_queries_are_darker_than_the_daylight_database(city_dir):
    day = pixels(city_dir, "test-db", find_images(city_dir / "test-db")[:40]).mean()
    dusk = pixels(city_dir, "test", find_images(city_dir / "test")).mean()
    assert dusk < 0.8 * day


def test_spots_4_m_apart_look_alike_and_spots_100_m_apart_do_not(city_dir):
    """The premise of classifying places: neighbours alias, distant places differ.

    Measured with 4 seeds on this city: mean absolute difference 22-23 (of 255)
    between same-heading train images 4 m apart, 36-38 for 100+ m apart (ratio 0.58-0.63).
    """
    frame = labels(city_dir, "train")
    east, north, heading = (frame[c].to_numpy() for c in ("utm_east", "utm_north", "heading"))
    img = pixels(city_dir, "train", frame["image_id"].to_list())
    distance = np.hypot(east[:, None] - east, north[:, None] - north)
    same = heading[:, None] == heading
    near = np.argwhere(same & (np.abs(distance - 4.0) < 0.05))
    far = np.argwhere(same & (distance >= 100.0))
    far = far[np.random.default_rng(0).choice(len(far), 500, replace=False)]
    near_diff = np.mean([np.abs(img[a] - img[b]).mean() for a, b in near])
    far_diff = np.mean([np.abs(img[a] - img[b]).mean() for a, b in far])
    assert len(near) > 400
    assert near_diff < 0.75 * far_diff, (near_diff, far_diff)


def test_render_view_looks_down_the_street_or_at_a_facade():
    city = make_streets(seed=0, streets=2, block_m=120.0)
    street = city.streets[0]
    along = render_view(city, 0, 60.0, 0.0, street.bearing, size=64)
    facade = render_view(city, 0, 60.0, 0.0, street.bearing + 90, size=64)
    assert along.shape == facade.shape == (64, 64, 3) and along.dtype == np.float32
    assert 0 <= along.min() and along.max() <= 1
    # Down the street the sky shows at the top centre; a facade 8 m away fills it.
    sky = np.array([0.45, 0.65, 0.92])
    assert np.abs(along[0, 32] - sky).max() < 0.05
    assert np.abs(facade[0, 32] - sky).max() > 0.1
