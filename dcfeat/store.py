"""The feature store, format version 1 (DESIGN.md, "Feature store").

`NAME.h5` holds one group per split with `embeddings` (rows, D) and `ids`
(rows,); `NAME.labels/split=<split>/*.parquet` holds one label row per
embedding row. Any program that writes that layout is read here. Extension: a split
may also hold `tokens` (rows, T, hidden) with attributes `cache_tokens` and
`tokens_shape` (`dcfeat extract --cache-tokens`, read by dcfeat.finetune).

dcfeat itself writes crash-safely: work goes into shard files under
`NAME.shards/<split>/<plan>/`, each written to a temporary name and renamed
into place when complete; `NAME.h5` is then rebuilt as HDF5 virtual datasets
over the checked shards, under a temporary name, and renamed over the old
file. A killed writer therefore leaves at worst files no split refers to
(temporary files, an unfinished plan's shards and label part), which the same
command resumes from; existing splits keep pointing at shards nobody touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dcfeat.errors import BadInput, DamagedStore
from dcfeat.identity import with_defaults
from dcfeat.labels import LABEL_SCHEMA, check_labels
from dcfeat.layout import (
    FORMAT_VERSION,
    check_split_name,
    label_part,
    labels_dir,
    shards_dir,
)


def split_attrs(group: h5py.Group) -> dict:
    """A split's HDF5 attributes as plain values, defaults filled in."""
    return with_defaults({k: attr_value(v) for k, v in group.attrs.items()})


def attr_value(value):
    """An HDF5 attribute as a plain Python value (arrays, e.g. `tokens_shape`, as lists)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.ndim:
        return value.tolist()
    return value.item() if hasattr(value, "item") else value


def read_ids(ds: h5py.Dataset, selection=()) -> np.ndarray:
    """Image ids as str, decoded as UTF-8 whatever charset the file declares (older stores said ASCII)."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr(encoding="utf-8")[selection], dtype=object)
    return np.asarray(ds[selection], dtype=object)


LABEL_COLUMNS = {"row": pl.Int64, **LABEL_SCHEMA}


@dataclass
class SplitInfo:
    name: str
    rows: int
    dim: int
    dtype: str
    attrs: dict
    complete: bool
    bytes_on_disk: int
    failures: int
    missing_sources: list[str] = field(default_factory=list)
    labels_rows: int | None = None
    tokens_shape: tuple[int, ...] | None = None  # (rows, T, hidden) of the cached tokens, if any
    token_bytes_per_image: int = 0

    @property
    def cache_tokens(self) -> int:
        """K: the split holds the hidden states entering the last K blocks (0: none)."""
        return int(self.attrs.get("cache_tokens", 0)) if self.tokens_shape else 0

    @property
    def problems(self) -> list[str]:
        out = []
        if self.missing_sources:
            out.append(f"{len(self.missing_sources)} shard files missing, e.g. {self.missing_sources[0]}")
        if self.labels_rows is None:
            out.append("no labels")
        elif self.labels_rows != self.rows:
            out.append(f"{self.labels_rows} label rows for {self.rows} embeddings")
        if not self.complete:
            out.append("incomplete")
        if self.tokens_shape and self.tokens_shape[0] != self.rows:
            out.append(f"{self.tokens_shape[0]} token rows for {self.rows} embeddings")
        return out


@dataclass
class Split:
    name: str
    embeddings: np.ndarray | None  # (rows, dim); None for a split trained from disk
    labels: pl.DataFrame  # LABEL_COLUMNS, row == position
    attrs: dict


def same_plan(plan_a: str | None, plan_b: str | None, otherwise: bool) -> bool:
    """Whether two splits hold the same images: their plan ids (`plan_id`, unique to each extraction)
    where both have one, else `otherwise` (a weaker test such as equal names)."""
    return plan_a == plan_b if plan_a and plan_b else otherwise


def same_split(a: Split, b: Split) -> bool:
    """Whether two splits hold the same images: their plan ids where both have one, else their names."""
    return same_plan(a.attrs.get("plan_id"), b.attrs.get("plan_id"), a.name == b.name)


def open_store(store: Path) -> h5py.File:
    """The store opened for reading, checked to be a dcfeat format-v1 file."""
    store = Path(store)
    if not store.is_file():
        raise BadInput(f"{store}: no such feature store; create it with `dcfeat extract --out {store}`")
    try:
        f = h5py.File(store, "r")
    except OSError as e:
        raise DamagedStore(f"{store}: not a readable HDF5 file ({e}); restore it, or re-run the `dcfeat extract` "
                           "commands that made it (their shards are reused)") from None
    if attr_value(f.attrs.get("dcfeat_format", -1)) != FORMAT_VERSION:
        f.close()
        raise BadInput(f"{store}: root attribute dcfeat_format is not {FORMAT_VERSION}; not a dcfeat store")
    return f


def vds_file_name(path: str) -> str:
    """A source file name as a virtual dataset records it: HDF5 reads `%` as a printf-style specifier
    (`%b`: block number), so a literal one is written `%%` (a store named `50%.h5`)."""
    return path.replace("%", "%%")


