"""Cells, groups and classes of Divide&Classify: UTM points → cells of side M → N² groups; the class table.

A cell is keyed by (UTM zone, hemisphere, p, q). Keying by the zone keeps a cell
inside one zone (p and q mean nothing across zones); keying by the hemisphere
rather than the latitude-band letter keeps a cell whole where it straddles two
8° bands, because northing runs on continuously across band boundaries.
Everything is vectorised: one argsort over all points, no Python loop over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dcfeat.choices import DEFAULT_M, DEFAULT_N, MIN_IMAGES_PER_CLASS
from dcfeat.database import NewRows
from dcfeat.errors import BadInput
from dcfeat.geo import UTM_LETTERS, Places, is_northern, metres_between

# Bits of p and of q in a cell key: ±2^27 cells reach past 10,000 km at M = 0.1 m.
_CELL_BITS = 28

# Columns of the class table, in order. Row r of the table is global class r:
# rows are sorted by group then index, so global id = offset[group] + index.
CLASS_SCHEMA: dict[str, pl.DataType] = {
    "group": pl.Int64,
    "index": pl.Int64,
    "utm_zone": pl.Int8,
    "utm_letter": pl.String,
    "p": pl.Int64,
    "q": pl.Int64,
    "cell_east": pl.Float64,
    "cell_north": pl.Float64,
    "images": pl.Int64,
}


def cell_of(east: np.ndarray, north: np.ndarray, M: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell indices (p, q) = (floor(e / M), floor(n / M)) as int64."""
    p = np.floor(np.asarray(east, dtype=np.float64) / M).astype(np.int64)
    q = np.floor(np.asarray(north, dtype=np.float64) / M).astype(np.int64)
    return p, q


