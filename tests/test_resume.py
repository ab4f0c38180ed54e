"""Training resumes after a crash: the same `dcfeat train --out R` continues from the last finished epoch and
ends bit for bit as an uninterrupted run (CPU); --restart starts over; one `dcfeat train` per run folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dcfeat import resume as resume_module
from dcfeat import train as train_module
from dcfeat.resume import run_lock
from tests.conftest import FAST_TRAIN, invoke, kill_9_when, refused


class Killed(BaseException):
    """Stands for kill -9 at a chosen point: nothing after it runs."""


def command(store, out, *extra):
    return ["train", "--feats", store, "--val-split", "val", "--out", out, *FAST_TRAIN, *extra]


@pytest.fixture(scope="module")
def uninterrupted(city_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = invoke(*command(city_store, out))
    assert r.exit_code == 0, r.output
    return out


def assert_same_run(a, b):
    """Equal weights bit for bit, the same calibration, the same log but for the seconds."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "calibration.json").read_text()) == json.loads((b / "calibration.json").read_text())

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert log(a) == log(b) and len(log(a)) == 6
    ca, cb = (json.loads((r / "config.json").read_text()) for r in (a, b))
    assert ca["complete"] and cb["complete"] and ca["best_epoch"] == cb["best_epoch"]
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())  # no resume state left


def kill_at(monkeypatch, module, name, when):
    """Make `module.name` die on its `when`-th call (counted from 1)."""
    real, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def kill_in_epoch_3(monkeypatch, store, out, *extra):
    """`command` killed -9 (as it were) during epoch 3: a run folder with epochs 1 and 2 done; every patch undone."""
    kill_at(monkeypatch, train_module, "recall_at_1", 3)
    with pytest.raises(Killed):
        invoke(*command(store, out, *extra), catch_exceptions=False)
    monkeypatch.undo()


# Points of an epoch's writes: during epoch 3's training, between its resume state and its kept model,
# before its config.json, and while fitting the confidence after the last epoch.
KILLS = {
    "mid-epoch": (train_module, "recall_at_1", 3),
    "after the log line": (resume_module, "save_resume", 2),
    "after the resume state": (train_module, "save_model", 2),
    "before config.json": (train_module, "write_config", 4),
    "while calibrating": (train_module, "fit_confidence", 1),
}


@pytest.mark.parametrize("where", KILLS)
def test_a_killed_run_resumes_to_the_same_end_as_an_uninterrupted_one(city_store, uninterrupted, tmp_path,
                                                                       monkeypatch, where):
    module, name, when = KILLS[where]
    out = tmp_path / "run"
    kill_at(monkeypatch, module, name, when)
    with pytest.raises(Killed):
        invoke(*command(city_store, out), catch_exceptions=False)
    monkeypatch.undo()
    # Every kill point lies after epoch 1 wrote its config: a run that says it is unfinished, and its resume state.
    assert not json.loads((out / "config.json").read_text())["complete"]
    assert (out / "resume.safetensors").is_file()
    r = invoke(*command(city_store, out))
    assert r.exit_code == 0, r.output
    assert_same_run(uninterrupted, out)


@pytest.fixture(scope="module")
def uninterrupted_streamed(city_store, tmp_path_factory):
    """The run of `command` with the train split (333 kB) streamed, 100 kB of rows at a time."""
    out = tmp_path_factory.mktemp("streamed") / "run"
    r = invoke(*command(city_store, out, "--memory-budget", "200kB"))
    assert r.exit_code == 0 and "streamed from disk" in r.output, r.output
    return out


# (how the killed run read the split, how the resumed one would by itself, the uninterrupted run it must equal)
READINGS = {
    "in memory, then streamed": (None, "200kB", "uninterrupted"),
    "streamed for lack of free memory, then in memory": ("free memory", None, "uninterrupted_streamed"),
    "streamed, then in other chunks": ("200kB", "150kB", "uninterrupted_streamed"),
}


@pytest.mark.parametrize("case", READINGS)
def test_a_resumed_run_reads_its_split_as_the_killed_one_did(city_store, tmp_path, monkeypatch, request, case):
    """M3: whether a split streams depends on the memory free at the start, and the resume state did not say:
    killed in memory and resumed streamed, `KeyError: 'rng.chunk_order'`; the other way, or in other
    chunks, a run silently unlike the uninterrupted one."""
    first, then, baseline = READINGS[case]
    out = tmp_path / "run"
    if first == "free memory":
        monkeypatch.setattr("dcfeat.devices.memory_budget", lambda *a, **k: 200 * 1024)
    kill_in_epoch_3(monkeypatch, city_store, out,
                    *(["--memory-budget", first] if first not in (None, "free memory") else []))
    r = invoke(*command(city_store, out, *(["--memory-budget", then] if then else [])))
    assert r.exit_code == 0, r.output
    assert_same_run(request.getfixturevalue(baseline), out)


