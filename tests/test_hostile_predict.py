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
from tests.conftest import invoke, refused, write_images


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-predict")
    write_images(root / "img", 24)
    store = root / "f.h5"
    r = invoke("extract", "--images", root / "img", "--out", store, "--model", tiny_model, "--image-size", 56,
               "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8,
               "--out", root / "run", "--no-progress")
    assert r.exit_code == 0, r.output
    return root / "run"


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
            refused(r, "bad input", str(locked), "ermission denied", "write")
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
    assert len(geo["features"]) == 6 and geo["dcfeat"]["run_complete"] is True and "dcfeat_notice" in geo
    assert leftovers(tmp_path) == []
    with pytest.raises(BadInput, match="--feats needs --split"):
        predict_files(tiny_run, tmp_path / "q.csv", feats=tmp_path / "f.h5")
