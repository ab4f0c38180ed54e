"""`dcfeat calibrate`: fit a run's confidence and 90 % radius on a held-out split (`train --val-split`
does the same at the end of training). Writes `calibration.json` in the run folder, atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcfeat.atomic import write_text
from dcfeat.calibration import (
    DATABASE_SIGNAL,
    SIGNALS,
    Calibrator,
    QuerySignals,
    fit,
    query_signals,
)
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput
from dcfeat.finetune import tuned_splits
from dcfeat.metrics import THRESHOLD_M, distances_m
from dcfeat.model import check_features
from dcfeat.retrieval import topk_cosine
from dcfeat.runfiles import CALIBRATION_FILE
from dcfeat.runs import Run, load_run
from dcfeat.store import Split, read_split


def signals_of(run: Run, features) -> QuerySignals:
    """The confidence signals of the run's classification answers for cached features (n, D)."""
    s = run.config["s"] if run.config["head"] != "softmax" else 1.0
    return query_signals(run.model, features, run.classes, M=run.config["M"], s=s)


def _from_top1_m(run: Run, sig: QuerySignals, east, north, zone, letter) -> np.ndarray:
    """Metres between each query's top-1 cell centre and a point given per query."""
    c, top = run.classes, sig.top_classes[:, 0]
    return distances_m(c["cell_east"].to_numpy()[top], c["cell_north"].to_numpy()[top], c["utm_zone"].to_numpy()[top],
                       east, north, zone, q_letter=c["utm_letter"].to_numpy()[top], p_letter=letter)


def answer_errors_m(run: Run, sig: QuerySignals, split: Split) -> np.ndarray:
    """Metres from each query's top-1 cell centre to where it was taken."""
    lab = split.labels
    return _from_top1_m(run, sig, lab["utm_east"].to_numpy(), lab["utm_north"].to_numpy(), lab["utm_zone"].to_numpy(),
                        lab["utm_letter"].to_numpy())


def disagreement_m(run: Run, sig: QuerySignals, east, north, zone, letter) -> np.ndarray:
    """Metres between each query's top-1 cell centre and another answer (retrieval's top 1); a query
    that other answer left empty counts as far away (1e9 m)."""
    return np.nan_to_num(_from_top1_m(run, sig, east, north, zone, letter), nan=1e9, posinf=1e9)


def retrieval_disagreement_m(run: Run, sig: QuerySignals, queries: Split, database: Split) -> np.ndarray:
    """DATABASE_SIGNAL of `queries`: exact retrieval in the run's space against `database`, top 1."""
    q, db = run.model.embed(queries.embeddings), run.model.embed(database.embeddings)
    rows = topk_cosine(q, db, 1, device=run.model.device)[1][:, 0]
    lab = database.labels
    return disagreement_m(run, sig, lab["utm_east"].to_numpy()[rows], lab["utm_north"].to_numpy()[rows],
                          lab["utm_zone"].to_numpy()[rows], lab["utm_letter"].to_numpy()[rows])


def calibrate(run: Run, split: Split, *, threshold_m: float = THRESHOLD_M, fitted_on: dict | None = None,
              database: Split | None = None) -> Calibrator:
    """Fit the confidence (right = top-1 within `threshold_m`) and the radius on `split`; with a
    `database`, also a second confidence that uses retrieval's agreement (`Calibrator.with_database`)."""
    if len(split.embeddings) == 0:
        raise BadInput(f"split '{split.name}' holds no queries to calibrate on")
    sig = signals_of(run, split.embeddings)
    err = answer_errors_m(run, sig, split)
    fitted_on = {"split": split.name, **(fitted_on or {})}
    try:
        cal = fit(sig.values, err <= threshold_m, sig.base_radius_m, err, threshold_m=threshold_m, fitted_on=fitted_on)
        if database is not None:
            values = {**sig.values, DATABASE_SIGNAL: retrieval_disagreement_m(run, sig, split, database)}
            cal.with_database = fit(values, err <= threshold_m, sig.base_radius_m, err, threshold_m=threshold_m,
                                    signals=(*SIGNALS, DATABASE_SIGNAL),
                                    fitted_on={**fitted_on, "database_split": database.name})
        return cal
    except ValueError as e:
        raise BadInput(f"split '{split.name}': {e}. Calibrate on a larger held-out split") from None


def calibrate_files(feats: Path, run_dir: Path, split: str, *, threshold_m: float = THRESHOLD_M,
                    device: str = "auto", database_split: str | None = None) -> tuple[Calibrator, Path]:
    """Read the run and the held-out split, fit, write RUN/calibration.json; (calibrator, its path)."""
    dev = resolve_device(device)
    run = load_run(run_dir, dev, calibration=False)  # the old calibration, even damaged, is replaced
    if split == run.config.get("train_split") and Path(feats).resolve() == Path(run.config.get("store", "")):
        raise BadInput(f"--split {split} is the run's training split: answers on it are surer than on new photos. "
                       "Calibrate on a held-out split (e.g. val), never on the test split")
    splits = [read_split(feats, name, dtype=np.float32 if name == split else None)
              for name in (split, *([database_split] if database_split else []))]
    for data in splits:
        check_features(run.feature_identity, data.attrs, what=f"split '{data.name}' of {feats}")
    if run.config.get("finetune_blocks"):
        splits = tuned_splits(run, feats, splits, dev)
    cal = calibrate(run, splits[0], threshold_m=threshold_m, fitted_on={"store": str(Path(feats).resolve())},
                    database=splits[1] if database_split else None)
    path = write_text(Path(run_dir) / CALIBRATION_FILE, cal.to_json())
    return cal, path
