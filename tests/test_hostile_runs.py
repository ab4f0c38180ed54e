"""Damaged, edited and unfinished run folders; error kinds of train and evaluate (DESIGN.md, "Errors", "Runs")."""

import errno
import inspect
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from dcfeat import train as train_module
from dcfeat.errors import BadInput, DamagedRun, DamagedStore
from dcfeat.finetune import TokenTraining
from dcfeat.model import DCModel, top_cells
from dcfeat.predict import predict_files
from dcfeat.run import load_run
from dcfeat.shards import write_split
from dcfeat.store import Split, read_split, split_info
from dcfeat.train import TrainConfig, train
from tests.conftest import FAST_TRAIN, invoke, refused, write_images


@pytest.fixture
def run_copy(city_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(city_run, out, ignore=shutil.ignore_patterns("eval"))
    return out


def _edit_config(run, **changes):
    config = json.loads((run / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k)
        else:
            config[k] = v
    (run / "config.json").write_text(json.dumps(config))


def _more_classes(run):
    cpg = json.loads((run / "config.json").read_text())["classes_per_group"]
    _edit_config(run, classes_per_group=[cpg[0] + 1, *cpg[1:]])


def _wrong_shape(run):
    state = load_file(str(run / "model.safetensors"))
    state["heads.0.weight"] = state["heads.0.weight"][:-1].contiguous()
    save_file(state, str(run / "model.safetensors"))


def _truncate(run, name="model.safetensors"):
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[:len(data) // 2])


def _drop_class_rows(run):
    classes = pl.read_parquet(run / "classes.parquet")
    classes.head(classes.height - 3).write_parquet(run / "classes.parquet")


def _no_classes(run):
    pl.read_parquet(run / "classes.parquet").head(0).write_parquet(run / "classes.parquet")


DAMAGE = {
    "edited classes_per_group": (_more_classes, ["classes.parquet", "config.json", "classes_per_group"]),
    "tensor of another shape": (_wrong_shape, ["model.safetensors", "heads.0.weight"]),
    "truncated model": (_truncate, ["model.safetensors", "cannot be read"]),
    "missing class rows": (_drop_class_rows, ["classes.parquet", "classes per group"]),
    "empty class table": (_no_classes, ["classes.parquet", "holds no classes"]),
    "malformed config": (lambda run: (run / "config.json").write_text('{"M": 20, "N": '),
                         ["config.json", "not valid JSON"]),
    "config without head": (lambda run: _edit_config(run, head=None), ["config.json", "`head` missing"]),
    "class table that is not Parquet": (lambda run: (run / "classes.parquet").write_bytes(b"PAR1 nonsense"),
                                        ["classes.parquet", "cannot be read"]),
    "model file deleted": (lambda run: (run / "model.safetensors").unlink(), ["model.safetensors missing"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_is_refused_naming_the_file_and_the_fix(city_store, run_copy, tmp_path, damage):
    tamper, words = DAMAGE[damage]
    tamper(run_copy)
    for command in (["evaluate", "--feats", city_store, "--run", run_copy, "--out", tmp_path / "eval"],
                    ["predict", "--run", run_copy, "--feats", city_store, "--split", "test", "--out",
                     tmp_path / "p.parquet"]):
        r = invoke(*command)
        refused(r, "damaged run", *words)
        assert "train" in r.output and "command.txt" in r.output  # the fix: restore, or train again
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p.parquet").exists()


def test_a_missing_folder_is_bad_input(tmp_path):
    refused(invoke("evaluate", "--run", tmp_path / "nothing"), "bad input", "no such folder", "dcfeat train")
    (tmp_path / "mine").mkdir()
    refused(invoke("evaluate", "--run", tmp_path / "mine"), "bad input", "holds none of")


# --- finetuned runs: blocks.safetensors -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_store(tiny_model, tmp_path_factory):
    """Tiny-DINOv2 store: `train` caches the tokens entering the last block, `plain` caches none."""
    root = tmp_path_factory.mktemp("hostile-ft")
    write_images(root / "img", 24)
    store = root / "f.h5"
    for split, extra in (("train", ["--cache-tokens", 1]), ("plain", [])):
        r = invoke("extract", "--images", root / "img", "--out", store, "--split", split, "--model", tiny_model,
                   "--image-size", 56, "--workers", 0, "--dtype", "float32", "--no-progress", *extra)
        assert r.exit_code == 0, r.output
    return store


@pytest.fixture(scope="module")
def ft_run(tiny_store):
    out = tiny_store.parent / "ft-run"
    r = invoke("train", "--feats", tiny_store, "--out", out, "--M", 200, "--min-images-per-class", 1, "--epochs", 1,
               "--dim", 8, "--finetune-blocks", 1, "--no-progress")
    assert r.exit_code == 0, r.output
    return out


def test_damaged_tuned_blocks_are_refused(tiny_store, ft_run, tmp_path):
    run = tmp_path / "run"
    evaluate = ["evaluate", "--feats", tiny_store, "--run", run, "--split", "train", "--out", tmp_path / "e"]
    shutil.copytree(ft_run, run)
    assert invoke(*evaluate).exit_code == 0
    assert "blocks.safetensors" in json.loads((run / "checksums.json").read_text())  # TokenTraining.save's
    assert invoke("info", run, "--verify").exit_code == 0

    state = load_file(str(run / "blocks.safetensors"))
    state["tuned.0.mlp.fc1.weight"] = state["tuned.0.mlp.fc1.weight"][:, :5].contiguous()
    save_file(state, str(run / "blocks.safetensors"))
    refused(invoke(*evaluate), "damaged run", "blocks.safetensors", "command.txt")

    _truncate(run, "blocks.safetensors")
    refused(invoke(*evaluate), "damaged run", "blocks.safetensors", "cannot be read")

    save_file({"tuned.3.mlp.fc1.weight": torch.zeros(2, 2)}, str(run / "blocks.safetensors"))
    refused(invoke(*evaluate), "damaged run", "blocks.safetensors", "last 1 tuned blocks")

    (run / "blocks.safetensors").unlink()
    refused(invoke(*evaluate), "damaged run", "blocks.safetensors missing")


def test_finetune_blocks_below_one_names_the_cache_depth(tiny_store):
    attrs = split_info(tiny_store, "train").attrs
    for split, words in (("train", ["choose 1 to 1", "last 1 blocks"]), ("plain", ["--cache-tokens K", "none"])):
        with pytest.raises(BadInput) as e:
            TokenTraining.open(tiny_store, split, None, attrs, -1, 1e-3)
        assert "1 to 0" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# --- unfinished runs ------------------------------------------------------------------------------------------

class Killed(BaseException):
    """What kill -9 does to the training loop, minus the process."""


def test_a_killed_run_says_so_everywhere_and_the_same_command_restarts_it(city_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    command = ["train", "--feats", city_store, "--val-split", "val", "--out", run, *FAST_TRAIN]
    real, calls = train_module.recall_at_1, []

    def val_recall_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during epoch 3 of 6: epochs 1 and 2 are written
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "recall_at_1", val_recall_then_die)
    with pytest.raises(Killed):
        invoke(*command)
    monkeypatch.undo()
    (run / "notes.txt").write_text("mine")

    config = json.loads((run / "config.json").read_text())
    assert (config["complete"], config["epochs_done"], config["epochs"]) == (False, 2, 6)
    loaded = load_run(run)
    assert not loaded.complete and loaded.epochs_done == 2
    assert loaded.status_line().startswith("INCOMPLETE RUN: training stopped after epoch 2 of 6")
    r = invoke("info", run, "--verify")
    assert r.exit_code == 4 and "INCOMPLETE RUN" in r.output, r.output

    r = invoke("evaluate", "--feats", city_store, "--run", run, "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    assert "INCOMPLETE RUN: training stopped after epoch 2 of 6" in r.output  # under the table
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert (report["run_complete"], report["epochs_done"], report["epochs"]) == (False, 2, 6)
    assert report["run_status"].startswith("INCOMPLETE RUN")

    result = predict_files(run, tmp_path / "p.parquet", feats=city_store, split="test", k=2, device="cpu")
    meta = json.loads(pl.read_parquet_metadata(result.path)["dcfeat"])
    assert (meta["run_complete"], meta["epochs_done"], meta["epochs"]) == (False, 2, 6)
    assert result.run.status_line().startswith("INCOMPLETE RUN")
    result = predict_files(run, tmp_path / "p.geojson", feats=city_store, split="test", k=1, device="cpu")
    assert json.loads(result.path.read_text())["dcfeat"]["run_complete"] is False

    assert invoke("evaluate", "--feats", city_store, "--run", run).exit_code == 0  # into RUN/eval/test
    (run / "eval" / "test" / "mine.txt").write_text("mine")
    assert json.loads((run / "eval" / "test" / "report.json").read_text())["run_complete"] is False

    r = invoke(*command)  # the same command again: resumes the run after epoch 2, to the end
    assert r.exit_code == 0, r.output
    # D26: the evaluation of the unfinished model is gone (it went on saying run_complete: false), not mine.txt.
    assert sorted(p.name for p in (run / "eval" / "test").iterdir()) == ["mine.txt"]
    assert invoke("evaluate", "--feats", city_store, "--run", run).exit_code == 0
    assert json.loads((run / "eval" / "test" / "report.json").read_text())["run_complete"] is True
    config = json.loads((run / "config.json").read_text())
    assert (config["complete"], config["epochs_done"]) == (True, 6)
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 6
    assert (run / "notes.txt").read_text() == "mine"  # only dcfeat's own files were cleared
    assert load_run(run).status_line() is None
    assert invoke("info", run, "--verify").exit_code == 0
    r = invoke("evaluate", "--feats", city_store, "--run", run, "--out", tmp_path / "eval2")
    assert r.exit_code == 0 and "INCOMPLETE" not in r.output
    assert json.loads((tmp_path / "eval2" / "report.json").read_text())["run_complete"] is True


def test_a_run_that_never_finished_an_epoch_is_refused_then_restarted(city_store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "command.txt").write_text("dcfeat train --out run\n")
    (run / ".model.safetensors.tmp").write_bytes(b"half a file")  # what a kill while saving leaves
    r = invoke("evaluate", "--feats", city_store, "--run", run)
    refused(r, "damaged run", "never finished an epoch", "dcfeat train")
    r = invoke("train", "--feats", city_store, "--out", run, "--epochs", 1, "--dim", 16, "--no-progress")
    assert r.exit_code == 0, r.output
    assert not (run / ".model.safetensors.tmp").exists() and load_run(run).complete


def test_a_finished_run_or_a_foreign_folder_is_never_overwritten(city_store, run_copy, tmp_path):
    before = (run_copy / "model.safetensors").read_bytes()
    refused(invoke("train", "--feats", city_store, "--out", run_copy, "--epochs", 1), "bad input", "exists",
            "finished run")
    assert (run_copy / "model.safetensors").read_bytes() == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"complete": false}')  # no command.txt: not a run of dcfeat
    refused(invoke("train", "--feats", city_store, "--out", foreign, "--epochs", 1), "bad input", "exists",
            "not a run folder")
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
    (tmp_path / "empty").mkdir()  # nothing to overwrite
    assert invoke("train", "--feats", city_store, "--out", tmp_path / "empty", "--epochs", 1, "--dim", 16,
                  "--no-progress").exit_code == 0


OLDER_LAYOUTS = {  # what an older dcfeat wrote and this one refuses, naming the command that writes it anew
    "config.json without completeness": ("config.json", lambda d: [d.pop("complete"), d.pop("epochs_done")],
                                         "`complete`", "Train the run again"),
    "config.json before presets": ("config.json", lambda d: d.pop("easy_margin"), "`easy_margin`",
                                   "Train the run again"),
    "calibration.json with the widening rule": (
        "calibration.json", lambda d: d.update(hybrid={"fallback_below": 0.1, "widen_below": 0.2, "widen_factor": 4}),
        "`widen_below`", "dcfeat calibrate --run"),
    "calibration.json before positions": ("calibration.json", lambda d: d.pop("position"), "`position`",
                                          "dcfeat calibrate --run"),
    "calibration.json before scorings": ("calibration.json", lambda d: d.pop("scoring"), "`scoring`",
                                         "dcfeat calibrate --run"),
}


@pytest.mark.parametrize("layout", list(OLDER_LAYOUTS))
def test_a_run_file_in_a_layout_of_an_older_dcfeat_is_refused_naming_the_fix(run_copy, layout):
    name, edit, field, fix = OLDER_LAYOUTS[layout]
    _edit_json(run_copy, name, edit)
    with pytest.raises(DamagedRun, match="written by an older dcfeat") as e:
        load_run(run_copy)
    assert str(run_copy / name) in str(e.value) and field in str(e.value) and fix in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "calibration.json"])
def test_a_run_file_of_a_newer_format_is_refused_and_one_without_format_read(run_copy, name):
    assert json.loads((run_copy / name).read_text())["format"] == 1
    before = load_run(run_copy)
    _edit_json(run_copy, name, lambda d: d.pop("format"))  # read as format 1
    again = load_run(run_copy)
    assert again.config == before.config and again.calibration == before.calibration
    _edit_json(run_copy, name, lambda d: d.update(format=2))
    with pytest.raises(DamagedRun, match="written by a newer dcfeat .format 2.*Upgrade dcfeat") as e:
        load_run(run_copy)
    assert str(run_copy / name) in str(e.value)
    _edit_json(run_copy, name, lambda d: d.update(format="one"))
    with pytest.raises(DamagedRun, match="`format` is 'one'"):
        load_run(run_copy)


# --- devices --------------------------------------------------------------------------------------------------

def test_load_run_places_the_model_and_topk_follows_it(city_store, city_run):
    val = read_split(city_store, "val", dtype=np.float32)
    run = load_run(city_run, "cpu")
    assert run.model.device == torch.device("cpu")
    ids, scores = run.model.topk(val.embeddings, 5)
    assert ids.shape == (100, 5) and (np.diff(scores, axis=1) <= 0).all()
    assert np.array_equal(top_cells(run.model, val.embeddings, run.classes, 5)["class"], ids)
    assert "device" not in inspect.signature(DCModel.topk).parameters

    seen = []

    class Stop(Exception):
        pass

    def record(module, args):
        seen.append(args[0].device)
        raise Stop

    run.model.to("meta")  # a device the model moved to after loading: inputs must follow it there
    run.model.projection.register_forward_pre_hook(record)
    with pytest.raises(Stop):
        run.model.topk(val.embeddings, 5)
    assert seen == [torch.device("meta")]


# --- error kinds of train and evaluate ------------------------------------------------------------------------

def test_train_and_evaluate_errors_have_their_kinds(city_store, city_run, tmp_path):
    refused(invoke("train", "--feats", city_store, "--min-images-per-class", 500, "--out", tmp_path / "a"),
            "bad input", "no class survives")
    refused(invoke("evaluate", "--feats", city_store, "--run", city_run, "--mode", "hybrid"), "bad input",
            "--database-split")
    test = read_split(city_store, "test")
    other = tmp_path / "other.h5"
    write_split(other, "test", test.embeddings, test.labels.drop("row"),
                {"model": "another-backbone", "pooling": "cls", "image_size": 224})
    refused(invoke("evaluate", "--feats", other, "--run", city_run), "incompatible", "another-backbone")
    far = tmp_path / "far.h5"
    write_split(far, "test", test.embeddings, test.labels.drop("row").with_columns(utm_zone=pl.lit(33, pl.Int8)),
                {"model": "synthetic-city", "pooling": "none", "image_size": 0,
                 "model_fingerprint": "synthetic-seed0-dim64"})
    refused(invoke("evaluate", "--feats", far, "--run", city_run), "incompatible", "UTM zone(s) [33]")

    split = read_split(city_store, "train")
    bad = split.embeddings.astype(np.float32)
    bad[7, 3] = np.inf
    with pytest.raises(DamagedStore, match=r"non-finite embeddings .* first \[7\]"):
        train(Split("train", bad, split.labels, split.attrs), TrainConfig(epochs=1), tmp_path / "r", progress=False)


def test_load_run_errors_are_damaged_run_or_bad_input(run_copy):
    _edit_config(run_copy, dim="wide")
    with pytest.raises(DamagedRun, match="`dim` is 'wide'"):
        load_run(run_copy)


# --- D7: edited values, not only types -------------------------------------------------------------------------

def _edit_json(run, name, edit):
    data = json.loads((run / name).read_text())
    edit(data)
    (run / name).write_text(json.dumps(data))


def _edit_classes(run, **columns):
    classes = pl.read_parquet(run / "classes.parquet")
    classes.with_columns(**columns).write_parquet(run / "classes.parquet")


VALUE_EDITS = {
    "hybrid: {}": ("calibration.json", lambda run: _edit_json(run, "calibration.json", lambda d: d.update(hybrid={})),
                   "`hybrid.fallback_below`"),
    "hybrid: 1.5": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d.update(hybrid={"fallback_below": 1.5})), "`hybrid.fallback_below`"),
    "position radius -1": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d["position"].update(radius_m=-1)), "`position.radius_m`"),
    "gate mass 2": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d.update(gate={"mass": 2, "cap": 20})), "`gate.mass`"),
    "gate cap 0": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d.update(gate={"mass": 0.9, "cap": 0})), "`gate.cap`"),
    "gate stray key": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d.update(gate={"mass": 0.9, "cap": 20, "q": 1})), "`q`"),
    "fitted_on right > queries": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d["fitted_on"].update(right=10 ** 6)), "`fitted_on`"),
    "fitted_on split 3": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d["fitted_on"].update(split=3)), "`fitted_on.split`"),
    "fitted_on position_lr1 2": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: d["fitted_on"].update(position_lr1={"45 m, T 1": 2})),
        "`fitted_on.position_lr1`"),
    "fitted_on: []": ("calibration.json", lambda run: _edit_json(run, "calibration.json",
                                                                 lambda d: d.update(fitted_on=[])), "`fitted_on`"),
    "database signal at top level": ("calibration.json", lambda run: _edit_json(
        run, "calibration.json", lambda d: (d["signals"].__setitem__(0, "retrieval_disagreement_m"))), "`signals`"),
    "utm_zone 99": ("classes.parquet", lambda run: _edit_classes(run, utm_zone=pl.lit(99, pl.Int8)), "`utm_zone`"),
    "cell_east NaN": ("classes.parquet", lambda run: _edit_classes(run, cell_east=pl.lit(float("nan"))),
                      "`cell_east`"),
    "cell_east + 5000": ("classes.parquet", lambda run: _edit_classes(run, cell_east=pl.col("cell_east") + 5000),
                         "`cell_east`"),
    "utm_letter Z": ("classes.parquet", lambda run: _edit_classes(run, utm_letter=pl.lit("Z")), "`utm_letter`"),
    "image_size 0": ("config.json", lambda run: _edit_json(
        run, "config.json", lambda d: d["features"].update(pooling="cls", image_size=0)), "`features.image_size`"),
    "s 0": ("config.json", lambda run: _edit_config(run, s=0), "`s`"),
    "s -30": ("config.json", lambda run: _edit_config(run, s=-30), "`s`"),
    "crop weird": ("config.json", lambda run: _edit_json(run, "config.json",
                                                         lambda d: d["features"].update(crop="weird")),
                   "`features.crop`"),
    "unknown pooling": ("config.json", lambda run: _edit_json(run, "config.json",
                                                              lambda d: d["features"].update(pooling="max")),
                        "`features.pooling`"),
    "features model 3": ("config.json", lambda run: _edit_json(run, "config.json",
                                                               lambda d: d["features"].update(model=3)),
                         "`features.model`"),
    "features stray key": ("config.json", lambda run: _edit_json(run, "config.json",
                                                                 lambda d: d["features"].update(colour="red")),
                           "`colour`"),
    "steps_per_epoch -1": ("config.json", lambda run: _edit_config(run, steps_per_epoch=-1), "`steps_per_epoch`"),
    "streamed 0 rows": ("config.json", lambda run: _edit_config(run, streamed={"chunk_rows": 0, "buffer_chunks": 2}),
                        "`streamed`"),
}


