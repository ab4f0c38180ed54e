"""`dcfeat import`: descriptors another tool computed (MegaLoc, CosPlace, NetVLAD, …) and their labels → a split.

The descriptors come as (n, D) numbers with one image id per row, from a `.npy` (ids from a text
file), a `.npz` or HDF5 file (`descriptors` or `embeddings`, and `ids`; a feature store's own
`/<split>/embeddings` layout too) or a Parquet table (an id column and a list column, or one numeric
column per dimension). Each id gets its label from its SF-XL style name, from a manifest matched by
id, or none at all (`unlabelled`). Everything is checked before a byte is written (ids, labels,
shapes, finite values, the range of the stored type, the store's other splits), and the split is
written by the split writer `extract` uses (dcfeat.shards: shards renamed into place, resumable),
one shard's rows read at a time, so a memory-mapped `.npy` or an HDF5 dataset larger than memory
imports too.

The features' identity is the name the user gives them (dcfeat.identity.imported_identity):
splits imported under one name and width mix, others are refused. The plan of a split also records
a digest of the descriptors' values, so the same ids with other values are another split (refused
without `overwrite`), and importing the same file again finds the split complete.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dcfeat import __version__
from dcfeat.choices import CROPS, DEFAULT_SHARD_ROWS, STORE_DTYPES, UNKNOWN_CROP
from dcfeat.errors import BadInput, first_line, writing
from dcfeat.identity import imported_identity
from dcfeat.labels import LABEL_SCHEMA, image_ids, parse_sfxl_names, read_manifest, unlabelled
from dcfeat.layout import check_split_name, check_store_path
from dcfeat.shards import write_split
from dcfeat.store import read_ids

DESCRIPTOR_FORMATS = (".npy", ".npz", ".h5", ".hdf5", ".parquet")
# Names of the descriptors (an .npz array, an HDF5 dataset, a Parquet column) and of the ids, tried in order.
DESCRIPTOR_NAMES = ("descriptors", "embeddings", "descriptor", "embedding", "features")
ID_NAMES = ("ids", "image_id", "path", "id", "image")
CHECK_ROWS = 1 << 16  # rows read at a time while checking the values
SHOWN = 5  # offending ids or rows named in a message


@dataclass
class Descriptors:
    """What a descriptor file holds: values (n, D), sliced along rows, and one id per row."""

    values: np.ndarray | h5py.Dataset
    ids: list[str] | None
    where: str  # how messages name it: "--descriptors FILE" (and the dataset inside)


@dataclass
class ImportResult:
    store: Path
    split: str
    rows: int
    dim: int
    model: str  # as recorded: imported:NAME
    fingerprint: str
    labelled: bool
    already_complete: bool
    seconds: float


def _read_id_file(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise BadInput(f"--ids {path}: no such file; give a text file with one image id (path or name) per line")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BadInput(f"--ids {path}: not UTF-8 text; write one image id per line, UTF-8") from None
    return lines[:-1] if lines and lines[-1] == "" else lines


def _first(names, available, what: str, where: str) -> str:
    found = next((n for n in names if n in available), None)
    if found is None:
        raise BadInput(f"{where}: no {what} ({' or '.join(names)}) in it; it holds {sorted(available) or 'nothing'}")
    return found


def _string_ids(array: np.ndarray, where: str) -> list[str]:
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise BadInput(f"{where}: ids of type {array.dtype} and shape {array.shape}; they must be strings, one per row")
    return [i.decode() if isinstance(i, bytes) else str(i) for i in array.tolist()]


def _npz(path: Path, where: str) -> Descriptors:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle, which never runs here
        raise BadInput(f"{where}: cannot be read without pickle ({e}); save the ids as a string array "
                       "(np.array(ids, dtype=str))") from None
    name = _first(DESCRIPTOR_NAMES, arrays, "descriptor array", where)
    ids = next((arrays[n] for n in ID_NAMES if n in arrays), None)
    return Descriptors(arrays[name], None if ids is None else _string_ids(ids, f"{where} ids"), f"{where} [{name}]")


def _hdf5(path: Path, where: str, split: str, stack: ExitStack) -> Descriptors:
    f = stack.enter_context(h5py.File(path, "r"))
    group, name = f, next((n for n in DESCRIPTOR_NAMES if isinstance(f.get(n), h5py.Dataset)), None)
    if name is None:  # a feature store's layout: /<split>/embeddings, the split of the same name or the only one
        groups = [g for g in f.values() if isinstance(g, h5py.Group) and isinstance(g.get("embeddings"), h5py.Dataset)]
        group = f[split] if split in f and f[split] in groups else (groups[0] if len(groups) == 1 else None)
        if group is None:
            raise BadInput(f"{where}: no dataset {' or '.join(DESCRIPTOR_NAMES)} at its root (it holds {sorted(f)}); "
                           + ("of its groups with `embeddings`, import one by --split of the same name"
                              if groups else "name the descriptors `descriptors` and their ids `ids`"))
        name = "embeddings"
    values = group[name]
    ids = next((group[n] for n in ID_NAMES if isinstance(group.get(n), h5py.Dataset)), None)
    if ids is not None and (ids.ndim != 1 or h5py.check_string_dtype(ids.dtype) is None):
        raise BadInput(f"{where}: {ids.name} of type {ids.dtype} and shape {ids.shape}; ids must be strings, one "
                       "per row")
    return Descriptors(values, None if ids is None else read_ids(ids).tolist(), f"{where} [{values.name}]")


def _parquet(path: Path, where: str, id_column: str | None) -> Descriptors:
    try:
        frame = pl.read_parquet(path, glob=False)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise BadInput(f"{where}: cannot be read as Parquet ({first_line(e)})") from None
    id_column = id_column or _first(ID_NAMES, frame.columns, "id column (another with --id-column)", where)
    if id_column not in frame.columns:
        raise BadInput(f"{where}: no column `{id_column}` (--id-column); it has {frame.columns}")
    ids = frame[id_column].cast(pl.String, strict=False)
    if ids.dtype != pl.String:
        raise BadInput(f"{where}: column `{id_column}` holds {frame[id_column].dtype}, not image ids")
    lists = [c for c in frame.columns if isinstance(frame[c].dtype, (pl.List, pl.Array))]
    if lists:
        column = next((c for c in DESCRIPTOR_NAMES if c in lists), lists[0] if len(lists) == 1 else None)
        if column is None:
            raise BadInput(f"{where}: list columns {lists}; name the descriptors' column one of {DESCRIPTOR_NAMES}")
        return Descriptors(_list_column(frame[column], f"{where} column `{column}`"), ids.to_list(),
                           f"{where} column `{column}`")
    numeric = [c for c in frame.columns if c != id_column]
    other = [c for c in numeric if not frame[c].dtype.is_numeric()]
    if other or not numeric:
        raise BadInput(f"{where}: expected an id column and either one list column of descriptors or only numeric "
                       f"columns (one per dimension); columns {other or 'none'} are neither")
    return Descriptors(frame.select(numeric).to_numpy(), ids.to_list(), f"{where} columns {numeric[0]}…{numeric[-1]}")


def _list_column(column: pl.Series, where: str) -> np.ndarray:
    """A list (or array) column as (rows, D) float32; every row of one length D."""
    try:
        column = column.cast(pl.List(pl.Float32))
    except pl.exceptions.PolarsError:
        raise BadInput(f"{where} holds {column.dtype}, not lists of numbers") from None
    lengths = column.list.len().fill_null(0).to_numpy()
    if len(lengths) and (lengths != lengths[0]).any() or column.null_count():
        bad = np.flatnonzero(lengths != np.bincount(lengths).argmax())[:SHOWN].tolist()
        raise BadInput(f"{where}: rows of different lengths ({sorted(set(lengths.tolist()))[:SHOWN]}), first odd "
                       f"rows {bad}; every descriptor must have the same length")
    dim = int(lengths[0]) if len(lengths) else 0
    return column.explode().fill_null(np.nan).to_numpy().reshape(len(lengths), dim)


@contextmanager
def open_descriptors(path: Path, *, ids_file: Path | None = None, split: str = "train",
                     id_column: str | None = None) -> Iterator[Descriptors]:
    """The descriptors of `path` with their ids (from the file, or `ids_file`), checked for shape and
    type; open while the context lasts (HDF5 and .npy are read lazily)."""
    path = Path(path)
    where = f"--descriptors {path}"
    suffix = path.suffix.lower()
    if suffix not in DESCRIPTOR_FORMATS:
        raise BadInput(f"{where}: expected one of {', '.join(DESCRIPTOR_FORMATS)}")
    if not path.is_file():
        raise BadInput(f"{where}: no such file")
    with ExitStack() as stack:
        try:
            if suffix == ".npy":
                found = Descriptors(np.load(path, mmap_mode="r", allow_pickle=False), None, where)
            elif suffix == ".npz":
                found = _npz(path, where)
            elif suffix == ".parquet":
                found = _parquet(path, where, id_column)
            else:
                found = _hdf5(path, where, split, stack)
        except (OSError, ValueError) as e:
            raise BadInput(f"{where}: cannot be read as {suffix[1:]} ({first_line(e)})") from None
        if ids_file is not None:
            if found.ids is not None:
                raise BadInput(f"{where} holds ids already; leave out --ids {ids_file}, or pass a file without them")
            found.ids = _read_id_file(ids_file)
        if found.ids is None:
            raise BadInput(f"{where} holds no ids: pass --ids FILE (one image id per line, row order)"
                           + (", or save an .npz with `descriptors` and `ids`" if suffix == ".npy" else ""))
        check_shape(found)
        yield found


def check_shape(found: Descriptors) -> None:
    values = found.values
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise BadInput(f"{found.where}: shape {values.shape}; descriptors must be a 2-D array (images, D) with at "
                       "least one row and column")
    if values.dtype.kind not in "fiu":
        raise BadInput(f"{found.where}: values of type {values.dtype}; descriptors must be numbers")
    if len(found.ids) != values.shape[0]:
        raise BadInput(f"{found.where}: {values.shape[0]:,} descriptors but {len(found.ids):,} ids; give one id per "
                       "row, in row order")


def scan_values(found: Descriptors, dtype: str) -> str:
    """Check every value is finite and fits `dtype`, reading CHECK_ROWS rows at a time; a digest of them."""
    digest, bad, top = hashlib.blake2b(digest_size=16), [], 0.0
    values, n = found.values, found.values.shape[0]
    for start in range(0, n, CHECK_ROWS):
        block = np.ascontiguousarray(values[start:start + CHECK_ROWS], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        bad += (start + np.flatnonzero(~finite)).tolist()
        if finite.any():
            top = max(top, float(np.abs(block[finite]).max()))
        digest.update(block.tobytes())
    if bad:
        shown = ", ".join(f"row {r} ({found.ids[r]})" for r in bad[:SHOWN])
        raise BadInput(f"{found.where}: {len(bad):,} of {n:,} descriptors hold values that are not finite (NaN or "
                       f"inf), first: {shown}. Recompute or remove them (and their ids); nothing was written")
    limit = float(np.finfo(np.dtype(dtype)).max)
    if top > limit:
        raise BadInput(f"{found.where}: values reach {top:.3g}, beyond the range of {dtype} (±{limit:,.0f}); import "
                       "with --dtype float32. Nothing was written")
    return digest.hexdigest()


def label_rows(ids: list[str], where: str, *, manifest: Path | None = None, path_column: str = "path",
               images: Path | None = None, labelled: bool = True) -> pl.DataFrame:
    """The label table (LABEL_SCHEMA, row order) of the ids: from their SF-XL names, from `manifest`
    (its paths and the ids both relative to `images`, default the manifest's folder), or none."""
    root = Path(images) if images is not None else (Path(manifest).parent if manifest is not None else None)
    keys = image_ids(pl.Series("id", ids, dtype=pl.String), root, where)
    if not labelled:
        return unlabelled(keys.to_list())
    if manifest is None:
        return parse_sfxl_names(keys.to_list(), f"ids of {where}")
    table = read_manifest(manifest, path_column=path_column, images=root)
    missing = keys.filter(~keys.is_in(table["image_id"].implode()))
    if missing.len():
        shown = "\n  ".join(missing.head(SHOWN).to_list())
        raise BadInput(f"{where}: {missing.len():,} of {len(ids):,} ids have no row in --manifest {manifest}, "
                       f"first:\n  {shown}\nIds and the manifest's `{path_column}` are matched relative to "
                       f"{'--images ' + str(images) if images is not None else 'the manifest folder ' + str(root)}: "
                       "add their rows, pass the --images folder both are relative to, or --unlabelled")
    return keys.to_frame().join(table, on="image_id", how="left", maintain_order="left").select(list(LABEL_SCHEMA))


def import_descriptors(descriptors: Path, out: Path, split: str = "train", *, model_name: str,
                       ids: Path | None = None, manifest: Path | None = None, path_column: str = "path",
                       images: Path | None = None, labelled: bool = True, id_column: str | None = None,
                       image_size: int = 0, crop: str = UNKNOWN_CROP, dtype: str = "float16",
                       shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False) -> ImportResult:
    """`dcfeat import`: check the descriptors, their ids and labels against each other and the store,
    then write them as `split` of `out`. `image_size` 0 and `crop` "unknown": not known."""
    t0 = time.perf_counter()
    check_split_name(split)
    out = check_store_path(out)
    if not model_name or not model_name.strip() or "\n" in model_name:
        raise BadInput("--model-name: name the model that computed the descriptors (e.g. MegaLoc), one line")
    if dtype not in STORE_DTYPES:
        raise BadInput(f"--dtype {dtype}: choose one of {', '.join(STORE_DTYPES)}")
    if crop not in (*CROPS, UNKNOWN_CROP):
        raise BadInput(f"--crop {crop}: choose one of {', '.join((*CROPS, UNKNOWN_CROP))}")
    if shard_rows < 1 or image_size < 0:
        raise BadInput("--shard-rows must be at least 1 and --image-size at least 0 (unknown)")
    with open_descriptors(descriptors, ids_file=ids, split=split, id_column=id_column) as found:
        labels = label_rows(found.ids, found.where, manifest=manifest, path_column=path_column, images=images,
                            labelled=labelled)
        digest = scan_values(found, dtype)
        dim = int(found.values.shape[1])
        attrs = {**imported_identity(model_name.strip(), dim), "backbone_random_init": False,
                 "image_size": int(image_size), "crop": crop, "dtype": dtype,
                 "images_root": str(Path(images).resolve()) if images is not None else "",
                 "descriptors_digest": digest, "dcfeat_version": __version__}
        if not labelled:
            attrs["labelled"] = False
        out.parent.mkdir(parents=True, exist_ok=True)
        with writing(out.parent):
            done = write_split(out, split, found.values, labels, attrs, overwrite=overwrite, shard_rows=shard_rows)
    return ImportResult(store=out, split=split, rows=labels.height, dim=dim, model=attrs["model"],
                        fingerprint=attrs["model_fingerprint"], labelled=labelled, already_complete=done,
                        seconds=time.perf_counter() - t0)
