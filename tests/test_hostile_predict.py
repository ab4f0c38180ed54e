"""`dcfeat predict` against wrong outputs, manifests and images: one message, no traceback, no stray files."""

import builtins
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dcfeat.errors import BadInput
from dcfeat.predict import predict_files, predict_images
from dcfeat.run import load_run
from tests.conftest import invoke, refused


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((70, 90, 3), 60 * i, np.uint8)).save(folder / f"photo{i}.jpg")
    return folder


def test_a_read_only_output_folder_is_named(tiny_run, photos, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse as the OS refuses everyone else
        real_open = builtins.open

        def refusing_open(file, mode="r", *args, **kwargs):
            if Path(file).parent == locked and any(c in mode for c in "wax+"):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    try:
        for name in ("p.parquet", "p.csv", "p.geojson"):
            r = invoke("predict", "--run", tiny_run, "--images", photos, "--out", locked / name, "--no-progress")
            refused(r, "environment", str(locked))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_out_that_is_a_folder_is_refused_before_any_work(tiny_run, photos, tmp_path):
    folder = tmp_path / "p.parquet"
    folder.mkdir()
    refused(invoke("predict", "--run", tiny_run, "--images", photos, "--out", folder, "--no-progress"),
            "bad input", "is a folder", str(folder / "predictions.parquet"))
    assert list(folder.iterdir()) == [] and leftovers(tmp_path) == []
    with pytest.raises(BadInput, match="is a folder"):  # before the run is even opened
        predict_files(tmp_path / "no-run", folder, images=photos)


def test_a_missing_manifest_is_named(tiny_run, tmp_path):
    r = invoke("predict", "--run", tiny_run, "--manifest", tmp_path / "list.csv", "--out", tmp_path / "p.csv")
    refused(r, "bad input", "--manifest", "list.csv", "no such file")
    assert not (tmp_path / "p.csv").exists() and leftovers(tmp_path) == []


def test_a_manifest_with_another_path_column(tiny_run, photos, tmp_path):
    manifest = tmp_path / "list.csv"
    pl.DataFrame({"file": ["new/photo0.jpg", "./new/photo2.jpg"], "note": ["a", "b"]}).write_csv(manifest)
    run = load_run(tiny_run)
    frame, skipped = predict_images(run, None, manifest, model=None, k=2, batch_size=4, workers=0, device="cpu",
                                    progress=False, path_column="file")
    assert skipped == [] and sorted(frame["image_id"].unique()) == ["new/photo0.jpg", "new/photo2.jpg"]
    with pytest.raises(BadInput, match="expected a `path` column"):
        predict_images(run, None, manifest, model=None, k=2, batch_size=4, workers=0, device="cpu",
                       progress=False)


def test_a_folder_of_only_corrupt_images_says_why(tiny_run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(6):
        (broken / f"b{i}.jpg").write_bytes(b"not a jpeg at all")
    (broken / "empty.png").write_bytes(b"")
    r = invoke("predict", "--run", tiny_run, "--images", broken, "--out", tmp_path / "p.parquet", "--no-progress")
    refused(r, "bad input", f"--images {broken}", "none of the 7 images could be read",
            "b0.jpg: UnidentifiedImageError")
    assert "b4.jpg" in r.output and "b5.jpg" not in r.output  # the first five reasons, not a wall of them
    assert not (tmp_path / "p.parquet").exists() and leftovers(tmp_path) == []


def test_predict_files_writes_every_format_with_the_run_status(tiny_run, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"nope")
    for name in ("p.parquet", "p.csv", "p.geojson"):
        result = predict_files(tiny_run, tmp_path / name, images=photos, k=2, device="cpu", progress=False)
        assert result.path == tmp_path / name and result.skipped[0][0] == "broken.jpg"
        assert result.run.status_line() is None and result.random_backbone
    frame = pl.read_parquet(tmp_path / "p.parquet")
    assert frame.height == 6 and frame.equals(result.frame)
    meta = json.loads(pl.read_parquet_metadata(tmp_path / "p.parquet")["dcfeat"])
    assert meta["run_complete"] is True and meta["epochs_done"] == meta["epochs"] == 1 and meta["random_backbone"]
    assert pl.read_csv(tmp_path / "p.csv").height == 6
    geo = json.loads((tmp_path / "p.geojson").read_text())
    assert len(geo["features"]) == 3 and geo["dcfeat"]["run_complete"] is True and "dcfeat_notice" in geo
    assert [len(f["properties"]["top_k"]) for f in geo["features"]] == [2, 2, 2]  # one feature per image
    assert leftovers(tmp_path) == []
    with pytest.raises(BadInput, match="--feats needs --split"):
        predict_files(tiny_run, tmp_path / "q.csv", feats=tmp_path / "f.h5")


def test_every_row_says_what_made_it_in_csv_and_parquet(city_run, city_store, tmp_path):
    for name in ("p.csv", "p.parquet"):
        predict_files(city_run, tmp_path / name, feats=city_store, split="test", k=3, device="cpu")
    csv = pl.read_csv(tmp_path / "p.csv")
    assert set(csv["run_status"]) == {"complete"} and set(csv["threshold_m"]) == {25.0}
    assert pl.read_parquet(tmp_path / "p.parquet")["run_status"].to_list() == csv["run_status"].to_list()


def test_an_unfinished_uncalibrated_random_run_says_so_in_every_row(tiny_run, photos, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "complete": False, "epochs_done": 1, "epochs": 3}))
    result = predict_files(run, tmp_path / "p.csv", images=photos, k=1, device="cpu", progress=False)
    assert set(pl.read_csv(tmp_path / "p.csv")["run_status"]) == {
        "INCOMPLETE RUN (epoch 1 of 3); RANDOM BACKBONE; UNCALIBRATED"}
    assert result.frame["threshold_m"].null_count() == result.frame.height  # no calibration, no threshold


