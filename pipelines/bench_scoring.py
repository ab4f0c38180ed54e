"""Cosine vs group-softmax ranking of cells (D&C Eq. 4.19-4.20) on the synthetic feature city.

Inputs: none (the city is generated, seeded). Output: pipelines/results/scoring.json, rendered into
BENCHMARKS.md by pipelines/bench.py. Run from the repository root: `python pipelines/bench_scoring.py`
(about a minute on 2 cores). One trained run (default TrainConfig), the same test queries and database
for both scorings; classify and hybrid use the ranking, retrieval does not.
"""

import json
import tempfile
import time
from pathlib import Path

from dcfeat.evaluate import evaluate_files
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files

RESULTS = Path(__file__).resolve().parents[1] / "pipelines" / "results"


def main() -> None:
    out = {"date": time.strftime("%Y-%m-%d"), "city": "make_city(seed=0)", "scorings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0), store)
        run = train_files(store, "train", TrainConfig(), val_split="val", device="cpu", progress=False,
                          out=Path(tmp) / "run")
        for scoring in ("cosine", "group-softmax"):
            report = evaluate_files(store, run.out, "test", database_split="test-db", modes=("classify", "hybrid"),
                                       scoring=scoring, device="cpu", out=Path(tmp) / scoring).report
            out["scorings"][scoring] = {m: {"recall": r["recall"], "median_error_m": r["median_error_m"]}
                                        for m, r in report["methods"].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scoring.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
