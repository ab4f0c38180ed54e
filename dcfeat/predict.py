"""`dcfeat predict`: new images (or cached features) → top-k cells → lat/lon, with a calibrated confidence.

The files stage around `dcfeat.localizer.Localizer`, which makes every answer: this module
lists the images (a folder or a manifest) or reads a cached split, and writes the table.
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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dcfeat.atomic import atomic_write
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput, check_writable, write_problem
from dcfeat.finetune import tuned_splits
from dcfeat.geo import utm_to_latlon
from dcfeat.identity import check_features
from dcfeat.labels import IMAGE_SUFFIXES, find_images, read_manifest, unread_files
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
                      radius_polygons: bool = False) -> Path:
    """The table as Parquet, CSV or GeoJSON (by `out`'s extension), written atomically.
    `radius_polygons`: GeoJSON answers are their 90 % circles (polygons) instead of points."""
    out = check_out(out)
    meta = {**(run.status() if run is not None else {}), "random_backbone": random_backbone,
            "calibrated": run is not None and run.calibration is not None}
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
    east, north = answer.get("utm_east", answer["cell_east"]), answer.get("utm_north", answer["cell_north"])
    lat, lon = utm_to_latlon(east + radius_m * np.cos(angle), north + radius_m * np.sin(angle), answer["utm_zone"],
                             answer["utm_letter"])
    return [[float(a), float(b)] for a, b in zip(lon, lat)]


def _image_list(images: Path | None, manifest: Path | None, path_column: str) -> tuple[Path, list[str], str]:
    """(root, image ids under it, how the user named them)."""
    if manifest is not None:
        root = Path(images) if images is not None else Path(manifest).parent
        ids = read_manifest(manifest, path_column=path_column, positions=False, images=root)
        return root, ids["image_id"].to_list(), f"--manifest {manifest}"
    if images is not None:
        ids = find_images(images)
        if not ids:
            raise BadInput(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        return Path(images), ids, f"--images {images}"
    raise BadInput("pass --images DIR, --manifest FILE, or --feats STORE --split SPLIT")


def predict_images(run: Run, images: Path | None, manifest: Path | None, *, model: str | None, k: int,
                   batch_size: int, workers: int, device: str, progress: bool,
                   path_column: str = "path", scoring: str = "cosine") -> tuple[pl.DataFrame, list]:
    """Embed image files with the run's backbone and classify them; (table, [(image id, reason)] skipped)."""

    localizer = Localizer(run, device=device, model=model, scoring=scoring)
    localizer.check_images()
    root, ids, where = _image_list(images, manifest, path_column)
    feats, kept, failed = localizer.embed_files([root / i for i in ids], batch_size=batch_size, workers=workers,
                                                progress=progress)
    skipped = [(ids[i], reason) for i, reason in failed]
    if not kept:
        shown = "\n  ".join(f"{i}: {reason}" for i, reason in skipped[:SHOWN_FAILURES])
        raise BadInput(f"{where}: none of the {len(ids)} images could be read, first:\n  {shown}\n"
                       f"Pass image files ({', '.join(IMAGE_SUFFIXES)}) that open, at least {localizer.image_size}"
                       " pixels on the short side")
    return localizer.table(feats, [ids[i] for i in kept], k=k), skipped


def predict_cached(run: Run, feats: Path, split: str, *, k: int, device: str = "auto",
                   scoring: str = "cosine") -> pl.DataFrame:
    """Predictions for a cached split (through the run's tuned blocks when it has them)."""

    data = read_split(feats, split, dtype="float32", positions=False)  # unlabelled photos too
    check_features(run.feature_identity, data.attrs, what=f"split '{split}' of {feats}")
    if run.finetune_blocks:
        [data] = tuned_splits(run, feats, [data], resolve_device(device))
    return Localizer(run, scoring=scoring).table(data.embeddings, data.labels["image_id"].to_list(), k=k)


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


def predict_files(run_dir: Path, out: Path, *, images: Path | None = None, manifest: Path | None = None,
                  path_column: str = "path", feats: Path | None = None, split: str | None = None, k: int = 5,
                  model: str | None = None, batch_size: int = 64, workers: int | None = None, device: str = "auto",
                  progress: bool = True, scoring: str = "cosine", min_confidence: float | None = None,
                  geojson_radius: bool = False) -> Prediction:
    """`dcfeat predict`: check the options and output, load the run, predict, write `out`."""

    out = check_out(out)
    if feats is not None and not split:
        raise BadInput("--feats needs --split (the cached split to predict)")
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    Localizer(run).check_min_confidence(min_confidence)
    skipped, warnings = [], []
    if feats is not None:
        if images is not None or manifest is not None:
            warnings.append(f"--feats and {'--images' if images is not None else '--manifest'} both given: predicting "
                            f"the cached split '{split}' of {feats}; the image files are not read")
        frame = predict_cached(run, feats, split, k=k, device=str(dev), scoring=scoring)
    else:
        frame, skipped = predict_images(run, images, manifest, model=model, k=k, batch_size=batch_size,
                                        workers=workers, device=str(dev), progress=progress,
                                        path_column=path_column, scoring=scoring)
        skipped += unread_files(images) if manifest is None else []
    frame = abstain(frame, min_confidence)
    path = write_predictions(frame, out, random_backbone=run.random_backbone, run=run, radius_polygons=geojson_radius)
    return Prediction(path=path, frame=frame, skipped=skipped, run=run, warnings=warnings)
