"""The cell-sorted database the hybrid searches (DESIGN.md, "Database index"): unit embeddings sorted by
class, a class → (start, count) table, and per row where the photo was taken.

A database is a folder:

    DB/manifest.json                     format, what it was built for, space, dim, dtype, rows, segments
    DB/segments/000000/embeddings.npy    (rows, D) float16 unit rows, sorted by class (stable)
    DB/segments/000000/rows.parquet      ROW_SCHEMA, one row per embedding row, in the same order
    DB/segments/000001/...               rows appended later (`add`), sorted the same way on their own

The database's own row order is the segments' rows one after the other. Each segment's class → (start,
count) table follows from its sorted `class` column, so it is made on opening, never stored beside it
to disagree. Embeddings are a plain `.npy` (any tool reads it), opened with `np.load(mmap_mode="r")`
for exact search over every row, and read for the hybrid with one `os.preadv` per run of adjacent
candidate cells into the block's own buffer: no library call per read (h5py costs ~40 µs a call, and a
block of queries reads one range per candidate cell), no chunk cache, and no page of the file counted
in the process's memory (slices of the memory map were: the kernel maps 64 KB around each fault, and
2,000 queries over 18 % of a 732 MB file left 592 MB of it in RSS; `pipelines/benchmarks/database.py`).
Only the rows of the candidate cells are ever read: query cost follows the candidates, and a database
larger than memory is searched from disk.

Writing is atomic: a new database is filled under a temporary name and renamed into place; `add`
writes its segment under a temporary name, renames it into `segments/`, then replaces the manifest,
which alone says which segments belong. A writer killed at any point leaves the old database whole
(a segment no manifest lists is removed by the next writer), and the same command writes the same
files again. A segment records its source (store, split, plan id): adding one source twice adds nothing.

The database is support: the caller gives each row's class (dcfeat.partition.assign_classes) and says
what the database is built for (`built_for`, checked on use by `check_built_for`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from dcfeat.atomic import exclusive, fsync_dir, leftover_tmp_files, tmp_dir, write_text
from dcfeat.devices import sampled_products
from dcfeat.errors import BadInput, DamagedStore, IncompatibleFeatures, first_line
from dcfeat.geo import Places
from dcfeat.retrieval import topk_cosine

FORMAT = 1
MANIFEST, SEGMENTS = "manifest.json", "segments"
EMBEDDINGS, ROWS = "embeddings.npy", "rows.parquet"
DTYPE = np.float16
# One row of the database: `row` is the row of the split it came from, `class` the class it is searched
# under, `outside` whether its own cell is no class (it was given the nearest class's).
ROW_SCHEMA = {"row": pl.Int64, "image_id": pl.String, "utm_east": pl.Float64, "utm_north": pl.Float64,
              "utm_zone": pl.Int8, "utm_letter": pl.String, "class": pl.Int64, "outside": pl.Boolean}
# What `search` keeps of every row in memory: the rest (image ids) is read when asked for.
HELD = [c for c in ROW_SCHEMA if c != "image_id"]
# Candidate values gathered per block of queries (128 MiB as float32), as dcfeat.retrieval's blocks.
MAX_ELEMENTS = 1 << 25
# A block's union of candidate rows is read as float32: at most max_elements values, (block · L · D) for L
# candidate rows per query. Scoring rows held in memory as float32 in place reads no copy, so there blocks
# are larger, about max_elements / (L · SCORED_PER_ROW) queries: what they hold is the (block, L) lists.
SCORED_PER_ROW = 64
# Rows written per step when a database held in memory is saved.
WRITE_CHUNK = 65536


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (in float32), stored as float16: what a database holds."""
    return F.normalize(x.float(), dim=1).half()


