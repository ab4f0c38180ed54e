"""Query speed at a 1.25 M-row database (this CPU): classification, exact retrieval, the vectorised hybrid
and the confidence-adaptive hybrid side by side; and exact retrieval against faiss's IndexFlatIP.

Inputs: none (the city and the random vectors are generated, seeded); faiss-cpu where installed (an
optional dependency, in the `test` extra: without it the comparison is skipped). Output:
pipelines/results/hybrid.json, rendered into BENCHMARKS.md by pipelines/bench.py. Run from the
repository root: `python pipelines/bench_hybrid.py` (about 15 minutes on 2 cores). Each ms/query is the
median of 3 timed runs after a warm-up, the modes interleaved run by run so that a busy spell of the
shared machine hits them alike. The run trains 3 epochs only (the speed does not depend on it; its LR@k
are reported as measured).
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.bench.scale import faiss_benchmark, queries_benchmark  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"


def main() -> None:
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "faiss_comparison": faiss_benchmark(),
           "queries": queries_benchmark()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hybrid.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