@pytest.mark.parametrize("edit", list(VALUE_EDITS))
def test_edited_values_of_a_run_are_refused_naming_file_and_field(city_store, run_copy, tmp_path, edit):
    """D7, D7c: each edit once gave a traceback, or was accepted and changed the answers, and
    `info --verify` called the run verified."""
    name, tamper, field = VALUE_EDITS[edit]
    tamper(run_copy)
    for command in (["evaluate", "--feats", city_store, "--run", run_copy, "--database-split", "test-db",
                     "--out", tmp_path / "eval"],
                    ["predict", "--run", run_copy, "--feats", city_store, "--split", "test", "--out",
                     tmp_path / "p.parquet"],
                    ["info", run_copy, "--verify"]):
        r = invoke(*command)
        refused(r, "damaged run", name, field)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p.parquet").exists()


def test_info_verify_compares_every_run_file_with_its_recorded_checksum(run_copy):
    """D7: an edit that keeps every value plausible (a weight nudged, the calibration's bias) passed as verified."""
    r = invoke("info", run_copy, "--verify")
    assert r.exit_code == 0 and "match the checksums" in r.output, r.output
    state = load_file(str(run_copy / "model.safetensors"))
    state["heads.0.weight"][0, 0] += 0.01
    save_file(state, str(run_copy / "model.safetensors"), metadata={"epoch": "6"})
    assert load_run(run_copy).complete  # still loads: only the checksum tells
    refused(invoke("info", run_copy, "--verify"), "damaged run", "model.safetensors", "checksums.json")
    _edit_json(run_copy, "calibration.json", lambda d: d.update(bias=d["bias"] + 0.5))
    (run_copy / "calibration.json").unlink()  # removing it is allowed (the run is then uncalibrated)
    refused(invoke("info", run_copy, "--verify"), "damaged run", "model.safetensors")
    (run_copy / "checksums.json").write_text("[]")
    refused(invoke("info", run_copy, "--verify"), "damaged run", "checksums.json")


