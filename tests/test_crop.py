"""`--crop centre|full`: whole images in patch multiples, batched by shape, and crop as part of a split's identity."""

import json
import shutil

import h5py
import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from dcfeat.errors import BadInput, DamagedRun
from dcfeat.images import Crops, ImageDataset, collate, load_image, whole_size
from dcfeat.run import load_run
from dcfeat.shards import write_split
from dcfeat.store import read_split, split_info
from tests.conftest import extract_args, invoke, write_images

SHAPES = [(72, 96), (96, 72), (80, 80), (60, 150)]  # (height, width)
SMALL_CITY = ["--M", "100", "--N", "1", "--min-images-per-class", "3", "--dim", "16", "--epochs", "2", "--no-progress"]


def extract(images, out, model, *extra):
    return invoke(*extract_args(images, out, model, *extra))


def _noise(path, width, height):
    rng = np.random.default_rng(width * height)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("patch,size", [(14, 224), (16, 224)])
def test_full_crop_keeps_the_aspect_ratio_in_patch_multiples(tmp_path, patch, size):
    for width, height in ((640, 480), (480, 640), (300, 300), (1000, 240)):
        path = _noise(tmp_path / f"{width}x{height}.png", width, height)
        got = load_image(path, size, crop="full", patch_size=patch)
        h, w = got.shape[:2]
        assert min(h, w) == size and h % patch == 0 and w % patch == 0
        assert abs(w / h - width / height) <= patch / 2 / size * max(w / h, h / w), (w, h)
        assert (w > h) == (width > height) and (w == h) == (width == height)
        ref = Image.open(path).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        assert np.array_equal(got, np.asarray(ref))
    # 640x480 at 224: 298.7 → 294 (21 patches of 14) or 304 (19 patches of 16)
    assert whole_size(640, 480, 224, patch) == ({14: 294, 16: 304}[patch], 224)
    assert whole_size(480, 640, 224, patch) == (224, {14: 294, 16: 304}[patch])


def test_full_crop_with_draft_decoding_stays_close(tmp_path):
    yy, xx = np.mgrid[0:768, 0:1024]
    arr = np.stack([128 + 100 * np.sin(xx / 40.0), 128 + 100 * np.cos(yy / 55.0), (xx + yy) % 256], -1)
    path = tmp_path / "a.jpg"
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)
    full = load_image(path, 112, crop="full", patch_size=14, draft=False).astype(float)
    draft = load_image(path, 112, crop="full", patch_size=14, draft=True).astype(float)
    assert full.shape == draft.shape == (112, 154, 3)
    assert not np.array_equal(full, draft) and np.abs(full - draft).mean() < 1.5


def test_a_batch_of_several_shapes_is_stacked_per_shape_and_mapped_back_in_order(tmp_path):
    paths = [_noise(tmp_path / f"{i}.png", w, h) for i, (h, w) in enumerate(SHAPES * 2)]
    paths.insert(3, tmp_path / "missing.png")
    dataset = ImageDataset(paths, 56, crop="full", patch_size=14)
    indices, crops, failed = collate([dataset[i] for i in range(len(paths))])
    assert indices == [0, 1, 2, 4, 5, 6, 7, 8] and [i for i, _ in failed] == [3]
    assert len(crops.groups) == 4 and len(crops) == 8
    assert [positions for positions, _ in crops.groups] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    means = crops.map(lambda x: x.float().mean(dim=(1, 2, 3)))
    alone = torch.stack([dataset[i][1].float().mean() for i in indices])
    assert torch.equal(means, alone)
    first, second = crops.map(lambda x: (x.float().mean(dim=(1, 2, 3)), x.shape[1] * torch.ones(len(x))))
    assert torch.equal(first, alone) and second.tolist() == [dataset[i][1].shape[0] for i in indices]
    square = Crops.stack([torch.zeros(56, 56, 3, dtype=torch.uint8)] * 3)
    assert len(square.groups) == 1 and square.groups[0][1].shape == (3, 56, 56, 3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model):
    """Centre and full stores of the same images (train, val), and a run trained on each."""
    root = tmp_path_factory.mktemp("crops")
    write_images(root / "train", 48, seed=0, shapes=SHAPES)
    write_images(root / "val", 12, seed=1, shapes=SHAPES)
    out = {}
    for crop in ("centre", "full"):
        store = root / crop / "f.h5"
        for split in ("train", "val"):
            r = extract(root / split, store, tiny_model, "--split", split, "--crop", crop, "--dtype", "float32")
            assert r.exit_code == 0, r.output
        run = root / crop / "run"
        r = invoke("train", "--feats", store, "--out", run, *SMALL_CITY)
        assert r.exit_code == 0, r.output
        out[crop] = (store, run)
    return root, out


def test_the_crop_is_stored_with_the_split_and_the_run(stores):
    _, out = stores
    for crop, (store, run) in out.items():
        with h5py.File(store) as f:
            assert f["train"].attrs["crop"] == crop and f["val"].attrs["crop"] == crop
        assert load_run(run, "cpu").config.features.crop == crop
    centre, full = (read_split(out[c][0], "val").embeddings for c in ("centre", "full"))
    assert np.abs(centre - full).max() > 1e-2  # whole images really are other inputs
    r = invoke("info", out["full"][0])
    assert r.exit_code == 0 and "56 full" in r.output, r.output


