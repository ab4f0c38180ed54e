"""`evaluate --grid`: queries beside their answers' photos, read from where extract found them."""

import json
import textwrap
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dcfeat.evaluate import evaluate_files
from dcfeat.plots import TITLE_WIDTH_CHARS
from dcfeat.reports import nearest_photos, write_grids
from dcfeat.store import read_split
from tests.conftest import invoke


RED, GREEN = (214, 39, 40), (44, 160, 44)  # matplotlib's tab:red and tab:green


def expected_size(rows: int, columns: int, title: str) -> tuple[int, int]:
    """Pixels at 100 dpi: 1.2-inch tiles with 0.1-inch gaps and a 0.25-inch title line each; the figure's
    title in lines of 0.19 inch under a 0.1-inch pad."""
    lines = len(textwrap.wrap(title, TITLE_WIDTH_CHARS))
    return round(100 * (0.1 + columns * 1.3)), round(100 * (0.1 + 0.19 * lines + rows * 1.55))


def test_a_grid_per_method_from_the_database_photos(calibrated_run, tmp_path):
    store, out = calibrated_run.parent / "f.h5", tmp_path / "eval"
    r = invoke("evaluate", "--feats", store, "--run", calibrated_run, "--split", "val", "--database-split", "train",
               "--grid", 2, "--threshold", 150, "--repeats", 1, "--device", "cpu", "--out", out,
               plots=True)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    methods = list(report["methods"])
    assert set(methods) == {"classify", "classify-centre", "retrieve", "hybrid", "fused", "adaptive"}
    errors, colours = pl.read_parquet(out / "predictions.parquet"), set()
    for method in methods:
        path = out / f"grid_{method}.png"
        assert report["files"][f"grid_{method}"] == path.name
        title = (f"{method}: queries of 'val' and their top 4 answers' photos (from 'train'), green within 150 m"
                 " — RANDOM BACKBONE: these numbers measure the pipeline, not DINOv2")
        with Image.open(path) as png:
            assert png.size == expected_size(2, 5, title)
            pixels = np.asarray(png.convert("RGB"))
        # the first row is query 0: each answer's frame (the tile's top-left pixel) is green within 150 m, else red
        top = pixels.shape[0] - round(100 * (1.55 + 0.1 + 1.2))
        frames = [tuple(pixels[top, round(100 * (0.1 + 1.3 * c))]) for c in range(5)]
        right = [e <= 150 for e in errors[f"{method}_error_m"][0].to_list()[:4]]
        assert frames == [(0, 0, 0)] + [GREEN if r else RED for r in right]
        colours.update(frames)
    assert {RED, GREEN} <= colours  # at 150 m this random backbone answers some right, some wrong
    # evaluating again without --grid removes the grids of the first evaluation
    r = invoke("evaluate", "--feats", store, "--run", calibrated_run, "--split", "val", "--repeats", 1, "--device",
               "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    assert not list(out.glob("grid_*.png"))


def test_without_a_database_classification_shows_training_photos(calibrated_run, tmp_path):
    result = evaluate_files(calibrated_run.parent / "f.h5", calibrated_run, "val", grid=2, repeats=1, device="cpu",
                            out=tmp_path / "e")
    assert sorted(p.name for p in tmp_path.joinpath("e").glob("grid_*.png")) == ["grid_classify-centre.png",
                                                                                 "grid_classify.png"]
    assert not [w for w in result.warnings if "--grid" in w]


def test_missing_images_skip_the_grid_naming_the_folder(calibrated_run, tmp_path):
    store = calibrated_run.parent / "f.h5"
    result = evaluate_files(store, calibrated_run, "val", database_split="train", repeats=1, device="cpu",
                            out=tmp_path / "e", plots=False)
    queries, database = read_split(store, "val"), read_split(store, "train")
    gone = tmp_path / "moved-away"
    args = dict(rows=2, threshold_m=25.0, photos=database)
    paths, warnings = write_grids(tmp_path, replace(queries, attrs={**queries.attrs, "images_root": str(gone)}),
                                  result.methods, result.recall, database=database, **args)
    assert paths == {} and len(warnings) == 1
    assert f"the images of split 'val' are not in {gone}" in warnings[0] and "no grid drawn" in warnings[0]
    moved = replace(database, attrs={**database.attrs, "images_root": str(gone)})
    paths, warnings = write_grids(tmp_path, queries, result.methods, result.recall, database=moved,
                                  **{**args, "photos": moved})
    assert paths == {} and len(warnings) == len(result.methods)
    assert all(f"split 'train' are not in {gone}" in w for w in warnings)


def test_the_photo_nearest_an_answer_across_zones():
    photos = pl.DataFrame({"utm_east": [500000.0, 500040.0, 166100.0], "utm_north": [4180000.0, 4180000.0, 4180000.0],
                           "utm_zone": [10, 10, 11], "utm_letter": ["S", "S", "S"]})
    east = np.array([[500030.0, 833900.0, np.nan]])  # 10 m from row 1; across the 10/11 line, ~25 m from row 2
    got = nearest_photos(photos, east, np.full((1, 3), 4180000.0), np.array([[10, 10, 10]]), np.full((1, 3), "S"))
    assert got.tolist() == [[1, 2, -1]]


@pytest.mark.parametrize("grid", [-1])
def test_a_negative_grid_is_refused(calibrated_run, tmp_path, grid):
    r = invoke("evaluate", "--feats", calibrated_run.parent / "f.h5", "--run", calibrated_run, "--split", "val",
               "--grid", grid, "--out", tmp_path / "e")
    assert r.exit_code == 2 and "--grid" in r.output
    assert not (tmp_path / "e").exists()
