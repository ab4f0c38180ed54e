"""`dcfeat export RUN DIR`: the run with a model card, loaded as it is by the Localizer and `dcfeat serve`."""

import json
import shutil

import pytest
import yaml

from dcfeat.errors import BadInput, DamagedRun
from dcfeat.export import export_run
from dcfeat.localizer import Localizer
from tests.conftest import invoke, jpeg_bytes, refused


@pytest.fixture(scope="module")
def evaluated(calibrated_run, tmp_path_factory):
    """A copy of the calibrated tiny run, evaluated on its store's train split (a report.json to quote)."""
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(calibrated_run, run)
    r = invoke("evaluate", "--feats", calibrated_run.parent / "f.h5", "--run", run, "--split", "train", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return run


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_copies_the_run_with_a_model_card_quoting_its_report(evaluated, tmp_path):
    out = tmp_path / "model"
    result = export_run(evaluated, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "calibration.json", "checksums.json", "classes.parquet", "command.txt", "config.json",
         "model.safetensors", "train_log.jsonl", "eval"])
    assert (out / "eval" / "train" / "report.json").is_file() and not (out / "eval" / "train" / "predictions.parquet").exists()
    assert result.reports == ["train"] and not list(tmp_path.glob(".*tmp"))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "dcfeat" and "visual-place-recognition" in meta["tags"]
    assert "base_model" not in meta  # a random local backbone is no base model to name
    report = json.loads((evaluated / "eval" / "train" / "report.json").read_text())
    [entry] = meta["model-index"]
    [results] = entry["results"]
    lr1 = {m["name"]: m["value"] for m in results["metrics"]}["classify LR@1 (25 m)"]
    assert lr1 == round(100 * report["methods"]["classify"]["recall"]["1"], 2)
    config = json.loads((evaluated / "config.json").read_text())
    for words in (config["features"]["model_fingerprint"], "RANDOM BACKBONE", "fitted on split `val`", "at 150 m",
                  "## Limits", "no orientation", "(not recorded)" if not (evaluated / "command.txt").read_text().strip()
                  else (evaluated / "command.txt").read_text().strip(), "| train | classify |"):
        assert words in card, words


def test_the_exported_folder_answers_as_the_run_does(evaluated, tmp_path):
    out = export_run(evaluated, tmp_path / "model").directory
    image = jpeg_bytes(4)
    want = Localizer.from_run(evaluated, device="cpu").locate([image])[0]
    got = Localizer.from_run(out, device="cpu").locate([image])[0]
    assert got.top_k == want.top_k and got.confidence == want.confidence and got.radius_m == want.radius_m
    assert invoke("info", out, "--verify").exit_code == 0  # checksums and all


def test_with_backbone_the_folder_carries_and_loads_its_own_weights(evaluated, tmp_path):
    out = export_run(evaluated, tmp_path / "model", with_backbone=True).directory
    assert (out / "backbone" / "config.json").is_file() and list((out / "backbone").glob("*.safetensors"))
    loc = Localizer.from_run(out, device="cpu")
    assert loc.backbone_source == str(out / "backbone")
    assert loc.locate([jpeg_bytes(4)])[0].top_k == Localizer.from_run(evaluated, device="cpu").locate([jpeg_bytes(4)])[0].top_k


def test_an_uncalibrated_unevaluated_run_says_so(tiny_run, tmp_path):
    card = (export_run(tiny_run, tmp_path / "m").directory / "README.md").read_text()
    assert "**UNCALIBRATED**" in card and "Not evaluated" in card and "model-index" not in front_matter(card)


def test_export_refuses_a_used_folder_or_a_damaged_run_writing_nothing(evaluated, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("mine")
    with pytest.raises(BadInput, match="not an empty folder"):
        export_run(evaluated, used)
    assert [p.name for p in used.iterdir()] == ["x"]
    damaged = tmp_path / "damaged"
    shutil.copytree(evaluated, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:  # one byte of a weight, after the header
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(DamagedRun, match="model.safetensors"):
        export_run(damaged, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_export_command(evaluated, tmp_path):
    r = invoke("export", evaluated, tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "hf upload" in r.stdout and "metrics of train" in r.stdout and "RANDOM BACKBONE" in r.stderr
    refused(invoke("export", evaluated, tmp_path / "m"), "bad input", "not an empty folder")
    refused(invoke("export", tmp_path / "nothing", tmp_path / "n"), "bad input", "not a complete run folder")
