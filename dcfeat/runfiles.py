"""Reading a run folder back, checked file by file: each problem is one DamagedRun naming the file and the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dcfeat.calibration import Calibrator
from dcfeat.errors import BadInput, DamagedRun
from dcfeat.heads import HEADS, TEST_PROTOTYPES
from dcfeat.model import DCModel
from dcfeat.partition import load_classes

MODEL_FILE, CONFIG_FILE, CLASSES_FILE = "model.safetensors", "config.json", "classes.parquet"
BLOCKS_FILE, CALIBRATION_FILE = "blocks.safetensors", "calibration.json"
RUN_FILES = (CONFIG_FILE, CLASSES_FILE, MODEL_FILE)
COMMAND_FILE, LOG_FILE = "command.txt", "train_log.jsonl"
# Everything `dcfeat train` writes in a run folder: what a restart into an unfinished run clears.
TRAIN_FILES = (COMMAND_FILE, LOG_FILE, *RUN_FILES, BLOCKS_FILE, CALIBRATION_FILE)


def _fix(directory: Path) -> str:
    command = Path(directory) / COMMAND_FILE
    again = f"the command in {command}" if command.is_file() else "`dcfeat train`"
    return f"Restore the file from a copy of the run, or train the run again with {again}"


def _damaged(path: Path, problem: str) -> DamagedRun:
    return DamagedRun(f"{path}: {problem}. The run folder was edited or damaged. {_fix(path.parent)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_folder(directory: Path) -> None:
    if not directory.is_dir():
        raise BadInput(f"{directory} is not a complete run folder: no such folder. Train one with `dcfeat train`, "
                       "or pass --run DIR of a folder it wrote")
    missing = [n for n in RUN_FILES if not (directory / n).is_file()]
    if not missing:
        return
    command = directory / COMMAND_FILE
    if command.is_file() and CONFIG_FILE in missing and MODEL_FILE in missing:
        raise DamagedRun(f"{directory}: training never finished an epoch there (no {MODEL_FILE} or {CONFIG_FILE} "
                         f"yet): it was stopped, or is still running. Re-run `dcfeat train` with the command in "
                         f"{command} (`{command.read_text().strip()}`): it restarts training in this folder")
    if len(missing) == len(RUN_FILES):
        raise BadInput(f"{directory} is not a complete run folder: it holds none of {', '.join(RUN_FILES)}. "
                       "Pass --run DIR of a folder written by `dcfeat train`")
    raise DamagedRun(f"{directory} is not a complete run folder: {', '.join(missing)} missing. {_fix(directory)}")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# config.json key → (check, what it must be); what load_run and the stages read.
CONFIG_RULES = {
    "M": (lambda v: _number(v) and v > 0, "a cell side in metres > 0"),
    "head": (lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
    "s": (_number, "a number"),
    "m": (_number, "a number"),
    "dim": (_positive_int, "a positive integer"),
    "classes_per_group": (lambda v: isinstance(v, list) and len(v) > 0 and sum(v) > 0 and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v),
        "a list of class counts, one per group"),
    "features": (lambda v: isinstance(v, dict) and _positive_int(v.get("dim")),
                 "an object with the training features' `dim` and backbone"),
}
PROGRESS_RULES = {
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "epochs_done": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an epoch count"),
    "epochs": (_positive_int, "the epochs asked for"),
}


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise _damaged(path, f"not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise _damaged(path, "not a JSON object")
    rules = {**CONFIG_RULES, **(PROGRESS_RULES if "complete" in config else {})}
    if config.get("finetune_blocks"):
        rules["finetune_blocks"] = (_positive_int, "the number of tuned blocks")
    if "test_prototypes" in config:  # runs before the presets score with normalised prototypes
        rules["test_prototypes"] = (lambda v: v in TEST_PROTOTYPES, f"one of {', '.join(TEST_PROTOTYPES)}")
    bad = [f"`{k}` {'missing' if k not in config else f'is {config[k]!r}'} (expected {what})"
           for k, (ok, what) in rules.items() if not ok(config.get(k))]
    if bad:
        raise _damaged(path, "; ".join(bad))
    return config


def read_progress(directory: Path, config: dict) -> tuple[bool, int | None]:
    """(complete, epochs done). Runs written before config.json recorded it: count the log's epochs."""
    if "complete" in config:
        return config["complete"], config["epochs_done"]
    log = directory / LOG_FILE
    done = len(log.read_text().splitlines()) if log.is_file() else config.get("epochs")
    epochs = config.get("epochs")
    return done is None or epochs is None or done >= epochs, done


