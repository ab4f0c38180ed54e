"""Run folders (DESIGN.md, "Runs"): create, save, load and check, completeness, `runs/latest`.

A run folder holds everything needed to evaluate or predict without the
training store: `model.safetensors` (projection + every group's prototypes in
one state dict), `config.json`, `classes.parquet`, and `blocks.safetensors`
when the run tunes the last backbone blocks. No pickles.

`config.json` also says how far training got: `complete`, `epochs_done` of
`epochs`. Training rewrites it after every epoch, so a run stopped half way
is recognised as such (`Run.status_line`) instead of passing for a finished one.
`load_run` checks every file against the others and refuses a damaged run
with one `DamagedRun` naming the file and the fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from dcfeat.atomic import atomic_write, tmp_path, write_text
from dcfeat.calibration import Calibrator
from dcfeat.errors import BadInput, DamagedRun, EnvironmentProblem
from dcfeat.layout import with_defaults
from dcfeat.model import DCModel
from dcfeat.partition import save_classes
from dcfeat.runfiles import (
    CLASSES_FILE,
    COMMAND_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    TRAIN_FILES,
    check_folder,
    read_blocks,
    read_calibration,
    read_classes,
    read_config,
    read_model,
    read_progress,
)


@dataclass
class Run:
    directory: Path
    model: DCModel
    config: dict
    classes: pl.DataFrame
    blocks: dict[str, torch.Tensor] | None = None  # blocks.safetensors, when the run tunes backbone blocks
    complete: bool = True
    epochs_done: int | None = None
    calibration: Calibrator | None = None  # calibration.json: confidence and 90 % radius, when fitted

    @property
    def random_backbone(self) -> bool:
        """The run's features came from a randomly initialised backbone: its numbers measure the pipeline."""
        return bool(self.config["features"].get("backbone_random_init"))

    @property
    def feature_identity(self) -> dict:
        """What the training features were made with (model, fingerprint, pooling, size, crop, dim, …):
        features a run is applied to must match it. Runs trained before `crop` existed used centre crops."""
        return with_defaults(self.config["features"])

    @property
    def epochs(self) -> int | None:
        return self.config.get("epochs")

    def status_line(self) -> str | None:
        """A warning for a run whose training stopped early (None for a finished run)."""
        if self.complete:
            return None
        return (f"INCOMPLETE RUN: training stopped after epoch {self.epochs_done} of {self.epochs} "
                f"(or is still running); the model kept is from epoch {self.config.get('best_epoch')}. Run the "
                f"command in {Path(self.directory) / COMMAND_FILE} again to train it in full")

    def status(self) -> dict:
        """How far training got, for reports and prediction files."""
        return {"run": str(Path(self.directory).resolve()), "run_complete": self.complete,
                "epochs_done": self.epochs_done, "epochs": self.epochs}


def save_model(directory: Path, model: DCModel, classes: pl.DataFrame) -> None:
    """Write the model's weights, and the class table once, each atomically (training rewrites them)."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(directory / MODEL_FILE) as tmp:
        save_file(state, str(tmp))
    if not (directory / CLASSES_FILE).is_file():
        with atomic_write(directory / CLASSES_FILE) as tmp:
            save_classes(classes, tmp)


def write_config(directory: Path, config: dict) -> None:
    write_text(Path(directory) / CONFIG_FILE, json.dumps(config, indent=1, sort_keys=True))


def load_run(directory: Path, device: torch.device | str = "cpu", *, calibration: bool = True) -> Run:
    """The run in `directory`, checked file by file, its model in eval mode on `device`.
    `calibration=False` skips calibration.json (`dcfeat calibrate` replaces it, even a damaged one)."""
    directory = Path(directory)
    check_folder(directory)
    config = read_config(directory)
    complete, epochs_done = read_progress(directory, config)
    classes = read_classes(directory, config)
    model = read_model(directory, config).to(device).eval()
    blocks = read_blocks(directory, config["finetune_blocks"]) if config.get("finetune_blocks") else None
    return Run(directory=directory, model=model, config=config, classes=classes, blocks=blocks, complete=complete,
               epochs_done=epochs_done, calibration=read_calibration(directory) if calibration else None)


def verified_run(directory: Path) -> Run:
    """`dcfeat info RUN_DIR --verify`: every file of the run loads and fits, and training finished."""
    run = load_run(directory)  # raises DamagedRun naming the file
    if run.status_line():
        raise DamagedRun(f"{directory}: {run.status_line()}")
    return run


def unfinished_run(directory: Path) -> bool:
    """Whether `directory` holds a run that `dcfeat train` started and never finished (safe to restart)."""
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


def clear_unfinished_run(directory: Path) -> None:
    """Remove what `dcfeat train` wrote in `directory` (and temporary files it left), nothing else."""
    for name in TRAIN_FILES:
        for path in (Path(directory) / name, tmp_path(Path(directory) / name)):
            path.unlink(missing_ok=True)


def new_run_dir(out: Path | None, runs: Path) -> Path:
    """A fresh run folder (refusing to reuse one), default runs/<timestamp>.

    An explicit `out` holding a run that `dcfeat train` started and never finished (killed, out
    of memory) is cleared and reused, so that the same command runs again after a crash; so is
    an empty folder. A finished run, or a folder holding anything else, is refused. Two default
    runs started within one second get <timestamp>-2, -3, …; mkdir without exist_ok is the
    atomic claim, so concurrent runs cannot share a folder either.
    """
    if out:
        out = Path(out)
        if out.is_dir() and unfinished_run(out):
            clear_unfinished_run(out)
            return out
        if out.is_dir() and not any(out.iterdir()):  # made beforehand, or a kill before command.txt
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


def point_latest(run: Path) -> None:
    """runs/latest → the newest run, swapped atomically."""
    latest = run.parent / "latest"
    tmp = run.parent / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    tmp.replace(latest)


