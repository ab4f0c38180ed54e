"""The fused hybrid's query cost as the database grows: it follows the candidate rows, not the database.

For each of `--sizes` (rows), a random database of unit float16 rows (`--dim` wide, about 20 rows per cell,
so cells grow with it as a city's photos do) is written with dcfeat.database's writer
(pipelines/benchmarks/database.py), and a fresh process searches it for `--queries` queries among `--cells`
random cells each: each query is a noisy copy (cosine ~0.8) of a random row of its first cell, so that the
search finds its photo. Timed: `CellDatabase.search` alone, and the fused hybrid (dcfeat.fusion's `search`,
`weights`, `answers` at ranks 1 and 20), with a cold page cache (every segment's embeddings file dropped with
posix_fadvise(DONTNEED) before the pass) and warm (a second pass). Recorded: ms/query, candidate rows per
query, bytes the cold pass read from storage (/proc/self/io), the search process's peak RSS (VmHWM) and the
file's size. At `--memory-check-at` rows the same rows are also loaded into a tensor-backed database in
another fresh process and searched for the same queries: rows and scores must be identical. At `--faiss-at`
rows, faiss's IndexIVFFlat with on-disk inverted lists (faiss.contrib.ondisk.merge_ondisk) is built from the
same rows and searched by a fresh process at the smallest nprobe whose recall@1 (against the exact top 1
of all rows, dcfeat's `search_all`) reaches the cell search's. `run scale` also draws ms/query against rows
(scale.<date>.<device>.<n>.png beside the record).
Inputs: none (seeded). Run from the repository root, niced on a shared machine:
`nice -n 10 python -m pipelines.benchmarks run scale` (default sizes up to 10 M rows: ~7.3 GB of temporary
files, about half an hour on 2 cores).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from dcfeat import fusion
from dcfeat.database import CellDatabase
from pipelines.benchmarks.database import ROWS_PER_CELL, status, write_random
from pipelines.benchmarks.markdown import command, measured, not_measured, table

SIZES = "75000,300000,1000000,3000000,10000000"
# Where the memory check and faiss run by default: the 3 M rows (faiss's IVF build at 10 M takes most
# of an hour on 2 cores).
CHECK_AT = 3_000_000
# The query's noise: |noise| = NOISE against the unit row, cosine 1 / sqrt(1 + NOISE²) = 0.8 to its photo.
NOISE = 0.75
# The posterior of the query's cells, best first (the fused weights use it; its values do not change the cost).
POSTERIOR = (0.5, 0.2, 0.1, 0.05, 0.05)
PASSES = ("search", "fused_1", "fused_20")
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Rows per shard of the faiss index before merging (float32: 1.5 GB at 384-d).
FAISS_SHARD = 1_000_000


def _sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give row counts separated by commas, e.g. 75000,300000") from None
    if not sizes or min(sizes) < 1000:
        raise click.BadParameter(f"{value!r}: every size needs at least 1,000 rows")
    return sizes


OPTIONS = [click.Option(["--sizes"], default=SIZES, show_default=True, callback=_sizes,
                        help="Database rows, one database per size, comma-separated."),
           click.Option(["--dim"], default=384, show_default=True, type=click.IntRange(1), help="Descriptor width."),
           click.Option(["--queries"], default=2000, show_default=True, type=click.IntRange(1)),
           click.Option(["--cells"], default=5, show_default=True, type=click.IntRange(1, len(POSTERIOR)),
                        help="Candidate cells per query."),
           click.Option(["--memory-check-at"], type=click.IntRange(0),
                        help="The size (one of --sizes; 0: none) also searched in memory, results compared "
                             f"[default: {CHECK_AT:,} where it is one of --sizes]."),
           click.Option(["--faiss-at"], type=click.IntRange(0),
                        help="The size (one of --sizes; 0: none) also searched by faiss IVF on disk "
                             f"[default: {CHECK_AT:,} where it is one of --sizes].")]


def _queries(db: CellDatabase, n: int, cells: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Unit queries, their candidate cells (n, cells) and the row each copies (n,); seeded."""
    rng = np.random.default_rng(1)
    counts = db.counts_of(np.arange(db.classes))
    top = rng.choice(np.flatnonzero(counts > 0), (n, cells))
    seg = db.segments[0]
    source = seg.starts[top[:, 0]] + (rng.random(n) * seg.counts[top[:, 0]]).astype(np.int64)
    rows = seg.read(source, np.ones(n, np.int64), torch.device("cpu"))  # os.preadv: no page mapped
    noise = torch.nn.functional.normalize(torch.randn(n, db.dim, generator=torch.Generator().manual_seed(1)), dim=1)
    return torch.nn.functional.normalize(rows + NOISE * noise, dim=1), top, source


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(":") for line in f)["read_bytes"])


