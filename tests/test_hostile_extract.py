"""Hostile input to `extract` and what it writes: odd file and folder names, unwritable outputs, checkpoints
whose features are not finite, images too elongated to embed whole. Each test names the defect of the
second adversarial pass it covers (D3, D8, D9, D11, D16, D17, D18)."""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from dcfeat.store import read_failures, read_split, split_info
from dcfeat.verify import verify_store
from tests.conftest import (
    HOSTILE_KINDS,
    extract_args,
    hostile_image_bytes,
    invoke,
    refused,
    sfxl_name,
    write_images,
)


# D3 ----------------------------------------------------------------- names that are not UTF-8


def _latin1_image(folder: Path) -> bytes:
    """An SF-XL-named JPEG whose name holds the Latin-1 byte \\xe9 (not valid UTF-8)."""
    name = sfxl_name(550010, 4180010).replace("@.jpg", "caf\xe9@.jpg").encode("latin-1")
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as f:
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(f, format="JPEG")
    return name


def test_a_name_that_is_not_utf8_is_refused_naming_it_before_any_work(tmp_path, tiny_model, images):
    _latin1_image(images / "d0")
    out = tmp_path / "out" / "f.h5"
    r = invoke(*extract_args(images, out, tiny_model))
    refused(r, "bad input", "caf\\xe9", "UTF-8", "rename")
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_name_that_is_not_utf8_before_embedding(tmp_path, tiny_model, images, monkeypatch):
    store, run = tmp_path / "f.h5", tmp_path / "run"
    assert invoke(*extract_args(images, store, tiny_model)).exit_code == 0
    r = invoke("train", "--feats", store, "--out", run, "--min-images-per-class", 1, "--M", 200, "--epochs", 1,
               "--dim", 16, "--no-progress")
    assert r.exit_code == 0, r.output
    _latin1_image(images / "d1")
    monkeypatch.setattr("dcfeat.images.ImageDataset.__getitem__", lambda *a: pytest.fail("an image was read"))
    refused(invoke("predict", "--run", run, "--images", images, "--out", tmp_path / "p.csv", "--no-progress"),
            "bad input", "caf\\xe9", "UTF-8")
    assert not (tmp_path / "p.csv").exists()


# D8, D9 ------------------------------------------------------------ features that are not finite


