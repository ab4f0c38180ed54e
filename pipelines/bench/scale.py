"""Query speed at a database of a million rows and more: classification, exact retrieval, the hybrid
and the adaptive hybrid side by side on the synthetic city; exact retrieval against faiss."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import evaluate
from dcfeat.retrieval import topk_cosine
from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files

CITY = {"seed": 0, "streets": 40, "db_spacing_m": 1.0, "val_queries": 1000}
MODES = ("classify", "retrieve", "hybrid", "adaptive")


def queries_benchmark(repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(**CITY), store)
        result = train_files(store, "train", TrainConfig(epochs=3), val_split="val", device="cpu", progress=False,
                             out=Path(tmp) / "run")
        calibrate_files(store, result.out, "val", device="cpu")
        run = load_run(result.out)
        q, db = read_split(store, "test", dtype=np.float32), read_split(store, "test-db")
        seconds, methods = {m: [] for m in MODES}, {}
        for r in range(repeats + 1):  # the first round warms up
            for mode in MODES:
                report = evaluate(run, q, database=db, modes=(mode,), device="cpu").report
                if r:
                    seconds[mode].append(report["methods"][mode]["seconds"])
                methods[mode] = report["methods"][mode]
    out = {"city": f"make_city({', '.join(f'{k}={v}' for k, v in CITY.items())})", "database_rows": len(db.labels),
           "queries": len(q.labels), "classes": len(run.classes), "train_epochs": 3}
    for mode in MODES:
        m = methods[mode]
        out[mode] = {"ms_per_query": 1000 * statistics.median(seconds[mode]) / len(q.labels),
                     "recall": m["recall"], **{k: m[k] for k in ("mean_candidates", "fallback_share",
                                                                 "widened_share") if k in m}}
    out["hybrid_over_classify"] = out["hybrid"]["ms_per_query"] / out["classify"]["ms_per_query"]
    out["retrieve_over_hybrid"] = out["retrieve"]["ms_per_query"] / out["hybrid"]["ms_per_query"]
    out["retrieve_over_adaptive"] = out["retrieve"]["ms_per_query"] / out["adaptive"]["ms_per_query"]
    out["adaptive_database_share"] = out["adaptive"]["mean_candidates"] / out["database_rows"]
    return out


def faiss_benchmark(rows: int = 1_000_000, dim: int = 512, nq: int = 1000, k: int = 20, repeats: int = 3) -> dict:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss-cpu is not installed"}
    rng = np.random.default_rng(0)
    db = rng.standard_normal((rows, dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((nq, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(db)
    times = {"dcfeat": [], "faiss": []}
    for r in range(repeats + 1):
        t = time.perf_counter()
        _, ours = topk_cosine(q, db, k, normalize=False)
        if r:
            times["dcfeat"].append(time.perf_counter() - t)
        t = time.perf_counter()
        _, theirs = index.search(q, k)
        if r:
            times["faiss"].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"rows": rows, "dim": dim, "queries": nq, "k": k, "faiss": faiss.__version__,
            "threads": torch.get_num_threads(), "dcfeat_seconds": med["dcfeat"], "faiss_seconds": med["faiss"],
            "dcfeat_over_faiss_queries_per_s": med["faiss"] / med["dcfeat"],
            "top1_agreement": float((ours[:, 0] == theirs[:, 0]).mean())}
