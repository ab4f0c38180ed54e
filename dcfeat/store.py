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
file. A killed writer therefore leaves at worst an orphaned temporary file;
existing splits keep pointing at shards nobody touches.
"""

from __future__ import annotations

from dcfeat.errors import BadInput

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dcfeat.labels import LABEL_SCHEMA

FORMAT_VERSION = 1
# Attributes that must agree between splits of one store: features made with another
# model, pooling or resolution live in another space and must not be mixed.
IDENTITY_ATTRS = ("model", "model_fingerprint", "pooling", "image_size", "dim")
LABEL_COLUMNS = {"row": pl.Int64, **LABEL_SCHEMA}


class StoreError(BadInput):
    """The store cannot be used as asked; the message names the file and the fix."""


def labels_dir(store: Path) -> Path:
    return Path(store).with_suffix(".labels")


def shards_dir(store: Path) -> Path:
    return Path(store).with_suffix(".shards")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(tmp: Path, final: Path) -> None:
    """Make a finished temporary file durable, then give it its final name."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def attr_value(value):
    """An HDF5 attribute as a plain Python value (arrays, e.g. `tokens_shape`, as lists)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.ndim:
        return value.tolist()
    return value.item() if hasattr(value, "item") else value


@contextmanager
def writer_lock(store: Path):
    """One writer per store; a second one is refused at once instead of waiting."""
    lock_path = shards_dir(store) / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StoreError(f"{store} is being written by {holder} ({lock_path}); wait for it to finish "
                             "or write to another --out") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------- reading


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
    embeddings: np.ndarray  # (rows, dim)
    labels: pl.DataFrame  # LABEL_COLUMNS, row == position
    attrs: dict


def _open(store: Path) -> h5py.File:
    store = Path(store)
    if not store.is_file():
        raise StoreError(f"{store}: no such feature store; create it with `dcfeat extract --out {store}`")
    try:
        f = h5py.File(store, "r")
    except OSError as e:
        raise StoreError(f"{store}: not a readable HDF5 file ({e})") from None
    if attr_value(f.attrs.get("dcfeat_format", -1)) != FORMAT_VERSION:
        f.close()
        raise StoreError(f"{store}: root attribute dcfeat_format is not {FORMAT_VERSION}; not a dcfeat store")
    return f


def _split_attrs(group: h5py.Group) -> dict:
    return {k: attr_value(v) for k, v in group.attrs.items()}


def _missing_sources(store: Path, ds: h5py.Dataset) -> list[str]:
    if not ds.is_virtual:
        return []
    names = {m.file_name for m in ds.virtual_sources()}
    return sorted(n for n in names if n != "." and not (Path(store).parent / n).is_file())


def _source_bytes(store: Path, ds: h5py.Dataset) -> int:
    if not ds.is_virtual:
        return ds.id.get_storage_size()
    names = {m.file_name for m in ds.virtual_sources()} - {"."}
    return sum((Path(store).parent / n).stat().st_size for n in names if (Path(store).parent / n).is_file())


def label_files(store: Path, split: str) -> list[Path]:
    return sorted((labels_dir(store) / f"split={split}").glob("*.parquet"))


def _info(store: Path, name: str, group: h5py.Group) -> SplitInfo:
    ds = group["embeddings"]
    attrs = _split_attrs(group)
    files = label_files(store, name)
    fail = group.get("failures/ids")
    tokens = group.get("tokens")
    return SplitInfo(
        name=name, rows=ds.shape[0], dim=ds.shape[1], dtype=str(ds.dtype), attrs=attrs,
        complete=bool(attrs.get("complete", True)),
        bytes_on_disk=_source_bytes(store, ds) + _source_bytes(store, group["ids"])
        + sum(p.stat().st_size for p in files),
        failures=0 if fail is None else fail.shape[0],
        missing_sources=_missing_sources(store, ds),
        labels_rows=pl.scan_parquet(files).select(pl.len()).collect().item() if files else None,
        tokens_shape=None if tokens is None else tokens.shape,
        token_bytes_per_image=0 if tokens is None else int(np.prod(tokens.shape[1:])) * tokens.dtype.itemsize)


def _is_split(group) -> bool:
    return isinstance(group, h5py.Group) and "embeddings" in group


def list_splits(store: Path) -> list[SplitInfo]:
    """Every split of the store with its size, attributes and any problem found."""
    store = Path(store)
    with _open(store) as f:
        return [_info(store, name, group) for name, group in f.items() if _is_split(group)]


def split_info(store: Path, split: str) -> SplitInfo:
    """One split's SplitInfo; the other splits' labels and shards are not looked at."""
    store = Path(store)
    with _open(store) as f:
        if not _is_split(f.get(split)):
            names = [name for name, group in f.items() if _is_split(group)]
            raise StoreError(f"{store} has no split '{split}' (it has: {', '.join(names) or 'none'}); "
                             f"add it with `dcfeat extract --split {split} --out {store} --images DIR`")
        return _info(store, split, f[split])


def read_labels(store: Path, split: str) -> pl.DataFrame:
    files = label_files(store, split)
    if not files:
        raise StoreError(f"{store}: split '{split}' has no labels under {labels_dir(store) / f'split={split}'}")
    frame = pl.read_parquet(files, hive_partitioning=False)
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise StoreError(f"{labels_dir(store)}: split '{split}' labels lack columns {missing}")
    frame = frame.select([pl.col(c).cast(t) for c, t in LABEL_COLUMNS.items()]).sort("row")
    if not np.array_equal(frame["row"].to_numpy(), np.arange(frame.height)):
        raise StoreError(f"{labels_dir(store)}: split '{split}' label rows are not 0..n-1 exactly once")
    return frame


def read_split(store: Path, split: str, *, dtype=None, allow_incomplete: bool = False,
               chunk_rows: int = 1 << 16) -> Split:
    """One split in memory: embeddings as one array, labels as a polars frame, checked."""
    info = split_info(store, split)
    if info.missing_sources:
        raise StoreError(f"{store}: split '{split}' points at missing shard files, e.g. "
                         f"{info.missing_sources[0]}; the store was moved or copied without "
                         f"{shards_dir(store).name}/. Copy that folder beside it.")
    if not info.complete and not allow_incomplete:
        raise StoreError(f"{store}: split '{split}' is incomplete; re-run the same `dcfeat extract` to finish it")
    labels = read_labels(store, split)
    if labels.height != info.rows:
        raise StoreError(f"{store}: split '{split}' has {info.rows} embeddings but {labels.height} label rows "
                         f"in {labels_dir(store)}; re-run `dcfeat extract` for this split")
    with _open(store) as f:
        ds = f[split]["embeddings"]
        out = np.empty(ds.shape, dtype=dtype or ds.dtype)
        for start in range(0, ds.shape[0], chunk_rows):
            stop = min(start + chunk_rows, ds.shape[0])
            out[start:stop] = ds[start:stop]
        ids = f[split]["ids"].asstr()[()] if h5py.check_string_dtype(f[split]["ids"].dtype) else f[split]["ids"][()]
    if not np.array_equal(np.asarray(ids, dtype=object), labels["image_id"].to_numpy()):
        raise StoreError(f"{store}: split '{split}' ids differ from the image_id column of its labels")
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise StoreError(f"{store}: split '{split}' has {int(bad.sum())} rows with non-finite values "
                         f"(first: row {int(np.flatnonzero(bad)[0])}); re-extract it")
    return Split(name=split, embeddings=out, labels=labels, attrs=info.attrs)


def read_failures(store: Path, split: str) -> list[tuple[str, str]]:
    """(image id, reason) of every image the split's extraction skipped."""
    with _open(store) as f:
        g = f[split].get("failures")
        if g is None:
            return []
        return list(zip(g["ids"].asstr()[()].tolist(), g["reasons"].asstr()[()].tolist()))


def check_compatible(existing: dict, new: dict, *, what: str, fix: str) -> None:
    """Refuse mixing features that do not belong together (another model, pooling, size, dim)."""
    diff = {k: (existing.get(k), new.get(k)) for k in IDENTITY_ATTRS
            if k in existing and k in new and existing.get(k) != new.get(k)}
    if diff:
        shown = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        raise StoreError(f"{what} do not belong together ({shown}). {fix}")

