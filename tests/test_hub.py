"""torch.hub descriptor models (`--model torchhub:…`): a tiny local hub repository made here, through every
stage, and every way a `torchhub:` model string or repository can be wrong. Nothing reaches the network."""

import json
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from dcfeat import hub
from dcfeat.backbone import load_backbone
from dcfeat.errors import BadInput, EnvironmentProblem
from dcfeat.hub import KNOWN_HUB_MODELS, HubSpec, hub_fingerprint, parse_hub
from dcfeat.localizer import Localizer
from dcfeat.serve import ServeConfig, create_app
from tests.conftest import assert_predict_from_images_as_from_feats, extract_args, invoke, jpeg_bytes, refused, write_images

HUBCONF = '''
dependencies = ["torch"]

import torch
from torch import nn


class TinyDescriptor(nn.Module):
    """A seeded conv net: image batch (B, 3, H, W) -> (B, dim), any size."""

    def __init__(self, dim, shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8, dim)
        self.shape = shape

    def forward(self, x):
        out = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        if self.shape == "flat":
            return out.reshape(-1)
        if self.shape == "nan":
            return out * float("nan")
        if self.shape == "tuple":
            return out, "attention maps"
        return out


def tiny_descriptor(dim=32, seed=0, shape="ok"):
    torch.manual_seed(seed)
    return TinyDescriptor(dim, shape)


def not_a_model():
    return "a string"


def offline_weights():
    import urllib.error

    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")  # as a download offline
'''


def make_hub_repo(folder: Path, hubconf: str = HUBCONF) -> Path:
    folder.mkdir(parents=True)
    (folder / "hubconf.py").write_text(textwrap.dedent(hubconf))
    return folder


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    return make_hub_repo(tmp_path_factory.mktemp("hub") / "tinyhub")


def model_of(repo: Path, query: str = "dim=32") -> str:
    return f"torchhub:{repo}:tiny_descriptor" + (f"?{query}" if query else "")


# --------------------------------------------------------------------------- the whole pipeline

