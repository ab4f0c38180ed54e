"""Features are identified by the weights' fingerprint, not the name the checkpoint was loaded under."""

import shutil

import pytest

from dcfeat.backbone import save_random_dinov2
from dcfeat.errors import IncompatibleFeatures
from dcfeat.identity import FeatureIdentity, check_compatible, check_features, identity_diff
from tests.conftest import extract_args, invoke, refused, write_images


def test_the_same_weights_under_another_folder_name_extract_into_one_store(tmp_path, tiny_model):
    images = tmp_path / "images"
    write_images(images, 12)
    copy = shutil.copytree(tiny_model, tmp_path / "model_copy")
    store = tmp_path / "feats.h5"
    assert invoke(*extract_args(images, store, tiny_model, "--split", "train")).exit_code == 0
    r = invoke(*extract_args(images, store, copy, "--split", "val"))
    assert r.exit_code == 0, r.output


def test_other_weights_under_the_same_name_are_refused(tmp_path, tiny_model):
    images = tmp_path / "images"
    write_images(images, 12)
    store = tmp_path / "feats.h5"
    assert invoke(*extract_args(images, store, tiny_model, "--split", "train")).exit_code == 0
    other = save_random_dinov2(tmp_path / "elsewhere" / tiny_model.name, hidden_size=32, layers=2, heads=2,
                               image_size=56, seed=1)
    refused(invoke(*extract_args(images, store, other, "--split", "val")), "incompatible", "model_fingerprint")


def test_names_count_only_where_a_fingerprint_is_missing():
    a = {"model": "facebook/dinov2-base", "model_fingerprint": "v2:abc", "pooling": "cls", "dim": 768}
    assert identity_diff(a, {**a, "model": "./dinov2-base"}) == {}
    assert identity_diff(a, {**a, "model_fingerprint": "v2:def"}) == {"model_fingerprint": ("v2:abc", "v2:def")}
    foreign = {"model": "other-tool", "pooling": "cls", "dim": 768}  # a store of another program
    assert identity_diff(a, foreign) == {"model": ("facebook/dinov2-base", "other-tool")}
    check_compatible(a, {**a, "model": "copy"}, what="splits", fix="")


def test_a_refusal_names_the_runs_checkpoint_as_the_fix():
    run = {"model": "facebook/dinov2-base", "model_source": "/models/dinov2-base", "model_fingerprint": "v2:abc",
           "pooling": "cls", "dim": 768}
    with pytest.raises(IncompatibleFeatures, match="extract it with the run's --model /models/dinov2-base$"):
        check_features(FeatureIdentity(**run), {**run, "model_fingerprint": "v2:def"}, what="split 'test'")