def cell_centre(p: np.ndarray, q: np.ndarray, M: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre of cell (p, q) in metres: ((p + 0.5) M, (q + 0.5) M) (D&C's Class2UTM)."""
    return (np.asarray(p) + 0.5) * M, (np.asarray(q) + 0.5) * M


def group_of(p: np.ndarray, q: np.ndarray, N: int) -> np.ndarray:
    """Group id (p mod N) · N + (q mod N); numpy's mod keeps negative p, q in 0..N-1."""
    return (np.mod(p, N) * N + np.mod(q, N)).astype(np.int64)


@dataclass(frozen=True)
class Partition:
    """Cells, groups and classes of one training set; per-image arrays follow its rows."""

    M: float
    N: int
    min_images_per_class: int
    group: np.ndarray  # int64 per image: group of its cell, kept or dropped
    class_index: np.ndarray  # int64 per image: index of its class in its group, -1 if dropped
    classes: pl.DataFrame  # CLASS_SCHEMA, one row per class
    cell_images: np.ndarray  # int64: images of every non-empty cell, kept or dropped

    @property
    def num_groups(self) -> int:
        return self.N * self.N

    @property
    def classes_per_group(self) -> list[int]:
        counts = np.bincount(self.classes["group"].to_numpy(), minlength=self.num_groups)
        return [int(c) for c in counts]

    def global_class(self) -> np.ndarray:
        """Per image: row of its class in `classes` (offset[group] + index), -1 if dropped."""
        offsets = np.concatenate([[0], np.cumsum(self.classes_per_group)])
        kept = self.class_index >= 0
        return np.where(kept, offsets[self.group] + self.class_index, -1)

    def cell_stats(self) -> str:
        """One-line histogram of images per cell, to explain why few or no classes survive."""
        counts = self.cell_images
        if counts.size == 0:
            return "no images, hence no cells"
        edges = [1, 2, 5, 10, 20, 50, 100]
        bins = np.histogram(counts, bins=[*edges, max(int(counts.max()), edges[-1]) + 1])[0]
        labels = [f"{lo}-{hi - 1}" if hi - lo > 1 else f"{lo}" for lo, hi in zip(edges, edges[1:])]
        histogram = ", ".join(f"{label}: {b}" for label, b in zip([*labels, f"{edges[-1]}+"], bins) if b)
        return (
            f"{counts.size} non-empty cells of side M={self.M:g} m, images per cell "
            f"min {counts.min()} / median {np.median(counts):g} / max {counts.max()} "
            f"(cells by image count: {histogram}); {len(self.classes)} cells hold at least "
            f"min_images_per_class={self.min_images_per_class} images"
        )


def _letter_codes(letter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-point code, the letters the codes index), in alphabetical order."""
    letters = np.asarray(letter)
    if letters.dtype.kind != "U":
        letters = letters.astype(str)  # object arrays, e.g. polars' to_numpy() of strings
    if letters.dtype.itemsize != 4:
        long = letters[np.char.str_len(letters) != 1][:3]
        raise ValueError(f"utm_letter must be one letter of {UTM_LETTERS!r}, got e.g. {long.tolist()}")
    # A one-character unicode array is its code points; counting them is far
    # cheaper than np.unique over tens of millions of strings.
    points = letters.view(np.uint32)
    present = np.flatnonzero(np.bincount(points, minlength=128))
    found = "".join(map(chr, present))
    if not set(found) <= set(UTM_LETTERS):
        raise ValueError(f"utm_letter must be one of {UTM_LETTERS!r} (upper case), got {found!r}")
    lookup = np.zeros(present.max() + 1, dtype=np.int64)
    lookup[present] = np.arange(present.size)
    return lookup[points], np.array(list(found))


def _pack(band: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """One int64 per (band, p, q), ordered like the triples: band = zone · 2 + northern (2..121)."""
    half = 1 << (_CELL_BITS - 1)
    if p.size and not (-half <= min(p.min(), q.min()) and max(p.max(), q.max()) < half):
        largest = max(abs(int(v)) for v in (p.min(), p.max(), q.min(), q.max()))
        raise BadInput(f"cell indices up to {largest:,}, beyond ±2^{_CELL_BITS - 1}: the cell side is too small for "
                       "these coordinates (or they lie far outside UTM). Raise --M (metres; 0.1 reaches past "
                       "10,000 km)")
    return (band.astype(np.int64) << (2 * _CELL_BITS)) + ((p + half) << _CELL_BITS) + (q + half)


def cell_keys(zone: np.ndarray, letter: np.ndarray, east: np.ndarray, north: np.ndarray, M: float) -> np.ndarray:
    """One int64 per point naming its cell of side M: (zone, hemisphere, p, q), sorted in that order.

    Equal keys are the same cell, so np.isin / searchsorted over keys matches points to cells.
    """
    p, q = cell_of(east, north, M)
    return _pack(np.asarray(zone).astype(np.int64) * 2 + is_northern(letter), p, q)


def partition(
    east: np.ndarray,
    north: np.ndarray,
    zone: np.ndarray,
    letter: np.ndarray,
    *,
    M: float = DEFAULT_M,
    N: int = DEFAULT_N,
    min_images_per_class: int = MIN_IMAGES_PER_CLASS,
) -> Partition:
    """Cells of side M over the images, their N² groups, and the cells kept as classes.

    Classes within a group are ordered by (zone, hemisphere, p, q). A Partition
    with no class is returned, not refused: the caller words the error, and
    `Partition.cell_stats()` says why.
    """
    east, north = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
    zone = np.asarray(zone).astype(np.int64)
    if not (east.shape == north.shape == zone.shape == np.shape(letter)) or east.ndim != 1:
        raise ValueError("east, north, zone and letter must be 1-D arrays of one length")
    if not (M > 0 and N >= 1 and min_images_per_class >= 1):
        raise ValueError(f"need M > 0, N >= 1, min_images_per_class >= 1; got {M=}, {N=}, {min_images_per_class=}")
    if not (np.isfinite(east).all() and np.isfinite(north).all()):
        raise ValueError("utm_east and utm_north must be finite numbers")
    if zone.size and not (zone.min() >= 1 and zone.max() <= 60):
        raise ValueError(f"utm_zone must be in 1..60, got {zone.min()}..{zone.max()}")
    if east.size == 0:
        return Partition(M, N, min_images_per_class, np.zeros(0, np.int64), np.zeros(0, np.int64),
                         pl.DataFrame(schema=CLASS_SCHEMA), np.zeros(0, np.int64))

    codes, letters = _letter_codes(letter)
    band = zone * 2 + is_northern(letters)[codes]  # (zone, hemisphere) as one integer
    p, q = cell_of(east, north, M)
    key = _pack(band, p, q)
    order = np.argsort(key, kind="stable")
    key_s, band_s, p_s, q_s = key[order], band[order], p[order], q[order]
    new = np.concatenate([[True], key_s[1:] != key_s[:-1]])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, east.size))
    cell = np.empty(east.size, dtype=np.int64)
    cell[order] = np.cumsum(new) - 1
    cell_band, cell_p, cell_q = band_s[starts], p_s[starts], q_s[starts]

    # The most frequent letter of each cell; ties go to the earlier letter.
    codes_s = codes[order]
    lo, hi = np.minimum.reduceat(codes_s, starts), np.maximum.reduceat(codes_s, starts)
    cell_code = lo.copy()
    mixed = np.flatnonzero(lo != hi)
    if mixed.size:  # rare: only cells crossing a band boundary get here
        compact = np.full(starts.size, -1)
        compact[mixed] = np.arange(mixed.size)
        point_cell = compact[cell]
        sel = point_cell >= 0
        votes = np.bincount(point_cell[sel] * letters.size + codes[sel], minlength=mixed.size * letters.size)
        cell_code[mixed] = votes.reshape(mixed.size, letters.size).argmax(axis=1)

    cell_group = group_of(cell_p, cell_q, N)
    kept = np.flatnonzero(counts >= min_images_per_class)
    kept = kept[np.argsort(cell_group[kept], kind="stable")]  # by group, then (band, p, q)
    kept_group = cell_group[kept]
    index = np.arange(kept.size) - np.searchsorted(kept_group, kept_group, side="left")
    cell_class = np.full(starts.size, -1, dtype=np.int64)
    cell_class[kept] = index

    cell_east, cell_north = cell_centre(cell_p[kept], cell_q[kept], M)
    classes = pl.DataFrame(
        {
            "group": kept_group,
            "index": index,
            "utm_zone": (cell_band[kept] // 2).astype(np.int8),
            "utm_letter": letters[cell_code[kept]].astype(object),
            "p": cell_p[kept],
            "q": cell_q[kept],
            "cell_east": cell_east,
            "cell_north": cell_north,
            "images": counts[kept].astype(np.int64),
        },
        schema=CLASS_SCHEMA,
    )
    return Partition(M, N, min_images_per_class, cell_group[cell], cell_class[cell], classes, counts.astype(np.int64))


def _checked(df: pl.DataFrame, source: str) -> pl.DataFrame:
    missing = [c for c in CLASS_SCHEMA if c not in df.columns]
    if missing:
        expected = ", ".join(f"{c} ({t})" for c, t in CLASS_SCHEMA.items())
        raise ValueError(f"{source}: class table lacks columns {missing}; expected {expected}")
    try:
        df = df.select(pl.col(c).cast(t, strict=True) for c, t in CLASS_SCHEMA.items())
    except pl.exceptions.InvalidOperationError as err:
        raise ValueError(f"{source}: class table column of the wrong type ({err})") from err
    group, index = df["group"].to_numpy(), df["index"].to_numpy()
    first = np.searchsorted(group, group, side="left")
    if np.any(np.diff(group) < 0) or np.any(index != np.arange(len(df)) - first):
        raise ValueError(f"{source}: class table must be sorted by group with index 0, 1, ... within each group")
    return df


def save_classes(df: pl.DataFrame, path: str | Path) -> None:
    """Write the class table (CLASS_SCHEMA) to Parquet."""
    _checked(df, "class table to save").write_parquet(path)


def load_classes(path: str | Path) -> pl.DataFrame:
    """Read a class table written by `save_classes`, with its dtypes, checked."""
    return _checked(pl.read_parquet(path, glob=False), str(path))  # a file name, never a pattern


def centres_of(classes: pl.DataFrame, ids: np.ndarray) -> Places:
    """The cell centres of class ids (rows of the class table), in the shape of `ids`. The band letters come
    as a unicode array, not polars' objects: `geo` reads a letter's hemisphere off its code point, and
    converting (n, k) objects first was ~1 µs per query and top-20 list each time (a few times per answer)."""
    ids = np.asarray(ids)
    return Places(classes["cell_east"].to_numpy()[ids], classes["cell_north"].to_numpy()[ids],
                  classes["utm_zone"].to_numpy()[ids], classes["utm_letter"].to_numpy().astype(str)[ids])


def places_of(labels: pl.DataFrame, rows: np.ndarray | None = None) -> Places:
    """Where the images of a label table were taken (all rows, or `rows` of it)."""
    cols = [labels[c].to_numpy() for c in ("utm_east", "utm_north", "utm_zone", "utm_letter")]
    return Places(*(c if rows is None else c[rows] for c in cols))


def class_keys(classes: pl.DataFrame, M: float) -> np.ndarray:
    """The cell key (`cell_keys`) of every class of the table."""
    return cell_keys(classes["utm_zone"].to_numpy(), classes["utm_letter"].to_numpy(),
                     classes["cell_east"].to_numpy(), classes["cell_north"].to_numpy(), M)


def label_keys(labels: pl.DataFrame, M: float) -> np.ndarray:
    """The cell key (`cell_keys`) of every image of a label table."""
    return cell_keys(labels["utm_zone"].to_numpy(), labels["utm_letter"].to_numpy(),
                     labels["utm_east"].to_numpy(), labels["utm_north"].to_numpy(), M)



# Rings of cells around a row's own cell searched for the nearest class before all the band's classes are.
_NEAREST_RINGS = 8


def _unpack(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(band, p, q) of cell keys (`_pack`'s inverse)."""
    half, mask = 1 << (_CELL_BITS - 1), (1 << _CELL_BITS) - 1
    return keys >> (2 * _CELL_BITS), ((keys >> _CELL_BITS) & mask) - half, (keys & mask) - half


def _nearest_on_lattice(p: np.ndarray, q: np.ndarray, cp: np.ndarray, cq: np.ndarray) -> np.ndarray:
    """Per cell (p, q): the index into (cp, cq) of the nearest of those cells of one band (squared distance
    in cells, ties to the lower index). The rings around each cell are looked up first (in a city a class is
    a few cells away); what they leave is compared with every cell of the band, a chunk of cells at a time."""
    n_c = len(cp)
    half = 1 << (_CELL_BITS - 1)
    key = lambda a, b: ((a + half) << _CELL_BITS) + (b + half)  # noqa: E731
    order = np.argsort(key(cp, cq))
    sorted_keys = key(cp, cq)[order]
    best = np.full(len(p), np.iinfo(np.int64).max)  # d2 · n_c + index: the lexicographic minimum in one number
    todo = np.arange(len(p))
    for r in range(1, _NEAREST_RINGS + 1):
        side = np.arange(-r, r + 1)
        dp = np.concatenate([side, side, np.full(2 * r - 1, -r), np.full(2 * r - 1, r)])
        dq = np.concatenate([np.full(2 * r + 1, -r), np.full(2 * r + 1, r), side[1:-1], side[1:-1]])
        wanted = key(p[todo, None] + dp, q[todo, None] + dq)
        at = np.searchsorted(sorted_keys, wanted).clip(max=n_c - 1)
        found = np.where(sorted_keys[at] == wanted, (dp * dp + dq * dq) * n_c + order[at], np.iinfo(np.int64).max)
        best[todo] = np.minimum(best[todo], found.min(1))
        todo = todo[best[todo] // n_c >= (r + 1) ** 2]  # a cell of the next ring could still be as near
        if not todo.size:
            break
    for start in range(0, todo.size, max(1, (1 << 22) // n_c)):
        rows = todo[start:start + max(1, (1 << 22) // n_c)]
        d2 = (p[rows, None] - cp) ** 2 + (q[rows, None] - cq) ** 2
        best[rows] = d2.argmin(1) + n_c * d2.min(1)
    return best % n_c


def assign_classes(classes: pl.DataFrame, labels: pl.DataFrame, M: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's class (row of the class table): its own cell's where that cell is a class, else the
    class whose cell centre is nearest to its cell's centre, within the cell's UTM zone and hemisphere where
    that holds a class (ties to the lower class id), across zones (dcfeat.geo) where it holds none. Returns
    (class ids, `outside`: True where the own cell is no class, metres from the own cell's centre to the
    class's centre: 0 inside)."""
    if classes.height == 0:
        raise ValueError("no classes to assign images to")
    keys, ckeys = label_keys(labels, M), class_keys(classes, M)
    order = np.argsort(ckeys, kind="stable")
    at = np.searchsorted(ckeys[order], keys).clip(max=len(ckeys) - 1)
    outside = ckeys[order][at] != keys
    ids = np.where(outside, -1, order[at])
    metres = np.zeros(len(keys))
    if not outside.any():
        return ids, outside, metres
    cells, inverse = np.unique(keys[outside], return_inverse=True)
    band, p, q = _unpack(cells)
    cband, cp, cq = _unpack(ckeys)
    nearest, far = np.empty(len(cells), np.int64), np.empty(len(cells))
    for b in np.unique(band):
        sel, mine = band == b, np.flatnonzero(cband == b)
        if mine.size:
            got = mine[_nearest_on_lattice(p[sel], q[sel], cp[mine], cq[mine])]
            nearest[sel], far[sel] = got, M * np.hypot(p[sel] - cp[got], q[sel] - cq[got])
            continue
        centres = centres_of(classes, np.arange(classes.height))  # no class in this zone: measured across zones
        every = Places(*(np.asarray(c)[None] for c in (centres.east, centres.north, centres.zone, centres.letter)))
        east, north = cell_centre(p, q, M)
        for i in np.flatnonzero(sel):  # rare (a zone without a class): one cell at a time, memory of one row
            here = Places(east[i:i + 1], north[i:i + 1], np.array([b // 2]), np.array([bool(b % 2)]))
            d = metres_between(here, every)[0]
            nearest[i], far[i] = int(np.argmin(d)), float(d.min())
    ids[outside], metres[outside] = nearest[inverse], far[inverse]
    return ids, outside, metres


def filed_rows(classes: pl.DataFrame, M: float, labels: pl.DataFrame, chunks, source: dict | None = None) -> NewRows:
    """A split's rows as a database files them under these classes (`assign_classes`): `labels` a split's
    label table, `chunks` their unit embeddings in row order (dcfeat.database.unit_rows), read as the writer
    asks for them."""
    ids, outside, metres = assign_classes(classes, labels, M)
    return NewRows(ids, outside, labels.select("row", "image_id", "utm_east", "utm_north", "utm_zone", "utm_letter"),
                   chunks, source or {}, float(metres.max()) if len(metres) else 0.0)
