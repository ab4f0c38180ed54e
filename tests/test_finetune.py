"""Fine-tuning the last DINOv2 blocks from cached tokens: extract --cache-tokens, train --finetune-blocks."""

import json
import shutil

import h5py
import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from dcfeat import finetune, sampling
from dcfeat.backbone import load_backbone, save_random_dinov2
from dcfeat.finetune import BLOCKS_FILE, TokenTraining, load_tail
from dcfeat.store import read_split, split_info
from dcfeat.train import TrainConfig, train
from tests.conftest import assert_predict_from_images_as_from_feats, invoke, write_images

# 48 training images over 300 m: cells of 100 m, one group, 3 images make a class (7 classes).
SMALL_CITY = ["--M", "100", "--N", "1", "--min-images-per-class", "3", "--dim", "16", "--no-progress"]


def extract(store, images, model, split, *extra):
    r = invoke("extract", "--images", images, "--out", store, "--model", model, "--split", split, "--image-size", 56,
               "--workers", 0, "--batch-size", 8, "--shard-rows", 16, "--no-progress", *extra)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    """fp32 store: train caches the tokens entering both blocks (K' = 2), val only the last one."""
    root = tmp_path_factory.mktemp("ft")
    write_images(root / "train", 48, seed=0)
    write_images(root / "val", 12, seed=1)
    out = root / "f.h5"
    extract(out, root / "train", tiny_model, "train", "--dtype", "float32", "--cache-tokens", 2)
    extract(out, root / "val", tiny_model, "val", "--dtype", "float32", "--cache-tokens", 1)
    return out


@pytest.fixture(scope="module")
def ft_run(store):
    out = store.parent / "run"
    r = invoke("train", "--feats", store, "--val-split", "val", "--out", out, "--epochs", 2,
               "--finetune-blocks", 1, "--lr-blocks", 1e-3, *SMALL_CITY)
    assert r.exit_code == 0, r.output
    return out


def test_cached_tokens_give_back_exactly_the_extracted_embeddings(store, tiny_model, tmp_path):
    with h5py.File(store) as f:
        g = f["train"]
        assert g["tokens"].shape == (48, 17, 32) and g["tokens"].dtype == np.float32  # CLS + (56/14)² patches
        assert g["tokens"].is_virtual and g.attrs["cache_tokens"] == 2 and list(g.attrs["tokens_shape"]) == [17, 32]
        train_tokens, val_tokens = g["tokens"][()], f["val"]["tokens"][()]
    attrs = split_info(store, "train").attrs
    tail = load_tail(attrs, 2, 1).eval()  # untouched blocks: same tokens in → same embedding out
    with torch.no_grad():
        for tokens, cached, split in ((train_tokens, 2, "train"), (val_tokens, 1, "val")):
            got = tail(torch.from_numpy(tokens), cached).numpy()
            assert np.abs(got - read_split(store, split).embeddings).max() <= 1e-5

    # Default fp16 store: tokens cost T × hidden × 2 bytes per image, shown by `dcfeat info`.
    half = tmp_path / "h.h5"
    extract(half, store.parent / "val", tiny_model, "val", "--cache-tokens", 1)
    info = invoke("info", half)
    assert "K=1, 1.1 KB/image" in info.output  # 17 × 32 × 2 B = 1088 B
    assert split_info(half, "val").token_bytes_per_image == 17 * 32 * 2
    with torch.no_grad():
        got = tail(torch.from_numpy(h5py.File(half)["val"]["tokens"][()]), 1).numpy()
    assert np.abs(got - read_split(half, "val").embeddings).max() < 2e-2  # fp16 rounding of tokens and output


def test_short_finetune_changes_only_the_last_blocks(store, tmp_path):
    data = read_split(store, "train")
    tail = TokenTraining.open(store, "train", None, data.attrs, 1, 1e-2)
    before = {k: v.clone() for k, v in tail.tail.state_dict().items()}
    config = TrainConfig(M=100, N=1, min_images_per_class=3, dim=16, epochs=2, finetune_blocks=1, lr_blocks=1e-2)
    train(data, config, tmp_path / "r", progress=False, tail=tail)
    after = tail.tail.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("frozen."))
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    matrices = {k for k in after if k.startswith("tuned.") and after[k].ndim == 2}
    assert len(matrices) == 6 and matrices | {"layernorm.weight"} <= changed  # q, k, v, o, fc1, fc2
    saved = load_file(str(tmp_path / "r" / BLOCKS_FILE))  # the last epoch's, as there is no val split
    assert set(saved) == {k for k in after if not k.startswith("frozen.")}
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["finetune_blocks"] == 1