def read_classes(directory: Path, config: dict) -> pl.DataFrame:
    path = directory / CLASSES_FILE
    try:
        classes = load_classes(path)
    except (ValueError, OSError, pl.exceptions.PolarsError) as e:
        raise _damaged(path, f"cannot be read as the run's class table ({_first_line(e)})") from None
    if classes.height == 0:
        raise _damaged(path, "holds no classes")
    expected = config["classes_per_group"]
    group = classes["group"].to_numpy()
    counts = np.bincount(group, minlength=len(expected)).tolist() if group.min() >= 0 else None
    if counts != expected:
        raise DamagedRun(f"{path} holds {counts if counts else 'negative group numbers, not'} classes per group "
                         f"but {directory / CONFIG_FILE} says classes_per_group {expected}: one of the two files "
                         f"was edited or damaged. {_fix(directory)}")
    return classes


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(path, f"cannot be read as safetensors ({_first_line(e)})") from None


def read_model(directory: Path, config: dict) -> DCModel:
    path = directory / MODEL_FILE
    state = _read_tensors(path)
    model = DCModel(config["features"]["dim"], config["dim"], config["classes_per_group"], head=config["head"],
                    s=config["s"], m=config["m"], easy_margin=bool(config.get("easy_margin")),
                    test_prototypes=config.get("test_prototypes", "normalised"))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    wrong = ([f"{k} missing" for k in want if k not in have] + [f"unexpected {k}" for k in have if k not in want]
             + [f"{k} is {have[k]}, config.json needs {want[k]}" for k in want if k in have and have[k] != want[k]])
    if wrong:
        raise _damaged(path, f"does not hold the model {CONFIG_FILE} describes ({'; '.join(wrong[:3])})")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise _damaged(path, "holds non-finite weights (NaN or infinity)")
    model.load_state_dict(state)
    return model


def read_blocks(directory: Path, blocks: int) -> dict[str, torch.Tensor]:
    """The tuned blocks' state; whether it fits the backbone is checked where it is loaded into one."""
    path = directory / BLOCKS_FILE
    if not path.is_file():
        raise DamagedRun(f"{directory}: {BLOCKS_FILE} missing, and {CONFIG_FILE} says the run tunes the last "
                         f"{blocks} backbone blocks. {_fix(directory)}")
    state = _read_tensors(path)
    tuned = {k.split(".")[1] for k in state if k.startswith("tuned.")}
    stray = [k for k in state if not k.startswith(("tuned.", "layernorm."))]
    if stray or tuned != {str(i) for i in range(blocks)} or not any(k.startswith("layernorm.") for k in state):
        found = f"blocks {sorted(tuned)}" + (f", unexpected {stray[0]}" if stray else "")
        raise _damaged(path, f"does not hold the last {blocks} tuned blocks and the layer norm that {CONFIG_FILE} "
                             f"says the run tunes ({found})")
    return state


def read_calibration(directory: Path) -> Calibrator | None:
    """The run's fitted confidence (`dcfeat calibrate`, or `train --val-split`); None when it has none."""
    path = directory / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return Calibrator.from_dict(json.loads(path.read_text()))
    except ValueError as e:  # not JSON, not UTF-8, or not a calibrator
        raise DamagedRun(f"{path}: not a calibration dcfeat wrote ({_first_line(e)}). The run folder was edited "
                         f"or damaged. Fit it again with `dcfeat calibrate --run {directory} --split val`, or "
                         "delete the file to use the run uncalibrated") from None
