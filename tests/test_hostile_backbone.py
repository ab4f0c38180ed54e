"""Hostile checkpoints and `--model` values: the fingerprint, pickles, missing folders, wrong models."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcfeat import backbone as bb
from dcfeat import checkpoints
from dcfeat.backbone import load_backbone, save_random_dinov2
from dcfeat.errors import BadInput, EnvironmentProblem
from tests.conftest import invoke


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """Four blocks, so that block 1 is well inside the sorted state dict, far from its ends."""
    return save_random_dinov2(tmp_path_factory.mktemp("m4") / "dinov2-4", hidden_size=32, layers=4, heads=2,
                              image_size=56)


def fingerprint(model, **kwargs) -> str:
    return load_backbone(str(model), device="cpu", **kwargs).fingerprint


# Defect 1: the fingerprint must follow every weight and the architecture, never the path or the run dtype.

def test_a_changed_middle_layer_changes_the_fingerprint(four_layers, tmp_path):
    model = tmp_path / "model"  # edited in place: the path cannot tell the two apart
    shutil.copytree(four_layers, model)
    before = fingerprint(model)
    weights = load_file(model / "model.safetensors")
    [name] = [k for k in weights if k.startswith("encoder.layer.1.") and k.endswith("mlp.fc1.weight")]
    weights[name] = weights[name].clone()
    weights[name][0, 0] += 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint(model) != before


def test_the_same_checkpoint_in_another_folder_keeps_its_fingerprint(four_layers, tmp_path):
    copy = tmp_path / "downloaded" / "elsewhere"
    shutil.copytree(four_layers, copy)
    original = fingerprint(four_layers)
    assert fingerprint(copy) == original and original.startswith("v2-")


def test_an_architecture_change_with_equal_tensors_changes_the_fingerprint(four_layers, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(four_layers, model)
    before = fingerprint(model)
    config = json.loads((model / "config.json").read_text())
    config["layer_norm_eps"] = 1e-3
    (model / "config.json").write_text(json.dumps(config))
    assert fingerprint(model) != before


def test_bf16_and_fp32_loads_of_one_checkpoint_share_the_fingerprint(four_layers):
    half = load_backbone(str(four_layers), device="cpu", _dtype=torch.bfloat16)
    full = load_backbone(str(four_layers), device="cpu", _dtype=torch.float32)
    assert half.model.dtype == torch.bfloat16 and full.model.dtype == torch.float32
    assert half.fingerprint == full.fingerprint


# Defect 2: weights load from safetensors only; a pickle is refused before it is opened.

@pytest.fixture
def pickled_only(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder)
    # transformers 5 writes safetensors even with safe_serialization=False, so pickle the state dict by hand.
    torch.save(load_file(tiny_model / "model.safetensors"), folder / "pytorch_model.bin")

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load was called on a model folder")

    monkeypatch.setattr(torch, "load", no_pickles)
    return folder


def test_a_pickled_checkpoint_is_refused_without_unpickling(pickled_only):
    with pytest.raises(BadInput) as e:
        load_backbone(str(pickled_only), device="cpu")
    assert "safetensors" in str(e.value) and str(pickled_only) in str(e.value)
    assert "use_safetensors=False" in str(e.value)  # the conversion command


def test_the_cli_refuses_a_pickled_checkpoint_with_exit_2(pickled_only, images, tmp_path):
    r = invoke("extract", "--images", images, "--out", tmp_path / "f.h5", "--model", pickled_only, "--no-progress",
               "--workers", 0)
    assert r.exit_code == 2 and "safetensors" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_repo_without_safetensors_is_told_apart_from_missing_weights(offline, monkeypatch):
    import huggingface_hub
    import transformers

    def no_safetensors(*args, **kwargs):  # transformers' words for a hub repo holding only pytorch_model.bin
        raise OSError("owner/old does not appear to have a file named model.safetensors or "
                      "model.safetensors.index.json and thus cannot be loaded with `safetensors`.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: transformers.Dinov2Config())
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_safetensors)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: offline)
    monkeypatch.setattr(checkpoints, "hub_unreachable", lambda: "offline: HF_HUB_OFFLINE is set" if offline else None)
    # Offline, the same words also mean "the weights are not in the cache": that is missing weights.
    with pytest.raises(EnvironmentProblem if offline else BadInput) as e:
        load_backbone("owner/old", device="cpu")
    assert ("hf download owner/old --local-dir DIR" if offline else "use_safetensors=False") in str(e.value)


# Defect 3: one error kind per cause, each naming the option and the fix.

@pytest.mark.parametrize("given", ["ABS", "./models/dinov2-base", "~/no-such-dcfeat-model", "a/b/c"])
def test_a_missing_model_folder_is_bad_input_with_a_download_hint(given, tmp_path):
    model = str(tmp_path / "nowhere") if given == "ABS" else given
    with pytest.raises(BadInput) as e:
        load_backbone(model, device="cpu")
    message = str(e.value)
    assert f"--model {model}: no such directory" in message
    assert f"hf download facebook/dinov2-base --local-dir {model}" in message
    assert f"hf download {model}" not in message


def test_a_file_given_as_model_is_bad_input(tiny_model):
    with pytest.raises(BadInput, match="not a directory"):
        load_backbone(str(tiny_model / "config.json"), device="cpu")


def test_an_offline_hub_id_is_missing_weights():
    with pytest.raises(EnvironmentProblem) as e:
        load_backbone("facebook/dinov2-small", device="cpu")
    assert "--model DIR" in str(e.value) and "hf download facebook/dinov2-small --local-dir DIR" in str(e.value)


def test_a_checkpoint_that_is_not_dinov2_is_bad_input(tiny_model, tmp_path):
    other = tmp_path / "vit"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "vit"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput) as e:
        load_backbone(str(other), device="cpu")
    assert "'vit'" in str(e.value) and "dinov2, dinov2_with_registers" in str(e.value)


@pytest.mark.parametrize("content", [None, "{not json"])
def test_a_folder_without_a_readable_config_is_bad_input(content, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    if content is not None:
        (folder / "config.json").write_text(content)
    with pytest.raises(BadInput, match="config.json"):
        load_backbone(str(folder), device="cpu")


def test_a_bad_pooling_is_bad_input(tiny_model):
    with pytest.raises(BadInput, match="--pooling"):
        load_backbone(str(tiny_model), pooling="max", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_an_environment_problem(tiny_model):
    with pytest.raises(EnvironmentProblem, match="--device cuda"):
        load_backbone(str(tiny_model), device="cuda")
    assert not hasattr(bb, "BackboneError")  # one kind per cause, no catch-all class
