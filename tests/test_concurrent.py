"""Two dcfeat processes (or threads) at once on one run or folder: the locks hold, no update is lost, and
nothing reads a model that is still training. Each test names the defect of the third adversarial pass it
covers (M4, M5, M6, M7, L4, L6)."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dcfeat.errors import EnvironmentProblem
from dcfeat.atomic import exclusive, record_checksum
from dcfeat.reports import recall_from_predictions
from dcfeat.resume import point_latest, run_lock
from dcfeat.run import verify_checksums
from tests.conftest import FAST_TRAIN, invoke, refused


@pytest.fixture
def run_copy(city_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(city_run, out, ignore=shutil.ignore_patterns("eval", "evaluations.json"))
    return out


# M7 ------------------------------------------------------------------ a lock file unlinked while held


def _count_under_the_lock(args: list[str]) -> None:
    """Add 1 to the counter file `args[1]` under `exclusive(args[0], remove=True)` until `args[3]` additions
    succeeded (a refused try is tried again); write how many into `args[2]`."""
    lock, counter, tally, wanted = Path(args[0]), Path(args[1]), Path(args[2]), int(args[3])
    done = 0
    while done < wanted:
        try:
            with exclusive(lock, "busy", remove=True):
                value = int(counter.read_text() or 0)
                counter.write_text(str(value + 1))
                done += 1
        except EnvironmentProblem:
            continue
    tally.write_text(str(done))


def test_three_processes_counting_under_a_removed_lock_lose_no_update(tmp_path, forks):
    """M7: `exclusive(remove=True)` unlinked the lock file while held; a process that had opened it
    before then locked the orphan, and ~80 % of acquisitions overlapped another holder."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [forks.Process(target=_count_under_the_lock,
                           args=([str(tmp_path / ".lock"), str(counter), str(tmp_path / f"tally{i}"), "100"],))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert int(counter.read_text()) == 3 * 100
    assert not (tmp_path / ".lock").exists()  # removed by its last holder


def test_a_shared_holder_excludes_an_exclusive_one_and_the_last_removes_the_file(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive(lock, "busy", shared=True, remove=True), exclusive(lock, "busy", shared=True, remove=True):
        with pytest.raises(EnvironmentProblem, match="busy"):
            with exclusive(lock, "busy"):
                pass
    assert not lock.exists()
    with exclusive(lock, "held by {holder}", holder="`dcfeat train`"):
        with pytest.raises(EnvironmentProblem, match=r"held by `dcfeat train`, pid \d+ on "):
            with exclusive(lock, "held by {holder}", shared=True):
                pass


# M5 -------------------------------------------------------------- checksums.json read, modified, written


def test_checksums_recorded_side_by_side_are_never_lost(tmp_path):
    """M5: record_checksum was an unlocked read-modify-write: 6 of 40 races left a sum verify rejects."""
    names = ["config.json", "classes.parquet", "model.safetensors", "calibration.json"]
    rounds, broken = 40, []
    start, end = threading.Barrier(len(names)), threading.Barrier(len(names))

    def writer(i: int) -> None:
        rng = np.random.default_rng(i)
        for _ in range(rounds):
            start.wait()
            (tmp_path / names[i]).write_bytes(rng.bytes(256))
            record_checksum(tmp_path / names[i])
            if end.wait() == 0:  # one thread checks the round
                try:
                    assert sorted(verify_checksums(tmp_path)) == sorted(names)
                except Exception as e:  # noqa: BLE001 — counted, not raised in a thread
                    broken.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert broken == []


# L4 ------------------------------------------------------------------- runs/latest swapped by two at once


def test_two_trainings_pointing_latest_at_once_both_succeed(tmp_path):
    """L4: point_latest swapped through the fixed `.latest.tmp`: two trainings finishing together exit 1."""
    runs = [tmp_path / "runs" / name for name in ("a", "b")]
    for run in runs:
        run.mkdir(parents=True)
    together, errors = threading.Barrier(2), []

    def point(run: Path) -> None:
        for _ in range(100):
            together.wait()
            try:
                point_latest(run)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=point, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / "runs" / "latest").resolve() in runs
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b", "latest"]  # no temporary link left