def test_geojson_is_one_valid_feature_per_image_with_its_top_k(city_run, city_store, tmp_path):
    predict_files(city_run, tmp_path / "p.geojson", feats=city_store, split="test", k=4, device="cpu")
    doc = json.loads((tmp_path / "p.geojson").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    test = pl.read_parquet(next((city_store.parent / "feats.labels" / "split=test").glob("*.parquet")))
    assert [f["properties"]["image_id"] for f in doc["features"]] == test["image_id"].to_list()
    first = doc["features"][0]
    assert first["geometry"]["type"] == "Point"
    assert [r["rank"] for r in first["properties"]["top_k"]] == [1, 2, 3, 4]
    assert first["geometry"]["coordinates"] == [first["properties"]["top_k"][0]["lon"],
                                                first["properties"]["top_k"][0]["lat"]]
    assert set(first["properties"]) >= {"confidence", "radius_m", "abstained", "threshold_m", "run_status"}


def test_geojson_radius_draws_the_90_percent_circle(city_run, city_store, tmp_path):
    import utm

    predict_files(city_run, tmp_path / "p.geojson", feats=city_store, split="test", k=1, device="cpu",
                  geojson_radius=True)
    feature = json.loads((tmp_path / "p.geojson").read_text())["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert feature["geometry"]["type"] == "Polygon" and len(ring) == 65 and ring[0] == ring[-1]
    answer = feature["properties"]["top_k"][0]
    for lon, lat in ring[:-1]:
        east, north, *_ = utm.from_latlon(lat, lon, force_zone_number=answer["utm_zone"])
        radius = np.hypot(east - answer["utm_east"], north - answer["utm_north"])  # around the position
        assert radius == pytest.approx(feature["properties"]["radius_m"], rel=1e-3)


def test_geojson_never_holds_nan():
    from dcfeat.predict import geojson

    frame = pl.DataFrame({"image_id": ["a"], "rank": [1], "class": [0], "probability": [0.5], "lat": [float("nan")],
                          "lon": [float("nan")], "confidence": [float("nan")], "radius_m": [None]})
    doc = geojson(frame, {})
    json.dumps(doc, allow_nan=False)  # raises on NaN
    assert doc["features"][0]["geometry"] is None and doc["features"][0]["properties"]["confidence"] is None


def test_answers_on_stdout_warnings_on_stderr(tiny_run, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"nope")
    r = invoke("predict", "--run", tiny_run, "--images", photos, "--out", tmp_path / "p.csv", "--k", 50,
               "--no-progress")
    assert r.exit_code == 0, r.output
    assert "where the photos were taken" in r.stdout and "photo0.jpg" in r.stdout
    classes = pl.read_csv(tmp_path / "p.csv")["rank"].max()
    assert f"top-{classes} cells each (the run has {classes} classes)" in r.stdout and classes < 50
    for warning in ("skipped broken.jpg", "UNCALIBRATED RUN", "RANDOM BACKBONE"):
        assert warning in r.stderr and warning not in r.stdout, warning


def test_predict_decodes_with_a_worker_per_core_by_default():
    from dcfeat.images import decoding_workers

    assert decoding_workers(None) == min(16, os.cpu_count() or 1) and decoding_workers(0) == 0
    cores = min(16, os.cpu_count() or 1)
    assert decoding_workers(None, 3, 64) == 0  # one batch: decoded in the main process, no process started
    assert decoding_workers(None, 64 * 3, 64) == min(cores, 2) and decoding_workers(None, 10_000, 64) == cores
    assert decoding_workers(4, 3, 64) == 4  # asked for: as asked


def test_unread_image_files_are_listed_and_both_inputs_get_a_word(tiny_run, photos, tmp_path, city_store):
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(photos / "anim.gif")
    r = invoke("predict", "--run", tiny_run, "--images", photos, "--out", tmp_path / "p.csv", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "skipped anim.gif: .gif files are not read by dcfeat" in r.stderr  # listed, not silently ignored
    assert pl.read_csv(tmp_path / "p.csv")["image_id"].unique().sort().to_list() == [f"photo{i}.jpg" for i in range(3)]


def test_feats_and_images_together_say_which_is_used(city_run, city_store, photos, tmp_path):
    r = invoke("predict", "--run", city_run, "--feats", city_store, "--split", "test", "--images", photos,
               "--out", tmp_path / "p.csv", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "--feats and --images both given: predicting the cached split 'test'" in r.stderr
