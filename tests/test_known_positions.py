"""Where a photo was taken when its name says nothing: EXIF GPS for `extract`'s labels, and `predict`'s
error_m against a manifest's, a name's or EXIF's position; `predict --images` of files, folders, several."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import utm
from PIL import Image, TiffImagePlugin

from dcfeat.errors import BadInput
from dcfeat.labels import NoExifPosition, collect_images, exif_position
from dcfeat.store import read_labels
from tests.conftest import extract_args, invoke, refused, sfxl_name

R = TiffImagePlugin.IFDRational


def dms(degrees: float) -> tuple:
    """|degrees| as EXIF's degree, minute, second rationals (seconds to 1/10000)."""
    d = abs(degrees)
    minutes = (d - int(d)) * 60
    seconds = Fraction(round((minutes - int(minutes)) * 60 * 10000), 10000)
    return R(int(d)), R(int(minutes)), R(seconds.numerator, seconds.denominator)


def gps(lat: float, lon: float, heading: float | None = None) -> dict:
    tags = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    return tags if heading is None else {**tags, 16: "T", 17: R(Fraction(heading).limit_denominator(100))}


def photo(path: Path, tags: dict | None = None, *, seed: int = 0, exif: bytes | None = None, fmt: str = "JPEG") -> Path:
    """A tiny random-pixel image, with a GPS IFD of `tags` (or raw `exif` bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif is None:
        e = Image.Exif()
        if tags is not None:
            e[0x8825] = tags
        exif = e.tobytes()
    pixels = np.random.default_rng(seed).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt, exif=exif)
    return path


# Near the tiny run's training images (UTM 550000..550300 E, 4180000..4180300 N, zone 10 S).
TRUE_EAST, TRUE_NORTH = 550100.0, 4180100.0
TRUE_LAT, TRUE_LON = utm.to_latlon(TRUE_EAST, TRUE_NORTH, 10, "S")


def test_exif_gps_gives_labels_in_each_points_zone(tmp_path):
    photo(tmp_path / "sf" / "IMG_0001.jpg", {1: "N", 2: (R(37), R(46), R(3012, 100)), 3: "W",
                                             4: (R(122), R(25), R(1)), 16: "T", 17: R(2105, 10)})
    photo(tmp_path / "sydney.png", {1: "S", 2: (R(33), R(52), R(0)), 3: "E", 4: (R(151), R(12), R(36))}, fmt="PNG")
    labels = collect_images(tmp_path).labels
    sf, sydney = labels.row(0, named=True), labels.row(1, named=True)  # sorted by id
    assert sf["image_id"] == "sf/IMG_0001.jpg"
    # 37°46'30.12"N 122°25'01"W, by hand: 37.775033333°, -122.416944444°; utm.from_latlon: 551346.927612 E,
    # 4181015.020031 N in 10S; the heading is GPSImgDirection 210.5.
    assert sf["lat"] == pytest.approx(37 + 46 / 60 + 30.12 / 3600, abs=1e-12)
    assert sf["lon"] == pytest.approx(-(122 + 25 / 60 + 1 / 3600), abs=1e-12)
    assert (sf["utm_zone"], sf["utm_letter"], sf["heading"]) == (10, "S", 210.5)
    assert sf["utm_east"] == pytest.approx(551346.9276121869, abs=1e-6)
    assert sf["utm_north"] == pytest.approx(4181015.020030745, abs=1e-6)
    # 33°52'S 151°12'36"E: Sydney, zone 56 H, south of the equator
    assert (sydney["utm_zone"], sydney["utm_letter"], sydney["heading"]) == (56, "H", None)
    assert sydney["utm_east"] == pytest.approx(334429.2681951, abs=1e-6)
    assert sydney["utm_north"] == pytest.approx(6251186.0521433, abs=1e-6)


def test_a_name_and_a_manifest_come_before_exif(tmp_path):
    named = photo(tmp_path / sfxl_name(550000.0, 4180000.0), gps(10.0, 10.0))  # the name wins
    exif_only = photo(tmp_path / "phone.jpg", gps(TRUE_LAT, TRUE_LON))
    got = collect_images(tmp_path).labels.sort("utm_east")
    assert got["image_id"].to_list() == [named.name, exif_only.name]
    assert got["utm_east"][0] == 550000.0 and got["utm_east"][1] == pytest.approx(TRUE_EAST, abs=0.01)
    # a manifest row's position wins; a row that gives none takes the name's, else EXIF's
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,lat,lon\n{named.name},,\nphone.jpg,37.5,-122.5\n")
    got = collect_images(None, manifest).labels.sort("image_id")
    assert got["utm_east"][0] == 550000.0 and got["lat"][1] == 37.5


def test_images_without_a_name_label_or_exif_gps_are_refused_naming_why(tmp_path):
    photo(tmp_path / "good.jpg", gps(TRUE_LAT, TRUE_LON))
    photo(tmp_path / "plain.jpg")
    photo(tmp_path / "broken.jpg", {1: "N", 2: (R(37), R(1, 0), R(0)), 3: "W", 4: dms(122.4)})
    with pytest.raises(BadInput) as e:
        collect_images(tmp_path)
    msg = str(e.value)
    assert f"2 of 3 image file names under {tmp_path} do not carry a position" in msg
    assert "plain.jpg: not an SF-XL name; no EXIF GPS position" in msg
    assert "broken.jpg: not an SF-XL name; EXIF GPSLatitude" in msg and "zero denominator" in msg
    assert "EXIF GPS in the file" in msg and "--manifest" in msg and "@UTM_east@UTM_north" in msg
    r = invoke("extract", "--images", tmp_path, "--out", tmp_path / "f.h5", "--model", tmp_path / "no-model")
    refused(r, "bad input", "plain.jpg", "EXIF GPS")
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("tags, why", [
    ({1: "N", 2: (R(37), R(1, 0), R(0)), 3: "W", 4: dms(122.4)}, "zero denominator"),
    ({1: "N", 2: (R(95), R(0), R(0)), 3: "W", 4: dms(122.4)}, "GPSLatitude 95° is beyond 90°"),
    ({1: "N", 2: dms(37.7), 3: "W", 4: (R(181), R(0), R(0))}, "GPSLongitude 181° is beyond 180°"),
    ({1: "N", 2: (R(37), R(75), R(0)), 3: "W", 4: dms(122.4)}, "past 60"),
    ({1: "X", 2: dms(37.7), 3: "W", 4: dms(122.4)}, "GPSLatitudeRef 'X'"),
    ({1: "N", 2: dms(37.7), 3: "N", 4: dms(122.4)}, "GPSLongitudeRef 'N'"),
    ({2: dms(37.7), 4: dms(122.4)}, "expected N or S"),
    ({1: "N", 2: dms(37.7), 3: "W"}, "no EXIF GPS position"),
    ({1: "N", 2: dms(0), 3: "E", 4: dms(0)}, "0°, 0°"),
    ({1: "N", 2: dms(85), 3: "W", 4: dms(122.4)}, "beyond the latitudes UTM covers"),
    ({1: "N", 2: dms(37.7), 3: "W", 4: dms(122.4), 9: "V"}, "no fix"),
    (None, "no EXIF GPS position"),
])
def test_malformed_exif_gps_is_a_reason_never_a_crash(tmp_path, tags, why):
    path = photo(tmp_path / "a.jpg", tags)
    with pytest.raises(NoExifPosition, match=why):
        exif_position(path)


def test_unreadable_exif_and_files_and_a_bad_heading(tmp_path):
    garbage = photo(tmp_path / "garbage.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    with pytest.raises(NoExifPosition):
        exif_position(garbage)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(NoExifPosition, match="EXIF not readable"):
        exif_position(tmp_path / "empty.jpg")
    # degrees alone (one rational) are read; a heading past 360° is dropped, not the position
    one = photo(tmp_path / "one.jpg", {1: "S", 2: R(3375, 100), 3: "E", 4: R(15121, 100), 17: R(400)})
    assert exif_position(one) == (-33.75, 151.21, None)


def test_extract_labels_phone_photos_from_exif(tmp_path, tiny_model):
    for i in range(3):
        photo(tmp_path / "phone" / f"IMG_{i}.jpg", gps(TRUE_LAT, TRUE_LON + 0.001 * i, heading=90.0 * i), seed=i)
    store = tmp_path / "f.h5"
    r = invoke(*extract_args(tmp_path / "phone", store, tiny_model))
    assert r.exit_code == 0, r.output
    labels = read_labels(store, "train")
    assert labels["heading"].to_list() == [0.0, 90.0, 180.0]
    assert labels["utm_east"][0] == pytest.approx(TRUE_EAST, abs=0.01)
    assert labels["utm_north"][0] == pytest.approx(TRUE_NORTH, abs=0.01)


def first_rows(path: Path) -> pl.DataFrame:
    return pl.read_csv(path).filter(pl.col("rank") == 1).sort("image_id")


def test_predict_takes_a_file_a_folder_or_several(tiny_run, tmp_path):
    one = photo(tmp_path / "one.jpg", seed=1)
    folder = tmp_path / "more"
    for i in range(2):
        photo(folder / "sub" / f"p{i}.jpg", seed=2 + i)
    Image.new("RGB", (60, 60)).save(folder / "anim.gif")
    r = invoke("predict", "--run", tiny_run, "--images", one, "--out", tmp_path / "a.csv", "--k", 2, "--no-progress")
    assert r.exit_code == 0, r.output
    assert first_rows(tmp_path / "a.csv")["image_id"].to_list() == [one.as_posix()]
    assert "known position" not in r.output and first_rows(tmp_path / "a.csv")["error_m"].null_count() == 1
    r = invoke("predict", "--run", tiny_run, "--images", one, "--images", folder, "--out", tmp_path / "b.csv",
               "--k", 2, "--no-progress")
    assert r.exit_code == 0, r.output
    assert first_rows(tmp_path / "b.csv")["image_id"].to_list() == [
        (folder / "sub/p0.jpg").as_posix(), (folder / "sub/p1.jpg").as_posix(), one.as_posix()]
    assert f"skipped {(folder / 'anim.gif').as_posix()}: .gif files are not read" in " ".join(r.stderr.split())
    # one file answers as it does inside its folder
    a, b = first_rows(tmp_path / "a.csv"), first_rows(tmp_path / "b.csv").filter(pl.col("image_id") == one.as_posix())
    assert a["class"].to_list() == b["class"].to_list()


def test_predict_refuses_what_is_not_an_image(tiny_run, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    refused(invoke("predict", "--run", tiny_run, "--images", tmp_path / "notes.txt", "--out", tmp_path / "p.csv"),
            "bad input", "notes.txt: not an image file dcfeat reads")
    refused(invoke("predict", "--run", tiny_run, "--images", tmp_path / "nope.jpg", "--out", tmp_path / "p.csv"),
            "bad input", "nope.jpg: no such file or folder")
    Image.new("RGB", (60, 60)).save(tmp_path / "a.gif")
    refused(invoke("predict", "--run", tiny_run, "--images", tmp_path / "a.gif", "--out", tmp_path / "p.csv"),
            "bad input", "no image files", "not read: ", "a.gif")
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    refused(invoke("predict", "--run", tiny_run, "--manifest", tmp_path / "m.csv", "--images", tmp_path,
                   "--images", tmp_path, "--out", tmp_path / "p.csv"), "bad input", "takes one --images")
    assert not (tmp_path / "p.csv").exists()


def test_predict_gives_the_error_against_a_manifests_position(tiny_run, tmp_path):
    for i in range(3):
        photo(tmp_path / f"p{i}.jpg", seed=i)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,utm_east,utm_north,utm_zone,utm_letter\np0.jpg,{TRUE_EAST},{TRUE_NORTH},10,S\n"
                        f"p1.jpg,{TRUE_EAST},{TRUE_NORTH + 5000},10,S\np2.jpg,,,,\n")
    r = invoke("predict", "--run", tiny_run, "--manifest", manifest, "--out", tmp_path / "p.csv", "--no-progress")
    assert r.exit_code == 0, r.output
    rows = first_rows(tmp_path / "p.csv")
    by_hand = np.hypot(rows["utm_east"].to_numpy()[:2] - TRUE_EAST,
                       rows["utm_north"].to_numpy()[:2] - [TRUE_NORTH, TRUE_NORTH + 5000])
    assert rows["error_m"].to_numpy()[:2] == pytest.approx(by_hand, abs=1e-6)
    assert by_hand[1] > 4000 and rows["error_m"][2] is None  # p2: no position anywhere
    within = 100 * (by_hand <= 25).mean()
    assert f"2 of 3 images have a known position" in r.output and f"{within:.1f} % answered within 25 m" in r.output
    every = pl.read_csv(tmp_path / "p.csv").filter(pl.col("image_id") == "p0.jpg")["error_m"]
    assert every.n_unique() == 1 and every.len() > 1  # one value per image, on each of its ranks


def test_predict_gives_the_error_against_exif_gps_and_names(tiny_run, tmp_path):
    photo(tmp_path / "phone.jpg", gps(TRUE_LAT, TRUE_LON))
    photo(tmp_path / sfxl_name(TRUE_EAST + 30, TRUE_NORTH), seed=1)
    photo(tmp_path / "zero.jpg", {1: "N", 2: (R(37), R(1, 0), R(0)), 3: "W", 4: dms(122.4)}, seed=2)
    r = invoke("predict", "--run", tiny_run, "--images", tmp_path, "--out", tmp_path / "p.geojson", "--no-progress")
    assert r.exit_code == 0, r.output
    features = {f["properties"]["image_id"]: f for f in json.loads((tmp_path / "p.geojson").read_text())["features"]}
    for name, east in (("phone.jpg", TRUE_EAST), (sfxl_name(TRUE_EAST + 30, TRUE_NORTH), TRUE_EAST + 30)):
        lon, lat = features[name]["geometry"]["coordinates"]
        answer_east, answer_north, _, _ = utm.from_latlon(lat, lon, force_zone_number=10)
        by_hand = np.hypot(answer_east - east, answer_north - TRUE_NORTH)
        assert features[name]["properties"]["error_m"] == pytest.approx(by_hand, abs=0.05)
    assert features["zero.jpg"]["properties"]["error_m"] is None  # malformed EXIF: unknown, not a failure
    assert "2 of 3 images have a known position" in r.output
