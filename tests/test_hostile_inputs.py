"""Hostile options and splits of train, calibrate and evaluate: devices dcfeat does not run on, empty splits,
options too large for memory, Ctrl-C. Each test names the defect it covers (D5, D13, D14, D23, D27)."""

import json
import shutil

import h5py
import numpy as np
import polars as pl
import pytest

from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput
from dcfeat.store import LABEL_COLUMNS, read_split
from tests.conftest import invoke, refused


@pytest.fixture(scope="module")
def empty_store(city_store, tmp_path_factory):
    """The city's train, val and test splits, and `empty` and `empty-db` with no rows, written the way another
    program may write them (plain h5py, labels as one Parquet file per split), with the city's attributes."""
    store = tmp_path_factory.mktemp("empty") / "feats.h5"
    with h5py.File(store, "w") as f:
        f.attrs["dcfeat_format"] = 1
        for name, source in (("train", "train"), ("val", "val"), ("test", "test"), ("empty", None),
                             ("empty-db", None)):
            split = read_split(city_store, source or "test")
            rows = len(split.embeddings) if source else 0
            g = f.create_group(name)
            g.create_dataset("embeddings", data=split.embeddings[:rows], maxshape=(None, 64), chunks=(64, 64))
            g.create_dataset("ids", data=split.labels["image_id"].to_list()[:rows], maxshape=(None,),
                             dtype=h5py.string_dtype())
            g.attrs.update({k: v for k, v in split.attrs.items() if k not in ("plan_id", "complete")})
            g.attrs["complete"] = True
            part = store.with_suffix(".labels") / f"split={name}"
            part.mkdir(parents=True)
            split.labels.head(rows).select(list(LABEL_COLUMNS)).write_parquet(part / "a.parquet")
    return store


def test_empty_splits_are_refused_before_any_work(empty_store, city_run, tmp_path):
    """D13: an empty --val-split crashed after epoch 1; D14: an empty --database-split gave an IndexError in
    evaluate and calibrate; D27: an empty query split was said to lie in "zone(s) []"."""
    r = invoke("train", "--feats", empty_store, "--val-split", "empty", "--out", tmp_path / "r", "--epochs", 1)
    refused(r, "bad input", "--val-split empty", "holds no rows")
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    shutil.copytree(city_run, run)
    r = invoke("evaluate", "--feats", empty_store, "--run", run, "--database-split", "empty-db", "--out",
               tmp_path / "e")
    refused(r, "bad input", "--database-split empty-db", "holds no rows")
    r = invoke("calibrate", "--feats", empty_store, "--run", run, "--database-split", "empty-db")
    refused(r, "bad input", "--database-split empty-db", "holds no rows")
    r = invoke("evaluate", "--feats", empty_store, "--run", run, "--split", "empty", "--out", tmp_path / "e")
    refused(r, "bad input", "--split empty", "holds no rows")
    assert "zone(s) []" not in r.output and not (tmp_path / "e").exists()
    assert json.loads((run / "calibration.json").read_text()) == json.loads((city_run / "calibration.json").read_text())


TOO_LARGE = {
    "--seed 1e20 as digits": (["--seed", "100000000000000000000"], "--seed"),
    "--seed -1": (["--seed", "-1"], "--seed"),
    "--batch-size 99999999999": (["--batch-size", "99999999999"], "--batch-size"),
    "--dim 9999999999": (["--dim", "9999999999"], "--dim"),
    "--N 100000": (["--N", "100000"], "--N"),
    "--M 0.001": (["--M", "0.001"], "--M"),
}


@pytest.mark.parametrize("option", list(TOO_LARGE))
def test_options_beyond_what_training_can_do_are_refused_before_the_run_folder(city_store, tmp_path, option):
    """D5: tracebacks, and a run folder holding only command.txt."""
    args, name = TOO_LARGE[option]
    r = invoke("train", "--feats", city_store, "--out", tmp_path / "r", "--epochs", 1, "--no-progress", *args)
    refused(r, "bad input", name)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device", ["mps", "meta", "xla", "cuda:x", "CPU"])
def test_devices_dcfeat_does_not_run_on_are_usage_errors(city_store, city_run, tmp_path, device):
    """D23: `--device mps` and `--device meta` gave tracebacks."""
    for command in (["train", "--feats", city_store, "--out", tmp_path / "r"],
                    ["evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path / "e"],
                    ["calibrate", "--feats", city_store, "--run", city_run],
                    ["extract", "--images", tmp_path, "--out", tmp_path / "f.h5"],
                    ["demo", "--root", tmp_path / "demo"],
                    ["predict", "--run", city_run, "--feats", city_store, "--split", "test", "--out",
                     tmp_path / "p.csv"]):
        r = invoke(*command, "--device", device)
        refused(r, "bad input", "--device", "cpu, cuda or cuda:N")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(BadInput, match="mps"):
        resolve_device("mps")
    assert str(resolve_device("cpu")) == "cpu"


def test_ctrl_c_exits_130_saying_interrupted(city_store, city_run, tmp_path, monkeypatch):
    """D27: Ctrl-C exited 1, the code reserved for bugs."""
    import dcfeat.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dcfeat.evaluate, "evaluate_files", interrupted)
    r = invoke("evaluate", "--feats", city_store, "--run", city_run, "--out", tmp_path / "e")
    assert r.exit_code == 130 and "interrupted" in r.stderr and "Traceback" not in r.output, r.output


def test_a_run_of_few_classes_records_the_k_it_answers(empty_store, tmp_path):
    """D27: "top-100000" for a run of 12 classes: evaluate caps k at the classes (no database)."""
    r = invoke("train", "--feats", empty_store, "--out", tmp_path / "r", "--M", 200, "--epochs", 1, "--dim", 8,
               "--no-progress")
    assert r.exit_code == 0, r.output
    classes = pl.read_parquet(tmp_path / "r" / "classes.parquet").height
    r = invoke("evaluate", "--feats", empty_store, "--run", tmp_path / "r", "--k", "1,5,100000", "--out",
               tmp_path / "e")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert 5 < classes < 20  # measured 12
    assert report["ks"] == [1, 5, classes] and f"LR@{classes}" in r.stdout and "LR@100000" not in r.stdout
    assert np.array(pl.read_parquet(tmp_path / "e" / "predictions.parquet")["classify_class"].to_list()).shape[1] \
        == classes
