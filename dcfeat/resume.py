"""A run folder's training lifecycle (DESIGN.md, "Runs"): the run's lock, the state training resumes
from, clearing what an unfinished `dcfeat train` left, new run folders and `runs/latest`.

`dcfeat train` holds the run's lock alone while it trains, `dcfeat calibrate` while it writes the
confidence, and `dcfeat evaluate` shares it with other evaluations (`run_lock`). After each epoch
training saves its state (RESUME_FILE: `train._State` says what it holds); the same command, into
the same folder, resumes from it (`resume_or_clear`), or with --restart clears the run and starts over.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dcfeat.atomic import CHECKSUM_FILE, RECORDS_LOCK, exclusive, leftover_tmp_files, replace_symlink
from dcfeat.errors import BadInput, DamagedRun, EnvironmentProblem, is_not_writable, not_writable
from dcfeat.reports import remove_outputs
from dcfeat.run import (
    BLOCKS_FILE,
    CALIBRATION_FILE,
    COMMAND_FILE,
    CONFIG_FILE,
    EVAL_DIR,
    EVALUATIONS_FILE,
    LAST_FILE,
    LOG_FILE,
    RUN_FILES,
    check_folder,
    first_line,
    save_tensors,
)

# Training's state after its last finished epoch (weights, optimiser, schedule, random generators),
# what the same command resumes from; and the lock that keeps one `dcfeat train` per run folder.
RESUME_FILE, LOCK_FILE = "resume.safetensors", ".lock"
# Everything `dcfeat train` writes in a run folder: what a restart into an unfinished run clears.
TRAIN_FILES = (COMMAND_FILE, LOG_FILE, *RUN_FILES, BLOCKS_FILE, CALIBRATION_FILE, RESUME_FILE, CHECKSUM_FILE,
               LAST_FILE)


def save_resume(directory: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """The state that resumes training after the epoch it records (RESUME_FILE)."""
    save_tensors(Path(directory) / RESUME_FILE, tensors, {"dcfeat_resume": json.dumps(state)})


def read_resume(directory: Path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of RESUME_FILE; None when training never finished an epoch there. `tensors=False`:
    the state alone (tensors {})."""
    path = Path(directory) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            state = json.loads((f.metadata() or {})["dcfeat_resume"])
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DamagedRun(f"{path}: cannot be read as the state training resumes from ({first_line(e)}). Train "
                         "the run again from its first epoch with the same command and --restart") from None
    return found, state


# What each command that takes the run's lock is told when another holds it.
_BUSY = {
    "train": "{run} is in use by {{holder}} ({{lock}}); wait for it to finish, or train into another --out",
    "calibrate": "--run {run} is in use by {{holder}} ({{lock}}): calibrate fits the model training finished and "
                 "writes into the run, so it runs alone; calibrate once that process has finished",
    "evaluate": "--run {run} is in use by {{holder}} ({{lock}}): a run being trained or calibrated is still "
                "changing; evaluate it once that process has finished",
}


@contextmanager
def run_lock(directory: Path, command: str = "train"):
    """The run folder's lock, taken by `command` (a key of _BUSY) for as long as it works on the run:
    `train` and `calibrate` (they write the model or its confidence) alone, `evaluate` (it reads them)
    beside other evaluations. Whoever cannot have it is refused at once, with a message naming the holder."""
    directory = Path(directory)
    if command != "train" and not directory.is_dir():
        check_folder(directory)  # the lock would make the folder: say there is none
    with ExitStack() as held:
        try:
            held.enter_context(exclusive(directory / LOCK_FILE, _BUSY[command].format(run=directory), remove=True,
                                         shared=command == "evaluate", holder=f"`dcfeat {command}`"))
        except OSError as e:
            if not is_not_writable(e):
                raise
            if command != "evaluate":
                raise not_writable(directory, e) from None
            # A run folder nobody can write is trained or calibrated by nobody: it is read unlocked.
        yield


def unfinished_run(directory: Path) -> bool:
    """Whether `directory` holds a run that `dcfeat train` started and never finished (to resume or restart)."""
    directory = Path(directory)
    if not (directory / COMMAND_FILE).is_file():
        return False
    config = directory / CONFIG_FILE
    if not config.is_file():
        return True
    try:
        return json.loads(config.read_text()).get("complete") is False
    except (ValueError, AttributeError):
        return False