def _drop(files: list[int]) -> None:
    for fd in files:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _passes(db: CellDatabase, q: torch.Tensor, top: np.ndarray, files: list[int]) -> tuple[dict, np.ndarray, np.ndarray]:
    """ms/query of each pass, cold (pages dropped first, bytes read from storage) then warm; the search's top rows
    and scores."""
    p = np.broadcast_to(np.asarray(POSTERIOR[:top.shape[1]]), top.shape)
    none = np.zeros(len(q), bool)

    def fused(ranks: int):
        cand = fusion.search(db, q, top, none)
        w = fusion.weights(cand, top, p, fusion.DEFAULT_FUSED)
        return fusion.answers(cand, w, fusion.DEFAULT_FUSED.radius_m, ranks)

    run = {"search": lambda: db.search(q, top, fusion.CANDIDATES), "fused_1": lambda: fused(1),
           "fused_20": lambda: fused(20)}
    db.search(q[:64], top[:64], fusion.CANDIDATES)  # torch's first call, before the clock
    out = {}
    for cache in ("cold", "warm"):
        for name in PASSES:
            if cache == "cold":
                _drop(files)
            else:
                run[name]()
            read, t = _read_bytes(), time.perf_counter()
            result = run[name]()
            out[f"{name}_{cache}_ms"] = 1000 * (time.perf_counter() - t) / len(q)
            if cache == "cold":
                out[f"{name}_cold_read_mb"] = (_read_bytes() - read) / 2**20
            if name == "search":
                scores, rows, _ = result
    return out, rows, scores


def _search_disk(path: str, q: torch.Tensor, top: np.ndarray, out) -> None:
    """In a fresh process: the database on disk, every pass timed; its results and memory."""
    torch.set_num_threads(2)
    db = CellDatabase.open(Path(path))
    opened = status()
    times, rows, scores = _passes(db, q, top, [s.file.fileno() for s in db.segments])
    out.put({**times, "after_open": opened, "end": status(), "rows_found": rows, "scores_found": scores})


