"""Files of `dcfeat evaluate`: report.json, predictions.parquet, the PNG plots, the qualitative grids.

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

from dcfeat.atomic import TMP_SUFFIX, atomic_write, fsync_dir, tmp_dir, waiting, write_text
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.choices import CENTRE_METHOD, MODES
from dcfeat.errors import DcfeatError
from dcfeat.geo import Places, metres_between
from dcfeat.images import ImageProblem, load_image
from dcfeat.store import Split, read_split

REPORT, PREDICTIONS = "report.json", "predictions.parquet"
# Every name `dcfeat evaluate` writes: only these are ever replaced or removed in an output folder.
OWN_FILES = (REPORT, PREDICTIONS, "error_cdf.png", "risk_coverage.png", "reliability.png",
             *(f"map_{method}.png" for method in (*MODES, CENTRE_METHOD)),
             *(f"grid_{method}.png" for method in (*MODES, CENTRE_METHOD)))
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
                  extra_files: dict[str, Path] | None = None, plots: bool = True) -> tuple[dict, dict[str, Path]]:
    """predictions.parquet, with `plots` error_cdf.png and map_METHOD.png per method, then report.json listing
    them and `extra_files` under "files". Returns (the report, every path written)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    frame = predictions_frame(labels, methods, results)
    with atomic_write(out / "predictions.parquet") as tmp:
        frame.write_parquet(tmp)
    paths["predictions"] = out / "predictions.parquet"
    if plots:
        paths.update(_overview_plots(out, report, labels, methods, results, background))
    paths.update(extra_files or {})
    report = {**report, "files": {k: p.name for k, p in paths.items()}}
    write_text(out / "report.json", json.dumps(report, indent=1))
    paths["report"] = out / "report.json"
    return report, paths


def _overview_plots(out: Path, report: dict, labels: pl.DataFrame, methods: list[Ranking], results: dict,
                    background: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Path]:
    """error_cdf.png of every method, map_METHOD.png of each."""
    from dcfeat.plots import plot_error_cdf, plot_query_map  # matplotlib: only where a figure is drawn

    paths = {}
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
    return paths


def write_confidence_plots(out: Path, plots: dict, *, split: str, notice: str = "") -> dict[str, Path]:
    """risk_coverage.png and reliability.png in `out`."""
    from dcfeat.plots import plot_reliability, plot_risk_coverage

    what = "calibrated confidence" if plots["best"] == "confidence" else "softmax probability (UNCALIBRATED)"
    return {
        "risk_coverage": plot_risk_coverage(plots["curves"], Path(out) / "risk_coverage.png",
                                            title=f"LR@1 of the most confident queries, split {split}{notice}"),
        "reliability": plot_reliability(plots["bins"], Path(out) / "reliability.png", ece=plots["ece"],
                                        title=f"Reliability of the {what}, split {split}{notice}"),
    }


# `evaluate --grid`: each query beside this many answers, as thumbnails of this many pixels (the centre crop).
GRID_ANSWERS, GRID_THUMB_PX = 4, 112


def grid_queries(n: int, rows: int) -> np.ndarray:
    """The queries a grid of `rows` shows: spread evenly over the split, the first and the last included."""
    return np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(np.int64)) if n and rows else np.zeros(0, int)


def nearest_photos(photos: pl.DataFrame, east: np.ndarray, north: np.ndarray, zone: np.ndarray,
                   letter: np.ndarray) -> np.ndarray:
    """Row of `photos` (labels) nearest to each position (across UTM zones); -1 where a position is missing."""
    rows = np.full(east.shape, -1, dtype=np.int64)
    if photos.height == 0:
        return rows
    p = Places(*(photos[c].to_numpy()[None] for c in ("utm_east", "utm_north", "utm_zone", "utm_letter")))
    for i in zip(*np.nonzero(np.isfinite(east) & np.isfinite(north))):  # one position at a time: memory of one row
        d = metres_between(Places(*(np.reshape(np.asarray(c)[i], 1) for c in (east, north, zone, letter))), p)
        rows[i] = int(np.argmin(d[0]))
    return rows


def training_photos(store: str | None, split: str | None) -> Split | None:
    """A run's training split (labels only), whose photos illustrate classification's answers where no database
    split is given; None where its store is gone."""
    if not store or not split or not Path(store).is_file():
        return None
    try:
        return read_split(Path(store), split, embeddings=False)
    except DcfeatError:
        return None


def images_folder(split: Split) -> Path | None:
    """Where `dcfeat extract` read the split's images (its `images_root`); None when that folder is gone."""
    root = split.attrs.get("images_root")
    return Path(root) if root and Path(root).is_dir() else None


def _gone(split: Split) -> str:
    return (f"--grid: the images of split '{split.name}' are not in {split.attrs.get('images_root')} (the folder "
            "`dcfeat extract` read them from); put them back there to draw the grids")


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        return load_image(path, GRID_THUMB_PX)
    except ImageProblem:
        return None


def write_grids(out: Path, queries: Split, methods: list[Ranking], results: dict, *, rows: int, threshold_m: float,
                database: Split | None, photos: Split | None, notice: str = "") -> tuple[dict[str, Path], list[str]]:
    """grid_METHOD.png per method: `rows` queries, each beside its top GRID_ANSWERS answers' photos, titled with
    the rank and the answer's distance to the truth, green within `threshold_m`, red beyond. A retrieval answer
    shows the database photo it retrieved; a classification answer the photo of `photos` (the database, or
    the run's training split) nearest to it. Images are read from each split's `images_root`; where a folder
    is gone, the grids that need it are skipped, with a warning naming it. Returns (paths, warnings)."""
    from dcfeat.plots import Tile, plot_grid

    query_root = images_folder(queries)
    if query_root is None:
        return {}, [_gone(queries) + ", no grid drawn"]
    picked = grid_queries(len(queries.labels), rows)
    query_ids = queries.labels["image_id"].to_list()
    paths, warnings = {}, []
    for m in methods:
        source = photos if m.name in ("classify", CENTRE_METHOD) else database
        if source is None:
            warnings.append(f"--grid: no photos to show for {m.name}'s answers: pass --database-split, or keep the "
                            "run's training store where it was trained")
            continue
        root = images_folder(source)
        if root is None:
            warnings.append(_gone(source) + f", no grid of {m.name}")
            continue
        shown = min(GRID_ANSWERS, m.east.shape[1])
        if source is photos:
            at = np.s_[picked, :shown]
            refs = nearest_photos(source.labels, m.east[at], m.north[at], m.zone[at], m.letter[at])
        else:
            refs = m.ref[picked, :shown]
        ids = source.labels["image_id"].to_list()
        grid = []
        for q, answer_rows in zip(picked, refs):
            tiles = [Tile(_thumbnail(query_root / query_ids[q]), f"query {q}", missing="unreadable")]
            for rank, row in enumerate(answer_rows):
                d = float(results[m.name].distances_m[q, rank])
                label = f"#{rank + 1}  {d:.0f} m" if np.isfinite(d) else f"#{rank + 1}  none"
                tiles.append(Tile(_thumbnail(root / ids[row]) if row >= 0 else None, label,
                                  right=bool(d <= threshold_m), missing="unreadable" if row >= 0 else "no answer"))
            grid.append(tiles)
        title = (f"{m.name}: queries of '{queries.name}' and their top {shown} answers' photos (from "
                 f"'{source.name}'), green within {threshold_m:g} m{notice}")
        paths[f"grid_{m.name}"] = plot_grid(grid, Path(out) / f"grid_{m.name}.png", title=title)
    return paths, warnings