# M5, M6 ------------------------------------------------------------ calibrate and evaluate while training


def test_calibrate_and_evaluate_refuse_a_run_being_trained(city_store, run_copy, tmp_path):
    """M5: calibrate took no lock and fitted an early epoch's model, which `info --verify` then called
    verified; M6: evaluate's report of that early model survived the run's completion."""
    before = (run_copy / "calibration.json").read_bytes()
    with run_lock(run_copy):  # what `dcfeat train` holds while it trains
        r = invoke("calibrate", "--feats", city_store, "--run", run_copy, "--split", "val")
        refused(r, "environment", f"--run {run_copy} is in use by `dcfeat train`, pid", "calibrate once")
        r = invoke("evaluate", "--feats", city_store, "--run", run_copy, "--out", tmp_path / "e")
        refused(r, "environment", f"--run {run_copy} is in use by `dcfeat train`, pid", "evaluate it once")
    assert (run_copy / "calibration.json").read_bytes() == before
    assert not (tmp_path / "e").exists() and not (run_copy / "evaluations.json").exists()
    assert invoke("calibrate", "--feats", city_store, "--run", run_copy, "--split", "val").exit_code == 0
    assert not (run_copy / ".lock").exists()
    with run_lock(run_copy, "evaluate"):  # an evaluation reads it: training and calibrating wait for it
        refused(invoke("calibrate", "--feats", city_store, "--run", run_copy, "--split", "val"), "environment",
                "is in use by another process")
        assert invoke("evaluate", "--feats", city_store, "--run", run_copy, "--out", tmp_path / "e").exit_code == 0


def _train_held_at_epoch_2(args: list[str]) -> None:
    """`dcfeat train ARGS[1:]`, its second epoch's validation held until the file args[0] exists."""
    import dcfeat.train as train_module
    from tests.conftest import run_dcfeat_quietly

    release, real, calls = Path(args[0]), train_module.recall_at_1, []

    def held(*a, **k):
        calls.append(1)
        while len(calls) == 2 and not release.exists():
            time.sleep(0.01)
        return real(*a, **k)

    train_module.recall_at_1 = held
    run_dcfeat_quietly(args[1:])


def test_an_evaluation_during_training_leaves_no_report_for_export_to_publish(city_store, tmp_path, forks):
    """M6: the epoch-80 report (`run_complete: false`) survived completion, and export published its
    LR@1 as the final model's."""
    run, release = tmp_path / "run", tmp_path / "release"
    train = forks.Process(target=_train_held_at_epoch_2, args=([str(release), "train", "--feats", str(city_store),
                                                               "--val-split", "val", "--out", str(run),
                                                               *FAST_TRAIN],))
    train.start()
    while train.is_alive() and not (run / "config.json").is_file():  # epoch 1 is done, epoch 2 held
        time.sleep(0.01)
    try:
        r = invoke("evaluate", "--feats", city_store, "--run", run)
        refused(r, "environment", "is in use by `dcfeat train`", "evaluate it once")
    finally:
        release.touch()
        train.join()
    assert train.exitcode == 0 and json.loads((run / "config.json").read_text())["complete"]
    assert not (run / "eval").exists()
    assert invoke("export", run, tmp_path / "export").exit_code == 0
    assert "| test |" not in (tmp_path / "export" / "README.md").read_text()  # no report of another model


# M4 --------------------------------------------------------------------- two evaluations into one folder