@dataclass
class NewRows:
    """Rows to write as one segment, in their source order: each row's class and labels (`row`, `image_id`,
    utm_*; ROW_SCHEMA less `class` and `outside`), and their unit embeddings as chunks in the same order
    (numpy or torch, any float type; read once, never held whole). `source`: where they came from."""

    classes: np.ndarray
    outside: np.ndarray
    labels: pl.DataFrame
    chunks: Iterable
    source: dict = field(default_factory=dict)
    farthest_m: float = 0.0  # metres from an outside row's cell to its class's cell, the largest


@dataclass
class Segment:
    """One cell-sorted part: its embeddings (a memory map, or a tensor for a database built in memory),
    its class → (start, count) table, and where its rows start in the database's row order."""

    name: str
    embeddings: np.ndarray | torch.Tensor
    starts: np.ndarray  # int64 (classes,)
    counts: np.ndarray  # int64 (classes,)
    offset: int
    file: object = None  # the embeddings file opened for reading (a database on disk)

    def read(self, starts: np.ndarray, counts: np.ndarray, device: torch.device) -> torch.Tensor:
        """The rows of the ranges [start, start + count), one after the other, as float32 on `device`. On
        disk, each run of adjacent ranges is one read (os.preadv) into the block's own buffer: a slice of the
        memory map would map the pages around it too (the kernel's fault-around: 64 KB per fault), so that
        scattered cells left most of the file counted in the process's memory."""
        if isinstance(self.embeddings, torch.Tensor):
            index = range_index(starts, counts).to(self.embeddings.device)
            return self.embeddings[index].to(device, torch.float32)
        keep = counts > 0
        starts, ends = starts[keep], starts[keep] + counts[keep]
        new = np.concatenate([[True], starts[1:] != ends[:-1]]) if len(starts) else np.zeros(0, bool)
        first, last = starts[new], np.append(ends[np.flatnonzero(new)[1:] - 1], ends[-1:])
        rows = np.empty((int(counts.sum()), self.embeddings.shape[1]), DTYPE)
        at, row_bytes = 0, rows.itemsize * rows.shape[1]
        for a, b in zip(first.tolist(), last.tolist()):
            if self.file is None:
                rows[at:at + b - a] = self.embeddings[a:b]
            else:
                done = os.preadv(self.file.fileno(), [memoryview(rows[at:at + b - a]).cast("B")],
                                 self.embeddings.offset + a * row_bytes)
                if done != (b - a) * row_bytes:
                    raise _damaged(Path(self.file.name), f"rows {a}..{b - 1} could not be read (file truncated?)")
            at += b - a
        return torch.from_numpy(rows).to(device, torch.float32)


