"""`dcfeat import` (descriptors another tool computed → a split) and `dcfeat evaluate` with no run.

The descriptors are the synthetic city's (tests/conftest.py `city_store`), written the ways other
tools write theirs: .npy + an id file, .npz, HDF5, Parquet; the test split's ids are plain names
labelled by a manifest, the others SF-XL names.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from dcfeat.localizer import Localizer
from dcfeat.reports import recall_from_predictions
from dcfeat.serve import ServeConfig, create_app
from dcfeat.store import read_split
from dcfeat.synthetic.features import SPLITS
from tests.conftest import FAST_TRAIN, invoke, jpeg_bytes, refused

MODEL = ["--model-name", "MegaLoc"]


@pytest.fixture(scope="module")
def sources(city_store):
    """The city's splits as float32 arrays with their labels: what another tool would hand over."""
    return {name: read_split(city_store, name, dtype=np.float32) for name in SPLITS}


def write_sources(folder: Path, sources) -> dict[str, list]:
    """Each split in another format; the `import` arguments that read it."""
    folder.mkdir(parents=True, exist_ok=True)
    train, val, test, db = (sources[s] for s in SPLITS)
    np.save(folder / "train.npy", train.embeddings)
    (folder / "train.txt").write_text("\n".join(train.labels["image_id"]) + "\n")
    np.savez(folder / "val.npz", descriptors=val.embeddings, ids=np.array(val.labels["image_id"].to_list()))
    names = [f"queries/q{i:04d}.jpg" for i in range(test.labels.height)]
    with h5py.File(folder / "test.h5", "w") as f:
        f["embeddings"] = test.embeddings
        f["ids"] = np.array([n.encode() for n in names])
    test.labels.select("utm_east", "utm_north", "utm_zone", "utm_letter").with_columns(
        path=pl.Series(names)).write_csv(folder / "test.csv")
    pl.DataFrame({"image_id": db.labels["image_id"], "descriptor": db.embeddings}).write_parquet(folder / "db.parquet")
    return {"train": ["--descriptors", folder / "train.npy", "--ids", folder / "train.txt"],
            "val": ["--descriptors", folder / "val.npz"],
            "test": ["--descriptors", folder / "test.h5", "--manifest", folder / "test.csv"],
            "test-db": ["--descriptors", folder / "db.parquet"]}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    store = root / "store" / "feats.h5"
    for split, args in write_sources(root / "in", sources).items():
        r = invoke("import", *args, *MODEL, "--split", split, "--out", store)
        assert r.exit_code == 0 and "imported:MegaLoc" in r.output, r.output
    return store


