"""`dcfeat predict`: new images (or cached features) → top-k cells → lat/lon, with a calibrated confidence.

The files stage around `dcfeat.localizer.Localizer`, which makes every answer: this module
lists the images (image files, folders searched recursively, or a manifest) or reads a cached
split, and writes the table.
Images go through the same backbone, pooling, size and crop (centre or full) as
the run's training features (checked by the weights' fingerprint), then the run's
classifier.

Output is Parquet, CSV or GeoJSON, by the file's extension. Parquet and CSV hold one row
per image and rank; GeoJSON one feature per image (its answer, the top-k in its
properties, optionally its 90 % circle as the geometry). Every row says what made it
in `run_status` (an unfinished run, a random backbone, an uncalibrated run), and which
threshold its confidence means (`threshold_m`); Parquet (key-value metadata `dcfeat`)
and GeoJSON (member `dcfeat`) also name the run.

Two numbers per answer: `probability` ranks the cells (a softmax over every cell's
score; the rank-1 cell can hold most of the mass and still be wrong), `confidence` is
the calibrated probability that the rank-1 answer lies within `threshold_m` of where
the photo was taken (fitted on a held-out split), with `radius_m` the radius that
holds the true position with probability 0.9.

Where the position a photo was taken at is known, `error_m` gives the rank-1 answer's distance
to it: from a manifest's lat/lon or UTM columns, else an SF-XL file name, else the file's EXIF
GPS (a phone photo's), else a cached split's labels; null where none says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dcfeat.atomic import atomic_write
from dcfeat.choices import THRESHOLD_M
from dcfeat.confidence import calibration_for, scoring_note
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput, check_writable, write_problem
from dcfeat.finetune import tuned_splits
from dcfeat.geo import Places, metres_between, utm_to_latlon
from dcfeat.identity import check_features
from dcfeat.labels import (
    IMAGE_SUFFIXES,
    UNREAD_SUFFIXES,
    UTM_COLUMNS,
    check_utf8_names,
    fill_positions,
    find_images,
    read_manifest,
    unlabelled,
    unread_files,
)
from dcfeat.localizer import IMAGE_COLUMNS, Localizer, abstain, json_value
from dcfeat.run import Run, load_run
from dcfeat.store import read_split

FORMATS = (".parquet", ".csv", ".geojson")
SHOWN_FAILURES = 5  # unreadable images named in the error when none could be read


def check_out(out: Path) -> Path:
    """Refuse an output file that could not be written, before any work is done."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise BadInput(f"--out {out}: choose a .parquet, .csv or .geojson file")
    if out.is_dir():
        raise BadInput(f"--out {out} is a folder; name a file in it, e.g. {out / ('predictions' + out.suffix)}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"--out {out}: {folder} is a file, not a folder. Choose another --out")
    check_writable(folder)  # an unwritable folder: EnvironmentProblem naming it, as every stage's
    return out


def write_predictions(frame: pl.DataFrame, out: Path, *, random_backbone: bool, run: Run | None = None,
                      radius_polygons: bool = False, scoring: str = "cosine") -> Path:
    """The table as Parquet, CSV or GeoJSON (by `out`'s extension), written atomically.
    `radius_polygons`: GeoJSON answers are their 90 % circles (polygons) instead of points. `scoring`: how
    the table's cells were ranked (its answers are calibrated only under the calibration's own)."""
    out = check_out(out)
    meta = {**(run.status() if run is not None else {}), "random_backbone": random_backbone, "scoring": scoring,
            "calibrated": run is not None and calibration_for(run.calibration, scoring) is not None}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as tmp, open(tmp, "wb") as f:
            if out.suffix.lower() == ".parquet":
                frame.write_parquet(f, metadata={"dcfeat": json.dumps(meta)})
            elif out.suffix.lower() == ".csv":
                frame.write_csv(f)
            else:
                doc = geojson(frame, meta, radius_polygons=radius_polygons)
                f.write(json.dumps(doc, allow_nan=False).encode())
    except OSError as e:
        problem = write_problem(out.parent, e)
        if problem is None:
            raise
        raise problem from None
    return out


CIRCLE_VERTICES = 64  # of a 90 % circle drawn as a GeoJSON polygon: within 0.2 % of its radius


def geojson(frame: pl.DataFrame, meta: dict, *, radius_polygons: bool = False) -> dict:
    """One feature per image: the rank-1 answer as a Point (or, with `radius_polygons` and a radius, its
    90 % circle as a Polygon), the image's confidence and the top-k cells in its properties."""
    features = []
    for (image_id,), rows in frame.group_by("image_id", maintain_order=True):
        ranked = rows.sort("rank").to_dicts()
        first = ranked[0]
        point = [json_value(first["lon"]), json_value(first["lat"])]
        geometry = {"type": "Point", "coordinates": point} if None not in point else None
        if radius_polygons and geometry and first.get("radius_m") is not None:
            geometry = {"type": "Polygon", "coordinates": [_circle(first, first["radius_m"])]}
        properties = {c: json_value(first[c]) for c in IMAGE_COLUMNS if c in first}
        properties["top_k"] = [{c: json_value(v) for c, v in r.items() if c not in IMAGE_COLUMNS} for r in ranked]
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    doc = {"type": "FeatureCollection", "features": features, "dcfeat": meta}
    if meta.get("random_backbone"):
        doc["dcfeat_notice"] = "RANDOM BACKBONE: these predictions measure the pipeline, not DINOv2"
    return doc


def _circle(answer: dict, radius_m: float) -> list[list[float]]:
    """[lon, lat] ring of a circle of `radius_m` around an answer, drawn in its UTM zone (closed)."""
    angle = np.linspace(0, 2 * np.pi, CIRCLE_VERTICES + 1)
    angle[-1] = 0.0  # closed exactly: the first and last positions are equal
    east, north = answer["utm_east"], answer["utm_north"]
    lat, lon = utm_to_latlon(east + radius_m * np.cos(angle), north + radius_m * np.sin(angle), answer["utm_zone"],
                             answer["utm_letter"])
    return [[float(a), float(b)] for a, b in zip(lon, lat)]


@dataclass(frozen=True)
class ImageList:
    """The images `predict` was given: each file, its id, and what it knows of where it was taken."""

    paths: list[Path]
    labels: pl.DataFrame  # image_id + LABEL_SCHEMA, in the order of `paths`: a manifest's positions, else null
    where: str  # how the user named them, for messages
    unread: list[tuple[str, str]]  # (image id, reason) of image files dcfeat does not read


def _as_tuple(images: Path | Sequence[Path] | None) -> tuple[Path, ...]:
    if images is None:
        return ()
    return (Path(images),) if isinstance(images, (str, os.PathLike)) else tuple(Path(i) for i in images)


def _named_images(value: Path, prefix: bool) -> tuple[list[str], list[Path], list[tuple[str, str]]]:
    """(ids, files, unread) of one --images value: a folder (searched recursively; with `prefix`, ids start
    with the folder as given, so that several folders never share an id) or one image file (id: as given)."""
    if value.is_dir():
        ids, unread = find_images(value), unread_files(value)
        shown = (lambda i: (value / i).as_posix()) if prefix else (lambda i: i)  # noqa: E731
        return [shown(i) for i in ids], [value / i for i in ids], [(shown(i), why) for i, why in unread]
    if not value.is_file():
        raise BadInput(f"--images {value}: no such file or folder")
    suffix = value.suffix.lower()
    if suffix in UNREAD_SUFFIXES:
        return [], [], unread_files(value)
    if suffix not in IMAGE_SUFFIXES:
        raise BadInput(f"--images {value}: not an image file dcfeat reads ({', '.join(IMAGE_SUFFIXES)}). Pass "
                       "image files or folders of them")
    check_utf8_names(value.parent, [value.name])
    return [value.as_posix()], [value], []


def _image_list(images: Path | Sequence[Path] | None, manifest: Path | None, path_column: str) -> ImageList:
    images = _as_tuple(images)
    if manifest is not None:
        if len(images) > 1:
            raise BadInput(f"--manifest {manifest} takes one --images: the folder its paths are relative to")
        root = images[0] if images else Path(manifest).parent
        labels = read_manifest(manifest, path_column=path_column, images=root)  # positions where it gives them
        return ImageList([root / i for i in labels["image_id"].to_list()], labels, f"--manifest {manifest}", [])
    if not images:
        raise BadInput("pass --images (image files or folders), --manifest FILE, or --feats STORE --split SPLIT")
    ids, paths, unread = [], [], []
    for value in images:
        i, p, u = _named_images(value, prefix=len(images) > 1)
        ids += i
        paths += p
        unread += u
    where = "--images " + " ".join(str(v) for v in images)
    if not ids:
        unread_text = f"; not read: {', '.join(i for i, _ in unread[:SHOWN_FAILURES])}" if unread else ""
        raise BadInput(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) found{unread_text}. Convert images to "
                       "one of these formats")
    return ImageList(paths, unlabelled(ids), where, unread)