def source_files(store: Path, ds: h5py.Dataset) -> list[Path]:
    """The shard files a virtual dataset reads from (none for an ordinary dataset)."""
    if not ds.is_virtual:
        return []
    names = sorted({m.file_name.replace("%%", "%") for m in ds.virtual_sources()} - {"."})
    return [Path(store).parent / n for n in names]


def _source_bytes(store: Path, ds: h5py.Dataset) -> int:
    if not ds.is_virtual:
        return ds.id.get_storage_size()
    return sum(p.stat().st_size for p in source_files(store, ds) if p.is_file())


def label_files(store: Path, split: str, plan_id: str | None = None) -> list[Path]:
    """The split's label files: the part its plan committed, or (stores written by others) every part."""
    part = labels_dir(store) / f"split={split}"
    if plan_id and (part / label_part(plan_id)).is_file():
        return [part / label_part(plan_id)]
    return sorted(p for p in part.glob("*.parquet") if not p.name.startswith("."))


def layout_problem(group: h5py.Group) -> str | None:
    """What keeps a split from being format v1 (stores written by other programs), None when nothing:
    embeddings (rows, D) of floats, ids (rows,), and a `dim` attribute, when given, of D."""
    ds, ids = group["embeddings"], group.get("ids")
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
        return f"embeddings of shape {getattr(ds, 'shape', None)}; they must be 2-D, (rows, D)"
    if ds.dtype.kind != "f":
        return f"embeddings of type {ds.dtype}; they must be float16 or float32"
    if not isinstance(ids, h5py.Dataset) or ids.shape != (ds.shape[0],):
        return (f"ids of shape {getattr(ids, 'shape', None)} for {ds.shape[0]} embedding rows; they must be one "
                "image id per row, shape (rows,)")
    if "dim" in group.attrs and attr_value(group.attrs["dim"]) != ds.shape[1]:
        return f"attribute dim = {attr_value(group.attrs['dim'])!r} but the embeddings have {ds.shape[1]} columns"
    return None


def layout_fix(split: str) -> str:
    return (f"rewrite split '{split}' in format v1 (docs/data.md, \"The feature store\") with the program that made it, "
            f"or re-extract it with `dcfeat extract --split {split} --overwrite`")


def _info(store: Path, name: str, group: h5py.Group) -> SplitInfo:
    problem = layout_problem(group)
    if problem:
        raise DamagedStore(f"{store}: split '{name}' has {problem}. Fix: {layout_fix(name)}")
    ds = group["embeddings"]
    attrs = split_attrs(group)
    files = label_files(store, name, attrs.get("plan_id"))
    fail = group.get("failures/ids")
    tokens = group.get("tokens")
    try:
        labels_rows = pl.scan_parquet(files, glob=False).select(pl.len()).collect().item() if files else None
    except (OSError, pl.exceptions.PolarsError):
        labels_rows = -1
    return SplitInfo(
        name=name, rows=ds.shape[0], dim=ds.shape[1], dtype=str(ds.dtype), attrs=attrs,
        complete=bool(attrs.get("complete", True)),
        bytes_on_disk=_source_bytes(store, ds) + _source_bytes(store, group["ids"])
        + sum(p.stat().st_size for p in files),
        failures=0 if fail is None else fail.shape[0],
        missing_sources=[str(p.relative_to(Path(store).parent)) for p in source_files(store, ds) if not p.is_file()],
        labels_rows=labels_rows,
        tokens_shape=None if tokens is None else tokens.shape,
        token_bytes_per_image=0 if tokens is None else int(np.prod(tokens.shape[1:])) * tokens.dtype.itemsize)


def _is_split(group) -> bool:
    return isinstance(group, h5py.Group) and "embeddings" in group


def list_splits(store: Path) -> list[SplitInfo]:
    """Every split of the store with its size, attributes and any problem found."""
    store = Path(store)
    with open_store(store) as f:
        return [_info(store, name, group) for name, group in f.items() if _is_split(group)]


def split_info(store: Path, split: str) -> SplitInfo:
    """One split's SplitInfo; the other splits' labels and shards are not looked at."""
    store = Path(store)
    check_split_name(split)
    with open_store(store) as f:
        if not _is_split(f.get(split)):
            names = [name for name, group in f.items() if _is_split(group)]
            raise BadInput(f"{store} has no split '{split}' (it has: {', '.join(names) or 'none'}); "
                           f"add it with `dcfeat extract --split {split} --out {store} --images DIR`")
        return _info(store, split, f[split])


def _labels_problem(store: Path, split: str, problem: str) -> DamagedStore:
    return DamagedStore(f"{labels_dir(store) / f'split={split}'}: {problem}. Re-run the `dcfeat extract` command "
                        f"of split '{split}' to rewrite its labels (`dcfeat info --verify {store}` lists every "
                        "problem)")


