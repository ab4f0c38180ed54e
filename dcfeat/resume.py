"""A run folder's training lifecycle (DESIGN.md, "Runs"): the run's lock, the state training resumes
from, clearing what an unfinished `dcfeat train` left, new run folders and `runs/latest`.

`dcfeat train` holds the run's lock alone while it trains, `dcfeat calibrate` while it writes the
confidence, and `dcfeat evaluate` shares it with other evaluations (`run_lock`). After each epoch
training saves its state (RESUME_FILE: `TrainingState` says what it holds); the same command, into
the same folder, resumes from it (`resume_or_clear`), or with --restart clears the run and starts over.
"""

from __future__ import annotations

import json
import math
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dcfeat.atomic import CHECKSUM_FILE, RECORDS_LOCK, exclusive, leftover_tmp_files, replace_symlink, write_text
from dcfeat.errors import (
    BadInput,
    DamagedRun,
    EnvironmentProblem,
    check_format,
    first_line,
    is_not_writable,
    not_writable,
)
from dcfeat.finetune import TokenTraining
from dcfeat.model import DCModel
from dcfeat.presets import TrainConfig
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
    MODEL_FILE,
    RUN_FILES,
    check_folder,
    cpu_copy,
    save_model,
    save_tensors,
    saved_epoch,
)
from dcfeat.sampling import Streamed

# Training's state after its last finished epoch (weights, optimiser, schedule, random generators),
# what the same command resumes from; and the lock that keeps one `dcfeat train` per run folder.
RESUME_FILE, LOCK_FILE = "resume.safetensors", ".lock"
# The format of the resume state's JSON: a state without `format` is read as this one.
RESUME_FORMAT = 1
_RESTART = "Train the run again from its first epoch with the same command and --restart"
# Everything `dcfeat train` writes in a run folder: what a restart into an unfinished run clears.
TRAIN_FILES = (COMMAND_FILE, LOG_FILE, *RUN_FILES, BLOCKS_FILE, CALIBRATION_FILE, RESUME_FILE, CHECKSUM_FILE,
               LAST_FILE)