@pytest.fixture(scope="module")
def imported_run(imported) -> Path:
    run = imported.parent / "run"
    r = invoke("train", "--feats", imported, "--val-split", "val", "--out", run, *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    return run


def test_every_format_imports_the_values_and_labels_given(imported, sources):
    for name in SPLITS:
        got, given = read_split(imported, name), sources[name]
        assert np.array_equal(got.embeddings, given.embeddings.astype(np.float16))  # float16 round-trips exactly
        assert got.attrs["model"] == "imported:MegaLoc" and got.attrs["pooling"] == "none"
        assert got.attrs["model_fingerprint"].startswith("imported:") and got.attrs["crop"] == "unknown"
        assert np.allclose(got.labels["utm_east"], given.labels["utm_east"])
        assert np.allclose(got.labels["utm_north"], given.labels["utm_north"])
    assert read_split(imported, "test").labels["image_id"][0] == "queries/q0000.jpg"
    assert len({read_split(imported, n).attrs["model_fingerprint"] for n in SPLITS}) == 1
    r = invoke("info", "--verify", imported)
    assert r.exit_code == 0 and "verified" in r.output, r.output


def test_numeric_parquet_columns_import_and_the_same_file_twice_is_nothing_to_do(sources, tmp_path):
    val = sources["val"]
    frame = pl.DataFrame(val.embeddings, schema=[f"d{i}" for i in range(val.embeddings.shape[1])])
    frame.insert_column(0, pl.Series("path", val.labels["image_id"])).write_parquet(tmp_path / "v.parquet")
    args = ["import", "--descriptors", tmp_path / "v.parquet", *MODEL, "--out", tmp_path / "s" / "f.h5"]
    assert invoke(*args).exit_code == 0
    assert np.array_equal(read_split(tmp_path / "s" / "f.h5", "train").embeddings, val.embeddings.astype(np.float16))
    r = invoke(*args)
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output


def test_train_evaluate_predict_and_serve_on_imported_descriptors(imported, imported_run, sources, tmp_path):
    config = json.loads((imported_run / "config.json").read_text())
    assert config["features"]["model"] == "imported:MegaLoc"
    out = tmp_path / "eval"
    r = invoke("evaluate", "--feats", imported, "--run", imported_run, "--database-split", "test-db", "--out", out,
               "--repeats", 1)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    # Measured: classify LR@1 0.655, the hybrid 0.655, on 134 classes; retrieval on the raw features 0.36.
    assert report["methods"]["classify"]["recall"]["1"] > 0.5 and report["methods"]["hybrid"]["recall"]["1"] > 0.5

    r = invoke("predict", "--run", imported_run, "--feats", imported, "--split", "test", "--k", 3,
               "--out", tmp_path / "p.parquet")
    assert r.exit_code == 0, r.output
    predicted = pl.read_parquet(tmp_path / "p.parquet").filter(pl.col("rank") == 1)
    loc = Localizer.from_run(imported_run, device="cpu")
    test = sources["test"].embeddings
    assert predicted["class"].to_list() == [a.top_k[0]["class"] for a in loc.locate_features(test, k=3)]

    r = invoke("predict", "--run", imported_run, "--images", tmp_path, "--out", tmp_path / "q.parquet")
    refused(r, "bad input", "imported:MegaLoc", "cannot embed photos", "dcfeat import --unlabelled",
            "predict --feats", '{"descriptors"')

    loc.load_backbone()  # nothing to load: the run has no backbone, and serving starts without one
    assert not loc.embeds_images and loc._backbone is None
    with TestClient(create_app(loc, ServeConfig(max_wait_ms=1))) as client:
        ids = [f"photo{i}" for i in range(3)]
        r = client.post("/v1/locate?k=2", json={"descriptors": test[:3].tolist(), "ids": ids})
        assert r.status_code == 200, r.text
        want = loc.locate_features(test[:3], k=2)
        assert [a["image"] for a in r.json()["answers"]] == ids
        assert [[c["class"] for c in a["top_k"]] for a in r.json()["answers"]] == \
            [[c["class"] for c in a.top_k] for a in want]
        assert [a["confidence"] for a in r.json()["answers"]] == pytest.approx([a.confidence for a in want], abs=1e-6)
        r = client.post("/v1/locate", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "no_backbone", r.text
        assert '"descriptors"' in r.json()["error"]["message"] and "application/json" in r.json()["error"]["message"]
        assert client.get("/v1/run").json()["accepts"] == {"images": False, "descriptors": 64}


def test_a_run_of_imported_descriptors_refuses_other_features(imported_run, city_store, tmp_path):
    r = invoke("evaluate", "--feats", city_store, "--run", imported_run, "--out", tmp_path / "e")
    refused(r, "incompatible", "imported:MegaLoc", "synthetic-city", "dcfeat import --model-name MegaLoc")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_inputs_are_refused_and_leave_the_store_as_it_was(sources, tmp_path):
    val = sources["val"]
    ids = val.labels["image_id"].to_list()
    store = tmp_path / "s" / "feats.h5"
    np.save(tmp_path / "v.npy", val.embeddings)
    (tmp_path / "v.txt").write_text("\n".join(ids))
    assert invoke("import", "--descriptors", tmp_path / "v.npy", "--ids", tmp_path / "v.txt", *MODEL,
                  "--out", store).exit_code == 0
    before = snapshot(store.parent)

    def bad(name: str, values: np.ndarray, names: list[str], *extra) -> object:
        np.save(tmp_path / f"{name}.npy", values)
        (tmp_path / f"{name}.txt").write_text("\n".join(names))
        r = invoke("import", "--descriptors", tmp_path / f"{name}.npy", "--ids", tmp_path / f"{name}.txt",
                   "--out", store, *(extra or (*MODEL, "--split", "val")))
        assert snapshot(store.parent) == before, name
        return r

    r = invoke("import", "--descriptors", tmp_path / "v.npy", *MODEL, "--out", store, "--split", "val")
    refused(r, "bad input", "holds no ids", "--ids FILE")
    refused(bad("short", val.embeddings, ids[:-1]), "bad input", "100 descriptors but 99 ids")
    refused(bad("plain", val.embeddings, ["a.jpg"] + ids[1:]), "bad input", "1 of 100", "a.jpg",
            "do not carry a position", "--manifest")
    refused(bad("twice", val.embeddings, [ids[0]] + ids[:-1]), "bad input", "listed more than once", ids[0])
    nan = val.embeddings.copy()
    nan[3, 5] = np.nan
    refused(bad("nan", nan, ids), "bad input", "1 of 100 descriptors", "not finite", f"row 3 ({ids[3]})",
            "nothing was written")
    refused(bad("huge", val.embeddings * 1e5, ids), "bad input", "beyond the range of float16", "--dtype float32")
    refused(bad("flat", val.embeddings[0], ids[:1]), "bad input", "2-D")
    refused(bad("narrow", val.embeddings[:, :32], ids), "incompatible", "dim: 64 vs 32",
            "dcfeat import --model-name MegaLoc")
    refused(bad("other", val.embeddings, ids, "--model-name", "CosPlace", "--split", "val"), "incompatible",
            "imported:MegaLoc", "imported:CosPlace", "dcfeat import --model-name MegaLoc")
    refused(bad("again", val.embeddings + 1, ids, *MODEL), "bad input", "already has a split 'train'", "--overwrite")

    (tmp_path / "m.csv").write_text("path,lat,lon\nelsewhere.jpg,37.7,-122.4\n")
    refused(bad("unlisted", val.embeddings, ids, *MODEL, "--split", "val", "--manifest", tmp_path / "m.csv"),
            "bad input", "100 of 100 ids have no row in --manifest", ids[0])
    r = invoke("import", "--descriptors", tmp_path / "v.txt", *MODEL, "--out", store)
    refused(r, "bad input", "expected one of .npy, .npz, .h5, .hdf5, .parquet")
    r = invoke("import", "--descriptors", tmp_path / "v.npy", "--ids", tmp_path / "v.txt", "--out", store)
    assert r.exit_code == 2 and "--model-name" in r.output
    assert snapshot(store.parent) == before

    r = invoke("import", "--descriptors", tmp_path / "again.npy", "--ids", tmp_path / "again.txt", *MODEL,
               "--out", store, "--overwrite")
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_split(store, "train").embeddings, (val.embeddings + 1).astype(np.float16))


def test_unlabelled_descriptors_are_predicted_not_evaluated(imported, imported_run, sources, tmp_path):
    test = sources["test"]
    np.savez(tmp_path / "u.npz", descriptors=test.embeddings[:5], ids=np.array([f"x{i}" for i in range(5)]))
    store = tmp_path / "u.h5"
    assert invoke("import", "--descriptors", tmp_path / "u.npz", *MODEL, "--unlabelled", "--split", "new",
                  "--out", store).exit_code == 0
    r = invoke("predict", "--run", imported_run, "--feats", store, "--split", "new", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert pl.read_csv(tmp_path / "p.csv").filter(pl.col("rank") == 1)["image_id"].to_list() == \
        [f"x{i}" for i in range(5)]
    r = invoke("evaluate", "--feats", store, "--split", "new", "--run", imported_run)
    refused(r, "bad input", "--unlabelled")


# --------------------------------------------------------------------------- evaluate with no run

def test_evaluate_without_a_run_is_exact_retrieval_on_the_raw_features(imported, imported_run, tmp_path):
    r = invoke("evaluate", "--feats", imported, "--run", "none", "--mode", "retrieve", "--database-split", "test-db",
               "--repeats", 1, plots=True)
    assert r.exit_code == 0 and "NO RUN" in r.output and "retrieve (raw)" in r.output, r.output
    out = imported.parent / "eval" / "feats" / "test"  # the default: STORE_FOLDER/eval/STORE_NAME/SPLIT
    report = json.loads((out / "report.json").read_text())
    assert report["run"] is None and report["run_status"].startswith("NO RUN") and report["confidence"] is None
    assert set(report["methods"]) == {"retrieve"} and report["features"]["model"] == "imported:MegaLoc"
    frame = pl.read_parquet(out / "predictions.parquet")
    assert recall_from_predictions(frame, "retrieve", report["ks"], 25.0) == report["methods"]["retrieve"]["recall"]
    assert {"error_cdf.png", "map_retrieve.png"} <= {p.name for p in out.iterdir()}
    # The same numbers as a run's own retrieval on the raw space: the run plays no part in it.
    r = invoke("evaluate", "--feats", imported, "--run", imported_run, "--mode", "retrieve", "--space", "raw",
               "--database-split", "test-db", "--out", tmp_path / "with-run", "--repeats", 1)
    assert r.exit_code == 0, r.output
    with_run = json.loads((tmp_path / "with-run" / "report.json").read_text())
    assert with_run["methods"]["retrieve"]["recall"] == report["methods"]["retrieve"]["recall"]
    assert report["methods"]["retrieve"]["recall"]["1"] == pytest.approx(0.36)  # measured; classify: 0.655

    r = invoke("evaluate", "--feats", imported, "--run", "none", "--database-split", "test-db")
    refused(r, "bad input", "needs a run", "--mode retrieve --database-split")
    r = invoke("evaluate", "--feats", imported, "--run", "none", "--mode", "retrieve")
    refused(r, "bad input", "--database-split")
    r = invoke("evaluate", "--feats", imported, "--run", "none", "--mode", "retrieve", "--database-split", "test-db",
               "--space", "projected")
    refused(r, "bad input", "--space projected", "no run")


def test_evaluate_without_a_run_where_none_was_trained_on_extracted_features(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/runs/latest here
    store = tiny_run.parent / "f.h5"  # 24 extracted photos, split train
    r = invoke("evaluate", "--feats", store, "--split", "train", "--database-split", "train", "--mode", "retrieve",
               "--out", tmp_path / "out", "--repeats", 1)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # Every photo finds itself: exact retrieval of a split among itself is right at every k.
    assert report["methods"]["retrieve"]["recall"] == {"1": 1.0, "5": 1.0, "10": 1.0, "20": 1.0}
    assert report["run"] is None and "itself" in report["warnings"][0]
    r = invoke("evaluate", "--feats", store, "--split", "train", "--mode", "classify")
    refused(r, "bad input", "--mode classify needs a run", "dcfeat train", "--mode retrieve")
