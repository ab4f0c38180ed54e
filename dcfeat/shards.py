"""Crash-safe, resumable, sharded writing of one split of a feature store.

A *plan* fixes what a split will hold: the sorted image ids with their labels,
the attributes that identify the features, and a grid of shards of
`shard_rows` ids each. The grid does not depend on how many processes write,
so a run resumed with another `torchrun` size, or by a single process, fills
the same shards, and the assembled split is the same.

Layout: `NAME.shards/<split>/<plan_id>/{plan.json, labels.parquet, 000000.h5, …}`.

Replacing a split is a transaction whose commit is the rename of `NAME.h5`:
the new labels go to their own file (`part-<plan_id>.parquet`, named by the
plan), the store is renamed into place, and only then are the old labels and
shards removed. A crash anywhere leaves the old split or the new one, each
with its own labels; the next writer removes what the crash left over.
Shards up to IN_MEMORY_BYTES are built in memory and written with plain file
I/O, so a full disk is an ordinary error and never reaches the HDF5 library
mid-write; larger ones (cached tokens) are written by HDF5 under a temporary
name after a free-space check.
A shard holds the embeddings (and cached tokens) of one run of plan rows, their
ids and row numbers, the rows that failed with why, and a checksum. The
one writer per store (`writer_lock`) removes, under its lock, what killed writers left: temporary
files, label parts beside the one a split committed, and (killed between a split's commit and its
clean-up) the shards of the plans that commit replaced (`clean_stale_files`), when nobody else can be
halfway through writing them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dcfeat.atomic import TMP_SUFFIX, atomic_write, exclusive, leftover_tmp_files, write_bytes
from dcfeat.choices import DEFAULT_SHARD_ROWS
from dcfeat.errors import BadInput, DamagedStore, check_free_space
from dcfeat.identity import ATTR_DEFAULTS, check_compatible, model_source, with_defaults
from dcfeat.layout import (
    FORMAT_VERSION,
    SUPERSEDED_FILE,
    check_split_name,
    check_store_path,
    label_part,
    labels_dir,
    shards_dir,
)
from dcfeat.store import attr_value, read_ids, split_attrs, vds_file_name

# HDF5 images up to this size are built in memory; larger shards (cached tokens) are written
# by HDF5 directly after a free-space check, so as not to hold them twice.
IN_MEMORY_BYTES = 512 << 20
SHARD_OVERHEAD = 16 << 10  # superblock, object headers and chunk index of a shard (measured ~15 KB)


@contextmanager
def writer_lock(store: Path):
    """One writer per store; a second one is refused at once instead of waiting.

    The holder also removes what killed writers left behind (`clean_stale_files`), which is
    safe exactly because nobody else writes.
    """
    check_store_path(store)
    with exclusive(shards_dir(store) / ".lock", f"{store} is being written by {{holder}} ({{lock}}); wait for it "
                   "to finish or write to another --out"):
        clean_stale_files(store)
        yield


def existing_split_attrs(store: Path) -> dict[str, dict]:
    if not Path(store).is_file():
        return {}
    with h5py.File(store, "r") as f:
        return {name: split_attrs(g) for name, g in f.items() if isinstance(g, h5py.Group)}


def clean_stale_files(store: Path) -> list[Path]:
    """Remove what killed writers left: temporary files, the label parts of each split of the store
    other than the one it committed, and the plans (shards) its commit made stale (a split not in
    the store yet, and a plan begun after the split's commit, are left alone: the same command resumes them)."""
    store = Path(store)
    stale = leftover_tmp_files(store)
    for folder in (labels_dir(store), shards_dir(store)):
        if folder.is_dir():
            stale += folder.glob(f"*/**/.*{TMP_SUFFIX}")  # a pattern below `folder`: its own path is never one
    committed = {name: a.get("plan_id") for name, a in existing_split_attrs(store).items()}
    for name, plan_id in committed.items():
        part = labels_dir(store) / f"split={name}"
        if plan_id and (part / label_part(plan_id)).is_file():
            stale += [p for p in part.glob("*.parquet") if p.name != label_part(plan_id)]
    for path in stale:
        path.unlink(missing_ok=True)
    for name, plan_id in committed.items():
        if plan_id:
            stale += remove_superseded(store, name, plan_id)
    return stale


def superseded_plans(store: Path, split: str, plan_id: str) -> list[Path]:
    """The plan folders that the commit of `plan_id` made stale and that are still there: listed in its
    SUPERSEDED_FILE before the store's rename, removed after it (a crash between the two leaves them)."""
    record = shards_dir(store) / split / plan_id / SUPERSEDED_FILE
    try:
        names = json.loads(record.read_text()) if record.is_file() else []
    except ValueError:
        names = []
    folders = [shards_dir(store) / split / name for name in (names if isinstance(names, list) else [])
               if isinstance(name, str) and "/" not in name and name not in ("", ".", "..", plan_id)]
    return [f for f in folders if f.is_dir()]


def remove_superseded(store: Path, split: str, plan_id: str) -> list[Path]:
    """Remove the plans that the commit of `plan_id` made stale, then their list; call only once
    `plan_id` is the split's committed plan."""
    removed = superseded_plans(store, split, plan_id)
    for folder in removed:
        remove_plan(store, folder)
    (shards_dir(store) / split / plan_id / SUPERSEDED_FILE).unlink(missing_ok=True)
    return removed


def remove_plan(store: Path, directory: Path) -> None:
    """rmtree, but only of a plan folder inside this store's own shards folder."""
    root = shards_dir(store).resolve()
    target = directory.resolve()
    if target.parent.parent != root or not target.is_dir():
        raise RuntimeError(f"refusing to remove {directory}: not a plan folder of {store}")
    shutil.rmtree(target)


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
        return pl.read_parquet(self.directory / "labels.parquet", glob=False)  # a path, never a pattern

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


def check_finite(plan: Plan, index: int, what: str, computed: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """`stored` (`computed` cast to the plan's dtype) when every value is finite; else BadInput saying why:
    the backbone's own output is not finite (its weights), or the cast overflowed (--dtype float32)."""
    if np.isfinite(stored).all():
        return stored
    model = model_source(plan.attrs)
    where = f"shard {index} of split '{plan.split}' ({plan.shard_path(index)})"
    if not np.isfinite(computed).all():
        raise BadInput(f"--model {model}: the backbone computed {what} that are not finite (NaN or inf) for {where}: "
                       "its weights are not finite, or its activations overflow. Check the checkpoint (download or "
                       "save it again); nothing of this shard was written")
    top = float(np.abs(computed[np.isfinite(computed)]).max())
    raise BadInput(f"--model {model}: {what} reach {top:.3g} in {where}, beyond the range of {stored.dtype} "
                   f"(±{float(np.finfo(stored.dtype).max):,.0f}); extract with --dtype float32. Nothing of this shard "
                   "was written")


def write_shard(plan: Plan, index: int, rows: np.ndarray, embeddings: np.ndarray,
                failures: list[tuple[int, str]], *, tokens: np.ndarray | None = None) -> Path:
    """Write shard `index` (plan rows `rows` succeeded, `failures` did not) atomically.

    `tokens` (rows, T, hidden): the hidden states a plan with `cache_tokens` keeps per image.
    """
    _, start, stop = plan.shards[index]
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) + len(failures) != stop - start or len(rows) != len(embeddings):
        raise ValueError(f"shard {index}: {len(rows)} rows + {len(failures)} failures != {stop - start} images")
    token_shape = tuple(plan.attrs.get("tokens_shape", ()))
    if token_shape and (tokens is None or tokens.shape != (len(rows), *token_shape)):
        raise ValueError(f"shard {index}: the plan caches tokens {token_shape} per image; got "
                         f"{None if tokens is None else tokens.shape}")
    dtype = np.dtype(plan.attrs["dtype"])
    # Checked in the dtype stored, before the file is begun: a float32 value beyond float16's range
    # is finite until the cast makes it inf.
    with np.errstate(over="ignore"):  # an overflow is what check_finite reports
        stored = check_finite(plan, index, "features", embeddings, embeddings.astype(dtype))
        stored_tokens = (check_finite(plan, index, "cached tokens", tokens, tokens.astype(dtype)) if token_shape
                         else None)
    final = plan.shard_path(index)
    with hdf5_file(final, plan.shard_bytes(stop - start)) as f:
        f.attrs.update({"plan_id": plan.plan_id, "index": index, "start": start, "stop": stop})
        # Chunks of ~1 MB along rows; no compression: DINOv2 features do not compress.
        chunk = (max(1, min(len(rows), (1 << 20) // (embeddings.shape[1] * dtype.itemsize))), embeddings.shape[1])
        f.create_dataset("embeddings", data=stored, chunks=chunk if len(rows) else None,
                         maxshape=(None, embeddings.shape[1]))
        if token_shape:
            # One image per chunk: training and evaluation read runs of whole images.
            f.create_dataset("tokens", data=stored_tokens, chunks=(1, *token_shape) if len(rows) else None)
        # UTF-8, fixed length: virtual datasets need one fixed type across shards.
        id_type = h5py.string_dtype("utf-8", plan.id_bytes)
        f.create_dataset("ids", data=np.array([i.encode() for i in plan.ids[rows]], dtype=id_type))
        f.create_dataset("rows", data=rows)
        f.create_dataset("failures/rows", data=np.array([r for r, _ in failures], dtype=np.int64))
        f.create_dataset("failures/reasons", data=[r for _, r in failures], dtype=h5py.string_dtype())
        f.attrs["checksum"] = shard_checksum(f)
    return final


def _plan_id(ids: list[str], attrs: dict, shard_rows: int) -> str:
    # An attribute at the value older stores are read with leaves the plan as it was: a split
    # extracted (or half extracted) before the attribute existed resumes, or is complete, as before.
    attrs = {k: v for k, v in attrs.items() if not (k in ATTR_DEFAULTS and v == ATTR_DEFAULTS[k])}
    h = hashlib.sha256(json.dumps({"attrs": attrs, "shard_rows": shard_rows}, sort_keys=True).encode())
    for i in ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()[:12]


def open_plan(store: Path, split: str, labels: pl.DataFrame, attrs: dict, *,
              shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False) -> tuple[Plan, bool]:
    """The plan for writing `split`, created or resumed; (plan, already_complete).

    `labels` are in plan order (image_id first). Refuses to mix with the store's
    other splits and to replace a finished split unless `overwrite`. A finished split
    with a shard damaged or missing since, or without its label part, is not complete:
    damaged shards are removed here, and the caller writes what is missing.
    """
    store = check_store_path(store)
    check_split_name(split)
    if shard_rows < 1:
        raise BadInput(f"--shard-rows {shard_rows}: a shard holds at least one image")
    if labels.height == 0:
        raise BadInput(f"split '{split}': no images to write")
    ids = labels["image_id"].to_list()
    plan_id = _plan_id(ids, attrs, shard_rows)
    existing = existing_split_attrs(store)
    for name, other in existing.items():
        if name != split:
            check_compatible(other, attrs, what=f"split '{split}' and split '{name}' of {store}",
                             fix="Use the same --model/--pooling/--image-size/--crop as the store, or another --out.")
    same_plan = split in existing and existing[split].get("plan_id") == plan_id
    if split in existing and not same_plan and not overwrite:
        raise BadInput(f"{store} already has a split '{split}' made from other images or settings; "
                       "pass --overwrite to replace it, or choose another --split")
    plan = Plan(store=store, split=split, plan_id=plan_id, attrs=attrs, rows=len(ids), shard_rows=shard_rows,
                id_bytes=max([len(i.encode()) for i in ids] + [1]))
    plan.directory.mkdir(parents=True, exist_ok=True)
    if not (plan.directory / "labels.parquet").is_file():
        write_parquet(labels, plan.directory / "labels.parquet")
    if not (plan.directory / "plan.json").is_file():
        meta = {"split": split, "plan_id": plan_id, "attrs": attrs, "rows": plan.rows, "shard_rows": shard_rows,
                "id_bytes": plan.id_bytes}
        write_bytes(plan.directory / "plan.json", json.dumps(meta, indent=1).encode())
    damaged = [i for i, _, _ in plan.shards if plan.shard_path(i).exists() and shard_problem(plan, i)]
    for index in damaged:
        plan.shard_path(index).unlink()
    complete = (same_plan and bool(existing[split].get("complete", False)) and not damaged
                and all(plan.shard_path(i).is_file() for i, _, _ in plan.shards)
                and (labels_dir(store) / f"split={split}" / label_part(plan_id)).is_file())
    return plan, complete


def load_plan(store: Path, split: str, plan_id: str) -> Plan:
    """A plan written earlier (by this process, or by rank 0 before a barrier)."""
    directory = shards_dir(store) / split / plan_id
    meta = json.loads((directory / "plan.json").read_text())
    return Plan(store=Path(store), split=split, plan_id=plan_id, attrs=with_defaults(meta["attrs"]),
                rows=meta["rows"], shard_rows=meta["shard_rows"], id_bytes=meta["id_bytes"])


def write_split(store: Path, split: str, embeddings: np.ndarray, labels: pl.DataFrame, attrs: dict, *,
                overwrite: bool = False, shard_rows: int = DEFAULT_SHARD_ROWS) -> bool:
    """Write features (rows in `labels` order) as a split; whether it was complete already (nothing written).

    `embeddings`: anything sliced along rows into arrays (an array, a memory-mapped .npy, an h5py
    dataset): one shard's rows are read at a time."""
    if len(embeddings) != labels.height:
        raise ValueError(f"{len(embeddings)} embeddings for {labels.height} label rows")
    attrs = {"dtype": "float16", "complete": True, **attrs, "dim": int(embeddings.shape[1])}
    with writer_lock(store):
        plan, done = open_plan(store, split, labels, attrs, shard_rows=shard_rows, overwrite=overwrite)
        if not done:
            for index, start, stop in plan.shards:
                if not shard_complete(plan, index):
                    write_shard(plan, index, np.arange(start, stop), embeddings[start:stop], [])
            assemble(plan)
    return done


def _shard_meta(plan: Plan, index: int) -> dict:
    problem = shard_problem(plan, index)
    if problem:
        raise DamagedStore(f"shard {plan.shard_path(index)} is {problem}; run the same `dcfeat extract` command "
                           "again: it re-extracts the shard")
    with h5py.File(plan.shard_path(index), "r") as f:
        return {"n": f["embeddings"].shape[0], "rows": f["rows"][()], "failed_rows": f["failures/rows"][()],
                "reasons": read_ids(f["failures/reasons"]).tolist(), "checksum": attr_value(f.attrs["checksum"])}


def assemble(plan: Plan) -> int:
    """Link every checked shard into `NAME.h5` and commit the split with its labels; returns rows."""
    store = plan.store
    dim = int(plan.attrs["dim"])
    checked = [(index, _shard_meta(plan, index)) for index, _, _ in plan.shards]
    total = sum(m["n"] for _, m in checked)
    dtype = np.dtype(plan.attrs["dtype"])
    id_type = h5py.string_dtype("utf-8", plan.id_bytes)
    emb = h5py.VirtualLayout((total, dim), dtype)
    ids = h5py.VirtualLayout((total,), id_type)
    token_shape = tuple(plan.attrs.get("tokens_shape", ()))
    tokens = h5py.VirtualLayout((total, *token_shape), dtype) if token_shape else None
    at = 0
    files = [os.path.relpath(plan.shard_path(index), store.parent) for index, _ in checked]
    for rel, (index, meta) in zip(files, checked):
        rel = vds_file_name(rel)
        if meta["n"]:
            emb[at:at + meta["n"]] = h5py.VirtualSource(rel, "embeddings", shape=(meta["n"], dim))
            ids[at:at + meta["n"]] = h5py.VirtualSource(rel, "ids", shape=(meta["n"],), dtype=id_type)
            if tokens is not None:
                tokens[at:at + meta["n"]] = h5py.VirtualSource(rel, "tokens", shape=(meta["n"], *token_shape))
            at += meta["n"]
    kept = np.concatenate([m["rows"] for _, m in checked])
    failed = np.concatenate([m["failed_rows"] for _, m in checked])
    reasons = [r for _, m in checked for r in m["reasons"]]
    plan_labels = plan.labels
    labels = plan_labels[kept.tolist()].with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    part = labels_dir(store) / f"split={plan.split}"
    part.mkdir(parents=True, exist_ok=True)
    write_parquet(labels, part / label_part(plan.plan_id))

    # The plans this commit makes stale, recorded before the commit: removed after it, or by the next
    # writer when a crash comes between the two (remove_superseded).
    superseded = sorted(d.name for d in (shards_dir(store) / plan.split).iterdir()
                        if d.is_dir() and d.name != plan.plan_id)
    if superseded:
        write_bytes(plan.directory / SUPERSEDED_FILE, json.dumps(superseded).encode())
    old_splits = []
    if store.is_file():
        with h5py.File(store, "r") as old:
            old_splits = [name for name in old if name != plan.split]
    with hdf5_file(store, SHARD_OVERHEAD + 300 * len(checked) + 200 * len(reasons)) as new:
        new.attrs["dcfeat_format"] = FORMAT_VERSION
        if old_splits:
            with h5py.File(store, "r") as old:
                for name in old_splits:
                    old.copy(old[name], new, name=name)
        g = new.create_group(plan.split)
        g.create_virtual_dataset("embeddings", emb, fillvalue=np.nan)
        g.create_virtual_dataset("ids", ids)
        if tokens is not None:
            g.create_virtual_dataset("tokens", tokens, fillvalue=np.nan)
        g.create_dataset("failures/ids", data=plan_labels["image_id"].to_numpy()[failed].tolist(),
                         dtype=h5py.string_dtype())
        g.create_dataset("failures/reasons", data=reasons, dtype=h5py.string_dtype())
        # What `dcfeat info --verify` checks every shard against.
        g.create_dataset("shards/files", data=files, dtype=h5py.string_dtype())
        g.create_dataset("shards/rows", data=np.array([m["n"] for _, m in checked], dtype=np.int64))
        g.create_dataset("shards/checksums", data=[m["checksum"] for _, m in checked], dtype=h5py.string_dtype())
        g.attrs.update({**plan.attrs, "plan_id": plan.plan_id, "complete": True, "failures": len(reasons)})
    # Committed: what the old split had is now unreferenced.
    for stale in part.glob("*.parquet"):
        if stale.name != label_part(plan.plan_id):
            stale.unlink()
    remove_superseded(store, plan.split, plan.plan_id)
    return total
