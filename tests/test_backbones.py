"""Every backbone family (DINOv2, DINOv2 with registers, DINOv3 ViT) end to end on tiny random checkpoints."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcfeat.backbone import (
    FAMILIES,
    POOLERS,
    load_backbone,
    save_random_dinov2,
    save_random_dinov3,
)
from dcfeat.errors import BadInput
from dcfeat.finetune import BLOCKS_FILE, load_tail
from dcfeat.images import load_image
from dcfeat.store import read_split, split_info
from tests.conftest import assert_predict_from_images_as_from_feats, invoke, write_images

TINY = {"hidden_size": 32, "layers": 2, "heads": 2}
# family → (save function and its extra arguments, patch size, registers, a valid crop, an invalid one)
FAMILY_CASES = {
    "dinov2": (save_random_dinov2, {"image_size": 56}, 14, 0, 56, 64),
    "dinov2_with_registers": (save_random_dinov2, {"image_size": 56, "registers": 4}, 14, 4, 56, 64),
    "dinov3_vit": (save_random_dinov3, {"image_size": 64, "registers": 4}, 16, 4, 64, 56),
}
SMALL_CITY = ["--M", "100", "--N", "1", "--min-images-per-class", "3", "--dim", "16", "--no-progress"]


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family(request, tmp_path_factory):
    """(model_type, checkpoint folder, patch, registers, valid size, invalid size)."""
    save, extra, patch, registers, good, bad = FAMILY_CASES[request.param]
    folder = save(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", **TINY, **extra)
    return request.param, folder, patch, registers, good, bad


def extract(store, images, model, size, split, *extra):
    r = invoke("extract", "--images", images, "--out", store, "--model", model, "--split", split, "--image-size", size,
               "--workers", 0, "--batch-size", 8, "--shard-rows", 16, "--no-progress", *extra)
    assert r.exit_code == 0, r.output
    return r


def test_the_checkpoint_config_gives_patch_registers_and_depth(family):
    model_type, folder, patch, registers, size, _ = family
    backbone = load_backbone(str(folder), device="cpu")
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    assert (backbone.patch_size, backbone.num_register_tokens, backbone.num_layers) == (patch, registers, 2)
    assert backbone.tokens_per_image(size) == 1 + registers + (size // patch) ** 2
    crops = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8)
    for pooling, (multiple, _) in POOLERS.items():
        backbone.pooling = pooling
        pooled, tokens = backbone.embed(crops, cache_tokens=2)
        assert pooled.shape == (3, multiple * 32) and pooled.dtype == torch.float32
        assert tokens.shape == (3, backbone.tokens_per_image(size), 32)
    backbone.pooling = "cls"  # CLS is token 0 of the normed sequence, i.e. pooler_output
    with torch.inference_mode():
        out = backbone.model(pixel_values=torch.randn(2, 3, size, size))
    assert torch.allclose(out.pooler_output, out.last_hidden_state[:, 0])


def test_extract_and_info_through_the_cli(family, images, tmp_path):
    _, folder, _, _, size, _ = family
    store = tmp_path / "f.h5"
    extract(store, images, folder, size, "train", "--pooling", "cls+mean")
    data = read_split(store, "train")
    assert data.embeddings.shape == (24, 64) and np.isfinite(data.embeddings).all()
    assert data.attrs["image_size"] == size and data.attrs["pooling"] == "cls+mean"
    r = invoke("info", store)
    assert r.exit_code == 0 and folder.name in r.output and "random init" in r.output, r.output


def test_fingerprint_is_stable_across_folders_and_differs_between_families(family, tmp_path):
    _, folder, *_ = family
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, copy)
    a, b = (load_backbone(str(f), device="cpu").fingerprint for f in (folder, copy))
    assert a == b
    others = {load_backbone(str(save(tmp_path / name, **TINY, **extra)), device="cpu").fingerprint
              for name, (save, extra, *_) in FAMILY_CASES.items() if name != family[0]}
    assert a not in others and len(others) == 2


def test_a_size_that_is_not_a_patch_multiple_exits_2_naming_the_patch(family, images, tmp_path):
    _, folder, patch, _, _, bad = family
    r = invoke("extract", "--images", images, "--out", tmp_path / "s" / "f.h5", "--model", folder,
               "--image-size", bad, "--workers", 0, "--no-progress")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"patch size {patch}" in r.output and f"multiple of {patch}" in r.output and "--image-size" in r.output
    assert not (tmp_path / "s").exists()


# (height, width) of whole images in a folder: landscape, portrait, square, panorama-like.
MIXED_SHAPES = [(72, 96), (96, 72), (80, 80), (60, 150)]


def test_full_crop_rows_equal_one_forward_per_image(family, tmp_path):
    """--crop full: whole images in patch multiples, batched by shape, every row as if embedded alone."""
    _, folder, patch, _, size, _ = family
    write_images(tmp_path / "img", 14, seed=5, shapes=MIXED_SHAPES)
    store = tmp_path / "f.h5"
    extract(store, tmp_path / "img", folder, size, "train", "--crop", "full", "--dtype", "float32",
            "--batch-size", 4, "--shard-rows", 6)
    data = read_split(store, "train")
    assert data.embeddings.shape == (14, 32) and data.attrs["crop"] == "full"
    backbone = load_backbone(str(folder), device="cpu")
    shapes = set()
    for image_id, row in zip(data.labels["image_id"], data.embeddings):
        image = load_image(tmp_path / "img" / image_id, size, crop="full", patch_size=patch)
        shapes.add(image.shape)
        assert image.shape[0] % patch == 0 and image.shape[1] % patch == 0 and min(image.shape[:2]) == size
        alone = backbone.embed(torch.from_numpy(image)[None])[0].numpy()
        assert np.abs(alone - row).max() <= 1e-5
    assert len(shapes) == len(MIXED_SHAPES)


@pytest.fixture(scope="module")
def tuned(family, tmp_path_factory):
    """fp32 store (train caches both blocks' inputs, val the last one's) and a run tuning the last block."""
    _, folder, _, _, size, _ = family
    root = tmp_path_factory.mktemp("ft")
    write_images(root / "train", 48, seed=0)
    write_images(root / "val", 12, seed=1)
    store = root / "f.h5"
    extract(store, root / "train", folder, size, "train", "--dtype", "float32", "--cache-tokens", 2)
    extract(store, root / "val", folder, size, "val", "--dtype", "float32", "--cache-tokens", 1)
    run = root / "run"
    r = invoke("train", "--feats", store, "--val-split", "val", "--out", run, "--epochs", 2, "--finetune-blocks", 1,
               "--lr-blocks", 1e-3, *SMALL_CITY)
    assert r.exit_code == 0, r.output
    return store, run


def test_cached_tokens_through_the_untouched_tail_give_the_extracted_features(family, tuned):
    _, _, patch, registers, size, _ = family
    store, _ = tuned
    with h5py.File(store) as f:
        tokens = {s: f[s]["tokens"][()] for s in ("train", "val")}
    assert tokens["train"].shape == (48, 1 + registers + (size // patch) ** 2, 32)
    tail = load_tail(split_info(store, "train").attrs, 2, 1)
    tail.train()  # training mode must not move DINOv3's RoPE positions
    with torch.no_grad():
        for split, cached in (("train", 2), ("val", 1)):
            got = tail(torch.from_numpy(tokens[split]), cached).numpy()
            assert np.abs(got - read_split(store, split).embeddings).max() <= 1e-5


def test_a_tuned_run_evaluates_and_predicts_from_images_alike(family, tuned):
    store, run = tuned
    assert set(load_file(str(run / BLOCKS_FILE))) >= {"layernorm.weight", "layernorm.bias"}
    r = invoke("evaluate", "--feats", store, "--run", run, "--split", "val", "--out", store.parent / "e")
    assert r.exit_code == 0, r.output
    assert_predict_from_images_as_from_feats(run, store, "val")


def test_another_model_type_is_refused_naming_the_supported_ones(tmp_path, images):
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=56, patch_size=14)).save_pretrained(folder)
    with pytest.raises(BadInput) as e:
        load_backbone(str(folder), device="cpu")
    assert "'vit'" in str(e.value) and all(name in str(e.value) for name in FAMILIES)
    r = invoke("extract", "--images", images, "--out", tmp_path / "f.h5", "--model", folder, "--image-size", 56,
               "--workers", 0, "--no-progress")
    assert r.exit_code == 2 and "dinov3_vit" in r.output and not (tmp_path / "f.h5").exists(), r.output