def range_index(starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """The indices start, start + 1, ..., start + count - 1 of every range, one range after the other (int64)."""
    starts, counts = torch.as_tensor(starts, dtype=torch.int64), torch.as_tensor(counts, dtype=torch.int64)
    return torch.repeat_interleave(starts - counts.cumsum(0) + counts, counts) + torch.arange(int(counts.sum()))


def _ranges(classes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) per class of a sorted `class` column."""
    starts = np.searchsorted(classes, np.arange(num_classes), side="left")
    return starts.astype(np.int64), (np.searchsorted(classes, np.arange(num_classes), side="right") - starts)


def _sorted_order(classes: np.ndarray) -> np.ndarray:
    """Rows by class, in their own order within a class."""
    return np.argsort(classes, kind="stable")


def _damaged(path: Path, problem: str) -> DamagedStore:
    return DamagedStore(f"{path}: {problem}. The database was edited or damaged: build it again with `dcfeat "
                        "index` (and its `--add` commands)")


class CellDatabase:
    """Unit embeddings sorted by class in segments, per row its place, class and whether its own cell is a
    class; searched among the rows of given classes (`search`) or all rows (`search_all`)."""

    def __init__(self, segments: list[Segment], table: pl.DataFrame, header: dict, path: Path | None = None):
        self.segments, self.table, self.header, self.path = segments, table, header, path
        self._ids: np.ndarray | None = None
        self._places: Places | None = None  # every row's, as numpy, on first use (`places`)
        self._counts = torch.as_tensor(np.stack([s.counts for s in segments]))  # (segments, classes)

    # --- what it is ---------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.table.height

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    @property
    def classes(self) -> int:
        return int(self.header["classes"])

    @property
    def space(self) -> str:
        return str(self.header["space"])

    @property
    def built_for(self) -> dict:
        return dict(self.header["built_for"])

    @property
    def outside(self) -> int:
        """Rows whose own cell is no class (searched under the nearest class)."""
        return int(self.table["outside"].sum())

    def cells(self) -> int:
        """Classes that hold at least one row."""
        return int((self._counts.sum(0) > 0).sum())

    def counts_of(self, cells) -> np.ndarray:
        """Rows per class id (any shape; -1: no class, 0 rows)."""
        cells = torch.as_tensor(np.asarray(cells), dtype=torch.int64)
        return torch.where(cells >= 0, self._counts.sum(0)[cells.clamp(min=0)], 0).numpy()

    def check_built_for(self, expected: dict, fix: str) -> None:
        """Refuse a database built for something else: a key of `built_for` whose value differs from `expected`'s."""
        have = self.built_for
        diff = {k: (have[k], v) for k, v in expected.items() if k in have and have[k] != v}
        if diff:
            shown = "; ".join(f"{k}: database {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise IncompatibleFeatures(f"{self.path or 'the database'} was built for another run or space ({shown}). "
                                       f"{fix}")

    # --- in memory ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, rows: NewRows, *, num_classes: int, space: str, built_for: dict,
              device: str | torch.device = "cpu") -> CellDatabase:
        """A one-segment database in memory on `device`, from `rows` (their chunks of unit rows read whole):
        sorted by class as a written one is, and searched the same way."""
        chunks = [torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c).to(device, torch.float16)
                  for c in rows.chunks]
        if not chunks:
            raise ValueError("a database needs rows: the caller refuses an empty split")
        embeddings = torch.cat(chunks)
        order = _sorted_order(rows.classes)
        # Held as float32 (of the float16 values a file holds, so that both search alike): the search scores
        # each cell's rows in place, with no float32 copy per block.
        emb = embeddings[torch.as_tensor(order).to(embeddings.device)].float()
        table = _table(rows, order)
        starts, counts = _ranges(table["class"].to_numpy(), num_classes)
        header = _header(num_classes, space, built_for, emb.shape[1], [_entry("000000", rows, table)])
        return cls([Segment("000000", emb, starts, counts, 0)], table, header)

    def save(self, path: Path) -> CellDatabase:
        """Write this database (built in memory) to a new folder `path`, atomically; the opened copy."""
        def chunks():
            for seg in self.segments:
                for start in range(0, len(seg.embeddings), WRITE_CHUNK):
                    block = seg.embeddings[start:start + WRITE_CHUNK]
                    yield block.cpu().numpy() if isinstance(block, torch.Tensor) else block

        table = self.table.with_columns(image_id=pl.Series(self.ids(np.arange(self.rows)), dtype=pl.String))
        entry = self.header["segments"][0]
        rows = NewRows(table["class"].to_numpy(), table["outside"].to_numpy(), table, chunks(), entry["source"],
                       entry["farthest_outside_m"])
        return create(path, rows, num_classes=self.classes, space=self.space, built_for=self.built_for,
                      dim=self.dim)

    # --- on disk ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> CellDatabase:
        """The database in folder `path`, its embeddings memory-mapped, checked against its manifest."""
        path = Path(path)
        header = read_manifest(path)
        segments, tables, offset = [], [], 0
        for entry in header["segments"]:
            folder = path / SEGMENTS / entry["name"]
            try:
                emb = np.load(folder / EMBEDDINGS, mmap_mode="r")
                table = pl.read_parquet(folder / ROWS, columns=HELD)
            except (OSError, ValueError, pl.exceptions.PolarsError) as e:
                raise _damaged(folder, f"unreadable segment ({first_line(e)})") from None
            if emb.dtype != DTYPE or emb.shape != (entry["rows"], header["dim"]) or table.height != entry["rows"]:
                raise _damaged(folder, f"embeddings {emb.dtype} {emb.shape} and {table.height} rows, where "
                                       f"{MANIFEST} says {entry['rows']} rows of {header['dim']} float16 values")
            classes = table["class"].to_numpy()
            if len(classes) and (np.any(np.diff(classes) < 0) or classes[0] < 0 or classes[-1] >= header["classes"]):
                raise _damaged(folder / ROWS, f"class column not sorted within 0..{header['classes'] - 1}")
            segments.append(Segment(entry["name"], emb, *_ranges(classes, header["classes"]), offset,
                                    open(folder / EMBEDDINGS, "rb", buffering=0)))
            tables.append(table)
            offset += entry["rows"]
        return cls(segments, pl.concat(tables), header, path)

    def add(self, rows: NewRows) -> CellDatabase:
        """Append `rows` as a new segment (atomic, resumable: see the module); the database reopened. Rows
        from a source already added (same store, split and plan id) are not added again."""
        if self.path is None:
            raise ValueError("add appends to a database on disk: save it first")
        return append(self.path, rows, dim=self.dim)

    def added(self, source: dict) -> bool:
        """Whether rows of `source` are in the database already (its plan id names the images)."""
        return bool(source.get("plan_id")) and any(e["source"] == source for e in self.header["segments"])

    # --- answers ------------------------------------------------------------------------------------------
    def places(self, rows: np.ndarray) -> Places:
        """Where the photos of database rows were taken, in the shape of `rows`; NaN (zone 0, letter "") for -1.
        Every row's columns are converted from the table once (a string column alone took ~0.1 s per call at
        1.25 M rows, as long as the fused hybrid's search of 500 queries)."""
        if self._places is None:
            t = self.table
            self._places = Places(t["utm_east"].to_numpy(), t["utm_north"].to_numpy(), t["utm_zone"].to_numpy(),
                                  t["utm_letter"].to_numpy().astype("U1"))
        rows = np.asarray(rows)
        safe, there = np.where(rows >= 0, rows, 0), rows >= 0
        return Places(*(np.where(there, column[safe], fill)
                        for column, fill in zip(self._places, (np.nan, np.nan, 0, ""))))

    def source_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows of their source split of database rows (-1 stays -1)."""
        rows = np.asarray(rows)
        return np.where(rows >= 0, self.table["row"].to_numpy()[np.where(rows >= 0, rows, 0)], -1)

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """The image ids of database rows (None for -1); read from disk on first use."""
        if self._ids is None:
            self._ids = (np.concatenate([pl.read_parquet(self.path / SEGMENTS / s.name / ROWS, columns=["image_id"])
                                         ["image_id"].to_numpy() for s in self.segments])
                         if self.path is not None else self.table["image_id"].to_numpy())
        rows = np.asarray(rows)
        return np.where(rows >= 0, self._ids[np.where(rows >= 0, rows, 0)], None)

    def search(self, queries: torch.Tensor, cells, k: int, bias=None, *,
               max_elements: int = MAX_ELEMENTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k rows by cosine (+ `bias`) for query i among the rows of its classes `cells[i]` only.

        `queries` (nq, D) unit float32 on the device to search on; `cells` (nq, C) int64 class ids, -1 for
        none; `bias` (nq, C) float32, added to the cosine of every row of that cell slot (a per-cell prior).
        Queries go in blocks of about `max_elements` candidate values: per block, the rows of the union of
        its queries' cells are read once (contiguous slices per cell and segment; a database held in memory
        as float32 is not copied at all), and one sampled product (dcfeat.devices.sampled_products) scores
        each query against its candidate rows where they lie, into its padded (block, L) candidate list: no
        row is copied per query, and no Python loop runs per query or per cell.
        A query's candidates are its slots' rows in slot order, each slot's segment by segment in row order
        (the tie order). Returns scores (nq, k) float32 with the bias, database rows (nq, k) int64 and the
        cosines without it (nq, k); past a query's candidates -inf, -1 and -inf.
        """
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have {queries.shape[1]} dimensions but the database has {self.dim}")
        device = queries.device
        cells = torch.as_tensor(np.asarray(cells), dtype=torch.int64)
        nq, n_slots = cells.shape
        n_seg = len(self.segments)
        bias = None if bias is None else torch.as_tensor(np.asarray(bias), dtype=torch.float32)
        out_s = torch.full((nq, k), -torch.inf)
        out_c = torch.full((nq, k), -torch.inf)
        out_i = torch.full((nq, k), -1, dtype=torch.int64)
        there = cells >= 0
        # (nq, C, segments): rows of each slot's cell in each segment, slot-major then segment.
        counts = torch.where(there[:, :, None], self._counts.T[cells.clamp(min=0)], 0)
        totals = counts.sum((1, 2))
        first_seg = self.segments[0].embeddings
        in_place = (n_seg == 1 and isinstance(first_seg, torch.Tensor) and first_seg.dtype == torch.float32
                    and first_seg.device == device)
        per_row = min(self.dim, SCORED_PER_ROW) if in_place else self.dim
        block = max(1, max_elements // (max(1, int(totals.max()) if nq else 1) * per_row))
        with torch.inference_mode():
            for qs in range(0, nq, block):
                qe = min(qs + block, nq)
                width = int(totals[qs:qe].max())
                if width == 0:
                    continue
                c = cells[qs:qe]
                union = torch.unique(c[c >= 0])  # sorted: each segment's ranges come in file order
                if in_place:  # one segment in memory, float32 on this device: its cells scored where they are
                    seg = self.segments[0]
                    buffer, rows = seg.embeddings, None
                    first = torch.as_tensor(seg.starts[union.numpy()])[None]
                else:
                    buffer, rows, first = [], [], torch.zeros(n_seg, len(union), dtype=torch.int64)
                    held = 0
                    for s, seg in enumerate(self.segments):
                        st, n = seg.starts[union.numpy()], seg.counts[union.numpy()]
                        first[s] = held + torch.as_tensor(np.cumsum(n) - n)
                        buffer.append(seg.read(st, n, device))
                        rows.append(seg.offset + range_index(st, n))
                        held += int(n.sum())
                    buffer, rows = torch.cat(buffer), torch.cat(rows).to(device)
                # Each (slot, segment) of a query owns the columns [col, col + n) of its candidate list: the
                # rows of that cell in that segment, at buffer[start, start + n). One sampled product scores
                # every (query, candidate row) pair of the block where the rows lie (no row copied per query,
                # no Python loop per cell or query).
                n = counts[qs:qe]  # (block, C, segments)
                slot_cell = torch.searchsorted(union, c.clamp(min=0)).clamp(max=len(union) - 1)  # n is 0 past -1
                start = first.T[slot_cell]  # (block, C, segments)
                per_query = n.sum((1, 2))
                pairs = int(per_query.sum())
                where = range_index(start.flatten(), n.flatten())  # buffer positions, query by query
                query_of = torch.repeat_interleave(torch.arange(len(c)), per_query)
                column = torch.arange(pairs) - torch.repeat_interleave(per_query.cumsum(0) - per_query, per_query)
                q_block = queries[qs:qe].float()
                sims = sampled_products(q_block, buffer, per_query.to(device), where.to(device))
                cos = torch.full((len(c), width), -torch.inf, device=device)
                at = torch.zeros((len(c), width), dtype=torch.int64, device=device)
                qd, cd = query_of.to(device), column.to(device)
                cos[qd, cd], at[qd, cd] = sims, where.to(device)
                if bias is None:
                    score = cos
                else:
                    score = cos.clone()
                    per_slot = bias[qs:qe][:, :, None].expand(n.shape).flatten()
                    score[qd, cd] = sims + torch.repeat_interleave(per_slot, n.flatten()).to(device)
                kk = min(k, width)
                top_s, top_p = torch.topk(score, kk, dim=1)
                out_s[qs:qe, :kk] = top_s.cpu()
                out_c[qs:qe, :kk] = cos.gather(1, top_p).cpu()
                found = at.gather(1, top_p)
                out_i[qs:qe, :kk] = torch.where(torch.isneginf(top_s), -1,
                                                found if rows is None else rows[found]).cpu()
        return out_s.numpy(), out_i.numpy(), out_c.numpy()

    def search_all(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k rows by cosine among every row (dcfeat.retrieval.topk_cosine per segment, merged):
        scores float32 and database rows int64, (nq, min(k, rows))."""
        best_s = torch.full((len(queries), 0), -torch.inf)
        best_i = torch.zeros((len(queries), 0), dtype=torch.int64)
        for seg in self.segments:
            if len(seg.embeddings) == 0:
                continue
            s, i = topk_cosine(queries, seg.embeddings, k, device=queries.device, normalize=False)
            best_s, best_i = torch.cat([best_s, torch.from_numpy(s)], 1), torch.cat([best_i, torch.from_numpy(i) + seg.offset], 1)
        kk = min(k, best_s.shape[1])
        s, at = torch.topk(best_s, kk, dim=1)
        return s.numpy(), best_i.gather(1, at).numpy()


def _table(rows: NewRows, order: np.ndarray) -> pl.DataFrame:
    """The segment's rows table (ROW_SCHEMA) in sorted order."""
    frame = rows.labels.with_columns(pl.Series("class", rows.classes, dtype=pl.Int64),
                                     pl.Series("outside", rows.outside, dtype=pl.Boolean))
    return frame.select([pl.col(c).cast(t) for c, t in ROW_SCHEMA.items()])[order]


def _entry(name: str, rows: NewRows, table: pl.DataFrame) -> dict:
    return {"name": name, "rows": table.height, "outside": int(table["outside"].sum()),
            "farthest_outside_m": float(rows.farthest_m), "source": rows.source}


def _header(num_classes: int, space: str, built_for: dict, dim: int, segments: list[dict]) -> dict:
    return {"format": FORMAT, "built_for": built_for, "space": space, "dim": int(dim), "dtype": "float16",
            "classes": int(num_classes), "rows": sum(e["rows"] for e in segments),
            "outside": sum(e["outside"] for e in segments), "segments": segments}


NOT_A_DATABASE = "build one with `dcfeat index --run RUN --feats STORE --split SPLIT --out FOLDER`"


def read_manifest(path: Path) -> dict:
    """A database's manifest, checked to be one this dcfeat reads."""
    path = Path(path)
    manifest = path / MANIFEST
    if not path.is_dir() or not manifest.is_file():
        what = "no such folder" if not path.exists() else ("a file" if not path.is_dir() else f"no {MANIFEST}")
        raise BadInput(f"{path} is not a database ({what}); {NOT_A_DATABASE}")
    try:
        header = json.loads(manifest.read_text())
    except ValueError as e:
        raise _damaged(manifest, f"not valid JSON ({first_line(e)})") from None
    if not isinstance(header, dict) or not isinstance(header.get("format"), int):
        raise BadInput(f"{path} is not a database ({MANIFEST} has no format version); {NOT_A_DATABASE}")
    if header["format"] > FORMAT:
        raise BadInput(f"{path}: database format {header['format']} is newer than this dcfeat reads ({FORMAT}): "
                       "upgrade dcfeat, or build the database again with this one")
    keys = ("built_for", "space", "dim", "classes", "rows", "segments")
    if any(k not in header for k in keys) or not all(isinstance(e, dict) and {"name", "rows", "source"} <= e.keys()
                                                     for e in header["segments"]):
        raise _damaged(manifest, f"lacks some of {', '.join(keys)}")
    return header


def _lock(path: Path):
    """One writer per database, beside its folder (it may not exist yet)."""
    path = Path(path)
    return exclusive(path.parent / f".{path.name}.lock", f"{path} is being written by {{holder}}; wait for it, or "
                     "write another --out", remove=True, holder="dcfeat index")


def _write_segment(folder: Path, rows: NewRows, dim: int) -> pl.DataFrame:
    """Fill `folder` with a segment of `rows`: the embeddings scattered into their sorted places chunk by
    chunk (a memory map: never the whole array in memory), then the rows table; both made durable."""
    order = _sorted_order(rows.classes)
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    emb = np.lib.format.open_memmap(folder / EMBEDDINGS, mode="w+", dtype=DTYPE, shape=(len(order), dim))
    done = 0
    for chunk in rows.chunks:
        chunk = chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != dim:
            raise IncompatibleFeatures(f"rows of {chunk.shape[-1]} values for a database of {dim}: another "
                                       "projection or other features than the database holds")
        emb[place[done:done + len(chunk)]] = chunk.astype(DTYPE)
        done += len(chunk)
    if done != len(order):
        raise ValueError(f"{done} embedding rows for {len(order)} labelled rows")
    emb.flush()
    del emb
    table = _table(rows, order)
    table.write_parquet(folder / ROWS)
    for name in (EMBEDDINGS, ROWS):
        with open(folder / name, "rb+") as f:
            os.fsync(f.fileno())
    fsync_dir(folder)
    return table


def _clear_leftovers(final: Path) -> None:
    """What killed writers left beside `final`: their temporary files and folders."""
    for tmp in leftover_tmp_files(final):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def create(path: Path, rows: NewRows, *, num_classes: int, space: str, built_for: dict, dim: int) -> CellDatabase:
    """Write a new database of one segment at `path` (which must not exist), atomically; it opened."""
    path = Path(path)
    with _lock(path):
        if path.exists():
            raise BadInput(f"--out {path} exists; add rows to a database with `dcfeat index --add`, or choose a new "
                           "--out")
        _clear_leftovers(path)
        tmp = tmp_dir(path)
        try:
            (tmp / SEGMENTS / "000000").mkdir(parents=True)
            table = _write_segment(tmp / SEGMENTS / "000000", rows, dim)
            fsync_dir(tmp / SEGMENTS)
            write_text(tmp / MANIFEST, json.dumps(_header(num_classes, space, built_for, dim,
                                                          [_entry("000000", rows, table)]), indent=1) + "\n")
            tmp.rename(path)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return CellDatabase.open(path)


def append(path: Path, rows: NewRows, *, dim: int) -> CellDatabase:
    """Add `rows` to the database at `path` as a new segment (see the module); it reopened."""
    path = Path(path)
    with _lock(path):
        header = read_manifest(path)  # the manifest of now, under the lock
        if rows.source.get("plan_id") and any(e["source"] == rows.source for e in header["segments"]):
            return CellDatabase.open(path)
        name = f"{len(header['segments']):06d}"
        folder = path / SEGMENTS
        _clear_leftovers(path / MANIFEST)
        listed = {e["name"] for e in header["segments"]}
        for stale in folder.iterdir():  # a killed add's segment, renamed in but never listed
            if stale.name not in listed:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_dir(folder / name)
        try:
            table = _write_segment(tmp, rows, dim)
            tmp.rename(folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(folder)
        segments = [*header["segments"], _entry(name, rows, table)]
        header = _header(header["classes"], header["space"], header["built_for"], dim, segments)
        write_text(path / MANIFEST, json.dumps(header, indent=1) + "\n")
    return CellDatabase.open(path)
