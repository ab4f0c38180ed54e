"""Image labels: SF-XL style `@`-separated file names or a manifest, to UTM.

Every image gets the label columns of the feature store (DESIGN.md, "Labels"):
utm_east, utm_north, utm_zone, utm_letter, lat, lon, heading. lat/lon → UTM is
done zone-correctly per point: the `utm` package takes the zone of the first
element of an array, so points are grouped by their own zone and the zone is
forced.
"""

from __future__ import annotations

from dcfeat.errors import BadInput

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import utm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

SFXL_PATTERN = (
    "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude"
    "@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg"
)
SFXL_EXAMPLE = "@0544388.51@4172758.25@10@S@037.70098@-122.49646@kPnABhWJ1kA61eMNPLs1vQ@@210@@@@201606@@.jpg"

LABEL_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "utm_east": pl.Float64,
    "utm_north": pl.Float64,
    "utm_zone": pl.Int8,
    "utm_letter": pl.String,
    "lat": pl.Float64,
    "lon": pl.Float64,
    "heading": pl.Float32,
}


class LabelError(BadInput):
    """Labels could not be read; the message names the files and the fix."""


@dataclass(frozen=True)
class LabelledImages:
    """Images (sorted by id) with their labels; `root / image_id` is the file."""

    root: Path
    labels: pl.DataFrame  # LABEL_SCHEMA columns, sorted by image_id, ids unique

    def __len__(self) -> int:
        return self.labels.height

    @property
    def paths(self) -> list[Path]:
        return [self.root / i for i in self.labels["image_id"].to_list()]


def find_images(root: Path) -> list[str]:
    """Image ids (paths relative to root, '/' separators) found recursively, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise LabelError(f"--images {root}: no such directory")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                found.append((rel / name).as_posix())
    found.sort()
    return found


def _float_field(parts: pl.Expr, index: int) -> pl.Expr:
    return parts.list.get(index, null_on_oob=True).replace("", None).cast(pl.Float64, strict=False)


def parse_sfxl_names(image_ids: list[str]) -> pl.DataFrame:
    """Labels from `@`-separated file names; LabelError naming the first bad files."""
    frame = pl.DataFrame({"image_id": image_ids}, schema={"image_id": pl.String})
    stem = pl.col("image_id").str.split("/").list.last()
    parts = stem.str.split("@")
    frame = frame.with_columns(
        utm_east=_float_field(parts, 1),
        utm_north=_float_field(parts, 2),
        utm_zone=_float_field(parts, 3),
        utm_letter=parts.list.get(4, null_on_oob=True).replace("", None).str.to_uppercase(),
        lat=_float_field(parts, 5),
        lon=_float_field(parts, 6),
        heading=_float_field(parts, 9).cast(pl.Float32),
        _at=stem.str.starts_with("@"),
    )
    bad = frame.filter(
        ~pl.col("_at")
        | pl.col("utm_east").is_null()
        | pl.col("utm_north").is_null()
        | ((pl.col("utm_zone").is_null() | pl.col("utm_letter").is_null())
           & (pl.col("lat").is_null() | pl.col("lon").is_null()))
    )
    if bad.height:
        shown = "\n  ".join(bad["image_id"].head(5).to_list())
        raise LabelError(
            f"{bad.height} of {frame.height} image file names do not carry a position:\n  {shown}\n"
            f"Expected SF-XL style names {SFXL_PATTERN}\n  e.g. {SFXL_EXAMPLE}\n"
            "(UTM east and north required; zone and letter, or lat and lon, needed too).\n"
            "For other names pass --manifest FILE.csv|.parquet with a `path` column and "
            "utm_east/utm_north/utm_zone/utm_letter or lat/lon columns."
        )
    frame = frame.drop("_at")
    return _complete_utm(frame)


def _zone_numbers(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.array([utm.latlon_to_zone_number(a, o) for a, o in zip(lat, lon)], dtype=np.int8)


def latlon_to_utm(lat: np.ndarray, lon: np.ndarray) -> pl.DataFrame:
    """UTM east/north/zone/letter of each point in its own zone."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise LabelError("lat/lon contain missing or non-finite values")
    if (np.abs(lat) > 84).any() or (np.abs(lon) > 180).any():
        raise LabelError("lat must lie in [-84, 84] and lon in [-180, 180] for UTM")
    zone = _zone_numbers(lat, lon)
    east = np.empty_like(lat)
    north = np.empty_like(lat)
    letter = np.empty(lat.shape, dtype=object)
    for z in np.unique(zone):
        sel = zone == z
        e, n, _, _ = utm.from_latlon(lat[sel], lon[sel], force_zone_number=int(z))
        east[sel], north[sel] = e, n
        letter[sel] = [utm.latitude_to_zone_letter(a) for a in lat[sel]]
    return pl.DataFrame(
        {"utm_east": east, "utm_north": north, "utm_zone": zone, "utm_letter": list(letter)},
        schema={k: LABEL_SCHEMA[k] for k in ("utm_east", "utm_north", "utm_zone", "utm_letter")},
    )


