"""Query speed at a 1.25 M-row database (this CPU): classification, exact retrieval, the vectorised hybrid
and the confidence-adaptive hybrid side by side; and exact retrieval against faiss's IndexFlatIP.

Inputs: none (the city and the random vectors are generated, seeded); faiss-cpu where installed (an
optional dependency, in the `test` extra: without it the comparison is skipped). Run from the repository
root: `python -m pipelines.benchmarks run hybrid` (about 15 minutes on 2 cores). Each ms/query is the
median of 3 timed runs after a warm-up, the modes interleaved run by run so that a busy spell of the
shared machine hits them alike. The run trains 3 epochs only (the speed does not depend on it; its LR@k
are reported as measured).
"""

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
from pipelines.benchmarks.markdown import command, measured, not_measured, table

CITY = {"seed": 0, "streets": 40, "db_spacing_m": 1.0, "val_queries": 1000}
MODES = ("classify", "retrieve", "hybrid", "fused", "adaptive")


def queries_benchmark(repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(**CITY), store)
        result = train_files(store, "train", TrainConfig(epochs=3), val_split="val", device="cpu", progress=False,
                             out=Path(tmp) / "run")
        calibrate_files(store, result.out, "val", device="cpu", database_split="test-db")  # the fused rule too
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
    out["fused_over_classify"] = out["fused"]["ms_per_query"] / out["classify"]["ms_per_query"]
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


def measure() -> dict:
    return {"torch": torch.__version__, "faiss_comparison": faiss_benchmark(), "queries": queries_benchmark()}


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("hybrid")
    hb = results[-1]
    q = hb["queries"]
    rows = [[name, f"{q[name]['ms_per_query']:.4f}", f"{100 * q[name]['recall']['1']:.1f}",
             f"{q[name]['mean_candidates']:,.0f}" if "mean_candidates" in q[name] else "—"]
            for name in ("classify", "retrieve", "hybrid", "fused", "adaptive") if name in q]
    goals = [["hybrid ms/query ÷ classify ms/query", f"**{q['hybrid_over_classify']:.2f}**", "≤ 2"],
             *([["fused hybrid ms/query ÷ classify ms/query", f"**{q['fused_over_classify']:.2f}**, LR@1 "
                 f"{100 * q['fused']['recall']['1']:.1f} vs retrieval's {100 * q['retrieve']['recall']['1']:.1f}",
                 "≤ 2"]] if "fused" in q else []),
             ["hybrid vs exact retrieval", f"**{q['retrieve_over_hybrid']:.0f}×** faster", "≥ 10×"],
             ["adaptive hybrid vs exact retrieval", f"**{q['retrieve_over_adaptive']:.1f}×** faster, "
              f"{100 * q['adaptive_database_share']:.2f} % of the database scored per query, LR@1 "
              f"{100 * q['adaptive']['recall']['1']:.1f} vs {100 * q['retrieve']['recall']['1']:.1f}",
              "≥ 5×, ≤ 10 %, LR@1 ≥ retrieval's"]]
    fz = hb["faiss_comparison"]
    if "skipped" not in fz:
        goals.append([f"exact retrieval ÷ faiss {fz['faiss']} `IndexFlatIP`, {fz['rows']:,} × {fz['dim']}, "
                      f"{fz['queries']:,} queries, k = {fz['k']}",
                      f"dcfeat {fz['dcfeat_seconds']:.2f} s, faiss {fz['faiss_seconds']:.2f} s: "
                      f"**{fz['dcfeat_over_faiss_queries_per_s']:.2f}**; top-1 agreement {fz['top1_agreement']:.3f}", "≥ 1"])
    return (f"`{q['city']}`: {q['database_rows']:,}-row database, {q['queries']} queries, {q['classes']:,} classes, "
            f"a run of {q['train_epochs']} epochs calibrated on val; CPU, median of 3 after a warm-up, modes "
            f"interleaved{measured(hb)} ({command('hybrid')}):\n\n"
            + table(["mode", "ms/query", "LR@1", "mean candidates"], rows) + "\n\n"
            + table(["goal", "measured", "target"], goals))
