"""Image labels: what a label is, and its sources (a manifest, SF-XL style `@`-separated file names, EXIF GPS).

Every image gets the label columns of the feature store (DESIGN.md, "Labels"):
utm_east, utm_north, utm_zone, utm_letter, lat, lon, heading. lat/lon → UTM is
done zone-correctly per point: the `utm` package takes the zone of the first
element of an array, so points are grouped by their own zone and the zone is
forced. Labels are checked (`check_labels`) before anything is written, so a
NaN or an impossible zone is refused naming the file to fix, not met later; the
store's reader checks the label files of a store written by another program the
same way.

Where sources disagree, the first that gives a position wins, image by image: a
manifest row, then the file's SF-XL name, then its EXIF GPS (GPSLatitude and
GPSLongitude with their refs, as phones write them; read from the header, no
pixels decoded). A manifest row or a name is what a dataset was curated with; EXIF
is whatever the camera's receiver said. The heading comes with the position's
source (EXIF: GPSImgDirection), or from the manifest where it gives one. EXIF that
is missing or malformed (a zero denominator, minutes past 60, a latitude past 90°,
a ref that is not N/S or E/W, 0°, 0°, a receiver without a fix) gives no position
and a reason for that image, never an exception.
"""

from __future__ import annotations

import math
import os
import posixpath
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import utm
from PIL import Image

from dcfeat.errors import BadInput, first_line
from dcfeat.geo import UTM_LETTERS

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
UTM_COLUMNS = ("utm_east", "utm_north", "utm_zone", "utm_letter")
LABEL_RULES = (f"utm_east in (0, 1,000,000) and utm_north in [0, 10,000,000] metres, utm_zone an integer 1..60, "
               f"utm_letter one of {UTM_LETTERS}, lat in [-90, 90], lon in [-180, 180], heading a finite number; "
               "empty UTM fields need lat within [-80, 84] and lon to derive them from")


def _label_faults() -> dict[str, pl.Expr]:
    """Per rule, True where a row breaks it; null (a value not given) counts as no fault."""
    east, north, lat, lon = pl.col("utm_east"), pl.col("utm_north"), pl.col("lat"), pl.col("lon")
    zone = pl.col("utm_zone").cast(pl.Float64)
    derivable = lat.is_between(-80, 84) & lon.is_not_null()  # the latitudes UTM covers (utm.from_latlon)
    return {
        "utm_east": ~(east.is_finite() & (east > 0) & (east < 1_000_000)),
        "utm_north": ~(north.is_finite() & north.is_between(0, 10_000_000)),
        "utm_zone": ~(zone.is_finite() & (zone.round() == zone) & zone.is_between(1, 60)),
        "utm_letter": ~pl.col("utm_letter").str.to_uppercase().is_in(list(UTM_LETTERS)),
        "lat": ~(lat.is_finite() & lat.is_between(-90, 90)),
        "lon": ~(lon.is_finite() & lon.is_between(-180, 180)),
        "heading": ~pl.col("heading").is_finite(),
        "position": pl.any_horizontal(pl.col(UTM_COLUMNS).is_null()) & ~derivable.fill_null(False),
    }


def _describe_fault(row: dict, faults: list[str]) -> str:
    return f"{row['image_id']}: " + ", ".join(
        f"{k}={row[k]!r}" if k != "position" else "empty UTM fields and no lat/lon to derive them from"
        for k in faults if row[f"_bad_{k}"])


def check_labels(frame: pl.DataFrame, source: str) -> None:
    """Refuse impossible labels (NaN, infinities, a zone 10.5 or letter Z, lat 95…) with BadInput
    naming `source`, the first bad rows and the rule, before anything is written."""
    frame = frame.with_columns(pl.lit(None, LABEL_SCHEMA[c]).alias(c)
                               for c in ("lat", "lon", "heading") if c not in frame.columns)
    faults = _label_faults()
    marked = frame.with_columns(rule.fill_null(False).alias(f"_bad_{k}") for k, rule in faults.items())
    bad = marked.filter(pl.any_horizontal(pl.col(f"_bad_{k}") for k in faults))
    if bad.height:
        shown = "\n  ".join(_describe_fault(row, list(faults)) for row in bad.head(5).iter_rows(named=True))
        raise BadInput(f"{source}: {bad.height} of {frame.height} rows have impossible labels, first:\n  {shown}\n"
                       f"Each needs {LABEL_RULES}. Correct or remove them.")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Image files dcfeat does not read (animations, formats PIL needs plugins for): listed as skipped, not ignored.