def _load(db: CellDatabase) -> None:
    """Every segment's rows read into a float16 tensor (the in-memory form `CellDatabase.build` makes)."""
    for seg in db.segments:
        buf = np.empty(seg.embeddings.shape, seg.embeddings.dtype)
        step = max(1, (1 << 30) // (buf.itemsize * buf.shape[1]))  # one read is at most 2 GB
        for a in range(0, len(buf), step):
            done = os.preadv(seg.file.fileno(), [memoryview(buf[a:a + step]).cast("B")],
                             seg.embeddings.offset + a * buf.itemsize * buf.shape[1])
            assert done == buf[a:a + step].nbytes
        seg.file.close()
        seg.embeddings, seg.file = torch.from_numpy(buf), None


def _search_memory(path: str, q: torch.Tensor, top: np.ndarray, out) -> None:
    """In a fresh process: the same rows held in memory, searched for the same queries."""
    torch.set_num_threads(2)
    db = CellDatabase.open(Path(path))
    _load(db)
    loaded = status()
    db.search(q[:64], top[:64], fusion.CANDIDATES)
    t = time.perf_counter()
    scores, rows, _ = db.search(q, top, fusion.CANDIDATES)
    out.put({"search_ms": 1000 * (time.perf_counter() - t) / len(q), "after_load": loaded, "end": status(),
             "rows_found": rows, "scores_found": scores})


def _fresh(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    proc = context.Process(target=target, args=(*args, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def _nlist(rows: int) -> int:
    """About √rows inverted lists (a power of two): lists of ~√rows rows, cheap to assign on 2 cores."""
    return 2 ** max(4, round(math.log2(math.sqrt(rows))))


def _build_faiss(db: CellDatabase, folder: Path) -> tuple[Path, dict]:
    """IndexIVFFlat (inner product) trained on a sample of the rows, its lists on disk; the index file's path."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    faiss.omp_set_num_threads(2)
    emb = db.segments[0].embeddings
    nlist = _nlist(db.rows)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(db.dim), db.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    sample = np.sort(np.random.default_rng(2).choice(db.rows, min(db.rows, 50 * nlist), replace=False))
    t = time.perf_counter()
    index.train(np.asarray(emb[sample], np.float32))
    train_s = time.perf_counter() - t
    trained = folder / "trained.index"
    faiss.write_index(index, str(trained))
    shards = []
    t = time.perf_counter()
    for a in range(0, db.rows, FAISS_SHARD):
        shard = faiss.read_index(str(trained))
        b = min(a + FAISS_SHARD, db.rows)
        shard.add_with_ids(np.asarray(emb[a:b], np.float32), np.arange(a, b, dtype=np.int64))
        shards.append(folder / f"shard{len(shards)}.index")
        faiss.write_index(shard, str(shards[-1]))
        del shard
    index = faiss.read_index(str(trained))
    merge_ondisk(index, [str(s) for s in shards], str(folder / "lists.ivfdata"))
    populated = folder / "populated.index"
    faiss.write_index(index, str(populated))
    for s in shards:
        s.unlink()
    return populated, {"nlist": nlist, "trained_on": len(sample), "train_s": train_s,
                       "add_s": time.perf_counter() - t, "faiss": faiss.__version__,
                       "disk_mb": sum(f.stat().st_size for f in (populated, folder / "lists.ivfdata")) / 2**20}


def _sweep_faiss(index_path: str, q: np.ndarray, exact: np.ndarray, want: float, out) -> None:
    """In a fresh process: faiss's on-disk IVF at growing nprobe (warm: each searched twice), up to the first
    whose recall@1 reaches `want`."""
    import faiss

    faiss.omp_set_num_threads(2)
    index = faiss.read_index(index_path)
    sweep = []
    for nprobe in NPROBES:
        index.nprobe = nprobe
        index.search(q, 1)
        t = time.perf_counter()
        _, ids = index.search(q, 1)
        sweep.append({"nprobe": nprobe, "warm_ms": 1000 * (time.perf_counter() - t) / len(q),
                      "recall_at_1": float((ids[:, 0] == exact).mean())})
        if sweep[-1]["recall_at_1"] >= want or nprobe >= index.nlist:
            break
    out.put(sweep)


def _search_faiss(index_path: str, lists_path: str, q: np.ndarray, nprobe: int, out) -> None:
    """In a fresh process: faiss's on-disk IVF at `nprobe`, cold (its lists file dropped from the page cache
    before any page of it is mapped here: mapped pages are not dropped), then warm; its memory."""
    import faiss

    faiss.omp_set_num_threads(2)
    index = faiss.read_index(index_path)
    index.nprobe = nprobe
    opened = status()
    fd = os.open(lists_path, os.O_RDONLY)
    _drop([fd])
    os.close(fd)
    read, t = _read_bytes(), time.perf_counter()
    index.search(q, 1)
    cold = {"cold_ms": 1000 * (time.perf_counter() - t) / len(q), "cold_read_mb": (_read_bytes() - read) / 2**20}
    t = time.perf_counter()
    index.search(q, 1)
    out.put({"warm_ms": 1000 * (time.perf_counter() - t) / len(q), **cold, "after_open": opened, "end": status()})


def _faiss(db: CellDatabase, q: torch.Tensor, exact: np.ndarray, want: float, folder: Path) -> dict:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return {"skipped": "faiss-cpu is not installed"}
    index, built = _build_faiss(db, folder)
    sweep = _fresh(_sweep_faiss, str(index), q.numpy(), exact, want)
    found = _fresh(_search_faiss, str(index), str(folder / "lists.ivfdata"), q.numpy(), sweep[-1]["nprobe"])
    return {**built, "sweep": sweep, "nprobe": sweep[-1]["nprobe"], "recall_at_1": sweep[-1]["recall_at_1"], **found}


def _one(rows: int, dim: int, queries: int, cells: int, check: bool, with_faiss: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        write_s = write_random(path, rows, dim)
        db = CellDatabase.open(path)
        q, top, source = _queries(db, queries, cells)
        file_mb = sum((path / "segments" / s.name / "embeddings.npy").stat().st_size for s in db.segments) / 2**20
        disk = _fresh(_search_disk, str(path), q, top)
        rows_found, scores_found = disk.pop("rows_found"), disk.pop("scores_found")
        counts = db.counts_of(top)
        entry = {"rows": rows, "classes": db.classes, "file_mb": file_mb, "write_s": write_s,
                 "candidates_per_query": float(counts.sum(1).mean()),
                 "distinct_rows_read": int(db.counts_of(np.unique(top)).sum()),
                 "found_own_photo": float((rows_found[:, 0] == source).mean()), **disk}
        if check:
            mem = _fresh(_search_memory, str(path), q, top)
            entry["memory"] = {"identical_rows": bool(np.array_equal(mem.pop("rows_found"), rows_found)),
                               "identical_scores": bool(np.array_equal(mem.pop("scores_found"), scores_found)),
                               **mem}
        if with_faiss:
            t = time.perf_counter()
            _, exact = db.search_all(q, 1)
            exact = exact[:, 0]
            cell_recall = float((rows_found[:, 0] == exact).mean())
            entry["exact_s"] = time.perf_counter() - t
            entry["cell_recall_at_1"] = cell_recall
            entry["faiss"] = _faiss(db, q, exact, cell_recall, Path(tmp))
        del db
    return entry


def measure(*, sizes: list[int] | None = None, dim: int = 384, queries: int = 2000, cells: int = 5,
            memory_check_at: int | None = None, faiss_at: int | None = None) -> dict:
    sizes = sizes or _sizes(None, None, SIZES)
    default = CHECK_AT if CHECK_AT in sizes else 0
    memory_check_at = default if memory_check_at is None else memory_check_at
    faiss_at = default if faiss_at is None else faiss_at
    for name, at in (("--memory-check-at", memory_check_at), ("--faiss-at", faiss_at)):
        if at and at not in sizes:
            raise click.BadParameter(f"{at} is not one of --sizes {','.join(map(str, sizes))}", param_hint=name)
    torch.set_num_threads(2)
    return {"dim": dim, "queries": queries, "cells": cells, "rows_per_cell": ROWS_PER_CELL,
            "candidates": fusion.CANDIDATES,
            "sizes": [_one(n, dim, queries, cells, n == memory_check_at, n == faiss_at) for n in sizes]}


def figure(record: dict, path: Path) -> None:
    """ms/query against database rows (log x), warm and cold, search alone and the fused hybrid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = record["sizes"]
    x = [s["rows"] for s in sizes]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, label in (("search", "CellDatabase.search"), ("fused_20", "fused hybrid (ranks 20)")):
        for cache, style in (("cold", "--"), ("warm", "-")):
            ax.plot(x, [s[f"{name}_{cache}_ms"] for s in sizes], style, marker="o", label=f"{label}, {cache}")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("database rows")
    ax.set_ylabel("ms / query")
    ax.set_title(f"{record['queries']:,} queries × {record['cells']} cells, ~{record['rows_per_cell']} rows per cell")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("scale")
    r = results[-1]
    rows = [[f"{s['rows']:,}", f"{s['file_mb']:,.0f} MB", f"{s['candidates_per_query']:.0f}",
             f"{s['distinct_rows_read']:,}",
             *(f"{s[f'{p}_{c}_ms']:.2f}" for c in ("warm", "cold") for p in PASSES),
             f"{s['search_cold_read_mb']:.0f} MB", f"{s['after_open']['VmHWM']:,.0f} MB",
             f"{s['end']['VmHWM']:,.0f} MB", f"{s['end']['VmHWM'] / s['file_mb']:.2f}"] for s in r["sizes"]]
    text = (f"Random databases of {r['dim']}-d float16 unit rows, about {r['rows_per_cell']} rows per cell, written by "
            f"`dcfeat.database`'s writer; {r['queries']:,} queries × {r['cells']} random cells each, each query a noisy "
            f"copy (cosine 0.8) of a random row of its first cell; a fresh process per database{measured(r)} "
            f"({command('scale')}). `search` is `CellDatabase.search` alone (top {r['candidates']}); `fused r1`/`r20` "
            "add `fusion.weights` and `fusion.answers` at ranks 1 and 20. Cold: before each pass every segment's "
            "`embeddings.npy` is dropped from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` (read = what "
            "the cold search read from storage, /proc/self/io); warm: a second pass. Rows/pass: the distinct rows "
            "of every query's cells, what one pass reads. Peak RSS is the search "
            "process's VmHWM (after opening the database, and at the end):\n\n"
            + table(["rows", "file", "rows/query", "rows/pass", "search warm", "fused r1 warm", "fused r20 warm", "search cold",
                     "fused r1 cold", "fused r20 cold", "cold read", "RSS opened", "peak RSS", "peak ÷ file"], rows)
            + f"\n\n(ms per query.) ![ms/query against database rows](pipelines/results/{Path(r['file']).stem}.png)")
    for s in r["sizes"]:
        if "memory" in s:
            m = s["memory"]
            same = "identical" if m["identical_rows"] and m["identical_scores"] else "**not identical**"
            text += (f"\n\nAt {s['rows']:,} rows, the same rows held in memory (a float16 tensor) and searched for the "
                     f"same queries: top-{r['candidates']} rows and scores {same} to the search on disk, so the same "
                     f"recall. Peak RSS on disk {s['end']['VmHWM']:,.0f} MB ({s['end']['VmHWM'] / s['file_mb']:.2f}× "
                     f"the {s['file_mb']:,.0f} MB file), in memory {m['end']['VmHWM']:,.0f} MB; search "
                     f"{s['search_warm_ms']:.2f} ms/query warm on disk, {m['search_ms']:.2f} in memory.")
        f = s.get("faiss")
        if f and "skipped" not in f:
            text += (f"\n\nBeyond RAM, against faiss {f['faiss']} `IndexIVFFlat` (inner product, {f['nlist']:,} lists "
                     f"trained on {f['trained_on']:,} rows, lists on disk: `OnDiskInvertedLists` via "
                     f"`merge_ondisk`), at {s['rows']:,} rows. Recall@1 against the exact top 1 of every row: the "
                     f"cell search {100 * s['cell_recall_at_1']:.1f} %; faiss "
                     + ("reaches" if f["recall_at_1"] >= s["cell_recall_at_1"] else "falls short of it, with")
                     + f" {100 * f['recall_at_1']:.1f} % at nprobe {f['nprobe']}"
                     + ("" if f["recall_at_1"] >= s["cell_recall_at_1"] else ", the largest tried")
                     + f" (cold and warm: a fresh process at that nprobe):\n\n"
                     + table(["", "recall@1", "ms/query warm", "ms/query cold", "cold read", "on disk", "peak RSS"],
                             [["cells (`CellDatabase.search`)", f"{100 * s['cell_recall_at_1']:.1f} %",
                               f"{s['search_warm_ms']:.2f}", f"{s['search_cold_ms']:.2f}",
                               f"{s['search_cold_read_mb']:.0f} MB", f"{s['file_mb']:,.0f} MB",
                               f"{s['end']['VmHWM']:,.0f} MB"],
                              [f"faiss IVF, nprobe {f['nprobe']}", f"{100 * f['recall_at_1']:.1f} %",
                               f"{f['warm_ms']:.2f}", f"{f['cold_ms']:.2f}", f"{f['cold_read_mb']:,.0f} MB",
                               f"{f['disk_mb']:,.0f} MB", f"{f['end']['VmHWM']:,.0f} MB"]])
                     + "\n\nfaiss's nprobe sweep (warm ms/query, recall@1): "
                     + ", ".join(f"{w['nprobe']}: {w['warm_ms']:.2f} ms, {100 * w['recall_at_1']:.1f} %"
                                 for w in f["sweep"]) + ".")
    return text
