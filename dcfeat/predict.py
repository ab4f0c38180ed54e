"""`dcfeat predict`: new images (or cached features) → top-k cells → lat/lon.

Images go through the same backbone, pooling and crop as the run's training
features (checked by the weights' fingerprint), then the run's classifier.
Output is Parquet, CSV or GeoJSON, by the file's extension.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
import utm

from dcfeat.labels import find_images
from dcfeat.model import Run, check_features
from dcfeat.store import StoreError, replace_atomically

FORMATS = (".parquet", ".csv", ".geojson")


def embed_images(paths: list[Path], backbone, image_size: int, *, batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Backbone features of image files; (features of the readable ones, [(index, reason)] of the rest)."""
    from dcfeat.images import ImageDataset, collate
    from dcfeat.progress import progress_bar

    loader = torch.utils.data.DataLoader(ImageDataset(paths, image_size), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate)
    feats, kept, failed = [], [], []
    with progress_bar("embed", len(paths), enabled=progress) as advance:
        for indices, batch, bad in loader:
            if batch is not None:
                feats.append(backbone.embed(batch).cpu().numpy())
                kept.extend(indices)
            failed.extend(bad)
            advance(len(indices) + len(bad))
    dim = backbone.dim
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), kept, failed


def cell_probabilities(run: Run, features: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Top-k class ids and their softmax probabilities over every class of every group."""
    scale = run.config["s"] if run.config["head"] != "softmax" else 1.0
    return run.model.topk(features, k, device=device, softmax_scale=scale)


def to_latlon(east: np.ndarray, north: np.ndarray, zone: np.ndarray, letter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lat, lon = np.empty_like(east), np.empty_like(east)
    keys = np.char.add(zone.astype(str), letter.astype(str))
    for key in np.unique(keys):
        sel = keys == key
        la, lo = utm.to_latlon(east[sel], north[sel], int(zone[sel][0]), str(letter[sel][0]), strict=False)
        lat[sel], lon[sel] = la, lo
    return lat, lon


def predictions(run: Run, image_ids: list[str], features: np.ndarray, k: int, device: str = "cpu") -> pl.DataFrame:
    """Long table: one row per image and rank with the cell, its probability, UTM and lat/lon."""
    ids, probs = cell_probabilities(run, features, k, device)
    n, kk = ids.shape
    flat = ids.reshape(-1)
    c = run.classes
    east, north = c["cell_east"].to_numpy()[flat], c["cell_north"].to_numpy()[flat]
    zone, letter = c["utm_zone"].to_numpy()[flat], c["utm_letter"].to_numpy()[flat]
    lat, lon = to_latlon(east, north, zone, letter) if n else (east, north)
    return pl.DataFrame({
        "image_id": np.repeat(np.asarray(image_ids, dtype=object), kk), "rank": np.tile(np.arange(1, kk + 1), n),
        "class": flat.astype(np.int64), "group": c["group"].to_numpy()[flat], "probability": probs.reshape(-1),
        "cell_east": east, "cell_north": north, "utm_zone": zone, "utm_letter": letter, "lat": lat, "lon": lon})


def write_predictions(frame: pl.DataFrame, out: Path, *, random_backbone: bool) -> Path:
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise StoreError(f"--out {out}: choose a .parquet, .csv or .geojson file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp")
    if suffix == ".parquet":
        frame.write_parquet(tmp)
    elif suffix == ".csv":
        frame.write_csv(tmp)
    else:
        features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
                     "properties": {k: v for k, v in r.items() if k not in ("lat", "lon")}}
                    for r in frame.iter_rows(named=True)]
        doc = {"type": "FeatureCollection", "features": features}
        if random_backbone:
            doc["dcfeat_notice"] = "RANDOM BACKBONE: these predictions measure the pipeline, not DINOv2"
        tmp.write_text(json.dumps(doc))
    replace_atomically(tmp, out)
    return out


def predict_images(run: Run, images: Path | None, manifest: Path | None, *, model: str | None, k: int,
                   batch_size: int, workers: int, device: str, progress: bool) -> tuple[pl.DataFrame, list]:
    """Embed image files with the run's backbone and classify them."""
    from dcfeat.backbone import load_backbone

    feats_attrs = run.features
    if manifest is not None:
        frame = pl.read_parquet(manifest) if Path(manifest).suffix == ".parquet" else pl.read_csv(manifest)
        if "path" not in frame.columns:
            raise StoreError(f"--manifest {manifest}: needs a `path` column")
        root = Path(images) if images else Path(manifest).parent
        ids = frame["path"].cast(pl.String).to_list()
    elif images is not None:
        root, ids = Path(images), find_images(images)
        if not ids:
            raise StoreError(f"--images {images}: no image files found")
    else:
        raise StoreError("pass --images DIR, --manifest FILE, or --feats STORE --split SPLIT")
    source = model or feats_attrs.get("model_source") or feats_attrs.get("model")
    backbone = load_backbone(source, pooling=feats_attrs["pooling"], device=device)
    check_features(feats_attrs, {"model_fingerprint": backbone.fingerprint, "pooling": backbone.pooling,
                                 "dim": backbone.dim}, what=f"backbone '{source}'")
    if run.config.get("finetune_blocks"):
        from dcfeat.finetune import use_tuned_blocks

        use_tuned_blocks(backbone, run)
    feats, kept, failed = embed_images([root / i for i in ids], backbone, int(feats_attrs["image_size"]),
                                       batch_size=batch_size, workers=workers, progress=progress)
    frame = predictions(run, [ids[i] for i in kept], feats, k, str(backbone.device))
    return frame, [(ids[i], reason) for i, reason in failed]


def predict_cached(run: Run, feats: Path, split: str, *, k: int, device: str = "auto") -> pl.DataFrame:
    """Predictions for a cached split (through the run's tuned blocks when it has them)."""
    from dcfeat.backbone import resolve_device
    from dcfeat.store import read_split

    data = read_split(feats, split, dtype="float32")
    check_features(run.features, data.attrs, what=f"split '{split}' of {feats}")
    if run.config.get("finetune_blocks"):
        from dcfeat.finetune import tuned_splits

        [data] = tuned_splits(run, feats, [data], resolve_device(device))
    return predictions(run, data.labels["image_id"].to_list(), data.embeddings, k)
