"""`dcfeat export RUN DIR`: the run with a model card, loaded as it is by the Localizer and `dcfeat serve`."""

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import utm
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


def test_the_exported_folder_answers_as_the_run_does(evaluated, tiny_model, tmp_path):
    out = export_run(evaluated, tmp_path / "model").directory
    image = jpeg_bytes(4)
    want = Localizer.from_run(evaluated, device="cpu").locate([image])[0]
    # The export names its local backbone by folder name only: a copy of the weights is passed.
    got = Localizer.from_run(out, device="cpu", model=str(tiny_model)).locate([image])[0]
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
    r = invoke("export", evaluated, tmp_path / "m", "--license", "mit", "--dataset-name", "street photos")
    assert r.exit_code == 0, r.output
    assert front_matter((tmp_path / "m" / "README.md").read_text())["license"] == "mit"
    assert "hf upload" in r.stdout and "metrics of train" in r.stdout and "RANDOM BACKBONE" in r.stderr
    refused(invoke("export", evaluated, tmp_path / "m"), "bad input", "not an empty folder")
    refused(invoke("export", tmp_path / "nothing", tmp_path / "n"), "bad input", "not a complete run folder")
    refused(invoke("export", evaluated, tmp_path / "n", "--license", "my license"), "bad input", "SPDX")
    assert not (tmp_path / "n").exists()


def test_an_export_names_no_path_of_the_machine_that_made_it(evaluated, tmp_path_factory, tmp_path):
    out = export_run(evaluated, tmp_path / "model", license="Apache-2.0", dataset_name="my-city/photos").directory
    config = json.loads((evaluated / "config.json").read_text())
    local = [str(tmp_path_factory.getbasetemp()), config["store"], config["features"]["model_source"],
             config["features"]["images_root"], str(evaluated.resolve())]
    if Path.home() != Path("/"):
        local.append(str(Path.home()))
    assert all(Path(p).is_absolute() for p in local)  # the run itself records where things were
    texts = [p for p in out.rglob("*") if p.suffix in (".md", ".json", ".jsonl", ".txt")]
    assert {p.name for p in texts} >= {"README.md", "config.json", "calibration.json", "command.txt", "report.json"}
    for path in texts:
        text = path.read_text()
        for where in local:
            assert where not in text, (path, where)
    exported = json.loads((out / "config.json").read_text())
    assert exported["store"] == "f.h5" and exported["features"]["images_root"] == "img"
    assert invoke("info", out, "--verify").exit_code == 0  # checksums of the rewritten files recorded anew
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["my-city/photos"]
    # How the features were made, and the cells' extent (lat/lon of the cell centres, computed here with utm).
    for words in ("images of the folder `img`", "crop `centre` at `56` px", "backbone `tiny-dinov2`",
                  "pooling `cls`", "stored as `float16`", "4 cells"):
        assert words in card, words
    classes = pl.read_parquet(out / "classes.parquet")
    lat, lon = utm.to_latlon(classes["cell_east"].to_numpy(), classes["cell_north"].to_numpy(), 10, "S")
    assert (f"latitude {lat.min():.5f} to {lat.max():.5f}, longitude {lon.min():.5f} to {lon.max():.5f}"
            in card)


@pytest.mark.parametrize("license, name", [("MIT\nlicense: other", None), ("mit: x", None), ("GPL 3", None),
                                           ("", None), (None, "two\nlines"), (None, "tab\there"), (None, "x" * 201),
                                           (None, "  ")])
def test_a_license_or_dataset_name_that_would_break_the_card_is_refused(evaluated, tmp_path, license, name):
    with pytest.raises(BadInput, match="--license" if license is not None else "--dataset-name"):
        export_run(evaluated, tmp_path / "m", license=license, dataset_name=name)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_a_dataset_name_with_yaml_and_markdown_characters_is_escaped(evaluated, tmp_path):
    name = 'SF-XL "v1": test | #1 --- [x]: *y* <b> \\ é'
    card = (export_run(evaluated, tmp_path / "m", dataset_name=name).directory / "README.md").read_text()
    assert front_matter(card)["datasets"] == [name]
    [row] = [line for line in card.splitlines() if line.startswith("| data set |")]
    assert row.count(" | ") == 1 and "\\|" in row  # the name's | does not split the table's cell


def test_a_folder_of_the_users_named_like_a_staging_folder_survives_an_export(evaluated, tmp_path):
    mine = tmp_path / ".mine.tmp"  # the name exports staged through before each took its own
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    export_run(evaluated, tmp_path / "mine")
    assert (mine / "notes.txt").read_text() == "keep" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.tmp", "mine"]  # no staging folder left
    assert (tmp_path / "mine" / "README.md").is_file()


def test_export_into_a_symlink_is_refused_naming_its_target_and_leaves_nothing(evaluated, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    for link, to in ((tmp_path / "L", target), (tmp_path / "dangling", tmp_path / "nowhere")):
        link.symlink_to(to)
        with pytest.raises(BadInput, match=f"is a symbolic link to {to}.*dcfeat export RUN {to}"):
            export_run(evaluated, link)
        refused(invoke("export", evaluated, link), "bad input", "symbolic link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L", "dangling", "target"]
    assert not any(target.iterdir()) and (tmp_path / "L").is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_failed_export_leaves_no_staging_folder(evaluated, tmp_path, monkeypatch):
    import dcfeat.export

    def broken(source, target):
        raise RuntimeError(f"copying {source.name} failed")

    monkeypatch.setattr(dcfeat.export, "_copy", broken)
    with pytest.raises(RuntimeError, match="failed"):
        export_run(evaluated, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # an empty folder given stays as it was
    with pytest.raises(RuntimeError, match="failed"):
        export_run(evaluated, tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not any((tmp_path / "empty").iterdir())
