"""How sure dcfeat is, measured: the calibrated confidence against its goals on the synthetic feature city.

Inputs: none (the city is generated, seeded). Output: pipelines/results/confidence.json, rendered into
BENCHMARKS.md by pipelines/bench.py, and `dcfeat evaluate`'s report and plots (not its predictions) in
pipelines/results/confidence/. Run from the repository root: `python pipelines/bench_confidence.py`
(about three minutes on 2 cores). One run (default TrainConfig) trained on the city's train split,
calibrated on its val split (3,000 queries; with test-db as the database too), measured on its test
split (4,000 queries) against test-db: more queries
than the default city so that ECE's 15 bins hold ~270 queries each (with 500, sampling noise alone
puts ECE near 0.03).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dcfeat.calibrate import calibrate_files  # noqa: E402
from dcfeat.evaluate import evaluate_files  # noqa: E402
from dcfeat.run import load_run  # noqa: E402
from dcfeat.store import read_split  # noqa: E402
from dcfeat.synthetic.features import make_city, write_city  # noqa: E402
from dcfeat.train import TrainConfig, train_files  # noqa: E402
from pipelines.bench.quality import near_misses  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"
CITY = {"seed": 0, "queries": 4000, "val_queries": 3000}


def main() -> None:
    out = {"date": time.strftime("%Y-%m-%d"), "city": f"make_city({', '.join(f'{k}={v}' for k, v in CITY.items())})"}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(**CITY), store)
        run = train_files(store, "train", TrainConfig(), val_split="val", device="cpu", progress=False,
                          out=Path(tmp) / "run")
        cal = calibrate_files(store, run.out, "val", device="cpu", database_split="test-db").calibrator
        report = evaluate_files(store, run.out, "test", database_split="test-db", device="cpu",
                                   out=RESULTS / "confidence").report  # the plots docs/confidence.md shows
        (RESULTS / "confidence" / "predictions.parquet").unlink()  # 6 MB the figures do not need
        out["near_misses"] = near_misses(load_run(run.out), read_split(store, "test", dtype=np.float32))
    out["calibrator"] = {"weights": dict(zip(cal.signals, cal.weights)), "radius_scale": cal.radius_scale,
                         "hybrid": cal.hybrid, "fitted_on": {k: v for k, v in cal.fitted_on.items() if k != "store"}}
    out["confidence"] = report["confidence"]
    out["methods"] = {m: {k: r[k] for k in ("recall", "median_error_m", "ms_per_query") if k in r}
                      | {k: r[k] for k in ("mean_candidates", "fallback_share", "widened_share") if k in r}
                      for m, r in report["methods"].items()}
    out["database_rows"] = report["database_rows"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "confidence.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