def test_a_hub_model_goes_through_extract_train_evaluate_predict_and_serve(hub_repo, tmp_path):
    model, store, run = model_of(hub_repo), tmp_path / "f.h5", tmp_path / "run"
    for split, n, seed in (("train", 24, 0), ("val", 12, 1), ("test", 8, 2), ("test-db", 24, 3)):
        write_images(tmp_path / split, n, seed=seed)
        # float32 rows: `predict --feats` then reads what `predict --images` computes (float16 rows of this
        # untrained net's descriptors moved probabilities by 2.4e-5, beyond the helper's 1e-5).
        r = invoke(*extract_args(tmp_path / split, store, model, "--split", split, "--dtype", "float32"))
        assert r.exit_code == 0, r.output
    with h5py.File(store) as f:
        attrs = dict(f["train"].attrs)
    # Identity: the folder's name, never its path; the entry, its arguments, the weights' fingerprint.
    assert attrs["model"] == "torchhub:tinyhub:tiny_descriptor?dim=32" and str(hub_repo) not in attrs["model"]
    assert (attrs["hub_repo"], attrs["hub_entry"], json.loads(attrs["hub_kwargs"])) == ("tinyhub", "tiny_descriptor",
                                                                                         {"dim": 32})
    assert attrs["model_source"] == model and attrs["pooling"] == "descriptor" and attrs["dim"] == 32
    assert attrs["model_fingerprint"] == load_backbone(model, device="cpu").fingerprint

    r = invoke("train", "--feats", store, "--val-split", "val", "--M", 200, "--min-images-per-class", 1, "--epochs", 2,
               "--dim", 8, "--out", run, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", "--run", run, "--feats", store, "--split", "test", "--database-split", "test-db",
               "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"classify", "retrieve", "hybrid"} <= set(report["methods"])
    assert_predict_from_images_as_from_feats(run, store, "test")

    localizer = Localizer.from_run(run, device="cpu")
    with TestClient(create_app(localizer, ServeConfig(max_wait_ms=1))) as client:
        a, b = jpeg_bytes(1), jpeg_bytes(2, size=(70, 90))
        r = client.post("/v1/locate?k=2", files=[("image", ("a.jpg", a, "image/jpeg")),
                                                 ("image", ("b.jpg", b, "image/jpeg"))])
        assert r.status_code == 200, r.text
        got = r.json()["answers"]
    want = [x.to_dict() for x in localizer.locate([a, b], ids=["a.jpg", "b.jpg"], k=2)]
    assert [[c["class"] for c in x["top_k"]] for x in got] == [[c["class"] for c in x["top_k"]] for x in want]


def test_the_model_is_frozen_and_its_descriptors_are_stored_as_returned(hub_repo):
    backbone = load_backbone(model_of(hub_repo, "dim=16&seed=3"), device="cpu")
    assert backbone.dim == 16 and backbone.patch_size == 1 and backbone.dtype == torch.float32
    assert not backbone.model.training and not any(p.requires_grad for p in backbone.model.parameters())
    images = torch.randint(0, 255, (3, 45, 61, 3), dtype=torch.uint8)  # no patch multiple needed
    got = backbone.embed(images)
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = backbone.model(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-3)  # dcfeat does not L2-normalise


def test_a_tuple_output_gives_its_first_element(hub_repo):
    backbone = load_backbone(model_of(hub_repo, "shape=tuple"), device="cpu")
    assert backbone.dim == 32 and backbone.embed(torch.zeros(2, 40, 40, 3, dtype=torch.uint8)).shape == (2, 32)


# --------------------------------------------------------------------------- identity

def test_the_fingerprint_is_stable_and_follows_weights_arguments_and_never_the_path(hub_repo, tmp_path):
    first = load_backbone(model_of(hub_repo), device="cpu")
    assert load_backbone(model_of(hub_repo), device="cpu").fingerprint == first.fingerprint
    copy = make_hub_repo(tmp_path / "elsewhere", (hub_repo / "hubconf.py").read_text())
    assert load_backbone(model_of(copy), device="cpu").fingerprint == first.fingerprint
    assert load_backbone(model_of(hub_repo, "dim=32&seed=1"), device="cpu").fingerprint != first.fingerprint
    net, spec = first.model, parse_hub(model_of(hub_repo))
    with torch.no_grad():
        net.fc.bias[5] += 1e-3
    assert hub_fingerprint(net, spec) != first.fingerprint
    with torch.no_grad():
        net.fc.bias[5] -= 1e-3
    assert hub_fingerprint(net, spec) == first.fingerprint
    # A keyword argument that changes no tensor (here: what forward returns) still changes the identity.
    assert load_backbone(model_of(hub_repo, "dim=32&shape=tuple"), device="cpu").fingerprint != first.fingerprint


def test_features_of_two_hub_models_are_not_mixed(hub_repo, tmp_path):
    other = make_hub_repo(tmp_path / "otherhub", HUBCONF.replace("torch.manual_seed(seed)", "torch.manual_seed(seed + 7)"))
    store = tmp_path / "f.h5"
    write_images(tmp_path / "a", 8)
    write_images(tmp_path / "b", 8, seed=1)
    assert invoke(*extract_args(tmp_path / "a", store, model_of(hub_repo))).exit_code == 0
    refused(invoke(*extract_args(tmp_path / "b", store, model_of(other), "--split", "val")), "incompatible",
            "model_fingerprint")
    r = invoke(*extract_args(tmp_path / "b", store, model_of(other), "--split", "test", "--out", tmp_path / "g.h5"))
    assert r.exit_code == 0, r.output
    r = invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8,
               "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 0, r.output
    refused(invoke("evaluate", "--run", tmp_path / "run", "--feats", tmp_path / "g.h5", "--split", "test"),
            "incompatible", "model_fingerprint")
    refused(invoke("predict", "--run", tmp_path / "run", "--images", tmp_path / "b", "--model", model_of(other),
                   "--out", tmp_path / "p.parquet", "--no-progress"), "incompatible", "model_fingerprint")


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("model", ["torchhub:", "torchhub:gmberton/cosplace", "torchhub::entry",
                                   "torchhub:gmberton/cosplace:not-an-entry", "torchhub:a/b:entry?dim",
                                   "torchhub:a/b:entry?dim=1&dim=2", "torchhub:no/such/folder:entry"])
def test_a_torchhub_string_that_does_not_parse_shows_the_two_forms(model):
    with pytest.raises(BadInput, match="torchhub:") as e:
        parse_hub(model)
    assert "OWNER/REPO" in str(e.value) or "keyword argument" in str(e.value)


def test_keyword_arguments_are_parsed_and_recorded_sorted(tmp_path):
    spec = parse_hub("torchhub:gmberton/cosplace:get_trained_model?fc_output_dim=2048&backbone=ResNet50"
                     "&scale=0.5&pretrained=True&extra=none")
    assert spec.kwargs == {"fc_output_dim": 2048, "backbone": "ResNet50", "scale": 0.5, "pretrained": True,
                           "extra": None}
    assert not spec.local and spec.name == spec.source == ("torchhub:gmberton/cosplace:get_trained_model?"
                                                           "backbone=ResNet50&extra=none&fc_output_dim=2048"
                                                           "&pretrained=true&scale=0.5")
    assert parse_hub(spec.name) == spec
    assert spec.known is KNOWN_HUB_MODELS["cosplace"]
    clone = tmp_path / "Bag-of-Queries"
    clone.mkdir()
    boq = parse_hub(f"torchhub:{clone}:get_trained_boq?backbone_name=dinov2&output_dim=12288")
    assert boq.local and boq.repo_name == "Bag-of-Queries" and boq.known.patch_size == 14


def test_every_known_model_string_parses_back_to_itself():
    for known in KNOWN_HUB_MODELS.values():
        spec = parse_hub(known.model)
        assert (spec.repo, spec.entry, spec.kwargs, spec.known) == (known.repo, known.entry, known.kwargs, known)


def test_a_folder_without_hubconf_or_entry_is_refused_naming_it(hub_repo, tmp_path, images):
    (tmp_path / "empty").mkdir()
    refused(invoke(*extract_args(images, tmp_path / "f.h5", f"torchhub:{tmp_path / 'empty'}:tiny_descriptor")),
            "bad input", "hubconf.py does not exist")
    with pytest.raises(BadInput, match="no entry 'missing'; its entries: .*tiny_descriptor"):
        load_backbone(f"torchhub:{hub_repo}:missing", device="cpu")
    with pytest.raises(BadInput, match="not a torch.nn.Module"):
        load_backbone(f"torchhub:{hub_repo}:not_a_model", device="cpu")
    with pytest.raises(BadInput, match=r"tiny_descriptor\(colour='red'\) refused its arguments \(TypeError"):
        load_backbone(model_of(hub_repo, "colour=red"), device="cpu")


def test_an_entry_that_cannot_download_its_weights_says_where_they_are_kept(hub_repo):
    with pytest.raises(EnvironmentProblem, match=r"offline_weights\(\) could not download .* Run it once where there is "
                                                 r"network: the weights its entry downloads are kept in .*checkpoints"):
        load_backbone(f"torchhub:{hub_repo}:offline_weights", device="cpu")


def test_missing_dependencies_are_an_environment_problem(tmp_path):
    repo = make_hub_repo(tmp_path / "needy", HUBCONF.replace('dependencies = ["torch"]',
                                                               'dependencies = ["torch", "no_such_package_x"]'))
    with pytest.raises(EnvironmentProblem, match="no_such_package_x"):
        load_backbone(model_of(repo), device="cpu")
    repo = make_hub_repo(tmp_path / "importing", HUBCONF.replace("import torch\n", "import torch\nimport no_such_module_y\n", 1))
    with pytest.raises(EnvironmentProblem, match="imports 'no_such_module_y', which is not installed here"):
        load_backbone(model_of(repo), device="cpu")


@pytest.mark.parametrize("shape,words", [("flat", "returned (64,) for a batch of 2"), ("nan", "NaN or inf")])
def test_a_model_whose_output_is_not_a_finite_batch_of_descriptors_is_refused(hub_repo, shape, words):
    with pytest.raises(BadInput, match=r"tiny_descriptor") as e:
        load_backbone(model_of(hub_repo, f"shape={shape}"), device="cpu")
    assert words in str(e.value)


def test_hub_models_take_no_pooling_cache_tokens_or_tuned_blocks(hub_repo, tmp_path, images):
    model, store = model_of(hub_repo), tmp_path / "f.h5"
    refused(invoke(*extract_args(images, store, model, "--pooling", "mean")), "bad input", "pools its own")
    refused(invoke(*extract_args(images, store, model, "--cache-tokens", 1)), "bad input", "--cache-tokens 0")
    assert not store.exists()
    assert invoke(*extract_args(images, store, model)).exit_code == 0
    refused(invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1,
                   "--finetune-blocks", 1, "--out", tmp_path / "run", "--no-progress"), "bad input",
            "--finetune-blocks 0")


