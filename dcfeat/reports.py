"""Files of `dcfeat evaluate`: report.json, predictions.parquet, PNG plots, the table.

All land in `<run>/eval/<split>/`, each written under a temporary name and
renamed into place. A run whose training stopped early says so in the report
(`run_complete`, `epochs_done`, `run_status`) and under the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from rich.table import Table

from dcfeat.atomic import atomic_write, write_text
from dcfeat.plots import plot_error_cdf, plot_query_map

RANDOM_NOTICE = "RANDOM BACKBONE: these numbers measure the pipeline, not DINOv2"


@dataclass
class Ranking:
    """What one method (classify, retrieve, hybrid) answered: ranked predictions per query, and its time."""

    name: str
    east: np.ndarray  # (n, k); NaN where fewer than k candidates existed
    north: np.ndarray
    zone: np.ndarray
    letter: np.ndarray
    score: np.ndarray
    ref: np.ndarray  # (n, k) class ids (classify) or database rows (retrieve, hybrid); -1 = none
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


def recall_table(report: dict) -> Table:
    ks = report["ks"]
    title = f"split {report['split']}: {report['queries']} queries, LR@k at {report['threshold_m']:g} m"
    if report.get("scoring", "cosine") != "cosine":
        title += f", cells ranked by {report['scoring']}"
    if report.get("database_rows"):
        title += f", database {report['database_split']} ({report['database_rows']:,} rows)"
    notes = [n for n in (report.get("run_status"), RANDOM_NOTICE if report["random_backbone"] else None) if n]
    table = Table(title=title, caption="\n".join(notes) or None)
    table.add_column("method")
    for k in ks:
        table.add_column(f"LR@{k}", justify="right")
    for col in ("median err", "ms/query", "queries/s"):
        table.add_column(col, justify="right")
    for name, m in report["methods"].items():
        label = name if name == "classify" else f"{name} ({m['space']})"
        table.add_row(label, *[f"{100 * m['recall'][str(k)]:.1f}" for k in ks], f"{m['median_error_m']:.1f} m",
                      f"{m['ms_per_query']:.3f}", f"{m['queries_per_s']:,.0f}")
    return table


def confidence_table(report: dict) -> Table:
    """How well each signal (and the calibrated confidence) sorts classification's right answers first."""
    sec = report["confidence"]
    title = (f"confidence of classification's answers: {100 * (sec['right'] or 0):.1f} % right at "
             f"{report['threshold_m']:g} m")
    notes = [sec["note"]] if sec.get("note") else []
    if sec.get("radius_90"):
        notes.append(f"90 % radius: the true position inside it for {100 * sec['radius_90']['inside']:.1f} % of "
                     f"queries (median radius {sec['radius_90']['median_m']:.0f} m)")
    table = Table(title=title, caption="\n".join(notes) or None)
    for col in ("signal", "AUC-PR", "AUROC", "LR@1 50 %", "LR@1 75 %", "LR@1 90 %", "ECE", "Brier"):
        table.add_column(col, justify="left" if col == "signal" else "right")
    fmt = lambda v, pct=False: "—" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")  # noqa: E731
    for name, m in sec["signals"].items():
        cov = m["lr1_at_coverage"]
        table.add_row(name, fmt(m["auc_pr"]), fmt(m["auroc"]), fmt(cov.get("50"), True), fmt(cov.get("75"), True),
                      fmt(cov.get("90"), True), fmt(m["ece"]), fmt(m["brier"]))
    return table
