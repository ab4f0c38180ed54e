"""One shard file of a plan: what a plan is, and writing and checking its shards.

A shard holds the embeddings (and cached tokens) of one run of plan rows, their
ids and row numbers, the rows that failed with why, and a checksum; each is
written whole under a temporary name and renamed into place (dcfeat.atomic).
"""

from __future__ import annotations

import io
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dcfeat.atomic import atomic_write, write_bytes
from dcfeat.errors import check_free_space
from dcfeat.layout import shards_dir

# HDF5 images up to this size are built in memory; larger shards (cached tokens) are written
# by HDF5 directly after a free-space check, so as not to hold them twice.
IN_MEMORY_BYTES = 512 << 20
SHARD_OVERHEAD = 16 << 10  # superblock, object headers and chunk index of a shard (measured ~15 KB)


@dataclass(frozen=True)
class Plan:
    store: Path
    split: str
    plan_id: str
    attrs: dict
    rows: int
    shard_rows: int
    id_bytes: int

    @property
    def directory(self) -> Path:
        return shards_dir(self.store) / self.split / self.plan_id

    def shard_path(self, index: int) -> Path:
        return self.directory / f"{index:06d}.h5"

    @property
    def shards(self) -> list[tuple[int, int, int]]:
        """(index, start, stop) of every shard of the grid."""
        return [(i, s, min(s + self.shard_rows, self.rows))
                for i, s in enumerate(range(0, self.rows, self.shard_rows))]

    @property
    def row_bytes(self) -> int:
        """Bytes a stored image costs in a shard: embedding, id, row index, cached tokens."""
        item = np.dtype(self.attrs["dtype"]).itemsize
        tokens = int(np.prod(self.attrs.get("tokens_shape", [0]))) * item
        return int(self.attrs["dim"]) * item + self.id_bytes + 8 + tokens

    def shard_bytes(self, rows: int) -> int:
        """Disk a shard of `rows` images takes, about (HDF5's own structures included)."""
        return rows * self.row_bytes + SHARD_OVERHEAD

    @cached_property
    def labels(self) -> pl.DataFrame:
        return pl.read_parquet(self.directory / "labels.parquet")

    @cached_property
    def ids(self) -> np.ndarray:
        return self.labels["image_id"].to_numpy()


def shard_checksum(f: h5py.File) -> str:
    """CRC-32 over every dataset of a shard, in a fixed order (damage detection, not security)."""
    crc = 0
    for name in ("embeddings", "ids", "rows", "tokens", "failures/rows"):
        if name in f:
            crc = zlib.crc32(np.ascontiguousarray(f[name][()]).tobytes(), crc)
    return f"crc32:{crc:08x}"


def shard_problem(plan: Plan, index: int) -> str | None:
    """Why shard `index` cannot be used (None when it can): a quick check, no checksum."""
    _, start, stop = plan.shards[index]
    path = plan.shard_path(index)
    if not path.is_file():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            n = f["embeddings"].shape[0]
            if (f.attrs["plan_id"] != plan.plan_id or int(f.attrs["start"]) != start or int(f.attrs["stop"]) != stop
                    or f["embeddings"].shape[1:] != (int(plan.attrs["dim"]),)
                    or not f["ids"].shape[0] == f["rows"].shape[0] == n
                    or n + f["failures/rows"].shape[0] != stop - start):
                return "does not belong to this plan"
            token_shape = tuple(plan.attrs.get("tokens_shape", ()))
            if token_shape and ("tokens" not in f or f["tokens"].shape != (n, *token_shape)):
                return "lacks the plan's cached tokens"
            if n:  # readable to its last row
                f["embeddings"][n - 1]
                if token_shape:
                    f["tokens"][n - 1]
    except (OSError, KeyError) as e:
        return f"unreadable ({e})"
    return None


def shard_complete(plan: Plan, index: int) -> bool:
    return plan.shard_path(index).is_file()


def write_parquet(frame: pl.DataFrame, final: Path) -> None:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    write_bytes(final, buffer.getvalue())


@contextmanager
def hdf5_file(final: Path, needed: int):
    """An HDF5 file to fill, landing at `final` atomically; in memory up to IN_MEMORY_BYTES."""
    check_free_space(final.parent, needed)
    if needed <= IN_MEMORY_BYTES:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            yield f
        with atomic_write(final, needed=needed) as tmp:
            tmp.write_bytes(buffer.getvalue())
    else:
        with atomic_write(final, needed=needed) as tmp:
            with h5py.File(tmp, "w") as f:
                yield f


def write_shard(plan: Plan, index: int, rows: np.ndarray, embeddings: np.ndarray,
                failures: list[tuple[int, str]], *, tokens: np.ndarray | None = None) -> Path:
    """Write shard `index` (plan rows `rows` succeeded, `failures` did not) atomically.

    `tokens` (rows, T, hidden): the hidden states a plan with `cache_tokens` keeps per image.
    """
    _, start, stop = plan.shards[index]
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) + len(failures) != stop - start or len(rows) != len(embeddings):
        raise ValueError(f"shard {index}: {len(rows)} rows + {len(failures)} failures != {stop - start} images")
    if not np.isfinite(embeddings).all():
        raise ValueError(f"shard {index}: non-finite embeddings; refusing to store them")
    token_shape = tuple(plan.attrs.get("tokens_shape", ()))
    if token_shape and (tokens is None or tokens.shape != (len(rows), *token_shape)):
        raise ValueError(f"shard {index}: the plan caches tokens {token_shape} per image; got "
                         f"{None if tokens is None else tokens.shape}")
    dtype = np.dtype(plan.attrs["dtype"])
    final = plan.shard_path(index)
    with hdf5_file(final, plan.shard_bytes(stop - start)) as f:
        f.attrs.update({"plan_id": plan.plan_id, "index": index, "start": start, "stop": stop})
        # Chunks of ~1 MB along rows; no compression: DINOv2 features do not compress.
        chunk = (max(1, min(len(rows), (1 << 20) // (embeddings.shape[1] * dtype.itemsize))), embeddings.shape[1])
        f.create_dataset("embeddings", data=embeddings.astype(dtype), chunks=chunk if len(rows) else None,
                         maxshape=(None, embeddings.shape[1]))
        if token_shape:
            stored = tokens.astype(dtype)
            if not np.isfinite(stored).all():
                raise ValueError(f"shard {index}: tokens overflow {dtype}; extract with --dtype float32")
            # One image per chunk: training and evaluation read runs of whole images.
            f.create_dataset("tokens", data=stored, chunks=(1, *token_shape) if len(rows) else None)
        # UTF-8, fixed length: virtual datasets need one fixed type across shards.
        id_type = h5py.string_dtype("utf-8", plan.id_bytes)
        f.create_dataset("ids", data=np.array([i.encode() for i in plan.ids[rows]], dtype=id_type))
        f.create_dataset("rows", data=rows)
        f.create_dataset("failures/rows", data=np.array([r for r, _ in failures], dtype=np.int64))
        f.create_dataset("failures/reasons", data=[r for _, r in failures], dtype=h5py.string_dtype())
        f.attrs["checksum"] = shard_checksum(f)
    return final
