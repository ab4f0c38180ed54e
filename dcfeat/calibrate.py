"""`dcfeat calibrate`: fit an existing run's confidence and 90 % radius on a held-out split.

`train --val-split` does the same at the end of training, with the model it holds
(dcfeat.confidence.fit_confidence). Writes `calibration.json` in the run folder, atomically.

A confidence fitted on the test split makes every figure measured on that split optimistic, so
the split must be held out: never the run's training split (recognised by its identity, the
split's plan id, not by a path a copy of the store changes), and a test split only with
`allow_test_split`: one whose name starts with "test", or one this run was evaluated on (by plan
id, wherever the evaluation wrote its files: the run's `evaluations.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcfeat.choices import THRESHOLD_M
from dcfeat.confidence import Calibrator, few_queries_warning, fit_confidence
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput, check_writable, writing
from dcfeat.finetune import tuned_splits
from dcfeat.identity import check_features
from dcfeat.reports import REPORT
from dcfeat.resume import run_lock
from dcfeat.run import EVAL_DIR, Run, load_run, read_evaluations, write_calibration
from dcfeat.store import Split, read_split, same_plan, split_info


@dataclass
class Calibration:
    """What `dcfeat calibrate` fitted, what deserves a word on stderr, and (from `calibrate_files`)
    where it wrote it."""

    calibrator: Calibrator
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)


def calibrate(run: Run, split: Split, *, threshold_m: float = THRESHOLD_M, store: str | None = None,
              database: Split | None = None) -> Calibration:
    """Fit the run's confidence (right = top-1 within `threshold_m`) and radius on `split`; with a
    `database`, also the confidence that uses retrieval's agreement (`Calibrator.with_database`). `store`: the
    split's store, recorded in the calibration's `fitted_on`."""
    cal = fit_confidence(run.model, run.classes, run.M, split, threshold_m=threshold_m, store=store,
                         database=database)
    unfused = (f"the fused hybrid's answers to the {cal.fitted_on.queries} queries of '{split.name}' against "
               f"'{database.name}' were all right or all wrong, so no confidence of theirs could be fitted: the fused "
               "hybrid answers by its default rule, uncalibrated. Calibrate on a larger held-out split"
               if database is not None and cal.fused is None else None)
    return Calibration(cal, warnings=[w for w in (few_queries_warning(cal), unfused) if w])


def evaluated_on(run_dir: Path, split: str, plan_id: str | None) -> str | None:
    """The report of an evaluation of this run on `split` (the same images: its plan id where both record
    one, else its name): from the run's record of its evaluations (`read_evaluations`,
    wherever their --out pointed), or a report under RUN/eval/ (runs evaluated before that record);
    None when there is none."""
    for entry in read_evaluations(run_dir):
        if same_plan(entry.get("plan_id"), plan_id, entry.get("split") == split):
            return str(Path(str(entry.get("out"))) / REPORT)
    for report_path in sorted((Path(run_dir) / EVAL_DIR).glob("*/report.json")):
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict):
            continue
        recorded = report.get("split_plan_id")
        if same_plan(recorded, plan_id, report.get("split") == split):
            return str(report_path)
    return None


def check_held_out(run: Run, feats: Path, split: str, *, allow_test_split: bool = False) -> None:
    """Refuse to calibrate on the run's training split, or (unless allowed) on a test split."""
    plan_id = split_info(feats, split).attrs.get("plan_id")
    trained = run.config.store_fingerprint
    if same_plan(plan_id, trained, split == run.config.train_split and
                 Path(feats).resolve() == Path(run.config.store or "")):
        raise BadInput(f"--split {split} of {feats} is the run's training split (the same images: plan id "
                       f"{plan_id}): answers on it are surer than on new photos. Calibrate on a held-out split "
                       "(e.g. val), never on the training or the test split")
    if allow_test_split:
        return
    report = evaluated_on(run.directory, split, plan_id)
    if split.startswith("test") or report is not None:
        why = "; ".join((["its name says it is a test split"] if split.startswith("test") else [])
                        + ([f"this run was evaluated on it ({report})"] if report is not None else []))
        raise BadInput(f"--split {split}: {why}. A confidence fitted on the split it is measured on makes every "
                       "figure there optimistic: calibrate on a held-out split (e.g. val), or pass "
                       "--allow-test-split if you mean to")


def calibrate_files(feats: Path, run_dir: Path, split: str, *, threshold_m: float = THRESHOLD_M,
                    device: str = "auto", database_split: str | None = None,
                    allow_test_split: bool = False) -> Calibration:
    """Read the run and the held-out split, fit, write RUN/calibration.json; under the run's lock, so refused
    while the run is trained (it would fit an early epoch's model) or evaluated."""
    with run_lock(run_dir, "calibrate"):
        dev = resolve_device(device)
        run = load_run(run_dir, dev, calibration=False)  # the old calibration, even damaged, is replaced
        check_held_out(run, feats, split, allow_test_split=allow_test_split)
        check_writable(run_dir)
        splits = [read_split(feats, name, dtype=np.float32 if name == split else None)
                  for name in (split, *([database_split] if database_split else []))]
        for data in splits:
            check_features(run.feature_identity, data.attrs, what=f"split '{data.name}' of {feats}")
        if database_split and len(splits[1].embeddings) == 0:
            raise BadInput(f"--database-split {database_split}: split '{database_split}' of {feats} holds no rows, "
                           "so there is nothing to retrieve from. Extract the database images into it, or leave the "
                           "option out")
        if run.finetune_blocks:
            splits = tuned_splits(run, feats, splits, dev)
        result = calibrate(run, splits[0], threshold_m=threshold_m, store=str(Path(feats).resolve()),
                           database=splits[1] if database_split else None)
        with writing(run_dir):
            result.path = write_calibration(run_dir, result.calibrator)
        return result
