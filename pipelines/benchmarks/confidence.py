"""How sure dcfeat is, measured: the calibrated confidence against its goals on the synthetic feature city.

Inputs: none (the city is generated, seeded). Output: the record, and `dcfeat evaluate`'s report and
plots (not its predictions) in pipelines/results/confidence/. Run from the repository root:
`python -m pipelines.benchmarks run confidence`
(about three minutes on 2 cores). One run (default TrainConfig) trained on the city's train split,
calibrated on its val split (3,000 queries; with test-db as the database too), measured on its test
split (4,000 queries) against test-db: more queries
than the default city so that ECE's 15 bins hold ~270 queries each (with 500, sampling noise alone
puts ECE near 0.03).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import evaluate_files
from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files
from pipelines.benchmarks.markdown import command, measured, not_measured, table
from pipelines.benchmarks.quality import near_misses
from pipelines.benchmarks.records import RESULTS
CITY = {"seed": 0, "queries": 4000, "val_queries": 3000}


def measure() -> dict:
    out = {"city": f"make_city({', '.join(f'{k}={v}' for k, v in CITY.items())})"}
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
                         "hybrid": cal.hybrid.to_dict(),
                         "fitted_on": {k: v for k, v in cal.fitted_on.to_dict().items() if k != "store"}}
    out["confidence"] = report["confidence"]
    out["methods"] = {m: {k: r[k] for k in ("recall", "median_error_m", "ms_per_query") if k in r}
                      | {k: r[k] for k in ("mean_candidates", "fallback_share", "widened_share") if k in r}
                      for m, r in report["methods"].items()}
    out["database_rows"] = report["database_rows"]
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("confidence")
    cf = results[-1]
    sec = cf["confidence"]
    sig = sec["signals"]
    fmt = lambda v, pct=False: "—" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")  # noqa: E731
    rows = [[f"**{name}**" if name == "confidence" else name, fmt(m["auc_pr"]), fmt(m["auroc"]),
             *(fmt(m["lr1_at_coverage"][c], True) for c in ("50", "75", "90")), fmt(m["ece"]), fmt(m["brier"])]
            for name, m in sig.items()]
    singles = {n: m["auc_pr"] for n, m in sig.items() if not n.startswith("confidence")}
    best = max(singles, key=singles.get)
    kinds = [("confidence_without_database" if "confidence_without_database" in sig else "confidence",
              "confidence (no database)")]
    if "confidence_without_database" in sig:
        kinds.append(("confidence", "confidence with retrieval's agreement"))
    goals = []
    for name, label in kinds:
        c = sig[name]
        goals += [[f"ECE, {label}", f"{c['ece']:.3f}", "≤ 0.03"],
                  [f"AUC-PR, {label}", f"{c['auc_pr']:.3f} vs the best single signal ({best}) {singles[best]:.3f}: "
                   f"**{c['auc_pr'] - singles[best]:+.3f}**; softmax probability "
                   f"{sig['softmax_probability']['auc_pr']:.3f}", "≥ best single + 0.02, and above the softmax probability"],
                  [f"LR@1 among the 50 % most confident, {label}", f"{100 * c['lr1_at_coverage']['50']:.1f} %", "≥ 97 %"]]
    goals.append(["true position inside the 90 % radius", f"{100 * sec['radius_90']['inside']:.1f} % "
                  f"(median radius {sec['radius_90']['median_m']:.0f} m)", "88–92 %"])
    nm = cf.get("near_misses")
    misses = "" if not nm else (
        f"\n\nThe wrong answers among the 50 % most confident queries by the confidence without a database "
        f"({nm['wrong_in_top_half']} of "
        f"{nm['queries_in_top_half']:,}) are near misses: their errors' 10th, 50th and 90th percentiles are "
        + ", ".join(f"{v:.1f}" for v in nm["error_m_percentiles_10_50_90"]) + " m.")
    m = cf["methods"]
    modes = [[name, *(f"{100 * r['recall'][k]:.1f}" for k in ("1", "5", "20")), f"{r['median_error_m']:.1f} m",
              f"{r['mean_candidates']:,.0f}" if "mean_candidates" in r else "—"] for name, r in m.items()]
    return (f"`{cf['city']}`: default `TrainConfig`, calibrated on val ({cf['calibrator']['fitted_on']['queries']:,} "
            f"queries), measured on test ({cf['confidence']['right'] * 100:.1f} % right at 25 m){measured(cf)} "
            f"({command('confidence')}). Every signal ranks the same answers (classification's top 1); "
            "entropy and spread rank by their negation, `retrieval_disagreement_m` is the distance between "
            "classification's and retrieval's top 1 (a database is needed):\n\n"
            + table(["signal", "AUC-PR", "AUROC", "LR@1 at 50 %", "at 75 %", "at 90 %", "ECE", "Brier"], rows)
            + "\n\n" + table(["goal", "measured", "target"], goals) + misses
            + f"\n\nThe modes on the same queries, database {cf['database_rows']:,} rows:\n\n"
            + table(["mode", "LR@1", "LR@5", "LR@20", "median error", "mean candidates"], modes))