def test_a_store_without_crop_reads_as_centre_and_a_run_without_it_is_refused(stores, tmp_path, tiny_model,
                                                                              city_store, city_run):
    root, _ = stores
    store = tmp_path / "old.h5"
    assert extract(root / "val", store, tiny_model, "--split", "val").exit_code == 0
    with h5py.File(store, "r+") as f:  # as a store written before `crop` existed
        del f["val"].attrs["crop"]
    assert split_info(store, "val").attrs["crop"] == "centre"
    r = extract(root / "val", store, tiny_model, "--split", "val")
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    r = extract(root / "val", store, tiny_model, "--split", "val2", "--crop", "full")
    assert r.exit_code == 5 and "crop: 'centre' vs 'full'" in r.output, r.output
    # A split planned before `crop` existed is the same plan as one with crop "centre": it resumes (or is
    # complete) instead of asking for --overwrite; "full" is another plan.
    data = read_split(store, "val")
    before = {k: v for k, v in data.attrs.items() if k not in ("crop", "plan_id", "complete", "failures")}
    labels = data.labels.drop("row")
    write_split(tmp_path / "w.h5", "val", data.embeddings, labels, before)
    write_split(tmp_path / "w.h5", "val", data.embeddings, labels, {**before, "crop": "centre"})
    with pytest.raises(BadInput, match="--overwrite"):
        write_split(tmp_path / "w.h5", "val", data.embeddings, labels, {**before, "crop": "full"})
    # Stores written by other programs (the synthetic city) and runs trained on them: centre.
    assert split_info(city_store, "test").attrs["crop"] == "centre"
    assert load_run(city_run, "cpu").feature_identity.crop == "centre"
    # A run of an older dcfeat, trained before `crop` existed, is refused: train it again.
    old = tmp_path / "old-run"
    shutil.copytree(city_run, old, ignore=shutil.ignore_patterns("eval"))
    config = json.loads((old / "config.json").read_text())
    del config["features"]["crop"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(DamagedRun, match=r"written by an older dcfeat \(`features` lacks `crop`\).*Train the run"):
        load_run(old)


@pytest.mark.parametrize("trained,applied", [("centre", "full"), ("full", "centre")])
def test_a_run_refuses_features_cropped_the_other_way(stores, tmp_path, trained, applied):
    _, out = stores
    run, other = out[trained][1], out[applied][0]
    r = invoke("evaluate", "--feats", other, "--split", "val", "--run", run, "--out", tmp_path / "e")
    assert r.exit_code == 5, r.output
    assert f"crop: run '{trained}' vs '{applied}'" in r.output and f"--crop {trained}" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "e").exists()
    r = invoke("predict", "--run", run, "--feats", other, "--split", "val", "--out", tmp_path / "p.parquet")
    assert r.exit_code == 5 and f"--crop {trained}" in r.output, r.output
    assert not (tmp_path / "p.parquet").exists()


def test_predict_images_uses_the_runs_full_crop(stores, tmp_path):
    root, out = stores
    store, run = out["full"]
    by_feats, by_images = tmp_path / "a.parquet", tmp_path / "b.parquet"
    r = invoke("predict", "--run", run, "--feats", store, "--split", "val", "--out", by_feats)
    assert r.exit_code == 0, r.output
    r = invoke("predict", "--run", run, "--images", root / "val", "--out", by_images, "--batch-size", 5,
               "--no-progress")
    assert r.exit_code == 0, r.output
    a, b = (pl.read_parquet(p).sort("image_id", "rank") for p in (by_feats, by_images))
    assert a.height == 12 * 5 and a["class"].to_list() == b["class"].to_list()
    assert np.abs(a["probability"].to_numpy() - b["probability"].to_numpy()).max() < 1e-5


def test_another_crop_in_the_same_store_or_split_is_refused(stores, tmp_path, tiny_model):
    root, _ = stores
    store = tmp_path / "f.h5"
    assert extract(root / "val", store, tiny_model, "--split", "val").exit_code == 0
    r = extract(root / "val", store, tiny_model, "--split", "test", "--crop", "full")
    assert r.exit_code == 5 and "crop: 'centre' vs 'full'" in r.output and "--crop" in r.output, r.output
    r = extract(root / "val", store, tiny_model, "--split", "val", "--crop", "full")
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    assert split_info(store, "val").attrs["crop"] == "centre"
    r = extract(root / "val", store, tiny_model, "--split", "val", "--crop", "full", "--overwrite")
    assert r.exit_code == 0, r.output
    assert split_info(store, "val").attrs["crop"] == "full"


def test_cached_tokens_of_whole_images_are_refused_before_anything_is_written(images, tmp_path, tiny_model):
    out = tmp_path / "s" / "f.h5"
    r = extract(images, out, tiny_model, "--crop", "full", "--cache-tokens", 1)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "--cache-tokens 1 with --crop full" in r.output and "--crop centre" in r.output
    assert not (tmp_path / "s").exists()
    assert "Not with --crop full" in invoke("extract", "--help").output


def test_a_bad_crop_is_a_usage_error_before_anything_is_created(images, tmp_path, tiny_model):
    out = tmp_path / "s" / "f.h5"
    r = extract(images, out, tiny_model, "--crop", "middle")
    assert r.exit_code == 2 and "Invalid value for '--crop'" in r.output and "centre" in r.output, r.output
    assert not (tmp_path / "s").exists()