UNREAD_SUFFIXES = (".gif", ".heic", ".heif", ".avif", ".jp2", ".jxl", ".svg", ".raw", ".dng")

SFXL_PATTERN = (
    "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude"
    "@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg"
)
SFXL_EXAMPLE = "@0544388.51@4172758.25@10@S@037.70098@-122.49646@kPnABhWJ1kA61eMNPLs1vQ@@210@@@@201606@@.jpg"

# a relative path that posixpath.normpath would change: ./ or ../ parts, //, a trailing /
_UNNORMALISED = r"(?:^|/)\.{1,2}(?:/|$)|//|^/|/$"


@dataclass(frozen=True)
class LabelledImages:
    """Images (sorted by id) with their labels; `root / image_id` is the file."""

    root: Path
    labels: pl.DataFrame  # LABEL_SCHEMA columns, sorted by image_id, ids unique
    positions: bool = True  # False: photos whose positions are unknown, every position column null

    def __len__(self) -> int:
        return self.labels.height

    @property
    def paths(self) -> list[Path]:
        return [self.root / i for i in self.labels["image_id"].to_list()]


def find_images(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Image ids (paths relative to root, '/' separators) found recursively, sorted; files ending in
    one of `suffixes` (UNREAD_SUFFIXES: the image files dcfeat skips, to list them).

    Links to directories are followed, but each real directory is listed once, and
    under its own path where it lies in the tree: the real tree is walked before any
    link, since a link back up the tree repeats its images and two never end.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"--images {root}: no such directory")
    found: list[str] = []
    walked: set[tuple[int, int]] = set()  # (st_dev, st_ino) of each directory listed
    tops = [root]
    while tops:
        for dirpath, dirnames, filenames in os.walk(tops.pop(0)):  # does not descend into links
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in walked:
                dirnames.clear()
                continue
            walked.add((st.st_dev, st.st_ino))
            dirnames.sort()
            tops += [Path(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            rel = Path(dirpath).relative_to(root)
            found += [(rel / name).as_posix() for name in filenames
                      if name.lower().endswith(suffixes) and not name.startswith(".")]
    found.sort()
    check_utf8_names(root, found)
    return found


def unread_files(images: Path | None) -> list[tuple[str, str]]:
    """(image id, reason) of the image files under `images` (a folder, or one file: its path as given) that
    dcfeat does not read (a .gif, …)."""
    images = Path(images) if images is not None else None
    if images is not None and images.is_file():
        found = [images.as_posix()] if images.suffix.lower() in UNREAD_SUFFIXES else []
    else:
        found = find_images(images, UNREAD_SUFFIXES) if images is not None and images.is_dir() else []
    return [(i, f"{Path(i).suffix.lower()} files are not read by dcfeat; convert it to one of "
                f"{', '.join(IMAGE_SUFFIXES)}") for i in found]


def _shown_name(name: str) -> str:
    """A file name as its bytes, undecodable ones escaped (\\xe9), printable on any terminal."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def check_utf8_names(root: Path, ids: list[str]) -> None:
    """Refuse, naming them and the fix, image paths that are not valid UTF-8 (a Latin-1 `café` from an old
    camera or archive): a store id, a label and every output file are UTF-8, and such a name has no
    faithful spelling there. Checked before anything is read or written."""
    bad = [i for i in ids if not i.isascii() and _undecodable(i)]
    if not _undecodable(str(root)) and not bad:
        return
    where = f"--images {_shown_name(str(root))}"
    if not bad:
        raise BadInput(f"{where}: the folder's path is not valid UTF-8 (undecodable bytes shown as \\xNN). Rename it "
                       "to a UTF-8 name (e.g. `convmv -f latin1 -t utf-8 --notest`), or move the images elsewhere")
    shown = "\n  ".join(_shown_name(i) for i in bad[:5])
    raise BadInput(f"{where}: {len(bad)} image paths are not valid UTF-8 (undecodable bytes shown as \\xNN), "
                   f"first:\n  {shown}\nImage ids are stored as UTF-8: rename these files (and folders) to UTF-8 "
                   f"names, e.g. `convmv -f latin1 -t utf-8 -r --notest {_shown_name(str(root))}`, or move them out")


def _undecodable(name: str) -> bool:
    """True for a name os.fsdecode() made of bytes that are not UTF-8 (they became lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _float_field(parts: pl.Expr, index: int) -> pl.Expr:
    return parts.list.get(index, null_on_oob=True).replace("", None).cast(pl.Float64, strict=False)


def _name_fields(image_ids: list[str]) -> pl.DataFrame:
    """The label fields SF-XL names carry, unchecked (the zone still a float: 10.5 must not truncate to 10),
    and `_carries`: whether a name gives a position (east and north, and zone and letter or lat and lon)."""
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
    return frame.with_columns(_carries=(
        pl.col("_at") & pl.col("utm_east").is_not_null() & pl.col("utm_north").is_not_null()
        & ((pl.col("utm_zone").is_not_null() & pl.col("utm_letter").is_not_null())
           | (pl.col("lat").is_not_null() & pl.col("lon").is_not_null())))).drop("_at")


NOT_A_NAME = "not an SF-XL name"


def refuse_unplaced(unplaced: list[tuple[str, str]], total: int, source: str) -> None:
    """BadInput naming `source`, the first images that carry no position (each with why) and every way to give one."""
    if not unplaced:
        return
    shown = "\n  ".join(f"{i}: {why}" for i, why in unplaced[:5])
    raise BadInput(
        f"{len(unplaced)} of {total} {source} do not carry a position:\n  {shown}\n"
        f"Expected SF-XL style names {SFXL_PATTERN}\n  e.g. {SFXL_EXAMPLE}\n"
        "(UTM east and north required; zone and letter, or lat and lon, needed too), or EXIF GPS in the file "
        "(GPSLatitude/GPSLongitude with their N/S and E/W refs, as phones and cameras write them).\n"
        "For other names pass --manifest FILE.csv|.parquet with a `path` column and "
        "utm_east/utm_north/utm_zone/utm_letter or lat/lon columns."
    )


def parse_sfxl_names(image_ids: list[str], source: str = "image file names") -> pl.DataFrame:
    """Labels from `@`-separated file names; BadInput naming `source` and the first bad files."""
    frame = _name_fields(image_ids)
    refuse_unplaced([(i, NOT_A_NAME) for i in frame.filter(~pl.col("_carries"))["image_id"].to_list()],
                    frame.height, source)
    frame = frame.drop("_carries")
    check_labels(frame, source)
    return _complete_utm(frame)


# EXIF GPS (the GPSInfo IFD, tag 0x8825) as phones and cameras write it: the tags dcfeat reads.
GPS_IFD = 0x8825
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
GPS_STATUS, GPS_IMG_DIRECTION = 9, 17


class NoExifPosition(ValueError):
    """An image whose EXIF gives no usable position; str(self) says why."""


def _exif_text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").upper()


def _degrees(value, what: str, limit: float) -> float:
    """Degrees of an EXIF GPS angle: degree, minute, second rationals (or fewer: degrees, minutes)."""
    parts = value if isinstance(value, (tuple, list)) else (value,)
    try:
        d = [float(x) for x in parts]
    except (TypeError, ValueError, ZeroDivisionError):
        raise NoExifPosition(f"EXIF {what} {value!r} is not degrees, minutes, seconds") from None
    if not 1 <= len(d) <= 3 or not all(math.isfinite(x) and x >= 0 for x in d) or any(x > 60 for x in d[1:]):
        # a zero denominator reads as NaN
        raise NoExifPosition(f"EXIF {what} {value!r} is not degrees, minutes, seconds (a zero denominator, a "
                             "negative part, or minutes or seconds past 60)")
    degrees = sum(x / 60 ** i for i, x in enumerate(d))
    if degrees > limit:
        raise NoExifPosition(f"EXIF {what} {degrees:g}° is beyond {limit:g}°")
    return degrees


def exif_position(path: Path) -> tuple[float, float, float | None]:
    """(lat, lon, heading or None) from an image file's EXIF GPS, read from its header, no pixels decoded;
    NoExifPosition saying why where it gives none. The heading is GPSImgDirection (true or magnetic
    north, as the camera wrote it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's decompression bomb warning: no pixels are decoded here
            with Image.open(path) as img:
                # A PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixels:
                # only the one before them (where writers put it) is read.
                gps = ({} if img.format == "PNG" and "exif" not in img.info else img.getexif().get_ifd(GPS_IFD))
    except Exception as e:  # noqa: BLE001 - EXIF is any bytes a camera or an editor wrote: never a crash
        raise NoExifPosition(f"EXIF not readable ({type(e).__name__}: {e})") from None
    if GPS_LATITUDE not in gps or GPS_LONGITUDE not in gps:
        raise NoExifPosition("no EXIF GPS position")
    if _exif_text(gps.get(GPS_STATUS, "A")) == "V":
        raise NoExifPosition("EXIF GPSStatus V: the receiver had no fix")
    lat_ref, lon_ref = _exif_text(gps.get(GPS_LATITUDE_REF, "")), _exif_text(gps.get(GPS_LONGITUDE_REF, ""))
    if lat_ref not in ("N", "S") or lon_ref not in ("E", "W"):
        raise NoExifPosition(f"EXIF GPSLatitudeRef {lat_ref!r} / GPSLongitudeRef {lon_ref!r}: expected N or S / "
                             "E or W")
    lat = _degrees(gps[GPS_LATITUDE], "GPSLatitude", 90) * (-1 if lat_ref == "S" else 1)
    lon = _degrees(gps[GPS_LONGITUDE], "GPSLongitude", 180) * (-1 if lon_ref == "W" else 1)
    if lat == 0 and lon == 0:
        raise NoExifPosition("EXIF GPS 0°, 0°: what a camera without a fix writes")
    if not -80 <= lat <= 84:
        raise NoExifPosition(f"EXIF GPS latitude {lat:g}° is beyond the latitudes UTM covers (80°S to 84°N)")
    try:
        heading = float(gps[GPS_IMG_DIRECTION]) if GPS_IMG_DIRECTION in gps else None
    except (TypeError, ValueError, ZeroDivisionError):
        heading = None
    heading = heading % 360 if heading is not None and 0 <= heading <= 360 else None
    return lat, lon, heading


POSITION_FIELDS = ("utm_east", "utm_north", "lat", "lon")


def has_position() -> pl.Expr:
    """True where a row of labels gives any position field (it may still break a rule)."""
    return pl.any_horizontal(pl.col(POSITION_FIELDS).is_not_null())


def fill_positions(labels: pl.DataFrame, paths: list[Path], *, source: str,
                   strict: bool = True) -> tuple[pl.DataFrame, list[tuple[str, str]]]:
    """Labels (LABEL_SCHEMA) whose rows that give no position take their file's: its SF-XL name's, else
    its EXIF GPS' (`paths`: the file of each row). Returns them with (image id, why) of each image that
    still has none, its position left null.

    `strict`: names carrying impossible labels are refused (BadInput naming `source`), as for training
    labels; otherwise (`predict`, which only compares) such a name counts as none.
    """
    empty = ~labels.select(has_position()).to_series()
    idx = np.flatnonzero(empty.to_numpy())
    if not len(idx):
        return labels, []
    names = _name_fields(labels["image_id"].gather(idx).to_list())
    if strict:
        check_labels(names.filter("_carries").drop("_carries"), source)
    else:
        faults = _label_faults()
        names = names.with_columns(_carries=pl.col("_carries") & ~pl.any_horizontal(
            r.fill_null(False) for r in faults.values()))
    named = names["_carries"]
    names = names.drop("_carries").with_columns(
        pl.when(pl.lit(named)).then(pl.col(c)).otherwise(None).alias(c) for c in LABEL_SCHEMA if c != "image_id")
    found, unplaced = [], []
    for row in np.flatnonzero(~named.to_numpy()):  # only files without a name label are opened
        try:
            found.append((row, *exif_position(paths[idx[row]])))
        except NoExifPosition as e:
            unplaced.append((names["image_id"][int(row)], f"{NOT_A_NAME}; {e}"))
    if found:
        rows, lat, lon, heading = zip(*found)
        at = pl.Series(rows, dtype=pl.UInt32)
        names = names.with_columns(lat=names["lat"].scatter(at, lat), lon=names["lon"].scatter(at, lon),
                                   heading=names["heading"].scatter(at, pl.Series(heading, dtype=pl.Float32)))
    filled = _complete_utm(names)
    given = labels["heading"].gather(idx)  # a heading the source gave stays
    filled = filled.with_columns(heading=given.zip_with(given.is_not_null(), filled["heading"]))
    return labels.with_row_index("_row").update(filled.with_columns(_row=pl.Series(idx, dtype=pl.UInt32)),
                                                on="_row", include_nulls=True).drop("_row"), unplaced


def _zone_numbers(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.array([utm.latlon_to_zone_number(a, o) for a, o in zip(lat, lon)], dtype=np.int8)


def latlon_to_utm(lat: np.ndarray, lon: np.ndarray) -> pl.DataFrame:
    """UTM east/north/zone/letter of each point in its own zone and hemisphere."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise BadInput("lat/lon contain missing or non-finite values")
    if (lat < -80).any() or (lat > 84).any() or (np.abs(lon) > 180).any():
        raise BadInput("lat must lie in [-80, 84] and lon in [-180, 180] for UTM")
    zone = _zone_numbers(lat, lon)
    northern = lat >= 0  # utm's own rule (band N starts at 0°); its arrays must not mix hemispheres
    east = np.empty_like(lat)
    north = np.empty_like(lat)
    letter = np.empty(lat.shape, dtype=object)
    for z in np.unique(zone):
        for hemisphere in (True, False):
            sel = (zone == z) & (northern == hemisphere)
            if not sel.any():
                continue
            e, n, _, _ = utm.from_latlon(lat[sel], lon[sel], force_zone_number=int(z), force_northern=hemisphere)
            east[sel], north[sel] = e, n
            letter[sel] = [utm.latitude_to_zone_letter(a) for a in lat[sel]]
    return pl.DataFrame(
        {"utm_east": east, "utm_north": north, "utm_zone": zone, "utm_letter": list(letter)},
        schema={k: LABEL_SCHEMA[k] for k in UTM_COLUMNS},
    )


def _complete_utm(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast checked labels to LABEL_SCHEMA and fill the UTM fields the source left empty from lat/lon (rows
    without a position stay empty)."""
    frame = frame.select([pl.col(c).cast(t) for c, t in LABEL_SCHEMA.items()])
    missing = (pl.any_horizontal(pl.col(UTM_COLUMNS).is_null()) & pl.col("lat").is_not_null()
               & pl.col("lon").is_not_null())
    idx = np.flatnonzero(frame.select(missing).to_series().to_numpy())
    if len(idx):
        derived = latlon_to_utm(frame["lat"].to_numpy()[idx], frame["lon"].to_numpy()[idx])
        frame = frame.with_columns(
            pl.coalesce(c, pl.Series([None] * frame.height, dtype=LABEL_SCHEMA[c]).scatter(idx, derived[c]))
            for c in UTM_COLUMNS)
    return frame


def _read_table(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise BadInput(f"--manifest {path}: no such file")
    if suffix not in (".csv", ".tsv", ".parquet"):
        raise BadInput(f"--manifest {path}: expected a .csv, .tsv or .parquet file")
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path, glob=False)  # a file name, never a pattern
        # every cell as text: `_numbers` then names a cell that is not a number instead of polars failing
        return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise BadInput(f"--manifest {path}: cannot be read as {suffix[1:]} ({first_line(e)}). Write it as UTF-8 "
                       f"{suffix[1:]} with a header row, or convert it to .parquet") from None


def _numbers(column: pl.Series, where: str) -> pl.Series:
    raw = column.str.strip_chars().replace("", None) if column.dtype == pl.String else column
    try:
        values = raw.cast(pl.Float64, strict=False)
    except pl.exceptions.PolarsError:  # a list or struct column
        raise BadInput(f"{where}: column `{column.name}` holds {column.dtype}, not numbers") from None
    bad = raw.filter(raw.is_not_null() & values.is_null())
    if bad.len():
        raise BadInput(f"{where}: column `{column.name}` has {bad.len()} cells that are not numbers, first: "
                       f"{bad.head(3).to_list()}. Write decimal numbers (leave a cell empty where unknown).")
    return values


def _relative_id(path: str, prefixes: tuple[str, ...] | None) -> str | None:
    """`path` normalised and relative to the images root; None where it lies outside. `prefixes`
    None: no root, an absolute path stays absolute."""
    path = posixpath.normpath(path)
    if path.startswith("/"):
        if prefixes is None:
            return path
        return next((path[len(p):] for p in prefixes if path.startswith(p)), None)
    return None if path == ".." or path.startswith("../") else path


def image_ids(paths: pl.Series, root: Path | None, where: str) -> pl.Series:
    """Image paths (a manifest's, another tool's ids) as store ids: normalised, '/' separators, relative to
    the images root (DESIGN.md, store `ids`); `root` None: absolute paths stay absolute. BadInput naming
    `where` for an empty path, a path outside the root, or a path listed twice."""
    try:
        raw = paths.cast(pl.String).str.replace_all("\\", "/", literal=True).replace("", None)
    except pl.exceptions.PolarsError:
        raise BadInput(f"{where}: column `{paths.name}` holds {paths.dtype}, not image paths") from None
    if raw.null_count():
        rows = (np.flatnonzero(raw.is_null().to_numpy())[:3] + 1).tolist()
        raise BadInput(f"{where}: {raw.null_count()} rows have no `{paths.name}`, first data rows {rows}. "
                       "Give every row the image path.")
    # absolute paths may spell --images with or without its links resolved
    prefixes = None if root is None else tuple({Path(p).as_posix().rstrip("/") + "/"
                                                for p in (os.path.abspath(root), os.path.realpath(root))})
    idx = np.flatnonzero(raw.str.contains(_UNNORMALISED).to_numpy())  # only these can change: fast on clean paths
    fixed = pl.Series([_relative_id(p, prefixes) for p in raw.gather(idx).to_list()], dtype=pl.String)
    outside = raw.gather(idx).filter(fixed.is_null())
    if outside.len():
        folder = f"the images folder {root}" if root is not None else "the folder they are relative to (../)"
        raise BadInput(f"{where}: {outside.len()} paths lie outside {folder}, first: "
                       f"{outside.head(3).to_list()}. Paths must lie under --images (default: the manifest's "
                       "folder): write them relative to it, or pass the --images folder that holds them.")
    ids = (raw.scatter(idx, fixed) if len(idx) else raw).alias("image_id")
    dup = ids.filter(ids.is_duplicated()).unique(maintain_order=True)
    if dup.len():
        raise BadInput(f"{where}: {dup.len()} images are listed more than once (after normalising ./, ../ and //), "
                       f"first: {dup.head(3).to_list()}. List each image once.")
    return ids


def read_manifest(path: Path, *, path_column: str = "path", positions: bool = True,
                  images: Path | None = None) -> pl.DataFrame:
    """Labels (LABEL_SCHEMA) from a CSV, TSV or Parquet manifest with UTM or lat/lon columns.

    Rows that give no position (every position cell empty, or no position columns) keep it empty:
    `collect_images` takes it from the image's name or EXIF GPS. Rows that give one are checked.
    With positions=False only `image_id`, for images without labels (`predict`). Paths
    become ids relative to `images` (default: the manifest's folder).
    """
    path = Path(path)
    where = f"--manifest {path}"
    frame = _read_table(path)
    cols = set(frame.columns)
    if path_column not in cols:
        need = (" and utm_east, utm_north, utm_zone, utm_letter or lat, lon columns (optional: heading; where a row "
                "gives no position, the image's SF-XL name or EXIF GPS is read)" if positions else "")
        raise BadInput(f"{where}: columns {sorted(cols)}; expected a `{path_column}` column (image path "
                       f"relative to --images; another name with --path-column){need}.")
    if frame.height == 0:
        raise BadInput(f"{where}: lists no images. Add one row per image below the header.")
    ids = image_ids(frame[path_column], Path(images) if images is not None else path.parent, where)
    if not positions:
        return ids.to_frame()
    numeric = ("utm_east", "utm_north", "utm_zone", "lat", "lon", "heading")
    out = ids.to_frame().with_columns(
        [_numbers(frame[c], where) if c in cols else pl.lit(None, pl.Float64).alias(c) for c in numeric]
        + [frame["utm_letter"].cast(pl.String).str.strip_chars().str.to_uppercase() if "utm_letter" in cols
           else pl.lit(None, pl.String).alias("utm_letter")])
    given = out.select(has_position()).to_series()
    check_labels(out.filter(given), where)
    return _complete_utm(out)


def unlabelled(ids: list[str]) -> pl.DataFrame:
    """The label columns of images whose positions are unknown: ids only, every position null."""
    return pl.DataFrame({"image_id": ids}, schema={"image_id": pl.String}).with_columns(
        pl.lit(None, t).alias(c) for c, t in LABEL_SCHEMA.items() if c != "image_id").select(list(LABEL_SCHEMA))


def collect_images(images: Path | None, manifest: Path | None = None, *,
                   path_column: str = "path", positions: bool = True) -> LabelledImages:
    """The labelled image list for `extract`: from a manifest's rows, else file names under `images`, else
    (image by image) the files' EXIF GPS; refused naming the images that carry no position.
    `positions=False`: photos whose positions are unknown (a split to predict), any file names."""
    if manifest is not None:
        root = Path(images) if images is not None else Path(manifest).parent
        labels = read_manifest(manifest, path_column=path_column, images=root, positions=positions)
        if not positions:
            labels = unlabelled(labels["image_id"].to_list())
        missing = [i for i in labels["image_id"].to_list() if not (root / i).is_file()]
        if missing:
            shown = "\n  ".join(f"{i} → {os.path.abspath(root / i)}" for i in missing[:3])
            relative_to = (f"--images {images}" if images is not None
                           else f"the manifest's folder {os.path.abspath(root)}, since --images was not given")
            raise BadInput(f"--manifest {manifest}: {len(missing)} of {labels.height} listed images are not files, "
                           f"first (as listed → where looked for):\n  {shown}\nPaths in the manifest are relative to "
                           f"{relative_to}. Pass the --images folder they are relative to, or correct the paths")
        source = f"images of --manifest {manifest}"
    else:
        if images is None:
            raise BadInput("pass --images DIR (SF-XL style file names, or photos with EXIF GPS) or --manifest FILE")
        ids = find_images(images)
        if not ids:
            raise BadInput(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        labels, root = unlabelled(ids), Path(images)
        source = f"image file names under {images}"
    if positions:
        labels, unplaced = fill_positions(labels, [root / i for i in labels["image_id"].to_list()], source=source)
        refuse_unplaced(unplaced, labels.height, source)
    return LabelledImages(root=root, labels=labels.sort("image_id"), positions=positions)
