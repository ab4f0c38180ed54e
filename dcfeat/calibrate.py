"""`dcfeat calibrate`: fit an existing run's confidence and 90 % radius on a held-out split.

`train --val-split` does the same at the end of training, with the model it holds
(dcfeat.confidence.fit_confidence). Writes `calibration.json` in the run folder, atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcfeat.choices import THRESHOLD_M
from dcfeat.confidence import Calibrator, fit_confidence
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput
from dcfeat.finetune import tuned_splits
from dcfeat.identity import check_features
from dcfeat.run import Run, load_run, write_calibration
from dcfeat.store import Split, read_split


@dataclass
class Calibration:
    """What `dcfeat calibrate` fitted, and (from `calibrate_files`) where it wrote it."""

    calibrator: Calibrator
    path: Path | None = None


def calibrate(run: Run, split: Split, *, threshold_m: float = THRESHOLD_M, fitted_on: dict | None = None,
              database: Split | None = None) -> Calibration:
    """Fit the run's confidence (right = top-1 within `threshold_m`) and radius on `split`; with a
    `database`, also the confidence that uses retrieval's agreement (`Calibrator.with_database`)."""
    return Calibration(fit_confidence(run.model, run.classes, run.M, split, threshold_m=threshold_m,
                                      fitted_on=fitted_on, database=database))


def calibrate_files(feats: Path, run_dir: Path, split: str, *, threshold_m: float = THRESHOLD_M,
                    device: str = "auto", database_split: str | None = None) -> Calibration:
    """Read the run and the held-out split, fit, write RUN/calibration.json."""
    dev = resolve_device(device)
    run = load_run(run_dir, dev, calibration=False)  # the old calibration, even damaged, is replaced
    if split == run.config.train_split and Path(feats).resolve() == Path(run.config.store or ""):
        raise BadInput(f"--split {split} is the run's training split: answers on it are surer than on new photos. "
                       "Calibrate on a held-out split (e.g. val), never on the test split")
    splits = [read_split(feats, name, dtype=np.float32 if name == split else None)
              for name in (split, *([database_split] if database_split else []))]
    for data in splits:
        check_features(run.feature_identity, data.attrs, what=f"split '{data.name}' of {feats}")
    if run.finetune_blocks:
        splits = tuned_splits(run, feats, splits, dev)
    result = calibrate(run, splits[0], threshold_m=threshold_m, fitted_on={"store": str(Path(feats).resolve())},
                       database=splits[1] if database_split else None)
    result.path = write_calibration(run_dir, result.calibrator)
    return result
