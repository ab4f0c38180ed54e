import numpy as np
import polars as pl
import pytest
import utm

from dcfeat.errors import BadInput
from dcfeat.labels import collect_images, latlon_to_utm, parse_sfxl_names, read_manifest


def test_sfxl_names_with_empty_fields_and_folders():
    frame = parse_sfxl_names([
        "a/b/@0544388.51@4172758.25@10@S@037.70098@-122.49646@kPnAB@@210@@@@201606@@.jpg",
        "@0544390.00@4172760.00@10@s@@@@@@@@@@@.jpg",
    ])
    assert frame["utm_east"].to_list() == [544388.51, 544390.0]
    assert frame["utm_north"].to_list() == [4172758.25, 4172760.0]
    assert frame["utm_zone"].to_list() == [10, 10]
    assert frame["utm_letter"].to_list() == ["S", "S"]
    assert frame["heading"].to_list() == [210.0, None]
    assert frame["lat"].to_list() == [37.70098, None]
    assert frame.schema["utm_zone"] == pl.Int8


def test_zone_comes_from_lat_lon_when_the_name_leaves_it_empty():
    frame = parse_sfxl_names(["@0244326.26@4176542.71@@@37.7@-119.9@@@@@@@@@.jpg"])
    assert frame["utm_zone"].item() == 11 and frame["utm_letter"].item() == "S"


def test_unparseable_names_are_named_with_the_pattern_and_the_manifest_alternative():
    with pytest.raises(BadInput) as e:
        parse_sfxl_names(["ok/@1@2@10@S@@@@@@@@@@@.jpg", "x/IMG_0001.jpg", "y/@abc@@10@S@@@@@@@@@@@.jpg"])
    msg = str(e.value)
    assert "2 of 3" in msg and "x/IMG_0001.jpg" in msg and "y/@abc" in msg
    assert "@UTM_east@UTM_north" in msg and "--manifest" in msg


def test_latlon_to_utm_uses_each_points_own_zone():
    lat = np.array([37.7, 37.7, -33.87, 60.0])
    lon = np.array([-122.5, -119.9, 151.21, 5.0])  # zone 10, 11, 56, and Norway's widened 32V
    frame = latlon_to_utm(lat, lon)
    for i in range(len(lat)):
        e, n, z, letter = utm.from_latlon(lat[i], lon[i])
        assert frame["utm_zone"][i] == z and frame["utm_letter"][i] == letter
        assert frame["utm_east"][i] == pytest.approx(e, abs=1e-6)
        assert frame["utm_north"][i] == pytest.approx(n, abs=1e-6)


def test_manifest_csv_with_latlon_and_parquet_with_utm(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(b"")
    csv = tmp_path / "m.csv"
    csv.write_text("path,lat,lon,heading\nimg/a.jpg,37.7,-122.5,90\nimg/b.jpg,37.7,-119.9,\n")
    got = collect_images(None, csv)
    assert got.labels["utm_zone"].to_list() == [10, 11]
    assert got.labels["heading"].to_list() == [90.0, None]
    assert got.paths[0] == tmp_path / "img" / "a.jpg"

    pq = tmp_path / "m.parquet"
    pl.DataFrame({"file": ["b.jpg", "a.jpg"], "utm_east": [1.0, 2.0], "utm_north": [3.0, 4.0],
                  "utm_zone": [10, 10], "utm_letter": ["s", "S"]}).write_parquet(pq)
    got = collect_images(tmp_path / "img", pq, path_column="file")
    assert got.labels["image_id"].to_list() == ["a.jpg", "b.jpg"]  # sorted
    assert got.labels["utm_letter"].to_list() == ["S", "S"]


def test_manifest_errors_name_the_columns_and_missing_files(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,x,y\na.jpg,1,2\n")
    with pytest.raises(BadInput, match="expected a `path` column"):
        read_manifest(bad)
    missing = tmp_path / "n.csv"
    missing.write_text("path,lat,lon\nnope.jpg,37.7,-122.5\n")
    with pytest.raises(BadInput, match="nope.jpg"):
        collect_images(None, missing)


def test_images_folder_errors(tmp_path):
    with pytest.raises(BadInput, match="no such directory"):
        collect_images(tmp_path / "nope")
    with pytest.raises(BadInput, match="no image files"):
        collect_images(tmp_path)
