"""A run folder (DESIGN.md, "Runs"): its files, its typed config, and creating, saving, loading and checking it.

A run folder holds everything needed to evaluate or predict without the
training store: `model.safetensors` (projection + every group's prototypes in
one state dict), `config.json` (`RunConfig`), `classes.parquet`, `calibration.json`
when the confidence is fitted, and `blocks.safetensors` when the run tunes the
last backbone blocks. No pickles.

`config.json` also says how far training got: `complete`, `epochs_done` of
`epochs`. Training rewrites it after every epoch, so a run stopped half way
is recognised as such (`Run.status_line`) instead of passing for a finished one.
config.json and calibration.json carry their `format` (CONFIG_FORMAT, CALIBRATION_FORMAT): a newer one is
refused (upgrade dcfeat), a file without one is read as format 1, and a layout of an older dcfeat (`OlderLayout`,
NEWER_KEYS) is refused naming the command that writes the file anew.
`load_run` checks every file against the others, values as well as types (a cell centre
that is not its cell's, a zone past 60, a pooling no backbone has), and refuses a damaged run
with one `DamagedRun` naming the file, the field and the fix. Every file dcfeat writes here also
gets its SHA-256 in `checksums.json` (config.json cannot hold its own), which
`dcfeat info RUN --verify` compares.

The run folder sits in the model layer: loading one rebuilds the model (dcfeat.model), its class
table (dcfeat.partition) and its confidence (dcfeat.confidence). Its training lifecycle (the lock,
resuming, clearing, `runs/latest`) is dcfeat.resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dcfeat.atomic import (
    CHECKSUM_FILE,
    RECORDS_LOCK,
    atomic_write,
    read_checksums,
    record_checksum,
    sha256_of,
    waiting,
    write_text,
)
from dcfeat.choices import HEADS, TEST_PROTOTYPES
from dcfeat.confidence import CALIBRATION_FORMAT, Calibrator
from dcfeat.database import CellDatabase
from dcfeat.errors import BadInput, DamagedRun, OlderLayout, check_format, first_line, is_not_writable, writing
from dcfeat.geo import UTM_LETTERS
from dcfeat.identity import IDENTITY_ATTRS, FeatureIdentity, feature_problems, weights_fingerprint
from dcfeat.model import DCModel
from dcfeat.partition import cell_centre, class_keys, group_of, load_classes, save_classes
from dcfeat.presets import TrainConfig

MODEL_FILE, CONFIG_FILE, CLASSES_FILE = "model.safetensors", "config.json", "classes.parquet"
# The last epoch's weights, where training kept another epoch's (D&C's script reports the last model).
LAST_FILE = "model_last.safetensors"
BLOCKS_FILE, CALIBRATION_FILE = "blocks.safetensors", "calibration.json"
RUN_FILES = (CONFIG_FILE, CLASSES_FILE, MODEL_FILE)
COMMAND_FILE, LOG_FILE = "command.txt", "train_log.jsonl"
# Which splits (by plan id) `dcfeat evaluate` measured this run's model on, wherever its --out pointed: the
# splits calibrate must not fit the confidence on.
EVALUATIONS_FILE = "evaluations.json"
# The files whose SHA-256 CHECKSUM_FILE keeps as dcfeat last wrote them (`dcfeat info RUN --verify` compares them).
CHECKSUMMED = (CONFIG_FILE, CLASSES_FILE, MODEL_FILE, BLOCKS_FILE, CALIBRATION_FILE)
# Where `dcfeat evaluate` writes by default: RUN/eval/<split>/.
EVAL_DIR = "eval"


def _train_again(directory: Path) -> str:
    command = Path(directory) / COMMAND_FILE
    return f"the command in {command}" if command.is_file() else "`dcfeat train`"


def _fix(directory: Path) -> str:
    return f"Restore the file from a copy of the run, or train the run again with {_train_again(directory)}"


def _damaged(path: Path, problem: str) -> DamagedRun:
    return DamagedRun(f"{path}: {problem}. The run folder was edited or damaged. {_fix(path.parent)}")


def _older(path: Path, what: str) -> DamagedRun:
    return DamagedRun(f"{path}: written by an older dcfeat ({what}), a layout this one no longer reads. Train the "
                      f"run again with {_train_again(path.parent)}")


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


def _positive(v) -> bool:
    return _number(v) and v > 0




# config.json's format: a file without `format` is read as this one. Another dcfeat's newer format is refused.
CONFIG_FORMAT = 1
# config.json key → (check, what it must be); what load_run and the stages read.
CONFIG_RULES = {
    "M": (_positive, "a cell side in metres > 0"),
    "N": (_positive_int, "the groups' side, a positive integer"),
    "head": (lambda v: v in tuple(HEADS), f"one of {', '.join(HEADS)}"),
    "s": (_positive, "the logit scale, a number > 0"),
    "m": (lambda v: _number(v) and 0 <= v <= 1.5, "the margin, a number from 0 to 1.5"),
    "dim": (_positive_int, "a positive integer"),
    "classes_per_group": (lambda v: isinstance(v, list) and len(v) > 0 and sum(v) > 0 and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v),
        "a list of class counts, one per group"),
    "features": (lambda v: isinstance(v, dict), "an object with the training features' `dim` and backbone"),
    "threshold_m": (_positive, "metres > 0"),
    "test_prototypes": (lambda v: v in tuple(TEST_PROTOTYPES), f"one of {', '.join(TEST_PROTOTYPES)}"),
    "easy_margin": (lambda v: isinstance(v, bool), "true or false"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "epochs_done": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an epoch count"),
    "epochs": (_positive_int, "the epochs asked for"),
}
# Keys an older dcfeat's config.json lacks (it counted finished epochs in the log, and had no presets):
# such a run is refused, to be trained again.
NEWER_KEYS = ("complete", "epochs_done", "threshold_m", "test_prototypes", "easy_margin")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
_COUNT = (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), "a count, or null")


def _reading(v) -> bool:
    return v is None or (isinstance(v, dict) and all(_positive_int(v.get(k)) for k in ("chunk_rows", "buffer_chunks")))


@dataclass(frozen=True)
class RunDetails:
    """What config.json keeps for the record only (no stage reads it back to train or answer): where and how
    training ran. `extra`: keys of the flat object this dcfeat does not know, kept as they were."""

    device: str | None = None
    memory_budget: int | None = None  # bytes: above it the split was streamed from disk
    classes: int | None = None
    images_used: int | None = None  # training images in a class
    steps_per_epoch: int | None = None
    streamed: dict | None = None  # how the split was streamed (`chunk_rows`, `buffer_chunks`); null: in memory
    tokens: dict | None = None  # how tuned blocks read the cached tokens (dcfeat.finetune)
    extra: dict = field(default_factory=dict)

    # field → (check, what it must be)
    RULES = {
        "device": (lambda v: v is None or isinstance(v, str), "a device name, or null"),
        "memory_budget": _COUNT, "classes": _COUNT, "images_used": _COUNT, "steps_per_epoch": _COUNT,
        "streamed": (_reading, "null, or positive `chunk_rows` and `buffer_chunks`"),
        "tokens": (lambda v: v is None or isinstance(v, dict), "an object, or null"),
    }

    def to_dict(self) -> dict:
        own = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **own}

    @classmethod
    def from_dict(cls, d: dict) -> RunDetails:
        """From the keys of config.json that are neither TrainConfig's nor RunConfig's own; ValueError naming
        the first field that is wrong."""
        for key, (ok, what) in cls.RULES.items():
            if not ok(d.get(key)):
                raise ValueError(f"`{key}` is {d[key]!r} (expected {what})")
        return cls(**{k: d.get(k) for k in cls.RULES}, extra={k: v for k, v in d.items() if k not in cls.RULES})


@dataclass(frozen=True)
class RunConfig:
    """config.json, typed: the training settings, what the features were, the classes, how far training got.

    The file stays one flat JSON object (TrainConfig's fields beside the run's own keys and `details`'),
    with its `format` (CONFIG_FORMAT), so tools that read it as JSON keep working.
    """

    train: TrainConfig
    features: FeatureIdentity  # the training features' identity (dcfeat.identity)
    classes_per_group: list[int]
    complete: bool = False
    epochs_done: int | None = None
    best_epoch: int | None = None
    stopped: str | None = None  # why the schedule ended training early
    store: str | None = None  # the training store, resolved
    train_split: str | None = None
    val_split: str | None = None
    store_fingerprint: str | None = None  # the training split's plan id
    details: RunDetails = field(default_factory=RunDetails)

    @property
    def feature_identity(self) -> FeatureIdentity:
        """What the training features were made with: features a run is applied to must match it."""
        return self.features

    @property
    def random_backbone(self) -> bool:
        return bool(self.features.backbone_random_init)

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("train", "details", "features")}
        return {"format": CONFIG_FORMAT, **self.details.to_dict(), **asdict(self.train), **own,
                "features": self.features.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """From config.json's object (its `format` checked by the reader); ValueError naming the field that
        is wrong (TrainConfig's own checks included)."""
        own = {f.name for f in fields(cls)} - {"train", "details", "features"}
        try:
            train = TrainConfig(**{k: v for k, v in d.items() if k in _TRAIN_FIELDS})
        except (BadInput, TypeError) as e:
            raise ValueError(str(e)) from None
        rest = {k: v for k, v in d.items() if k not in {*own, *_TRAIN_FIELDS, "format", "features"}}
        return cls(train=train, features=FeatureIdentity.from_dict(d.get("features")),
                   **{k: d[k] for k in own if k in d}, details=RunDetails.from_dict(rest))


def _config_object(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise _damaged(path, f"not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise _damaged(path, "not a JSON object")
    check_format(path, config.get("format"), CONFIG_FORMAT, _fix(directory))
    older = [k for k in NEWER_KEYS if k not in config]
    if older:
        raise _older(path, f"no {', '.join(f'`{k}`' for k in older)}")
    rules = dict(CONFIG_RULES)
    if config.get("finetune_blocks"):
        rules["finetune_blocks"] = (_positive_int, "the number of tuned blocks")
    bad = [f"`{k}` {'missing' if k not in config else f'is {config[k]!r}'} (expected {what})"
           for k, (ok, what) in rules.items() if not ok(config.get(k))]
    if not bad and len(config["classes_per_group"]) != config["N"] ** 2:
        bad.append(f"`classes_per_group` holds {len(config['classes_per_group'])} groups but `N` is {config['N']} "
                   f"(N² = {config['N'] ** 2} groups)")
    if isinstance(config.get("features"), dict):
        bad += feature_problems(config["features"])
    if bad:
        raise _damaged(path, "; ".join(bad))
    return config


def read_config(directory: Path) -> RunConfig:
    """The run's config.json, checked, as a RunConfig."""
    config = _config_object(directory)
    try:
        return RunConfig.from_dict(config)
    except OlderLayout as e:
        raise _older(directory / CONFIG_FILE, first_line(e)) from None
    except ValueError as e:
        raise _damaged(directory / CONFIG_FILE, first_line(e)) from None


def read_classes(directory: Path, config: RunConfig) -> pl.DataFrame:
    path = directory / CLASSES_FILE
    try:
        classes = load_classes(path)
    except (ValueError, OSError, pl.exceptions.PolarsError) as e:
        raise _damaged(path, f"cannot be read as the run's class table ({first_line(e)})") from None
    if classes.height == 0:
        raise _damaged(path, "holds no classes")
    expected = config.classes_per_group
    group = classes["group"].to_numpy()
    counts = np.bincount(group, minlength=len(expected)).tolist() if group.min() >= 0 else None
    if counts != expected:
        raise DamagedRun(f"{path} holds {counts if counts else 'negative group numbers, not'} classes per group "
                         f"but {directory / CONFIG_FILE} says classes_per_group {expected}: one of the two files "
                         f"was edited or damaged. {_fix(directory)}")
    wrong = _class_problems(classes, config.train.M, config.train.N)
    if wrong:
        raise _damaged(path, "; ".join(wrong))
    return classes


def _class_problems(classes: pl.DataFrame, M: float, N: int) -> list[str]:
    """Values of the class table that no partition of side M into N² groups gives, column by column."""
    def rows(bad: np.ndarray) -> str:
        first = np.flatnonzero(bad)
        return f"{len(first)} row(s), the first row {int(first[0])}"

    zone, letter = classes["utm_zone"].to_numpy(), classes["utm_letter"].to_numpy().astype(str)
    p, q = classes["p"].to_numpy(), classes["q"].to_numpy()
    east, north = classes["cell_east"].to_numpy(), classes["cell_north"].to_numpy()
    problems = []
    checks = [
        ("utm_zone", (zone < 1) | (zone > 60), "a UTM zone from 1 to 60"),
        ("utm_letter", ~np.isin(letter, list(UTM_LETTERS)), f"a UTM band letter of {UTM_LETTERS}"),
        ("images", classes["images"].to_numpy() < 1, "the class's training images, at least 1"),
        ("group", classes["group"].to_numpy() != group_of(p, q, N), f"(p mod N)·N + (q mod N) with N = {N}"),
    ]
    with np.errstate(invalid="ignore", over="ignore"):
        want_east, want_north = cell_centre(p, q, M)
        for name, index, have, want in (("cell_east", "p", east, want_east), ("cell_north", "q", north, want_north)):
            far = ~np.isfinite(have) | ~(np.abs(have - want) <= 1e-6 * max(M, 1.0))
            checks.append((name, far, f"the cell centre ({index} + 0.5)·M with M = {M:g}"))
    for name, bad, what in checks:
        if bad.any():
            problems.append(f"`{name}` wrong in {rows(bad)} (expected {what})")
    return problems


def new_model(config: RunConfig) -> DCModel:
    """The (untrained) model a run config describes."""
    c = config.train
    return DCModel(config.features.dim, c.dim, config.classes_per_group, head=c.head, s=c.s, m=c.m,
                   easy_margin=c.easy_margin, test_prototypes=c.test_prototypes)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(path, f"cannot be read as safetensors ({first_line(e)})") from None


def read_model(directory: Path, config: RunConfig, weights: str = "kept") -> DCModel:
    """The model of the kept epoch, or with `weights="last"` of the last one (the kept one when they are one)."""
    path = directory / (LAST_FILE if weights == "last" and (directory / LAST_FILE).is_file() else MODEL_FILE)
    state = _read_tensors(path)
    model = new_model(config)
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
    fit = (f"Fit it again with `dcfeat calibrate --run {directory} --split val`, or delete the file to use the run "
           "uncalibrated")
    try:
        found = json.loads(path.read_text())
        check_format(path, found.get("format") if isinstance(found, dict) else None, CALIBRATION_FORMAT, fit)
        return Calibrator.from_dict(found)
    except OlderLayout as e:
        raise DamagedRun(f"{path}: written by an older dcfeat ({first_line(e)}), a layout this one no longer reads. "
                         f"{fit}") from None
    except ValueError as e:  # not JSON, not UTF-8, or not a calibrator
        raise DamagedRun(f"{path}: not a calibration dcfeat wrote ({first_line(e)}). The run folder was edited "
                         f"or damaged. {fit}") from None


@dataclass
class Run:
    """A loaded run: its model (eval mode), typed config, class table, and what else it holds."""

    directory: Path
    model: DCModel
    config: RunConfig
    classes: pl.DataFrame
    blocks: dict[str, torch.Tensor] | None = None  # blocks.safetensors, when the run tunes backbone blocks
    calibration: Calibrator | None = None  # calibration.json: confidence and 90 % radius, when fitted

    @property
    def M(self) -> float:
        return self.config.train.M

    @property
    def complete(self) -> bool:
        return self.config.complete

    @property
    def epochs_done(self) -> int | None:
        return self.config.epochs_done

    @property
    def epochs(self) -> int:
        return self.config.train.epochs

    @property
    def random_backbone(self) -> bool:
        """The run's features came from a randomly initialised backbone: its numbers measure the pipeline."""
        return self.config.random_backbone

    @property
    def feature_identity(self) -> FeatureIdentity:
        return self.config.feature_identity

    @property
    def finetune_blocks(self) -> int:
        return self.config.train.finetune_blocks

    def status_line(self) -> str | None:
        """A warning for a run whose training stopped early (None for a finished run)."""
        if self.complete:
            return None
        return (f"INCOMPLETE RUN: training stopped after epoch {self.epochs_done} of {self.epochs} "
                f"(or is still running); the model kept is from epoch {self.config.best_epoch}. Run the "
                f"command in {Path(self.directory) / COMMAND_FILE} again to resume it")

    def status(self) -> dict:
        """How far training got, for reports and prediction files."""
        return {"run": str(Path(self.directory).resolve()), "run_complete": self.complete,
                "epochs_done": self.epochs_done, "epochs": self.epochs}


def save_model(directory: Path, model: DCModel, classes: pl.DataFrame, epoch: int | None = None,
               state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Write the model's weights (or `state`, weights already copied) recording the epoch they are
    from, and the class table once, each atomically (training rewrites them). Returns the weights
    written: a copy on the CPU, detached from the model."""
    directory = Path(directory)
    if state is None:
        state = cpu_copy(model.state_dict())
    save_tensors(directory / MODEL_FILE, state, {} if epoch is None else {"epoch": str(epoch)})
    if not (directory / CLASSES_FILE).is_file():
        with atomic_write(directory / CLASSES_FILE) as tmp:
            save_classes(classes, tmp)
        record_checksum(directory / CLASSES_FILE)
    return state


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict copied to the CPU, detached (on the CPU `.cpu()` alone would alias the live tensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


# safetensors reports an I/O error in its message only: "... Os { code: 28, kind: StorageFull, ... }".
_OS_CODE = re.compile(r"(?:code: |os error )(\d+)")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors written atomically, with string metadata; a checksummed run file's checksum recorded."""
    path = Path(path)
    with atomic_write(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata or None)
        except SafetensorError as e:  # an OSError in disguise (a full disk): atomic_write words it
            code = _OS_CODE.search(str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), first_line(e), str(tmp)) from None
    if path.name in CHECKSUMMED:
        record_checksum(path)


def verify_checksums(directory: Path) -> list[str]:
    """Compare every run file that exists with the checksum dcfeat recorded when it wrote it (a
    DamagedRun naming the first that differs); the names of the files checked."""
    directory = Path(directory)
    sums = read_checksums(directory)
    path = directory / CHECKSUM_FILE
    if path.is_file() and not sums:
        raise _damaged(path, "not the file names and SHA-256 checksums dcfeat writes")
    checked = []
    for name in CHECKSUMMED:
        path = directory / name
        if name not in sums or not path.is_file():  # runs from before checksums; calibration.json removed
            continue
        if sha256_of(path) != sums[name]:
            raise _damaged(path, f"its SHA-256 differs from the one {CHECKSUM_FILE} recorded when dcfeat wrote it "
                                 "(changed since)")
        checked.append(name)
    return checked


def saved_epoch(path: Path) -> int | None:
    """The epoch a model or blocks file of a run was saved at (None: not recorded, or no such file)."""
    try:
        with safe_open(str(path), "pt") as f:
            epoch = (f.metadata() or {}).get("epoch")
    except (SafetensorError, OSError):
        return None
    return int(epoch) if epoch and epoch.isdigit() else None


def write_config(directory: Path, config: RunConfig) -> None:
    record_checksum(write_text(Path(directory) / CONFIG_FILE, config.to_json()))


def write_calibration(directory: Path, calibration: Calibrator) -> Path:
    path = write_text(Path(directory) / CALIBRATION_FILE, calibration.to_json())
    record_checksum(path)
    return path


def append_log(directory: Path, record: dict) -> None:
    """One epoch's line of train_log.jsonl; a full disk names the run folder (an append's OSError names no file)."""
    with writing(directory), open(Path(directory) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_run(directory: Path, device: torch.device | str = "cpu", *, calibration: bool = True,
             weights: str = "kept") -> Run:
    """The run in `directory`, checked file by file, its model in eval mode on `device`.
    `calibration=False` skips calibration.json (`dcfeat calibrate` replaces it, even a damaged one).
    `weights="last"`: the last epoch's model instead of the kept one (its calibration was fitted for
    the kept one)."""
    directory = Path(directory)
    check_folder(directory)
    config = read_config(directory)
    classes = read_classes(directory, config)
    model = read_model(directory, config, weights).to(device).eval()
    blocks = read_blocks(directory, config.train.finetune_blocks) if config.train.finetune_blocks else None
    return Run(directory=directory, model=model, config=config, classes=classes, blocks=blocks,
               calibration=read_calibration(directory) if calibration else None)


def verified_run(directory: Path) -> tuple[Run, list[str]]:
    """`dcfeat info RUN_DIR --verify`: every file of the run loads and fits, each is the one dcfeat
    wrote (checksums.json), and training finished. The run, and the files whose checksum matched."""
    run = load_run(directory)  # raises DamagedRun naming the file
    checked = verify_checksums(directory)
    if run.status_line():
        raise DamagedRun(f"{directory}: {run.status_line()}")
    return run, checked


def read_evaluations(directory: Path) -> list[dict]:
    """The evaluations `record_evaluation` recorded ([] where none, or the file is unreadable)."""
    try:
        found = json.loads((Path(directory) / EVALUATIONS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []


def record_evaluation(directory: Path, split: str, plan_id: str | None, store: str | None, out: Path) -> None:
    """Add to EVALUATIONS_FILE that the run's model was evaluated on `split` (its plan id, its store)
    with the files in `out`; atomically, under the records lock (evaluations run side by side). Nothing
    where the run folder cannot be written (a read-only copy: calibrate cannot write there either)."""
    entry = {"split": split, "plan_id": plan_id, "store": store, "out": str(Path(out).resolve())}
    try:
        with waiting(Path(directory) / RECORDS_LOCK):
            entries = [e for e in read_evaluations(directory) if e != entry]
            write_text(Path(directory) / EVALUATIONS_FILE, json.dumps([*entries, entry], indent=1) + "\n")
    except OSError as e:  # a run folder nobody can write: nobody can calibrate it there either
        if not is_not_writable(e):
            raise


def database_identity(run: Run, space: str) -> dict:
    """What a database searched with this run must have been built for (dcfeat.database's `built_for`): the
    run's cells (M and every class's cell, in class order: the class ids rows are filed under), its features'
    identity, the space, and in the projected space the projection's weights (the kept epoch's or the last's).
    A copy of the run elsewhere is the same run: no path is part of it."""
    keys = class_keys(run.classes, run.M)
    digest = hashlib.sha256(f"M={run.M!r}\n".encode() + keys.astype("<i8").tobytes()).hexdigest()[:16]
    features = run.feature_identity
    projection = (weights_fingerprint("projection", run.model.projection.state_dict()) if space == "projected"
                  else None)
    return {"classes_digest": digest, "classes": len(run.classes), "M": run.M, "space": space,
            "projection": projection, **{k: features.attrs().get(k) for k in IDENTITY_ATTRS}}


def open_database(path: Path, run: Run, space: str | None) -> CellDatabase:
    """`--database DB`: the database, refused where it was built for another run, projection or space."""
    db = CellDatabase.open(path)
    if space is not None and space != db.space:
        raise BadInput(f"--space {space}: the database {path} holds {db.space} descriptors; leave --space out, or "
                       f"build a database in that space with `dcfeat index --space {space}`")
    db.check_built_for(database_identity(run, db.space),
                       f"Build one for this run with `dcfeat index --run {run.directory} --out NEW_FOLDER`, or pass the "
                       "--run (and --weights) the database was built with (`dcfeat info DB` names it)")
    return db