def read_labels(store: Path, split: str, plan_id: str | None = None, *, positions: bool = True) -> pl.DataFrame:
    """A split's label table, checked (`positions=False`: a split of photos whose positions are unknown,
    extracted with --unlabelled, whose position columns are null)."""
    files = label_files(store, split, plan_id)
    if not files:
        raise _labels_problem(store, split, "no labels")
    try:
        frame = pl.read_parquet(files, hive_partitioning=False, glob=False)  # paths, never patterns
    except (OSError, pl.exceptions.PolarsError) as e:
        raise _labels_problem(store, split, f"unreadable label file ({type(e).__name__}: {e})") from None
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise _labels_problem(store, split, f"labels lack columns {missing}")
    try:
        frame = frame.select([pl.col(c).cast(t) for c, t in LABEL_COLUMNS.items()]).sort("row")
        if positions:
            check_labels(frame, "labels")
    except (pl.exceptions.PolarsError, BadInput) as e:  # written by another program: checked like ours
        raise _labels_problem(store, split, str(e).replace("\n", " ")) from None
    if not np.array_equal(frame["row"].to_numpy(), np.arange(frame.height)):
        raise _labels_problem(store, split, "label rows are not 0..n-1 exactly once")
    return frame


def unreadable_sources(store: Path, split: str) -> list[tuple[Path, str]]:
    """(shard, why) for every shard of the split that is missing or does not open: a quick check.

    A virtual dataset reads a missing or unreadable source as fill values, silently, so every
    reader looks first. `dcfeat info --verify` also checks row counts and checksums.
    """
    with open_store(store) as f:
        sources = source_files(store, f[split]["embeddings"])
    bad = []
    for path in sources:
        if not path.is_file():
            bad.append((path, "missing"))
            continue
        try:
            with h5py.File(path, "r") as shard:
                n = shard["embeddings"].shape[0]
                if n:
                    shard["embeddings"][n - 1]
        except (OSError, KeyError) as e:
            bad.append((path, f"unreadable ({e})"))
    return bad


def damaged_split(store: Path, split: str, bad: list[tuple[Path, str]]) -> DamagedStore:
    shown = "; ".join(f"{p} {why}" for p, why in bad[:3])
    return DamagedStore(f"{store}: split '{split}' has {len(bad)} damaged or missing shard file(s): {shown}. Re-run "
                        f"the same `dcfeat extract` command: it re-extracts them. A store moved without its "
                        f"{shards_dir(store).name}/ folder needs that folder copied beside it")


def read_split(store: Path, split: str, *, dtype=None, allow_incomplete: bool = False,
               chunk_rows: int = 1 << 16, embeddings: bool = True, positions: bool = True) -> Split:
    """One split in memory: embeddings as one array, labels as a polars frame, checked.

    `embeddings=False`: the labels only, for a split trained from disk (`embeddings` is None;
    the shards are checked, the ids are not compared, and the values are checked only where
    training reads the split whole, for class-mean prototypes).
    """
    info = split_info(store, split)
    bad = unreadable_sources(store, split)
    if bad:
        raise damaged_split(store, split, bad)
    if not info.complete and not allow_incomplete:
        raise DamagedStore(f"{store}: split '{split}' is incomplete; re-run the same `dcfeat extract` to finish it")
    labelled = bool(info.attrs.get("labelled", True))
    if positions and not labelled:
        raise BadInput(f"{store}: split '{split}' holds photos whose positions are unknown (extracted with "
                       f"--unlabelled): predict where they were taken with `dcfeat predict --feats {store} --split "
                       f"{split}`; training, calibrating and evaluating need a labelled split")
    labels = read_labels(store, split, info.attrs.get("plan_id"), positions=labelled)
    if labels.height != info.rows:
        raise _labels_problem(store, split, f"{labels.height} label rows for {info.rows} embeddings")
    if not embeddings:
        return Split(name=split, embeddings=None, labels=labels, attrs={**info.attrs, "dim": info.dim})
    try:
        with open_store(store) as f:
            ds = f[split]["embeddings"]
            out = np.empty(ds.shape, dtype=dtype or ds.dtype)
            for start in range(0, ds.shape[0], chunk_rows):
                stop = min(start + chunk_rows, ds.shape[0])
                out[start:stop] = ds[start:stop]
            ids = read_ids(f[split]["ids"])
    except OSError as e:
        raise damaged_split(store, split, [(Path(store), f"unreadable ({e})")]) from None
    if not np.array_equal(ids, labels["image_id"].to_numpy()):
        raise _labels_problem(store, split, "the ids of the embeddings differ from the image_id column")
    bad_rows = ~np.isfinite(out).all(axis=1)
    if bad_rows.any():
        raise DamagedStore(f"{store}: split '{split}' has {int(bad_rows.sum())} rows with non-finite values "
                           f"(first: row {int(np.flatnonzero(bad_rows)[0])}); re-extract it")
    return Split(name=split, embeddings=out, labels=labels, attrs=info.attrs)


def read_failures(store: Path, split: str) -> list[tuple[str, str]]:
    """(image id, reason) of every image the split's extraction skipped."""
    with open_store(store) as f:
        g = f[split].get("failures")
        if g is None:
            return []
        return list(zip(read_ids(g["ids"]).tolist(), read_ids(g["reasons"]).tolist()))