def test_saved_run_evaluates_and_predicts_identically(store, ft_run, tiny_model):
    config = json.loads((ft_run / "config.json").read_text())
    assert config["finetune_blocks"] == 1 and config["tokens"] == {"cached": {"train": 2, "val": 1}, "streamed": False}
    assert set(load_file(str(ft_run / BLOCKS_FILE))) >= {"tuned.0.mlp.fc1.weight", "layernorm.weight"}
    log = [json.loads(line) for line in (ft_run / "train_log.jsonl").read_text().splitlines()]
    frames = []
    for name in ("e1", "e2"):
        r = invoke("evaluate", "--feats", store, "--run", ft_run, "--split", "val", "--out", store.parent / name)
        assert r.exit_code == 0, r.output
        frames.append(pl.read_parquet(store.parent / name / "predictions.parquet"))
        report = json.loads((store.parent / name / "report.json").read_text())
        assert report["methods"]["classify"]["recall"]["1"] == log[config["best_epoch"] - 1]["val_lr1"]
    assert frames[0].equals(frames[1])

    # New images: the full backbone with its last block replaced = the cached tokens through the tuned one.
    assert_predict_from_images_as_from_feats(ft_run, store, "val")


def test_streamed_tokens_train_like_in_memory_ones(store, tmp_path, monkeypatch):
    data = read_split(store, "train")
    config = TrainConfig(M=100, N=1, min_images_per_class=3, dim=16, epochs=2, batch_size=8, finetune_blocks=1,
                         lr_blocks=1e-3)

    def run(name):
        tail = TokenTraining.open(store, "train", None, data.attrs, 1, config.lr_blocks)
        result = train(data, config, tmp_path / name, progress=False, tail=tail)
        return load_file(str(result.out / BLOCKS_FILE)), json.loads((result.out / "config.json").read_text())

    memory, _ = run("memory")
    monkeypatch.setattr(finetune, "MEMORY_BYTES", 0)
    monkeypatch.setattr(sampling, "CHUNK_ROWS", 8)
    monkeypatch.setattr(sampling, "BUFFER_CHUNKS", 100)  # one buffer holds the split: the same batches
    streamed, config_json = run("one-buffer")
    assert config_json["tokens"]["streamed"] and all(torch.equal(memory[k], streamed[k]) for k in memory)
    monkeypatch.setattr(sampling, "BUFFER_CHUNKS", 2)  # 3 buffers of 16 rows, shuffled every epoch
    small, _ = run("small-buffers")
    assert not all(torch.equal(memory[k], small[k]) for k in memory)
    log = [json.loads(line) for line in (tmp_path / "small-buffers" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(e["loss"]) for e in log)


def test_bad_combinations_fail_clearly(store, ft_run, tiny_model, tmp_path):
    r = invoke("train", "--feats", store, "--out", tmp_path / "r1", "--finetune-blocks", 3, *SMALL_CITY)
    assert r.exit_code != 0 and "last 2 blocks" in r.output and "--cache-tokens 3" in r.output
    r = invoke("train", "--feats", store, "--val-split", "val", "--out", tmp_path / "r2", "--finetune-blocks", 2,
               *SMALL_CITY)
    assert r.exit_code != 0 and "split 'val'" in r.output and "--cache-tokens 2" in r.output
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()

    # A split without tokens: the frozen model's features still work, the tuned run says what to add.
    plain = tmp_path / "p.h5"
    extract(plain, store.parent / "val", tiny_model, "val", "--dtype", "float32")
    r = invoke("evaluate", "--feats", plain, "--run", ft_run, "--split", "val")
    assert r.exit_code != 0 and "no cached tokens" in r.output and "--cache-tokens 1" in r.output
    # --cache-tokens is part of what a split is: another value is another split.
    r = invoke("extract", "--images", store.parent / "val", "--out", plain, "--model", tiny_model, "--split", "val",
               "--image-size", 56, "--workers", 0, "--dtype", "float32", "--cache-tokens", 1, "--no-progress")
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = invoke("extract", "--images", store.parent / "val", "--out", tmp_path / "x.h5", "--model", tiny_model,
               "--image-size", 56, "--workers", 0, "--cache-tokens", 5, "--no-progress")
    assert r.exit_code != 0 and "has 2 blocks" in r.output

    # Another model behind the features' checkpoint path: tuning would start from other blocks.
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    other = tmp_path / "o.h5"
    write_images(tmp_path / "img", 48, seed=0)
    extract(other, tmp_path / "img", model, "train", "--cache-tokens", 1)
    shutil.rmtree(model)
    save_random_dinov2(model, hidden_size=32, layers=2, heads=2, image_size=56, seed=1)
    assert load_backbone(str(model), device="cpu").fingerprint != split_info(other, "train").attrs["model_fingerprint"]
    r = invoke("train", "--feats", other, "--out", tmp_path / "r3", "--finetune-blocks", 1, *SMALL_CITY)
    assert r.exit_code != 0 and "other weights" in r.output and not (tmp_path / "r3").exists()
