"""The trained classifier and its run folder (DESIGN.md, "Runs").

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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dcfeat.atomic import atomic_write, tmp_path, write_text
from dcfeat.errors import BadInput, DamagedRun, IncompatibleFeatures
from dcfeat.heads import HEADS, GroupHeads, Projection
from dcfeat.partition import load_classes, save_classes

# What the features a run was trained on must share with the features it is applied to.
FEATURE_KEYS = ("model", "model_fingerprint", "pooling", "image_size", "dim")
MODEL_FILE, CONFIG_FILE, CLASSES_FILE = "model.safetensors", "config.json", "classes.parquet"
BLOCKS_FILE = "blocks.safetensors"
RUN_FILES = (CONFIG_FILE, CLASSES_FILE, MODEL_FILE)
COMMAND_FILE, LOG_FILE = "command.txt", "train_log.jsonl"
# Everything `dcfeat train` writes in a run folder: what a restart into an unfinished run clears.
TRAIN_FILES = (COMMAND_FILE, LOG_FILE, *RUN_FILES, BLOCKS_FILE)


class DCModel(nn.Module):
    """Projection + group heads; scores every class of every group for a batch of features."""

    def __init__(self, in_dim: int, dim: int, classes_per_group: list[int], *, head: str, s: float, m: float):
        super().__init__()
        self.projection = Projection(in_dim, dim)
        self.heads = GroupHeads(classes_per_group, head=head, dim=dim, s=s, m=m)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    @property
    def device(self) -> torch.device:
        return self.projection.linear.weight.device

    @torch.no_grad()
    def topk(self, features: torch.Tensor | np.ndarray, k: int, *, chunk: int = 4096,
             softmax_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Global class ids (rows of classes.parquet) and scores of the top-k classes, best first.

        Scores where the model is: features go to the model's device chunk by chunk. With
        `softmax_scale`, the scores are softmax probabilities of scale × score over every
        class of every group.
        """
        was_training = self.training
        self.eval()
        ids, scores = [], []
        for start in range(0, len(features), chunk):
            rows = features[start:start + chunk]
            x = (rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.asarray(rows))).to(self.device)
            s = self.heads.scores(self.projection(x))
            if softmax_scale is not None:
                s = torch.softmax(softmax_scale * s.float(), dim=1)
            top = s.topk(min(k, s.shape[1]), dim=1)
            ids.append(top.indices.cpu().numpy())
            scores.append(top.values.float().cpu().numpy())
        self.train(was_training)
        if not ids:
            kk = min(k, sum(self.heads.classes_per_group))
            return np.zeros((0, kk), np.int64), np.zeros((0, kk), np.float32)
        return np.concatenate(ids), np.concatenate(scores)


@dataclass
class Run:
    directory: Path
    model: DCModel
    config: dict
    classes: pl.DataFrame
    blocks: dict[str, torch.Tensor] | None = None  # blocks.safetensors, when the run tunes backbone blocks
    complete: bool = True
    epochs_done: int | None = None

    @property
    def features(self) -> dict:
        return self.config["features"]

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


def _fix(directory: Path) -> str:
    command = Path(directory) / COMMAND_FILE
    again = f"the command in {command}" if command.is_file() else "`dcfeat train`"
    return f"Restore the file from a copy of the run, or train the run again with {again}"


def _damaged(path: Path, problem: str) -> DamagedRun:
    return DamagedRun(f"{path}: {problem}. The run folder was edited or damaged. {_fix(path.parent)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_folder(directory: Path) -> None:
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


def _read_config(directory: Path) -> dict:
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
    bad = [f"`{k}` {'missing' if k not in config else f'is {config[k]!r}'} (expected {what})"
           for k, (ok, what) in rules.items() if not ok(config.get(k))]
    if bad:
        raise _damaged(path, "; ".join(bad))
    return config


def _progress(directory: Path, config: dict) -> tuple[bool, int | None]:
    """(complete, epochs done). Runs written before config.json recorded it: count the log's epochs."""
    if "complete" in config:
        return config["complete"], config["epochs_done"]
    log = directory / LOG_FILE
    done = len(log.read_text().splitlines()) if log.is_file() else config.get("epochs")
    epochs = config.get("epochs")
    return done is None or epochs is None or done >= epochs, done


def _read_classes(directory: Path, config: dict) -> pl.DataFrame:
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


def _read_model(directory: Path, config: dict) -> DCModel:
    path = directory / MODEL_FILE
    state = _read_tensors(path)
    model = DCModel(config["features"]["dim"], config["dim"], config["classes_per_group"], head=config["head"],
                    s=config["s"], m=config["m"])
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


def _read_blocks(directory: Path, blocks: int) -> dict[str, torch.Tensor]:
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


def load_run(directory: Path, device: torch.device | str = "cpu") -> Run:
    """The run in `directory`, checked file by file, its model in eval mode on `device`."""
    directory = Path(directory)
    _check_folder(directory)
    config = _read_config(directory)
    complete, epochs_done = _progress(directory, config)
    classes = _read_classes(directory, config)
    model = _read_model(directory, config).to(device).eval()
    blocks = _read_blocks(directory, config["finetune_blocks"]) if config.get("finetune_blocks") else None
    return Run(directory=directory, model=model, config=config, classes=classes, blocks=blocks, complete=complete,
               epochs_done=epochs_done)


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


def check_features(run_features: dict, split_attrs: dict, *, what: str) -> None:
    """Refuse to apply a run to features from another backbone, pooling, size or dim."""
    diff = [f"{k}: run {run_features.get(k)!r} vs {split_attrs.get(k)!r}" for k in FEATURE_KEYS
            if k in run_features and k in split_attrs and run_features[k] != split_attrs[k]]
    if diff:
        raise IncompatibleFeatures(f"{what} was made by another backbone or setting than the run's training "
                                   f"features ({'; '.join(diff)}); extract it with the run's --model/--pooling/"
                                   "--image-size")
