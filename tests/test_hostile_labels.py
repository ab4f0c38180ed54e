"""Hostile image folders and manifests: link loops, impossible labels, paths outside --images."""

import os
import threading

import polars as pl
import pytest

from dcfeat.errors import BadInput
from dcfeat.labels import (
    check_labels,
    collect_images,
    find_images,
    parse_sfxl_names,
    read_manifest,
)
from tests.conftest import invoke

GOOD = "@0544388.51@4172758.25@10@S@037.70098@-122.49646@pano@@210@@@@201606@@.jpg"


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def manifest(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# 1. symlink loops under --images


def test_a_link_back_to_the_root_lists_each_image_once(tmp_path):
    root = tmp_path / "img"
    touch(root / "a" / GOOD)
    touch(root / "b.jpg")
    os.symlink(root, root / "a" / "loop")
    assert find_images_within(root) == [f"a/{GOOD}", "b.jpg"]


def find_images_within(root, seconds=30):
    """find_images(root), failing the test instead of hanging when the walk does not end."""
    got = []
    walk = threading.Thread(target=lambda: got.append(find_images(root)), daemon=True)
    walk.start()
    walk.join(timeout=seconds)
    assert not walk.is_alive(), f"the walk under {root} did not end in {seconds} s"
    return got[0]


def test_two_links_into_each_other_list_each_image_once(tmp_path):
    root = tmp_path / "img"
    touch(root / "a" / "x.jpg")
    touch(root / "b" / "y.jpg")
    os.symlink(root / "b", root / "a" / "to_b")
    os.symlink(root / "a", root / "b" / "to_a")
    assert find_images_within(root) == ["a/x.jpg", "b/y.jpg"]


def test_two_links_back_to_the_root_end(tmp_path):
    root = tmp_path / "img"
    touch(root / "a" / "x.jpg")
    os.symlink(root, root / "a" / "up")
    os.symlink(root, root / "a" / "up_again")  # 2 ** depth paths until the kernel's link limit: endless
    assert find_images_within(root) == ["a/x.jpg"]


def test_a_link_to_a_folder_elsewhere_is_still_followed(tmp_path):
    touch(tmp_path / "elsewhere" / "z.jpg")
    root = tmp_path / "img"
    touch(root / "a.jpg")
    os.symlink(tmp_path / "elsewhere", root / "more")
    assert find_images(root) == ["a.jpg", "more/z.jpg"]


# 2. impossible labels are refused before anything is written


@pytest.mark.parametrize("name, shown", [
    ("@nan@4172758.25@10@S@@@@@@@@@@@.jpg", "utm_east=nan"),
    ("@inf@4172758.25@10@S@@@@@@@@@@@.jpg", "utm_east=inf"),
    ("@0544388.51@nan@10@S@@@@@@@@@@@.jpg", "utm_north=nan"),
    ("@0544388.51@-5@10@S@@@@@@@@@@@.jpg", "utm_north=-5.0"),
    ("@0@4172758.25@10@S@@@@@@@@@@@.jpg", "utm_east=0.0"),
    ("@1000000@4172758.25@10@S@@@@@@@@@@@.jpg", "utm_east=1000000.0"),
    ("@0544388.51@4172758.25@10@Z@@@@@@@@@@@.jpg", "utm_letter='Z'"),
    ("@0544388.51@4172758.25@10@i@@@@@@@@@@@.jpg", "utm_letter='I'"),
    ("@0544388.51@4172758.25@10.5@S@@@@@@@@@@@.jpg", "utm_zone=10.5"),
    ("@0544388.51@4172758.25@61@S@@@@@@@@@@@.jpg", "utm_zone=61.0"),
    ("@0544388.51@4172758.25@10@S@95@-122.5@@@@@@@@@.jpg", "lat=95.0"),
    ("@0544388.51@4172758.25@10@S@37.7@200@@@@@@@@@.jpg", "lon=200.0"),
    ("@0544388.51@4172758.25@10@S@@@@@inf@@@@@@.jpg", "heading=inf"),
    ("@0544388.51@4172758.25@@@-82@5@@@@@@@@@.jpg", "no lat/lon to derive"),  # UTM stops at 80°S
])
def test_impossible_labels_in_file_names_are_refused(tmp_path, name, shown):
    root = tmp_path / "img"
    touch(root / GOOD)
    touch(root / "sub" / name)
    with pytest.raises(BadInput) as e:
        collect_images(root)
    msg = str(e.value)
    assert f"image file names under {root}" in msg and "1 of 2" in msg
    assert f"sub/{name}" in msg and shown in msg and "utm_zone an integer 1..60" in msg


@pytest.mark.parametrize("header, row, shown", [
    ("path,utm_east,utm_north,utm_zone,utm_letter", "a.jpg,NaN,4172758.25,10,S", "utm_east=nan"),
    ("path,utm_east,utm_north,utm_zone,utm_letter", "a.jpg,544388.5,4172758.25,10.5,S", "utm_zone=10.5"),
    ("path,utm_east,utm_north,utm_zone,utm_letter", "a.jpg,544388.5,4172758.25,0,S", "utm_zone=0.0"),
    ("path,utm_east,utm_north,utm_zone,utm_letter", "a.jpg,544388.5,4172758.25,10,I", "utm_letter='I'"),
    ("path,utm_east,utm_north,utm_zone,utm_letter", "a.jpg,544388.5,4172758.25,10,SS", "utm_letter='SS'"),
    ("path,utm_east,utm_north,utm_zone,utm_letter,lat,lon", "a.jpg,544388.5,4172758.25,10,S,37.7,-inf", "lon=-inf"),
    ("path,lat,lon", "a.jpg,NaN,-122.5", "lat=nan"),
    ("path,lat,lon", "a.jpg,-82,5", "no lat/lon to derive"),
    ("path,lat,lon", "a.jpg,37.7,", "no lat/lon to derive"),
    ("path,lat,lon,heading", "a.jpg,37.7,-122.5,nan", "heading=nan"),
])
def test_impossible_labels_in_a_manifest_are_refused(tmp_path, header, row, shown):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    good = "b.jpg,544388.5,4172758.25,10,S" if "utm_east" in header else "b.jpg,37.7,-122.5"
    good += "," * (header.count(",") - good.count(","))
    path = manifest(tmp_path, f"{header}\n{good}\n{row}\n")
    with pytest.raises(BadInput) as e:
        collect_images(None, path)
    msg = str(e.value)
    assert f"--manifest {path}" in msg and "1 of 2" in msg and "a.jpg" in msg and shown in msg


def test_manifest_cells_that_are_not_numbers_are_named(tmp_path):
    path = manifest(tmp_path, "path,utm_east,utm_north,utm_zone,utm_letter\na.jpg,12 km,4172758.25,10,S\n")
    with pytest.raises(BadInput, match=r"column `utm_east` has 1 cells that are not numbers, first: \['12 km'\]"):
        read_manifest(path)


def test_check_labels_lists_the_count_and_the_first_rows():
    frame = parse_sfxl_names([GOOD])
    check_labels(frame, "store x.labels")  # completed labels (int8 zone) pass
    bad = pl.concat([frame] + [frame.with_columns(image_id=pl.lit(f"{i}.jpg"), utm_letter=pl.lit("O"))
                               for i in range(7)])
    with pytest.raises(BadInput) as e:
        check_labels(bad, "store x.labels")
    msg = str(e.value)
    assert msg.startswith("store x.labels: 7 of 8 rows") and "4.jpg: utm_letter='O'" in msg and "5.jpg" not in msg


def test_impossible_labels_exit_2_and_write_nothing(tmp_path):
    root = tmp_path / "img"
    touch(root / "@nan@4172758.25@10@S@@@@@@@@@@@.jpg")
    out = tmp_path / "f.h5"
    r = invoke("extract", "--images", root, "--out", out, "--model", tmp_path / "no-model", "--no-progress")
    assert r.exit_code == 2, r.output
    assert "utm_east=nan" in r.output and "Traceback" not in r.output
    assert not out.exists() and not out.with_suffix(".shards").exists()


# 3. manifest paths become ids relative to --images


def test_absolute_and_unnormalised_paths_become_relative_ids(tmp_path):
    root = tmp_path / "img"
    for name in ("a/x.jpg", "a/y.jpg", "b.jpg", "c.jpg"):
        touch(root / name)
    path = manifest(tmp_path, f"path,lat,lon\n{root}/a/x.jpg,37.7,-122.5\n./a//y.jpg,37.7,-122.5\n"
                              "a\\..\\b.jpg,37.7,-122.5\nc.jpg,37.7,-122.5\n")
    got = collect_images(root, path)
    assert got.labels["image_id"].to_list() == ["a/x.jpg", "a/y.jpg", "b.jpg", "c.jpg"]


@pytest.mark.parametrize("outside", ["../elsewhere/x.jpg", "a/../../elsewhere/x.jpg", "ABS"])
def test_paths_outside_images_are_refused(tmp_path, outside):
    root = tmp_path / "img"
    touch(root / "a.jpg")
    touch(tmp_path / "elsewhere" / "x.jpg")
    outside = outside.replace("ABS", str(tmp_path / "elsewhere" / "x.jpg"))
    path = manifest(tmp_path, f"path,lat,lon\na.jpg,37.7,-122.5\n{outside},37.7,-122.5\n")
    with pytest.raises(BadInput) as e:
        collect_images(root, path)
    msg = str(e.value)
    assert f"--manifest {path}" in msg and outside in msg and str(root) in msg and "must lie under --images" in msg


def test_one_image_spelt_two_ways_is_a_duplicate(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    path = manifest(tmp_path, "path,lat,lon\na/./x.jpg,37.7,-122.5\na/x.jpg,37.7,-122.5\n")
    with pytest.raises(BadInput, match=r"listed more than once .*\['a/x.jpg'\]"):
        collect_images(None, path)


# 4. a manifest of paths only, for predict


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_manifest_without_positions_reads_only_paths(tmp_path, suffix):
    paths = ["b.jpg", "./a/x.jpg", str(tmp_path / "c.jpg")]
    path = tmp_path / f"m{suffix}"
    pl.DataFrame({"file": paths, "note": ["1", "2", "3"]}).write_parquet(path) if suffix == ".parquet" else \
        pl.DataFrame({"file": paths}).write_csv(path, separator="\t" if suffix == ".tsv" else ",")
    got = read_manifest(path, path_column="file", positions=False)
    assert got.columns == ["image_id"] and got["image_id"].to_list() == ["b.jpg", "a/x.jpg", "c.jpg"]
    with pytest.raises(BadInput, match="expected a `path` column"):
        read_manifest(path, positions=False)


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(BadInput, match=f"--manifest {tmp_path / 'nope.csv'}: no such file"):
        read_manifest(tmp_path / "nope.csv", positions=False)


# Second adversarial pass ----------------------------------------------------------------------------------------
# D4: both sides of the equator in one UTM zone


def test_points_on_both_sides_of_the_equator_in_one_zone_get_their_own_hemisphere(tmp_path):
    import numpy as np
    import utm

    from dcfeat.labels import latlon_to_utm

    lat, lon = np.array([0.5, -0.5, 0.0, -0.0001]), np.array([-78.5, -78.5, -78.4, -78.4])  # Quito, zone 17
    got = latlon_to_utm(lat, lon)
    for row, a, o in zip(got.iter_rows(named=True), lat, lon):
        e, n, z, letter = utm.from_latlon(a, o)
        assert (row["utm_zone"], row["utm_letter"]) == (z, letter) == (17, "N" if a >= 0 else "M")
        assert row["utm_east"] == pytest.approx(e) and row["utm_north"] == pytest.approx(n)
    m = manifest(tmp_path, "path,lat,lon\na.jpg,0.5,-78.5\nb.jpg,-0.5,-78.5\n")
    assert read_manifest(m)["utm_letter"].to_list() == ["N", "M"]
    names = ["@0776000.00@0055000.00@@@0.5@-78.5@@@@@@@@@.jpg", "@0776000.00@9945000.00@@@-0.5@-78.5@@@@@@@@@.jpg"]
    assert parse_sfxl_names(names)["utm_letter"].to_list() == ["N", "M"]


# A manifest listing images that are not there


def test_a_missing_listed_image_shows_where_it_was_looked_for_and_what_paths_are_relative_to(tmp_path):
    (tmp_path / "photos").mkdir()
    m = manifest(tmp_path, "path,lat,lon\nphotos/a.jpg,37.7,-122.4\n")
    with pytest.raises(BadInput) as e:
        collect_images(None, m)
    assert str(tmp_path / "photos" / "a.jpg") in str(e.value)
    assert "manifest's folder" in str(e.value) and "--images" in str(e.value)
    with pytest.raises(BadInput) as e:
        collect_images(tmp_path / "photos", m)
    assert str(tmp_path / "photos" / "photos" / "a.jpg") in str(e.value)
    assert f"--images {tmp_path / 'photos'}" in str(e.value)