# safetensors (0.8 on) writes a file through a temporary file of its own beside it, `.tmp` and six
# random letters or digits, and renames that: a writer killed meanwhile leaves it in the run folder.
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def killed_writers_files(directory: Path) -> list[Path]:
    """What writers killed mid-write left in the run folder: temporary files of its files, dcfeat's
    (`atomic_write`) and safetensors' own."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ours = [p for name in TRAIN_FILES for p in leftover_tmp_files(directory / name)]
    theirs = [p for p in directory.iterdir() if _SAFETENSORS_TMP.fullmatch(p.name) and p.is_file()]
    return sorted(ours + theirs)


def clear_unfinished_run(directory: Path) -> None:
    """Remove what `dcfeat train` wrote in `directory` (and temporary files it left), nothing else."""
    for path in (*(Path(directory) / name for name in TRAIN_FILES), *killed_writers_files(directory)):
        path.unlink(missing_ok=True)


def clear_evaluations(directory: Path) -> None:
    """Remove `dcfeat evaluate`'s files under RUN/eval/ (its own file names only) and its record of the
    splits it measured: they describe a model of an unfinished run that training is about to change,
    and would go on saying `run_complete: false` of a run that then completes."""
    (Path(directory) / EVALUATIONS_FILE).unlink(missing_ok=True)
    evals = Path(directory) / EVAL_DIR
    if not evals.is_dir():
        return
    for folder in [evals, *(p for p in evals.iterdir() if p.is_dir())]:
        remove_outputs(folder)
        if folder != evals and not any(folder.iterdir()):
            folder.rmdir()
    if not any(evals.iterdir()):
        evals.rmdir()


def new_run_dir(out: Path | None, runs: Path) -> Path:
    """The run folder to train in, default a fresh runs/<timestamp>.

    An explicit `out` holding a run that `dcfeat train` started and never finished (killed, out
    of memory) is returned as it is: `resume_or_clear` decides, under the run's lock, whether
    training resumes there or starts over. So is an empty folder. A finished run, or a folder
    holding anything else, is refused. Two default runs started within one second get
    <timestamp>-2, -3, …; mkdir without exist_ok is the atomic claim, so concurrent runs cannot
    share a folder either.
    """
    if out:
        out = Path(out)
        if out.is_dir() and unfinished_run(out):
            return out
        locks = (LOCK_FILE, RECORDS_LOCK)  # what a kill leaves in a folder made beforehand
        if out.is_dir() and not [p for p in out.iterdir() if p.name not in locks]:
            return out
        if out.exists():
            what = "a finished run" if (out / COMMAND_FILE).is_file() else "not a run folder of dcfeat"
            raise BadInput(f"--out {out} exists ({what}); a run never overwrites another. Choose another --out")
        out.mkdir(parents=True)
        return out
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        out = runs / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    raise EnvironmentProblem(f"{runs}: could not find a free run folder name for {stamp} among 999; remove "
                             "old runs there or pass --out")


def resume_or_clear(directory: Path, *, restart: bool = False) -> bool:
    """Under the run's lock: whether training resumes in `directory` (it holds an unfinished run that
    finished an epoch). Otherwise, or with `restart`, what an earlier `dcfeat train` left there is cleared.
    A run that finished meanwhile (another `dcfeat train` held the lock until then) is refused."""
    if (Path(directory) / COMMAND_FILE).is_file() and not unfinished_run(directory):
        raise BadInput(f"--out {directory} exists (a finished run); a run never overwrites another. Choose another "
                       "--out")
    clear_evaluations(directory)
    for path in killed_writers_files(directory):  # under the lock no other writer is alive
        path.unlink(missing_ok=True)
    if unfinished_run(directory) and not restart and (Path(directory) / RESUME_FILE).is_file():
        return True
    clear_unfinished_run(directory)
    return False


def point_latest(run: Path) -> None:
    """runs/latest → the newest run, swapped atomically."""
    replace_symlink(run.parent / "latest", run.name)