def test_whole_images_of_any_size_go_through_a_hub_model(hub_repo, tmp_path):
    write_images(tmp_path / "img", 6, shapes=[(96, 112), (80, 150)])
    store = tmp_path / "f.h5"
    r = invoke(*extract_args(tmp_path / "img", store, model_of(hub_repo), "--crop", "full", "--image-size", 50))
    assert r.exit_code == 0, r.output
    with h5py.File(store) as f:
        assert f["train/embeddings"].shape == (6, 32)
        assert (f["train"].attrs["crop"], f["train"].attrs["image_size"]) == ("full", 50)


def test_a_known_model_needing_patch_multiples_refuses_other_sizes(tmp_path, images):
    clone = make_hub_repo(tmp_path / "salad", HUBCONF.replace("def tiny_descriptor(", "def dinov2_salad("))
    backbone = load_backbone(f"torchhub:{clone}:dinov2_salad", device="cpu")
    assert backbone.patch_size == 14
    refused(invoke(*extract_args(images, tmp_path / "f.h5", f"torchhub:{clone}:dinov2_salad", "--image-size", 60)),
            "bad input", "patch size 14", "56 or 70")


def test_the_github_form_offline_fails_at_once_naming_the_local_form(monkeypatch, tmp_path, images):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # a torch.hub cache that holds nothing
    tries = []

    def no_network(request, timeout=None):
        tries.append((request.full_url, timeout))
        raise hub.URLError("[Errno -3] Temporary failure in name resolution")

    def never(*args, **kwargs):
        raise AssertionError("torch.hub.load ran although GitHub cannot be reached")

    monkeypatch.setattr(hub, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load", never)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = "torchhub:gmberton/cosplace:get_trained_model?backbone=ResNet50&fc_output_dim=2048"
    r = invoke(*extract_args(images, tmp_path / "f.h5", model))
    refused(r, "environment", "GitHub cannot be reached", "git clone https://github.com/gmberton/cosplace",
            "--model torchhub:/path/to/cosplace:get_trained_model?backbone=ResNet50&fc_output_dim=2048")
    assert tries == [(hub.GITHUB_URL, hub.REACH_TIMEOUT_S)]  # one try with a short timeout, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EnvironmentProblem, match=r"offline \(HF_HUB_OFFLINE is set\)"):
        load_backbone(model, device="cpu")
    assert len(tries) == 1  # offline: not even one try


def test_the_github_form_loads_the_cached_code_pinned_without_asking_github(monkeypatch, tmp_path, hub_repo):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (Path(torch.hub.get_dir()) / "someone_tinyhub_master").mkdir(parents=True)
    calls = []

    def no_network(*args, **kwargs):
        raise AssertionError("GitHub was asked although torch.hub's cache holds the code")

    monkeypatch.setattr(hub, "urlopen", no_network)
    real = torch.hub.load

    def cached(repo, entry, **kwargs):
        calls.append((repo, entry, kwargs.pop("trust_repo"), kwargs.pop("verbose")))
        return real(str(hub_repo), entry, source="local", **kwargs)

    monkeypatch.setattr(torch.hub, "load", cached)
    backbone = load_backbone("torchhub:someone/tinyhub:tiny_descriptor?dim=8", device="cpu")
    assert calls == [("someone/tinyhub:master", "tiny_descriptor", True, False)]
    assert backbone.dim == 8 and backbone.name == backbone.source == "torchhub:someone/tinyhub:tiny_descriptor?dim=8"


def test_hub_spec_names_never_hold_the_clone_path(tmp_path):
    spec = HubSpec(str(tmp_path / "MegaLoc"), "get_trained_model", {}, local=True)
    assert spec.name == "torchhub:MegaLoc:get_trained_model" and spec.known is KNOWN_HUB_MODELS["megaloc"]
    assert spec.source == f"torchhub:{tmp_path / 'MegaLoc'}:get_trained_model"


def test_nothing_in_dcfeat_unpickles_without_weights_only():
    root = Path(__file__).resolve().parents[1]
    for path in [*(root / "dcfeat").rglob("*.py"), *(root / "pipelines").rglob("*.py")]:
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)
