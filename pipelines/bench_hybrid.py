"""Query speed at a 1.25 M-row database (this CPU): classification, exact retrieval, the vectorised hybrid
and the confidence-adaptive hybrid side by side; and exact retrieval against faiss's IndexFlatIP.

Inputs: none (the city and the random vectors are generated, seeded); faiss-cpu where installed (it is
no dependency of dcfeat: `pip install faiss-cpu` to include the comparison). Output:
pipelines/results/hybrid.json, rendered into BENCHMARKS.md by pipelines/bench.py. Run from the
repository root: `python pipelines/bench_hybrid.py` (about 15 minutes on 2 cores). Each ms/query is the
median of 3 timed runs after a warm-up, the modes interleaved run by run so that a busy spell of the
shared machine hits them alike. The run trains 3 epochs only (the speed does not depend on it; its LR@k
are reported as measured).
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dcfeat.calibrate import calibrate_files  # noqa: E402
from dcfeat.evaluate import evaluate  # noqa: E402
from dcfeat.retrieval import topk_cosine  # noqa: E402
from dcfeat.runs import load_run  # noqa: E402
from dcfeat.store import read_split  # noqa: E402
from dcfeat.synthetic.features import make_city, write_city  # noqa: E402
from dcfeat.train import TrainConfig, train_files  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"
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
                report, _, _ = evaluate(run, q, database=db, modes=(mode,), device="cpu")
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


def main() -> None:
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "faiss_comparison": faiss_benchmark(),
           "queries": queries_benchmark()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hybrid.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