def with_errors(frame: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """`error_m` beside each answer: metres from its image's rank-1 position to where the photo was taken,
    across UTM zones (`geo.metres_between`); null where that is unknown. `truth`: LABEL_SCHEMA rows, one
    per image in the order of `frame`'s images (null positions where unknown)."""
    first = frame.filter(pl.col("rank") == 1)
    if first.height != truth.height:
        raise ValueError(f"{truth.height} known positions for {first.height} images")
    errors = np.full(first.height, np.nan)
    known = truth["utm_east"].is_not_null().to_numpy()
    if known.any():
        t, a = truth.filter(known), first.filter(known)
        errors[known] = metres_between(*(Places(*(f[c].to_numpy() for c in UTM_COLUMNS)) for f in (t, a)))
    per_image = frame.height // max(first.height, 1)  # predictions() gives every image the same number of rows
    return frame.with_columns(error_m=pl.Series(np.repeat(errors, per_image)).fill_nan(None))


def error_summary(frame: pl.DataFrame, threshold_m: float = THRESHOLD_M) -> dict | None:
    """Of the images whose position is known: how many, the share whose answer lies within `threshold_m`,
    the median error; None where no position is known."""
    err = frame.filter(pl.col("rank") == 1)["error_m"].drop_nulls().to_numpy() if "error_m" in frame.columns else []
    if not len(err):
        return None
    return {"known": len(err), "threshold_m": threshold_m, "within": float((err <= threshold_m).mean()),
            "median_m": float(np.median(err))}


def predict_images(run: Run, images: Path | Sequence[Path] | None, manifest: Path | None, *, model: str | None,
                   k: int, batch_size: int, workers: int, device: str, progress: bool, path_column: str = "path",
                   scoring: str = "cosine", database=None) -> tuple[pl.DataFrame, list]:
    """Embed image files with the run's backbone and classify them; (table, [(image id, reason)] skipped).
    Where an image's position is known (a manifest's, its SF-XL name's or its EXIF GPS'), `error_m` says how
    far its answer lies from it."""
    localizer = Localizer(run, device=device, model=model, scoring=scoring, database=database)
    localizer.check_images()
    listed = _image_list(images, manifest, path_column)
    ids = listed.labels["image_id"].to_list()
    feats, kept, failed = localizer.embed_files(listed.paths, batch_size=batch_size, workers=workers,
                                                progress=progress)
    skipped = [(ids[i], reason) for i, reason in failed] + listed.unread
    if not kept:
        shown = "\n  ".join(f"{i}: {reason}" for i, reason in skipped[:SHOWN_FAILURES])
        raise BadInput(f"{listed.where}: none of the {len(ids)} images could be read, first:\n  {shown}\n"
                       f"Pass image files ({', '.join(IMAGE_SUFFIXES)}) that open, at least {localizer.image_size}"
                       " pixels on the short side")
    truth, _ = fill_positions(listed.labels[kept], [listed.paths[i] for i in kept], source=listed.where,
                              strict=False)
    return with_errors(localizer.table(feats, [ids[i] for i in kept], k=k), truth), skipped


def predict_cached(run: Run, feats: Path, split: str, *, k: int, device: str = "auto",
                   scoring: str = "cosine", database=None) -> pl.DataFrame:
    """Predictions for a cached split (through the run's tuned blocks when it has them), with `error_m` where
    the split's labels know the position."""

    data = read_split(feats, split, dtype="float32", positions=False)  # unlabelled photos too
    check_features(run.feature_identity, data.attrs, what=f"split '{split}' of {feats}")
    if run.finetune_blocks:
        [data] = tuned_splits(run, feats, [data], resolve_device(device))
    frame = Localizer(run, scoring=scoring, database=database).table(data.embeddings, data.labels["image_id"].to_list(),
                                                                     k=k)
    return with_errors(frame, data.labels)


@dataclass
class Prediction:
    path: Path
    frame: pl.DataFrame  # predictions(): one row per image and rank
    skipped: list[tuple[str, str]]  # (image id, reason) of images that could not be read
    run: Run  # its status_line() says whether training finished
    warnings: list[str] = field(default_factory=list)  # inputs accepted that deserve a word (stderr)

    @property
    def random_backbone(self) -> bool:
        return self.run.random_backbone

    @property
    def errors(self) -> dict | None:
        """`error_summary` of the answers: None where no image's position is known."""
        return error_summary(self.frame)


def predict_files(run_dir: Path, out: Path, *, images: Path | Sequence[Path] | None = None,
                  manifest: Path | None = None, path_column: str = "path", feats: Path | None = None,
                  split: str | None = None, k: int = 5,
                  model: str | None = None, batch_size: int = 64, workers: int | None = None, device: str = "auto",
                  progress: bool = True, scoring: str = "cosine", min_confidence: float | None = None,
                  geojson_radius: bool = False, database: Path | None = None) -> Prediction:
    """`dcfeat predict`: check the options and output, load the run, predict, write `out`. `images`: image
    files and folders (searched recursively), one or several. `database`: a database `dcfeat index` wrote
    for the run: the answers are the fused hybrid's (dcfeat.fusion)."""

    out = check_out(out)
    if feats is not None and not split:
        raise BadInput("--feats needs --split (the cached split to predict)")
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    localizer = Localizer(run, scoring=scoring, database=database)  # the database opened and checked once
    database = localizer.database
    localizer.check_min_confidence(min_confidence)
    skipped, warnings = [], []
    note = scoring_note(run.calibration, scoring)
    if note:
        warnings.append(note)
    if feats is not None:
        if _as_tuple(images) or manifest is not None:
            warnings.append(f"--feats and {'--images' if _as_tuple(images) else '--manifest'} both given: predicting "
                            f"the cached split '{split}' of {feats}; the image files are not read")
        frame = predict_cached(run, feats, split, k=k, device=str(dev), scoring=scoring, database=database)
    else:
        frame, skipped = predict_images(run, images, manifest, model=model, k=k, batch_size=batch_size,
                                        workers=workers, device=str(dev), progress=progress,
                                        path_column=path_column, scoring=scoring, database=database)
    frame = abstain(frame, min_confidence)
    path = write_predictions(frame, out, random_backbone=run.random_backbone, run=run, radius_polygons=geojson_radius,
                             scoring=scoring)
    return Prediction(path=path, frame=frame, skipped=skipped, run=run, warnings=warnings)