def _scaled_model(tiny_model: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of the tiny DINOv2 whose safetensors weights went through `change(tensors)`."""
    model = tmp_path / name
    shutil.copytree(tiny_model, model)
    [weights] = model.glob("*.safetensors")
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return model


def test_features_beyond_float16_are_refused_naming_dtype_float32(tmp_path, tiny_model, images):
    def huge(tensors):
        tensors["layernorm.weight"] = tensors["layernorm.weight"] * np.float32(1e6)

    model = _scaled_model(tiny_model, tmp_path, "huge", huge)
    out = tmp_path / "f.h5"
    refused(invoke(*extract_args(images, out, model)), "bad input", "float16", "--dtype float32")
    assert not out.exists() and not list(tmp_path.glob("f.shards/train/*/0*.h5"))
    r = invoke(*extract_args(images, out, model, "--dtype", "float32"))
    assert r.exit_code == 0, r.output
    emb = read_split(out, "train").embeddings
    assert emb.dtype == np.float32 and np.abs(emb).max() > 65504 and np.isfinite(emb).all()
    assert len(list(tmp_path.glob("f.shards/train/*"))) == 1  # the float16 attempt's plan is gone


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_checkpoint_with_a_nan_weight_is_refused_naming_it(tmp_path, tiny_model, images, value):
    def nan(tensors):  # NaN, or an infinity that is the tensor's largest or smallest value
        tensors["layernorm.bias"][0] = value

    model = _scaled_model(tiny_model, tmp_path, "nan-model", nan)
    out = tmp_path / "out" / "f.h5"
    refused(invoke(*extract_args(images, out, model)), "bad input", "nan-model", "not finite", "layernorm.bias")
    assert not (tmp_path / "out").exists()  # the weights are checked before any folder is created


# D11 ---------------------------------------------------------------- outputs that cannot be written


def test_a_read_only_output_folder_is_refused_naming_it(tmp_path, tiny_model, images, fake_mount):
    """A folder on a read-only filesystem (EROFS), and one without write permission (EACCES; not for root, whom
    chmod does not stop): refused naming the folder, for a store in it or in a folder to be created under it."""
    read_only, no_permission = tmp_path / "ro", tmp_path / "no-permission"
    read_only.mkdir()
    fake_mount(read_only)
    folders = [read_only]
    if os.geteuid() != 0:
        no_permission.mkdir(mode=0o555)
        folders.append(no_permission)
    try:
        for folder in folders:
            for out in (folder / "f.h5", folder / "sub" / "f.h5"):
                refused(invoke(*extract_args(images, out, tiny_model)), "environment", str(folder), "writ")
            assert not any(folder.iterdir())
    finally:
        if no_permission.exists():
            no_permission.chmod(0o755)


def test_a_write_refused_by_the_filesystem_midway_is_one_message(tmp_path, tiny_model, images, monkeypatch):
    """Read-only (EROFS) or permission denied (EACCES) once shards are being written: one message naming the
    folder, no traceback, no temporary file, and the same command then finishes."""
    import dcfeat.atomic as atomic

    out = tmp_path / "f.h5"
    real = atomic.os.open

    for code in (errno.EROFS, errno.EACCES):
        def refuse_shards(path, flags, mode=0o777, *a, code=code, **k):
            if str(path).endswith(".tmp") and ".h5." in os.path.basename(str(path)):
                raise OSError(code, os.strerror(code), str(path))
            return real(path, flags, mode, *a, **k)

        monkeypatch.setattr(atomic.os, "open", refuse_shards)
        r = invoke(*extract_args(images, out, tiny_model))
        refused(r, "environment", "f.shards", os.strerror(code))
        monkeypatch.setattr(atomic.os, "open", real)
        assert not list(tmp_path.glob("**/.*.tmp"))
    assert invoke(*extract_args(images, out, tiny_model)).exit_code == 0
    assert not [p for p in verify_store(out)[1] if p.serious]


# D16 ---------------------------------------------------------------- an output under a file


def test_an_output_under_a_regular_file_is_refused_before_anything_is_created(tmp_path, tiny_model, images):
    blocker = tmp_path / "FILE"
    blocker.write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    for out in (blocker / "feats.h5", blocker / "deeper" / "feats.h5"):
        refused(invoke(*extract_args(images, out, tiny_model)), "bad input", str(blocker), "not a folder")
    assert sorted(tmp_path.rglob("*")) == before


# D17 ---------------------------------------------------------------- glob characters in paths


def test_a_store_and_run_under_a_folder_with_glob_characters_work_end_to_end(tmp_path, tiny_model):
    root = tmp_path / "br [1]" / "x*?"
    images = root / "im[a]ges"
    write_images(images, 24, seed=3)
    store = root / "f[1].h5"
    for split in ("train", "test"):
        r = invoke(*extract_args(images, store, tiny_model, "--split", split))
        assert r.exit_code == 0, r.output
    r = invoke("info", store, "--verify")
    assert r.exit_code == 0 and "verified" in r.output, r.output
    run = root / "runs" / "r[0]"
    r = invoke("train", "--feats", store, "--out", run, "--min-images-per-class", 1, "--M", 200, "--epochs", 1,
               "--dim", 16, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", "--feats", store, "--run", run, "--split", "test")
    assert r.exit_code == 0, r.output
    r = invoke("predict", "--run", run, "--images", images, "--out", root / "p[1].csv", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (root / "p[1].csv").is_file()
    # a second writer of the store sees its own files through the brackets (clean-up, verify)
    leftover = store.with_name(f".{store.name}.dead.tmp")
    leftover.write_bytes(b"half")
    assert any(p.where == str(leftover) for p in verify_store(store)[1])
    r = invoke(*extract_args(images, store, tiny_model, "--split", "test"))
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    assert not leftover.exists()


# D18 ---------------------------------------------------------------- images too elongated to embed whole


def test_an_extremely_wide_image_is_skipped_with_a_reason_under_crop_full(tmp_path, tiny_model, images):
    name = sfxl_name(550020, 4180020).replace(".jpg", ".png")  # wider than JPEG allows
    Image.new("RGB", (100_000, 1), (90, 90, 90)).save(images / "d0" / name)
    out = tmp_path / "f.h5"
    r = invoke(*extract_args(images, out, tiny_model, "--crop", "full"))
    assert r.exit_code == 0, r.output
    [(image_id, reason)] = read_failures(out, "train")
    assert image_id.startswith("d0/@0550020.00") and "aspect" in reason and "--crop centre" in reason


# H1 (third pass) ------------------------------------------------------ files of formats dcfeat does not read


def test_files_of_other_formats_named_jpg_are_skipped_with_their_reason_and_the_split_completes(tmp_path, tiny_model,
                                                                                                images):
    """A fuzzed DDS (NotImplementedError) or SPIDER file (AttributeError) named .jpg stopped extract with a
    traceback, and the rerun stopped on the same file: the split could never complete."""
    for i, kind in enumerate(HOSTILE_KINDS):
        (images / "d0" / sfxl_name(550100 + i, 4180100)).write_bytes(hostile_image_bytes(kind))
    out = tmp_path / "f.h5"
    r = invoke(*extract_args(images, out, tiny_model))
    assert r.exit_code == 0, r.output
    failures = read_failures(out, "train")
    assert len(failures) == len(HOSTILE_KINDS) and all("JPEG, PNG, WebP, TIFF or BMP" in why for _, why in failures)
    assert split_info(out, "train").complete and len(read_split(out, "train").labels) == 24