def _complete_utm(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill zone/letter from lat/lon where the source left them empty; cast to LABEL_SCHEMA."""
    missing = frame["utm_zone"].is_null() | frame["utm_letter"].is_null()
    if missing.any():
        sub = frame.filter(missing)
        derived = latlon_to_utm(sub["lat"].to_numpy(), sub["lon"].to_numpy())
        idx = np.flatnonzero(missing.to_numpy())
        zone = frame["utm_zone"].to_numpy().copy()
        letter = frame["utm_letter"].to_list()
        zone[idx] = derived["utm_zone"].to_numpy()
        for i, v in zip(idx, derived["utm_letter"].to_list()):
            letter[i] = v
        frame = frame.with_columns(utm_zone=pl.Series(zone), utm_letter=pl.Series(letter, dtype=pl.String))
    zones = frame["utm_zone"]
    if ((zones < 1) | (zones > 60)).any():
        raise LabelError("UTM zone numbers must lie in 1..60")
    return frame.select([pl.col(c).cast(t) for c, t in LABEL_SCHEMA.items()])


def read_manifest(path: Path, *, path_column: str = "path") -> pl.DataFrame:
    """Labels from a CSV or Parquet manifest with UTM or lat/lon columns."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"--manifest {path}: no such file")
    if path.suffix.lower() == ".parquet":
        frame = pl.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        frame = pl.read_csv(path, separator="\t" if path.suffix.lower() == ".tsv" else ",",
                            infer_schema_length=10000)
    else:
        raise LabelError(f"--manifest {path}: expected a .csv, .tsv or .parquet file")
    cols = set(frame.columns)
    has_utm = {"utm_east", "utm_north", "utm_zone", "utm_letter"} <= cols
    has_latlon = {"lat", "lon"} <= cols
    if path_column not in cols or not (has_utm or has_latlon):
        raise LabelError(
            f"--manifest {path}: columns {sorted(cols)}; expected a `{path_column}` column "
            "(image path relative to --images) and either utm_east, utm_north, utm_zone, "
            "utm_letter or lat, lon (optional: heading)."
        )
    out = frame.select(pl.col(path_column).cast(pl.String).str.replace_all("\\\\", "/").alias("image_id"))
    for c in ("lat", "lon"):
        out = out.with_columns((frame[c].cast(pl.Float64) if c in cols else pl.lit(None, pl.Float64)).alias(c))
    out = out.with_columns(
        heading=frame["heading"].cast(pl.Float32) if "heading" in cols else pl.lit(None, pl.Float32)
    )
    if has_utm:
        out = out.with_columns(
            utm_east=frame["utm_east"].cast(pl.Float64),
            utm_north=frame["utm_north"].cast(pl.Float64),
            utm_zone=frame["utm_zone"].cast(pl.Int64),
            utm_letter=frame["utm_letter"].cast(pl.String).str.to_uppercase(),
        )
    else:
        out = pl.concat([out, latlon_to_utm(out["lat"].to_numpy(), out["lon"].to_numpy())], how="horizontal")
    nulls = out.filter(pl.any_horizontal(pl.col("image_id", "utm_east", "utm_north").is_null()))
    if nulls.height:
        raise LabelError(f"--manifest {path}: {nulls.height} rows lack a path or position, "
                         f"first: {nulls.head(3).to_dicts()}")
    return _complete_utm(out)


def collect_images(images: Path | None, manifest: Path | None = None, *,
                   path_column: str = "path") -> LabelledImages:
    """The labelled image list for `extract`: from file names under `images` or a manifest."""
    if manifest is not None:
        labels = read_manifest(manifest, path_column=path_column)
        root = Path(images) if images is not None else Path(manifest).parent
        missing = [i for i in labels["image_id"].to_list() if not (root / i).is_file()]
        if missing:
            raise LabelError(
                f"--manifest {manifest}: {len(missing)} listed images are not under {root}, first: "
                f"{missing[:3]}. Paths are relative to --images (default: the manifest's folder)."
            )
    else:
        if images is None:
            raise LabelError("pass --images DIR (SF-XL style file names) or --manifest FILE")
        ids = find_images(images)
        if not ids:
            raise LabelError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        labels = parse_sfxl_names(ids)
        root = Path(images)
    dup = labels.filter(pl.col("image_id").is_duplicated())
    if dup.height:
        raise LabelError(f"duplicate image ids: {dup['image_id'].unique().head(3).to_list()}")
    return LabelledImages(root=root, labels=labels.sort("image_id"))
