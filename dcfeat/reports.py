"""Files of `dcfeat evaluate`: report.json, predictions.parquet, the PNG plots.

All land in one folder (`dcfeat evaluate --out`, by default `<run>/eval/<split>/`). They are
written into a temporary folder inside it first (`staged`) and moved into place together, report.json
last: an evaluation that fails (a full disk) leaves the folder as it was, and one that succeeds leaves
only its own files, none of an earlier evaluation's other modes. A run whose training stopped early
says so in the report (`run_complete`, `epochs_done`, `run_status`), and the CLI's table says it too.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dcfeat.atomic import TMP_SUFFIX, atomic_write, fsync_dir, tmp_dir, write_text
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.choices import CENTRE_METHOD, MODES
from dcfeat.locking import waiting
from dcfeat.plots import plot_error_cdf, plot_query_map, plot_reliability, plot_risk_coverage

REPORT, PREDICTIONS = "report.json", "predictions.parquet"
# Every name `dcfeat evaluate` writes: only these are ever replaced or removed in an output folder.
OWN_FILES = (REPORT, PREDICTIONS, "error_cdf.png", "risk_coverage.png", "reliability.png",
             *(f"map_{method}.png" for method in (*MODES, CENTRE_METHOD)))
_STAGING, _LOCK = "dcfeat-evaluate", ".dcfeat-evaluate.lock"


def remove_outputs(folder: Path, keep: set[str] | frozenset = frozenset()) -> None:
    """Remove the files `dcfeat evaluate` writes (OWN_FILES) from `folder`, but those named in `keep`."""
    for name in OWN_FILES:
        if name not in keep:
            (Path(folder) / name).unlink(missing_ok=True)


@contextmanager
def staged(out: Path):
    """Yields an empty temporary folder of this evaluation's own inside `out` for its files. On success
    they replace dcfeat's files in `out` (report.json last, after the old one is gone), and dcfeat's files
    of an earlier evaluation that this one did not write are removed; on any failure the temporary
    folder is removed and `out` keeps what it held (a folder made for it is removed again).

    Evaluations writing into one `out` take turns (a lock file in it, waited for): each one's files
    land whole, and the last one's are what `out` holds, never a report of one beside another's
    predictions. Under that lock no other evaluation is writing there, so staging folders found are
    what killed ones left, and are removed."""
    out = Path(out)
    created = not out.exists()
    try:
        with waiting(out / _LOCK):
            for left in out.glob(f".{_STAGING}*{TMP_SUFFIX}"):  # also the one fixed name of earlier versions
                shutil.rmtree(left, ignore_errors=True)
            staging = tmp_dir(out / _STAGING)
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            new = {p.name for p in staging.iterdir()}
            remove_outputs(out, keep=new - {REPORT})
            for name in sorted(new, key=lambda n: n == REPORT):
                os.replace(staging / name, out / name)
            staging.rmdir()
            fsync_dir(out)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            with suppress(OSError):  # another evaluation has begun writing there
                out.rmdir()


@dataclass
class Ranking:
    """What one method (classify, retrieve, hybrid, adaptive) answered: ranked predictions per query, and its time."""

    name: str
    east: np.ndarray  # (n, k); NaN where fewer than k candidates existed
    north: np.ndarray
    zone: np.ndarray
    letter: np.ndarray
    score: np.ndarray
    ref: np.ndarray  # (n, k) class ids (classify) or database rows (the others); -1 = none
    seconds: float
    extra: dict = field(default_factory=dict)


def predictions_frame(labels: pl.DataFrame, methods: list[Ranking], results: dict) -> pl.DataFrame:
    """One row per query: true UTM, then per method the ranked predictions and top-1 error."""
    cols = {c: labels[c] for c in ("image_id", "utm_east", "utm_north", "utm_zone", "utm_letter")}
    for m in methods:
        ref = "class" if m.name == "classify" else "db_row"
        cols[f"{m.name}_{ref}"] = pl.Series(m.ref.astype(np.int64).tolist(), dtype=pl.List(pl.Int64))
        cols[f"{m.name}_score"] = pl.Series(m.score.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))
        cols[f"{m.name}_east"] = pl.Series(m.east.tolist(), dtype=pl.List(pl.Float64))
        cols[f"{m.name}_north"] = pl.Series(m.north.tolist(), dtype=pl.List(pl.Float64))
        cols[f"{m.name}_zone"] = pl.Series(m.zone.astype(np.int64).tolist(), dtype=pl.List(pl.Int8))
        cols[f"{m.name}_error_m"] = pl.Series(results[m.name].distances_m.tolist(), dtype=pl.List(pl.Float64))
        cols[f"{m.name}_top1_error_m"] = pl.Series(results[m.name].distances_m[:, 0], dtype=pl.Float64)
    return pl.DataFrame(cols)


def recall_from_predictions(frame: pl.DataFrame, method: str, ks: list[int], threshold_m: float) -> dict[str, float]:
    """LR@k recomputed from predictions.parquet alone (the agreement check)."""
    err = np.array(frame[f"{method}_error_m"].to_list(), dtype=np.float64)
    hit = np.nan_to_num(err, nan=np.inf) <= threshold_m
    return {str(k): float(hit[:, :k].any(axis=1).mean()) for k in ks}


def write_outputs(out: Path, report: dict, labels: pl.DataFrame, methods: list[Ranking], results: dict,
                  *, background: tuple[np.ndarray, np.ndarray] | None = None,
                  extra_files: dict[str, Path] | None = None) -> tuple[dict, dict[str, Path]]:

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    frame = predictions_frame(labels, methods, results)
    with atomic_write(out / "predictions.parquet") as tmp:
        frame.write_parquet(tmp)
    paths["predictions"] = out / "predictions.parquet"
    notice = f" — {RANDOM_NOTICE}" if report["random_backbone"] else ""
    paths["error_cdf"] = plot_error_cdf({m: r.distances_m[:, 0] for m, r in results.items()}, out / "error_cdf.png",
                                        threshold_m=report["threshold_m"],
                                        title=f"Top-1 error, split {report['split']}{notice}")
    east, north = labels["utm_east"].to_numpy(), labels["utm_north"].to_numpy()
    for m in methods:
        paths[f"map_{m.name}"] = plot_query_map(
            east, north, results[m.name].correct[:, 0], m.east[:, 0], m.north[:, 0], out / f"map_{m.name}.png",
            title=f"{m.name}: queries of '{report['split']}' correct (green) / wrong (red) at "
                  f"{report['threshold_m']:g} m{notice}", background=background)
    paths.update(extra_files or {})
    report = {**report, "files": {k: p.name for k, p in paths.items()}}
    write_text(out / "report.json", json.dumps(report, indent=1))
    paths["report"] = out / "report.json"
    return report, paths


def write_confidence_plots(out: Path, plots: dict, *, split: str, notice: str = "") -> dict[str, Path]:
    """risk_coverage.png and reliability.png in `out`."""
    what = "calibrated confidence" if plots["best"] == "confidence" else "softmax probability (UNCALIBRATED)"
    return {
        "risk_coverage": plot_risk_coverage(plots["curves"], Path(out) / "risk_coverage.png",
                                            title=f"LR@1 of the most confident queries, split {split}{notice}"),
        "reliability": plot_reliability(plots["bins"], Path(out) / "reliability.png", ece=plots["ece"],
                                        title=f"Reliability of the {what}, split {split}{notice}"),
    }