def test_calibrate_and_training_record_the_checksums_of_what_they_write(city_store, run_copy):
    from dcfeat.atomic import read_checksums, sha256_of

    r = invoke("calibrate", "--feats", city_store, "--run", run_copy, "--database-split", "test-db")
    assert r.exit_code == 0, r.output
    sums = read_checksums(run_copy)
    assert sums["calibration.json"] == sha256_of(run_copy / "calibration.json")
    assert invoke("info", run_copy, "--verify").exit_code == 0


# --- D10, D11: a full disk or a read-only folder while training, calibrating, evaluating -----------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # what a write or an append raises: no file name


@pytest.mark.parametrize("where", ["train log append", "safetensors", "config.json"])
def test_a_full_disk_while_training_names_the_run_folder(city_store, tmp_path, monkeypatch, where):
    """D10: with 40 KB free a SafetensorError traceback; with 100 KB exit 6 naming the current folder."""
    import dcfeat.run as run_module
    from safetensors import SafetensorError

    run = tmp_path / "run"
    if where == "train log append":
        import builtins

        real_open = builtins.open

        def open_(path, mode="r", *args, **kwargs):
            if str(path).endswith("train_log.jsonl") and "a" in mode:
                _no_space()
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
    elif where == "safetensors":
        def full(*args, **kwargs):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

        monkeypatch.setattr(run_module, "save_file", full)
    else:
        real = run_module.write_text

        def write_text(path, text):
            if path.name == "config.json":
                _no_space()
            return real(path, text)

        monkeypatch.setattr(run_module, "write_text", write_text)
    r = invoke("train", "--feats", city_store, "--out", run, "--epochs", 1, "--dim", 16, "--no-progress")
    refused(r, "environment", str(run), "no space left")
    assert f"{tmp_path}:" not in r.output.replace(str(run), "RUN")  # the run folder, not the one above it
    assert not list(run.glob(".*.tmp"))  # no temporary file left
    monkeypatch.undo()
    r = invoke("train", "--feats", city_store, "--out", run, "--epochs", 1, "--dim", 16, "--no-progress")
    assert r.exit_code == 0, r.output  # the same command, once there is room
    assert invoke("info", run, "--verify").exit_code == 0


def test_a_read_only_folder_is_refused_naming_it_before_any_work(city_store, run_copy, tmp_path, fake_mount):
    """D11: calibrate, evaluate and train --out on a read-only filesystem gave EROFS tracebacks."""
    before = (run_copy / "calibration.json").read_bytes()
    fake_mount(run_copy)  # read-only
    r = invoke("calibrate", "--feats", city_store, "--run", run_copy)
    refused(r, "environment", str(run_copy), "read-only")
    assert (run_copy / "calibration.json").read_bytes() == before
    r = invoke("evaluate", "--feats", city_store, "--run", run_copy)
    refused(r, "environment", str(run_copy / "eval" / "test"), "read-only")
    mount = tmp_path / "mount"
    mount.mkdir()
    fake_mount(mount)
    r = invoke("evaluate", "--feats", city_store, "--run", run_copy, "--out", mount / "eval")
    refused(r, "environment", str(mount / "eval"), "read-only")
    r = invoke("train", "--feats", city_store, "--out", mount / "run", "--epochs", 1, "--no-progress")
    refused(r, "environment", str(mount / "run"), "read-only")
    assert not any(mount.iterdir()) and not (run_copy / "eval").exists()
