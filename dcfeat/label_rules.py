"""What a label is: the columns every image gets, and the values they may hold.

`check_labels` refuses impossible labels (NaN, infinities, a zone 10.5 or letter Z,
lat 95…) with the rule broken and the first rows that break it, for labels read from
file names or a manifest (dcfeat.labels) and for label files of a store (dcfeat.store).
"""

from __future__ import annotations

import polars as pl

from dcfeat.errors import BadInput
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
