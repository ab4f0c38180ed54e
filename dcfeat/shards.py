"""Crash-safe, resumable, sharded writing of one split of a feature store.

A *plan* fixes what a split will hold: the sorted image ids with their labels,
the attributes that identify the features, and a grid of shards of
`shard_rows` ids each. The grid does not depend on how many processes write,
so a run resumed with another `torchrun` size, or by a single process, fills
the same shards, and the assembled split is the same.

Layout: `NAME.shards/<split>/<plan_id>/{plan.json, labels.parquet, 000000.h5, …}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dcfeat.store import (FORMAT_VERSION, StoreError, attr_value, check_compatible, labels_dir,
                          replace_atomically, shards_dir, writer_lock)

DEFAULT_SHARD_ROWS = 8192
_TMP = ".tmp"


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

    @cached_property
    def labels(self) -> pl.DataFrame:
        return pl.read_parquet(self.directory / "labels.parquet")

    @cached_property
    def ids(self) -> np.ndarray:
        return self.labels["image_id"].to_numpy()


def _plan_id(ids: list[str], attrs: dict, shard_rows: int) -> str:
    h = hashlib.sha256(json.dumps({"attrs": attrs, "shard_rows": shard_rows}, sort_keys=True).encode())
    for i in ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()[:12]


def existing_split_attrs(store: Path) -> dict[str, dict]:
    if not Path(store).is_file():
        return {}
    with h5py.File(store, "r") as f:
        return {name: {k: attr_value(v) for k, v in g.attrs.items()}
                for name, g in f.items() if isinstance(g, h5py.Group)}


def open_plan(store: Path, split: str, labels: pl.DataFrame, attrs: dict, *,
              shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False) -> tuple[Plan, bool]:
    """The plan for writing `split`, created or resumed; (plan, already_complete).

    `labels` are in plan order (image_id first). Refuses to mix with the store's
    other splits and to replace a finished split unless `overwrite`.
    """
    store = Path(store)
    ids = labels["image_id"].to_list()
    plan_id = _plan_id(ids, attrs, shard_rows)
    existing = existing_split_attrs(store)
    for name, other in existing.items():
        if name != split:
            check_compatible(other, attrs, what=f"split '{split}' and split '{name}' of {store}",
                             fix="Use the same --model/--pooling/--image-size as the store, or another --out.")
    if split in existing:
        if existing[split].get("plan_id") == plan_id and existing[split].get("complete", False):
            return load_plan(store, split, plan_id), True
        if not overwrite:
            raise StoreError(f"{store} already has a split '{split}' made from other images or settings; "
                             "pass --overwrite to replace it, or choose another --split")
    plan = Plan(store=store, split=split, plan_id=plan_id, attrs=attrs, rows=len(ids), shard_rows=shard_rows,
                id_bytes=max([len(i.encode()) for i in ids] + [1]))
    plan_file = plan.directory / "plan.json"
    if not plan_file.is_file():
        plan.directory.mkdir(parents=True, exist_ok=True)
        tmp = plan.directory / (".labels.parquet" + _TMP)
        labels.write_parquet(tmp)
        replace_atomically(tmp, plan.directory / "labels.parquet")
        tmp = plan.directory / (".plan.json" + _TMP)
        tmp.write_text(json.dumps({"split": split, "plan_id": plan_id, "attrs": attrs, "rows": plan.rows,
                                   "shard_rows": shard_rows, "id_bytes": plan.id_bytes}, indent=1))
        replace_atomically(tmp, plan_file)
    return plan, False


def write_split(store: Path, split: str, embeddings: np.ndarray, labels: pl.DataFrame, attrs: dict, *,
                overwrite: bool = False, shard_rows: int = DEFAULT_SHARD_ROWS) -> int:
    """Write in-memory features (rows in `labels` order) as a split; returns rows."""
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
    return labels.height


def load_plan(store: Path, split: str, plan_id: str) -> Plan:
    """A plan written earlier (by this process, or by rank 0 before a barrier)."""
    directory = shards_dir(store) / split / plan_id
    meta = json.loads((directory / "plan.json").read_text())
    return Plan(store=Path(store), split=split, plan_id=plan_id, attrs=meta["attrs"], rows=meta["rows"],
                shard_rows=meta["shard_rows"], id_bytes=meta["id_bytes"])


def shard_complete(plan: Plan, index: int) -> bool:
    return plan.shard_path(index).is_file()


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
    final = plan.shard_path(index)
    tmp = final.with_name("." + final.name + _TMP)
    dtype = np.dtype(plan.attrs["dtype"])
    with h5py.File(tmp, "w") as f:
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
        f.create_dataset("ids", data=np.array([i.encode() for i in plan.ids[rows]], dtype=f"S{plan.id_bytes}"))
        f.create_dataset("rows", data=rows)
        f.create_dataset("failures/rows", data=np.array([r for r, _ in failures], dtype=np.int64))
        f.create_dataset("failures/reasons", data=[r for _, r in failures], dtype=h5py.string_dtype())
    replace_atomically(tmp, final)
    return final


def _check_shard(plan: Plan, index: int, start: int, stop: int, dim: int) -> dict:
    path = plan.shard_path(index)
    try:
        with h5py.File(path, "r") as f:
            ok = (f.attrs["plan_id"] == plan.plan_id and int(f.attrs["start"]) == start
                  and int(f.attrs["stop"]) == stop and f["embeddings"].shape[1:] == (dim,)
                  and f["ids"].shape[0] == f["embeddings"].shape[0] == f["rows"].shape[0])
            n = f["embeddings"].shape[0]
            token_shape = tuple(plan.attrs.get("tokens_shape", ()))
            if token_shape:
                ok = ok and "tokens" in f and f["tokens"].shape == (n, *token_shape)
            if ok and n:
                f["embeddings"][n - 1]  # readable to its last row
                if token_shape:
                    f["tokens"][n - 1]
            return {"n": n, "rows": f["rows"][()], "failed_rows": f["failures/rows"][()],
                    "reasons": f["failures/reasons"].asstr()[()]} if ok else {}
    except (OSError, KeyError) as e:
        raise StoreError(f"shard {path} is unreadable ({e}); delete it and re-run the same command") from None


def assemble(plan: Plan) -> int:
    """Link every checked shard into `NAME.h5` and write the split's labels; returns rows."""
    store = plan.store
    dim = int(plan.attrs["dim"])
    checked = []
    for index, start, stop in plan.shards:
        meta = _check_shard(plan, index, start, stop, dim)
        if not meta:
            raise StoreError(f"shard {plan.shard_path(index)} does not belong to this plan; delete it and re-run")
        checked.append((index, meta))
    total = sum(m["n"] for _, m in checked)
    emb = h5py.VirtualLayout((total, dim), np.dtype(plan.attrs["dtype"]))
    ids = h5py.VirtualLayout((total,), np.dtype(f"S{plan.id_bytes}"))
    token_shape = tuple(plan.attrs.get("tokens_shape", ()))
    tokens = h5py.VirtualLayout((total, *token_shape), np.dtype(plan.attrs["dtype"])) if token_shape else None
    at = 0
    for index, meta in checked:
        if meta["n"]:
            rel = os.path.relpath(plan.shard_path(index), store.parent)
            emb[at:at + meta["n"]] = h5py.VirtualSource(rel, "embeddings", shape=(meta["n"], dim))
            ids[at:at + meta["n"]] = h5py.VirtualSource(rel, "ids", shape=(meta["n"],))
            if tokens is not None:
                tokens[at:at + meta["n"]] = h5py.VirtualSource(rel, "tokens", shape=(meta["n"], *token_shape))
            at += meta["n"]
    kept = np.concatenate([m["rows"] for _, m in checked]) if checked else np.zeros(0, np.int64)
    failed = np.concatenate([m["failed_rows"] for _, m in checked]) if checked else np.zeros(0, np.int64)
    reasons = [r for _, m in checked for r in m["reasons"]]
    plan_labels = plan.labels

    labels = plan_labels[kept.tolist()].with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    part = labels_dir(store) / f"split={plan.split}"
    part.mkdir(parents=True, exist_ok=True)
    tmp = part / (".part-0.parquet" + _TMP)
    labels.write_parquet(tmp)

    tmp_h5 = store.with_name("." + store.name + f".{os.getpid()}" + _TMP)
    with h5py.File(tmp_h5, "w") as new:
        new.attrs["dcfeat_format"] = FORMAT_VERSION
        if store.is_file():
            with h5py.File(store, "r") as old:
                for name in old:
                    if name != plan.split:
                        old.copy(old[name], new, name=name)
        g = new.create_group(plan.split)
        g.create_virtual_dataset("embeddings", emb, fillvalue=np.nan)
        g.create_virtual_dataset("ids", ids)
        if tokens is not None:
            g.create_virtual_dataset("tokens", tokens, fillvalue=np.nan)
        g.create_dataset("failures/ids", data=plan_labels["image_id"].to_numpy()[failed].tolist(),
                         dtype=h5py.string_dtype())
        g.create_dataset("failures/reasons", data=reasons, dtype=h5py.string_dtype())
        g.attrs.update({**plan.attrs, "plan_id": plan.plan_id, "complete": True, "failures": len(reasons)})
    # Labels first, then the store: a crash in between leaves the old store, and the
    # re-run rewrites both. Stale label parts of this split go only after both are in place.
    final_part = part / "part-0.parquet"
    replace_atomically(tmp, final_part)
    replace_atomically(tmp_h5, store)
    for stale in part.glob("*.parquet"):
        if stale != final_part:
            stale.unlink()
    for old_plan in (shards_dir(store) / plan.split).iterdir():
        if old_plan.is_dir() and old_plan.name != plan.plan_id:
            shutil.rmtree(old_plan)
    return total