def save_resume(directory: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """The state that resumes training after the epoch it records (RESUME_FILE)."""
    saved = json.dumps({"format": RESUME_FORMAT, **state})
    save_tensors(Path(directory) / RESUME_FILE, tensors, {"dcfeat_resume": saved})


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
        raise DamagedRun(f"{path}: cannot be read as the state training resumes from ({first_line(e)}). "
                         f"{_RESTART}") from None
    if not isinstance(state, dict):
        raise DamagedRun(f"{path}: its state is not a JSON object. {_RESTART}")
    check_format(path, state.get("format"), RESUME_FORMAT, _RESTART)
    if "streamed" not in state:
        raise DamagedRun(f"{path}: written by an older dcfeat (no `streamed`: how the split was read), a state this "
                         f"one no longer resumes from. {_RESTART}")
    return found, state


# What each command that takes the run's lock is told when another holds it.
_BUSY = {
    "train": "{run} is in use by {{holder}} ({{lock}}); wait for it to finish, or train into another --out",
    "calibrate": "--run {run} is in use by {{holder}} ({{lock}}): calibrate fits the model training finished and "
                 "writes into the run, so it runs alone; calibrate once that process has finished",
    "evaluate": "--run {run} is in use by {{holder}} ({{lock}}): a run being trained or calibrated is still "
                "changing; evaluate it once that process has finished",
    "index": "--run {run} is in use by {{holder}} ({{lock}}): a run being trained or calibrated is still "
             "changing; index with it once that process has finished",
}


@contextmanager
def run_lock(directory: Path, command: str = "train"):
    """The run folder's lock, taken by `command` (a key of _BUSY) for as long as it works on the run:
    `train` and `calibrate` (they write the model or its confidence) alone, `evaluate` and `index` (they
    read them) beside other readers. Whoever cannot have it is refused at once, with a message naming the holder."""
    directory = Path(directory)
    if command != "train" and not directory.is_dir():
        check_folder(directory)  # the lock would make the folder: say there is none
    with ExitStack() as held:
        try:
            held.enter_context(exclusive(directory / LOCK_FILE, _BUSY[command].format(run=directory), remove=True,
                                         shared=command in ("evaluate", "index"), holder=f"`dcfeat {command}`"))
        except OSError as e:
            if not is_not_writable(e):
                raise
            if command not in ("evaluate", "index"):
                raise not_writable(directory, e) from None
            # A run folder nobody can write is trained or calibrated by nobody: it is read unlocked.
        yield


class TrainingState:
    """What resumes training after an epoch: the model's and tuned blocks' weights, the optimiser and
    schedule, every random generator, the epochs done, best score and kept epoch so far, and how the
    split is read (in memory, or streamed in chunks of which size: `resumed_reading`).

    Saved as one safetensors file (tensors, and the rest as JSON in its metadata), after the epoch's
    log line and before the kept model and config.json. `schedule`: training's (`train.Schedule`), whose
    `plateau` (a torch LR scheduler, or None) is saved and restored.
    """

    def __init__(self, model: DCModel, opt: torch.optim.Optimizer, schedule,
                 generators: dict[str, torch.Generator], tail: TokenTraining | None, config: TrainConfig,
                 inputs: dict, reading: dict | None = None):
        self.model, self.opt, self.schedule, self.generators, self.tail = model, opt, schedule, generators, tail
        self.config, self.inputs = asdict(config), inputs
        self.reading = reading  # how the split is read: None in memory, else streamed's chunk_rows, buffer_chunks
        self.epoch, self.best, self.best_epoch, self.stopped = 0, -math.inf, 0, None

    def save(self, out: Path) -> dict[str, dict[str, torch.Tensor]]:
        """Write the state; returns the CPU copies of the model's and the tail's weights it wrote."""
        opt = self.opt.state_dict()
        current = {"model": cpu_copy(self.model.state_dict()),
                   "tail": self.tail.tail.tuned_state() if self.tail else {}}
        tensors = {**{f"model.{k}": v for k, v in current["model"].items()},
                   **{f"tail.{k}": v for k, v in current["tail"].items()},
                   **{f"optimizer.{i}.{k}": v.cpu() for i, s in opt["state"].items() for k, v in s.items()
                      if torch.is_tensor(v)},
                   **{f"rng.{name}": g.get_state() for name, g in self.generators.items()},
                   "rng.torch": torch.get_rng_state()}
        save_resume(out, tensors, {
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "stopped": self.stopped,
            "config": self.config, "inputs": self.inputs, "streamed": self.reading,
            "param_groups": opt["param_groups"],
            "optimizer_scalars": {str(i): {k: v for k, v in s.items() if not torch.is_tensor(v)}
                                  for i, s in opt["state"].items()},
            "schedule": self.schedule.plateau.state_dict() if self.schedule.plateau else None})
        return current

    def restore(self, out: Path, tensors: dict[str, torch.Tensor], saved: dict, classes) -> list[dict]:
        """Back to the saved state (refusing one of other settings); the log's records up to it."""
        differ = {k: (saved["config"].get(k), v) for k, v in self.config.items() if saved["config"].get(k) != v}
        differ.update({k: (saved["inputs"].get(k), v) for k, v in self.inputs.items()
                       if saved["inputs"].get(k) != v})
        if saved["streamed"] != self.reading:
            differ["streamed"] = (saved["streamed"], self.reading)
        if differ:
            shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
            raise BadInput(f"{out} holds an unfinished run started with other settings or features ({shown}). "
                           f"Run the command in {out / COMMAND_FILE} to resume it, or add --restart to train "
                           "it again from its first epoch")
        device = self.model.device
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.tail:
            self.tail.restore({k[5:]: v for k, v in tensors.items() if k.startswith("tail.")})
        state = {}
        for key, v in tensors.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v.to(device) if name != "step" else v
        for i, scalars in saved["optimizer_scalars"].items():
            state.setdefault(int(i), {}).update(scalars)
        self.opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        if self.schedule.plateau is not None:
            self.schedule.plateau.load_state_dict(saved["schedule"])
        for name, g in self.generators.items():
            g.set_state(tensors[f"rng.{name}"])
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch, self.best, self.best_epoch = saved["epoch"], saved["best"], saved["best_epoch"]
        self.stopped = saved["stopped"]
        # The kept epoch's files: written after the state, so a kill in between left an older epoch's.
        if saved_epoch(out / MODEL_FILE) != self.best_epoch:
            if self.best_epoch != self.epoch:  # the state's own weights are the kept ones only then
                raise DamagedRun(f"{out / MODEL_FILE} is not from epoch {self.best_epoch}, the one "
                                 f"{out / RESUME_FILE} keeps: the run was edited. Train it again with the same "
                                 "command and --restart")
            save_model(out, self.model, classes, self.best_epoch)
            if self.tail:
                self.tail.save(out, self.best_epoch)
        log = out / LOG_FILE
        lines = log.read_text().splitlines()[:self.epoch] if log.is_file() else []
        write_text(log, "".join(line + "\n" for line in lines))  # drops the line of an epoch the state lacks
        return [json.loads(line) for line in lines]

    def kept(self, out: Path) -> tuple:
        """The kept epoch's weights (model, tail) as training holds them, read back from the run."""
        model = load_file(str(out / MODEL_FILE))
        return model, load_file(str(out / BLOCKS_FILE)) if self.tail else None


def resumed_reading(run: Path, feats: Path, streamed: Streamed | None) -> Streamed | None:
    """How the interrupted run in `run` read its split, saved with its resume state: in memory, or streamed
    in chunks of its size. Whether a split streams depends on the memory free at the start; a resumed run
    reads it as before, or it would not end as the uninterrupted one (`streamed`: what this start chose, kept
    where there is no state to resume from)."""
    saved = read_resume(run, tensors=False)
    if saved is None:
        return streamed
    reading = saved[1]["streamed"]
    if reading is None:
        return None
    if not (isinstance(reading, dict) and all(isinstance(reading.get(k), int) and not isinstance(reading[k], bool)
                                              and reading[k] > 0 for k in ("chunk_rows", "buffer_chunks"))):
        raise DamagedRun(f"{run / RESUME_FILE}: `streamed` is {reading!r}, not how a split was read (null, or "
                         f"positive `chunk_rows` and `buffer_chunks`). {_RESTART}")
    return Streamed(Path(feats), reading["chunk_rows"], reading["buffer_chunks"])


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