def test_two_evaluations_into_one_folder_both_succeed_and_the_last_lands_whole(city_store, run_copy, tmp_path,
                                                                                monkeypatch):
    """M4: the staging folder had one fixed name: the second evaluation emptied the first's, and one
    failed with FileNotFoundError or left a report.json that was not its predictions.parquet's."""
    import dcfeat.evaluate as evaluate_module
    from dcfeat.evaluate import evaluate_files

    out = tmp_path / "e"
    second_started, second_writing = threading.Event(), threading.Event()
    real_staged, real_plots = evaluate_module.staged, evaluate_module.write_confidence_plots

    def staged(folder):
        if threading.current_thread().name == "second":
            second_started.set()
        return real_staged(folder)

    def plots(*args, **kwargs):
        if threading.current_thread().name == "first":
            # Inside its staging folder: wait for the second evaluation to begin writing too. Where it must
            # wait for this one (the fix) it never gets that far; the bound only ends the wait then.
            second_started.wait()
            second_writing.wait(timeout=2)
        else:
            second_writing.set()
        return real_plots(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "staged", staged)
    monkeypatch.setattr(evaluate_module, "write_confidence_plots", plots)
    errors = []

    def evaluate(**options) -> None:
        try:
            evaluate_files(city_store, run_copy, "test", device="cpu", out=out, repeats=1, **options)
        except Exception as e:  # noqa: BLE001 — reported below, not lost in a thread
            errors.append(e)

    first = threading.Thread(target=evaluate, name="first", kwargs={"modes": ("classify",)})
    second = threading.Thread(target=evaluate, name="second",
                              kwargs={"modes": ("classify", "retrieve"), "database_split": "test-db"})
    first.start()
    while first.is_alive() and not list(out.glob(".*.tmp")):  # the first is writing before the second starts
        time.sleep(0.01)
    second.start()
    first.join()
    second.join()
    assert errors == []
    report = json.loads((out / "report.json").read_text())
    frame = pl.read_parquet(out / "predictions.parquet")
    assert sorted(report["methods"]) == ["classify", "classify-centre", "retrieve"]  # the second's, whole
    assert {c.removesuffix("_top1_error_m") for c in frame.columns if c.endswith("_top1_error_m")} == \
        set(report["methods"])
    for method, figures in report["methods"].items():
        assert recall_from_predictions(frame, method, report["ks"], report["threshold_m"]) == figures["recall"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging or lock left


# L6 ----------------------------------------------------------- the splits a run was evaluated on, anywhere


def test_calibrate_refuses_a_split_evaluated_with_its_files_elsewhere(city_store, run_copy, tmp_path):
    """L6: the guard read RUN/eval only, so `evaluate --out elsewhere` let calibrate fit on that split."""
    before = (run_copy / "calibration.json").read_bytes()
    assert invoke("evaluate", "--feats", city_store, "--run", run_copy, "--split", "val",
                  "--out", tmp_path / "elsewhere").exit_code == 0
    assert not (run_copy / "eval").exists()
    r = invoke("calibrate", "--feats", city_store, "--run", run_copy, "--split", "val")
    refused(r, "bad input", "evaluated on it", str(tmp_path / "elsewhere" / "report.json"), "--allow-test-split")
    assert (run_copy / "calibration.json").read_bytes() == before
    # the same images in a copy of the store, by plan id
    copy = tmp_path / "copy"
    shutil.copytree(city_store.parent, copy, ignore=shutil.ignore_patterns("runs"))
    r = invoke("calibrate", "--feats", copy / city_store.name, "--run", run_copy, "--split", "val")
    refused(r, "bad input", "evaluated on it")


def test_calibrated_on_this_split_is_said_of_the_same_images_in_a_copy_of_the_store(city_store, run_copy,
                                                                                      tmp_path):
    """L6: the note compared the store's path and the split's name, not the images (plan id)."""
    assert invoke("calibrate", "--feats", city_store, "--run", run_copy, "--split", "val").exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(city_store.parent, copy, ignore=shutil.ignore_patterns("runs"))
    r = invoke("evaluate", "--feats", copy / city_store.name, "--run", run_copy, "--split", "val",
               "--out", tmp_path / "e")
    assert r.exit_code == 0 and "CALIBRATED ON THIS SPLIT" in r.output, r.output
