"""A practitioner with no network: a hub id fails at once naming the fixes that need none, and
`--random-backbone` (extract, predict, serve) runs the pipeline on a saved random DINOv2-S/14.

The network is never contacted: the hub's endpoint is a local port that refuses connections.
"""

import os
import shutil
import socket

import polars as pl
import pytest
from safetensors.torch import save_file

from dcfeat import backbone as bb
from dcfeat import checkpoints
from dcfeat.backbone import load_backbone, save_random_dinov2
from dcfeat.choices import RANDOM_VIT_DIR
from dcfeat.errors import EnvironmentProblem
from tests.conftest import extract_args, invoke, refused, write_images


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset, an empty Hugging Face cache, and a hub endpoint on a local port that is bound
    but not listening (so it refuses every connection); transformers' loaders fail the test if reached."""
    from huggingface_hub import constants
    import transformers

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def reached(*a, **k):
        raise AssertionError("transformers asked the hub (and would retry for ~26 s)")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", reached)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", reached)
    yield endpoint
    closed.close()


def test_a_hub_id_offline_fails_with_one_request_naming_the_fixes(no_network):
    with pytest.raises(EnvironmentProblem) as e:
        load_backbone("facebook/dinov2-small", device="cpu")
    message = str(e.value)
    for words in (f"no connection to {no_network}", "--random-backbone", f"data/{RANDOM_VIT_DIR}",
                  f"data/demo/{RANDOM_VIT_DIR}", "hf download facebook/dinov2-small --local-dir DIR", "--model DIR",
                  "RANDOM BACKBONE"):
        assert words in message, (words, message)


def test_the_cli_refuses_an_unreachable_hub_as_an_environment_problem(no_network, images, tmp_path):
    r = invoke("extract", "--images", images, "--out", tmp_path / "f.h5", "--no-progress", "--workers", 0)
    refused(r, "environment", "--model facebook/dinov2-base", "--random-backbone")
    assert not (tmp_path / "f.h5").exists()


def test_a_checkpoint_in_the_hub_cache_loads_with_no_request(no_network, tiny_model, tmp_path, monkeypatch):
    """The cache's snapshot is loaded as a folder: the same weights, named by the hub id."""
    from huggingface_hub import constants

    repo = tmp_path / "hf-cache" / "models--owner--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert checkpoints.cached_checkpoint("owner/tiny") == snapshot
    monkeypatch.undo()  # transformers' real loaders, the cache kept, and no way to ask the hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(checkpoints, "hub_unreachable", lambda: pytest.fail("the hub was asked"))
    loaded = load_backbone("owner/tiny", device="cpu")
    assert loaded.name == "owner/tiny" and loaded.fingerprint == load_backbone(str(tiny_model), device="cpu").fingerprint
    (snapshot / "model.safetensors").unlink()  # a cache without the weights holds no checkpoint
    assert checkpoints.cached_checkpoint("owner/tiny") is None


def test_the_random_vit_is_saved_once_under_a_temporary_name(tmp_path, monkeypatch):
    saved = []

    def fake(shape, directory):  # the real one writes 88 MB
        saved.append(directory.name)
        assert directory.name.startswith(f".{RANDOM_VIT_DIR}.") and directory.name.endswith(".tmp")
        (directory / "config.json").write_text("{}")
        save_file({}, directory / "model.safetensors")

    monkeypatch.setattr(bb, "save_random_vit", fake)
    folder = tmp_path / RANDOM_VIT_DIR
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an interrupted save in place, as the demo did before
    assert bb.random_vit(folder) == folder and bb.random_vit(folder) == folder
    assert len(saved) == 1 and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [RANDOM_VIT_DIR]


@pytest.fixture
def random_home(tiny_model, tmp_path, monkeypatch):
    """The working directory holds data/dinov2-small-random: here a copy of the tiny random model that
    trained the runs of conftest (the real one is a 88 MB DINOv2-S/14)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "data" / RANDOM_VIT_DIR)
    return tmp_path


def test_extract_with_the_random_backbone_labels_what_it_made(random_home):
    write_images(random_home / "img", 8)
    r = invoke("extract", "--images", random_home / "img", "--out", random_home / "f.h5", "--random-backbone",
               "--image-size", 56, "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "8 rows written" in r.stdout and "RANDOM BACKBONE" in r.stderr
    refused(invoke(*extract_args(random_home / "img", random_home / "g.h5", "facebook/dinov2-small"),
                   "--random-backbone"), "bad input", "--random-backbone and --model")


def test_predict_and_serve_with_the_random_backbone_only_for_its_own_runs(random_home, tiny_run, city_run, tmp_path,
                                                                          monkeypatch):
    import dcfeat.serve

    write_images(random_home / "new", 3, seed=5)
    r = invoke("predict", "--run", tiny_run, "--images", random_home / "new", "--out", "p.parquet", "--no-progress",
               "--random-backbone")
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(random_home / "p.parquet")["image_id"].n_unique() == 3 and "RANDOM BACKBONE" in r.stderr
    # Features of no random backbone: refused before the random model is looked for.
    shutil.rmtree(random_home / "data")
    refused(invoke("predict", "--run", city_run, "--images", random_home / "new", "--random-backbone"),
            "incompatible", "not of a random backbone", "Drop --random-backbone")
    assert not (random_home / "data").exists()
    # Another random model than the run's: the fingerprint decides.
    save_random_dinov2(random_home / "data" / RANDOM_VIT_DIR, hidden_size=32, layers=2, heads=2, image_size=56, seed=1)
    refused(invoke("predict", "--run", tiny_run, "--images", random_home / "new", "--random-backbone"),
            "incompatible", "model_fingerprint", "randomly initialised backbone", "extract --random-backbone")
    served = {}
    monkeypatch.setattr(dcfeat.serve, "serve_run", lambda run, **kw: served.update(kw))
    assert invoke("serve", "--run", tiny_run, "--random-backbone").exit_code == 0
    assert served["model"] == str((random_home / "data" / RANDOM_VIT_DIR).resolve())


def test_extract_refuses_an_unobtainable_hub_id_before_it_imports_torch(tmp_path):
    """The answer comes in the time Python starts and reads the cache (no torch, no transformers: seconds)."""
    import subprocess
    import sys

    script = ("import sys\nfrom dcfeat.cli import main\ntry:\n    main(['extract', '--images', sys.argv[1], '--out', "
              "sys.argv[2], '--no-progress'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
              "print('imported', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "f.h5")], env=env,
                       capture_output=True, text=True)
    assert "exit 6" in r.stdout and "imported []" in r.stdout, (r.stdout, r.stderr)
    assert "--random-backbone" in r.stdout + r.stderr and not (tmp_path / "f.h5").exists()
