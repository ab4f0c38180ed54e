"""The hybrid's search of a database on disk: peak memory against the file's size, and its speed.

A random database of `--rows` unit float16 rows (`--dim` wide, about 20 rows per cell as SF-XL's test
database has) is written with dcfeat.database's writer, then searched by a fresh process for `--queries`
random queries among `--cells` random cells each (what `evaluate --cells C` searches): the search reads
only the candidate cells' rows from the memory-mapped file. The search process reports its peak RSS
(VmHWM), split into anonymous memory and file pages mapped. Inputs: none (seeded). Run from the
repository root: `python -m pipelines.benchmarks run database` (1 M rows: a few minutes on 2 cores).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import polars as pl
import torch

from dcfeat.database import CellDatabase, NewRows, create, unit_rows
from pipelines.benchmarks.markdown import command, measured, not_measured, table

ROWS_PER_CELL = 20
# `rows` names the callback of benchmarks that report row by row: the option's parameter is `size`.
OPTIONS = [click.Option(["--rows", "size"], default=1_000_000, show_default=True, type=click.IntRange(1000),
                        help="Database rows."),
           click.Option(["--dim"], default=384, show_default=True, type=click.IntRange(1), help="Descriptor width."),
           click.Option(["--queries"], default=2000, show_default=True, type=click.IntRange(1)),
           click.Option(["--cells"], default=5, show_default=True, type=click.IntRange(1),
                        help="Candidate cells per query.")]


def status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in MB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def write_random(path: Path, rows: int, dim: int) -> float:
    """A random database at `path`, written chunk by chunk; seconds taken."""
    rng = np.random.default_rng(0)
    classes = rows // ROWS_PER_CELL
    labels = pl.DataFrame({"row": np.arange(rows), "image_id": np.char.add("db/", np.arange(rows).astype(str)),
                           "utm_east": rng.uniform(0, 1e4, rows), "utm_north": rng.uniform(0, 1e4, rows),
                           "utm_zone": np.full(rows, 10, np.int8), "utm_letter": np.full(rows, "S")})
    gen = torch.Generator().manual_seed(0)
    chunks = (unit_rows(torch.randn(min(65536, rows - s), dim, generator=gen)) for s in range(0, rows, 65536))
    t = time.perf_counter()
    create(path, NewRows(rng.integers(0, classes, rows), np.zeros(rows, bool), labels, chunks, {"split": "random"}),
           num_classes=classes, space="raw", built_for={}, dim=dim)
    return time.perf_counter() - t


def _search(path: str, queries: int, cells: int, out) -> None:
    """In a fresh process: open the database, search, report time, rows read and memory."""
    torch.set_num_threads(2)
    db = CellDatabase.open(Path(path))
    opened = status()
    rng = np.random.default_rng(1)
    q = torch.nn.functional.normalize(torch.randn(queries, db.dim, generator=torch.Generator().manual_seed(1)), dim=1)
    top = rng.integers(0, db.classes, (queries, cells))
    db.search(q[:64], top[:64], 20)  # warm-up
    t = time.perf_counter()
    _, found, _ = db.search(q, top, 20)
    seconds = time.perf_counter() - t
    out.put({"seconds": seconds, "ms_per_query": 1000 * seconds / queries, "answered": float((found[:, 0] >= 0).mean()),
             "mean_candidates": float(db.counts_of(top).sum(1).mean()),
             "distinct_rows_read": int(db.counts_of(np.unique(top)).sum()), "after_open": opened, "end": status()})


def measure(*, size: int = 1_000_000, dim: int = 384, queries: int = 2000, cells: int = 5) -> dict:
    rows = size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        write_s = write_random(path, rows, dim)
        size = (path / "segments" / "000000" / "embeddings.npy").stat().st_size
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        proc = context.Process(target=_search, args=(str(path), queries, cells, out))
        proc.start()
        result = out.get()
        proc.join()
    row_mb = dim * 2 / 2**20
    return {"rows": rows, "dim": dim, "queries": queries, "cells": cells, "classes": rows // ROWS_PER_CELL,
            "file_mb": size / 2**20, "write_s": write_s, "read_mb": result["distinct_rows_read"] * row_mb, **result}


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("database")
    rows = [[f"{r['rows']:,} × {r['dim']}", f"{r['file_mb']:,.0f} MB", f"{r['queries']:,} × {r['cells']}",
             f"{r['read_mb']:,.0f} MB", f"{r['after_open']['VmHWM']:,.0f} MB", f"{r['end']['VmHWM']:,.0f} MB",
             f"{r['end']['RssAnon']:,.0f} MB",
             f"{r['end']['RssFile']:,.0f} MB", f"{r['ms_per_query']:.2f}", f"{r['write_s']:.0f} s"] for r in results]
    return (f"A random database written by `dcfeat.database`'s writer and searched by a fresh process "
            f"(random cells, about {ROWS_PER_CELL} rows each){measured(results[-1])} ({command('database')}). "
            "Peak RSS is the search process's VmHWM: anonymous memory (the blocks, the rows table) plus the file's "
            "pages it mapped; the file itself is never read whole:\n\n"
            + table(["rows × dim", "file", "queries × cells", "rows read", "RSS opened", "peak RSS", "anon", "file pages",
                     "ms/query", "write"], rows))
