"""Cosine vs group-softmax ranking of cells (D&C Eq. 4.19-4.20) on the synthetic feature city.

Inputs: none (the city is generated, seeded). Run from the repository root:
`python -m pipelines.benchmarks run scoring` (about a minute on 2 cores). One trained run (default
TrainConfig), the same test queries and database for both scorings; classify and hybrid use the ranking,
retrieval does not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dcfeat.evaluate import evaluate_files
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files
from pipelines.benchmarks.markdown import command, measured, not_measured, recall_cells, table


def measure() -> dict:
    out = {"city": "make_city(seed=0)", "scorings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0), store)
        run = train_files(store, "train", TrainConfig(), val_split="val", device="cpu", progress=False,
                          out=Path(tmp) / "run")
        for scoring in ("cosine", "group-softmax"):
            report = evaluate_files(store, run.out, "test", database_split="test-db", modes=("classify", "hybrid"),
                                    scoring=scoring, device="cpu", out=Path(tmp) / scoring, plots=False).report
            out["scorings"][scoring] = {m: {"recall": r["recall"], "median_error_m": r["median_error_m"]}
                                        for m, r in report["methods"].items()}
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("scoring")
    sc = results[-1]
    rows = [[f"{method} ({name})", *recall_cells(m)]
            for name, methods in sc["scorings"].items() for method, m in methods.items()]
    return (f"`{sc['city']}`, one trained run (default `TrainConfig`), the same 500 test queries and database for "
            f"both rankings{measured(sc)} ({command('scoring')}):\n\n"
            + table(["method (cells ranked by)", "LR@1", "LR@5", "LR@10", "LR@20", "median error"], rows))