RESUME_EDITS = {  # how the resume state's JSON is edited → what the refusal names
    "streamed -1 rows": (lambda state: {**state, "streamed": {"chunk_rows": -1}}, "`streamed`", "--restart"),
    "no streamed (an older dcfeat's)": (lambda state: {k: v for k, v in state.items() if k != "streamed"},
                                        "written by an older dcfeat", "--restart"),
    "a newer format": (lambda state: {**state, "format": 2}, "written by a newer dcfeat", "Upgrade dcfeat"),
    "format 'x'": (lambda state: {**state, "format": "x"}, "`format` is 'x'", "--restart"),
}


@pytest.mark.parametrize("edit", list(RESUME_EDITS))
def test_a_resume_state_that_this_dcfeat_cannot_resume_from_is_refused(city_store, tmp_path, monkeypatch, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "run"
    kill_in_epoch_3(monkeypatch, city_store, out)
    with safe_open(str(out / "resume.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state = json.loads(meta["dcfeat_resume"])
    assert state["format"] == 1
    change, *words = RESUME_EDITS[edit]
    save_file(tensors, str(out / "resume.safetensors"), metadata={"dcfeat_resume": json.dumps(change(state))})
    refused(invoke(*command(city_store, out)), "damaged run", "resume.safetensors", *words)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_the_same_command_ends_as_an_uninterrupted_run(city_store, uninterrupted,
                                                                                 tmp_path, forks):
    out = tmp_path / "run"
    log = out / "train_log.jsonl"
    kill_9_when(forks, command(city_store, out), lambda: log.is_file() and len(log.read_text().splitlines()) >= 2)
    assert not json.loads((out / "config.json").read_text())["complete"]  # killed before the end
    r = invoke(*command(city_store, out))
    assert r.exit_code == 0, r.output
    assert_same_run(uninterrupted, out)


def _save_again_and_again(args: list[str]) -> None:
    """Write a 64 MB safetensors file at args[0] over and over: a process to kill -9 mid-save."""
    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(16 << 20)}
    for _ in range(100):
        save_file(tensors, args[0])


def _left_by_a_save_killed_midway(forks, folder) -> list:
    """The files besides its target that safetensors leaves when killed mid-save ([] if it writes in place)."""
    folder.mkdir()
    for _ in range(20):  # each try kills it the moment another file appears, which may be just after the rename
        kill_9_when(forks, [folder / "w.safetensors"], lambda: any(p.name != "w.safetensors" for p in folder.iterdir()),
                    target=_save_again_and_again)
        if left := [p for p in folder.iterdir() if p.name != "w.safetensors"]:
            return left
    return []


@pytest.mark.slow
def test_what_safetensors_leaves_when_killed_mid_save_is_removed_on_resume(city_store, uninterrupted, tmp_path,
                                                                        monkeypatch, forks):
    """safetensors writes through a temporary file of its own beside its target; a kill -9 mid-save
    leaves that file, which the resumed run must not keep."""
    left = _left_by_a_save_killed_midway(forks, tmp_path / "scratch")
    if not left:
        pytest.skip("this safetensors writes its files in place")
    out = tmp_path / "run"
    kill_at(monkeypatch, train_module, "save_model", 2)
    with pytest.raises(Killed):
        invoke(*command(city_store, out), catch_exceptions=False)
    monkeypatch.undo()
    for path in left:
        path.rename(out / path.name)
    assert resume_module.killed_writers_files(out) == sorted(out / p.name for p in left)
    r = invoke(*command(city_store, out))
    assert r.exit_code == 0, r.output
    assert_same_run(uninterrupted, out)  # the same files: none left over


def test_restart_trains_an_unfinished_run_again_from_its_first_epoch(city_store, uninterrupted, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "run"
    kill_in_epoch_3(monkeypatch, city_store, out)
    started = []
    real = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *a, **k: started.append(1) or real(*a, **k))
    r = invoke(*command(city_store, out, "--restart"))
    assert r.exit_code == 0, r.output
    assert len(started) == 6 * 10  # every step of all six epochs again
    assert_same_run(uninterrupted, out)


def test_resuming_with_other_settings_is_refused_and_changes_nothing(city_store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_in_epoch_3(monkeypatch, city_store, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = invoke(*command(city_store, out), "--seed", "7")
    refused(r, "bad input", "other settings", "seed: 0 then, 7 now", "--restart")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_two_trainings_into_one_folder_are_refused(city_store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        r = invoke(*command(city_store, out))
    refused(r, "environment", "is in use by `dcfeat train`, pid", "another --out")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the lock file gone with its holder


def test_a_run_finished_while_waiting_for_the_lock_is_never_cleared(uninterrupted):
    with pytest.raises(resume_module.BadInput, match="a finished run"):
        resume_module.resume_or_clear(uninterrupted)
    assert (uninterrupted / "model.safetensors").is_file()


@pytest.mark.parametrize("bars", ["progress bars", "--no-progress"])
def test_every_epoch_prints_a_line_on_stderr(city_store, tmp_path, bars):
    """--no-progress hides progress bars only: it also dropped the epoch lines, all a log showed of training."""
    args = [a for a in command(city_store, tmp_path / "run") if a != "--no-progress" or bars == "--no-progress"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("epoch ") and "loss" in line]
    assert [line.split(":")[0] for line in lines] == [f"epoch {e}/6" for e in range(1, 7)]
    assert all("train accuracy" in line and "val LR@1" in line for line in lines)
