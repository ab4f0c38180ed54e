"""BENCHMARKS.md's sections on answering queries: the confidence, and the speed at 1.25 M rows."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.bench.markdown import measured, table


def confidence(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_confidence.py`."
    cf = json.loads(path.read_text())
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
            "(`pipelines/bench_confidence.py`). Every signal ranks the same answers (classification's top 1); "
            "entropy and spread rank by their negation, `retrieval_disagreement_m` is the distance between "
            "classification's and retrieval's top 1 (a database is needed):\n\n"
            + table(["signal", "AUC-PR", "AUROC", "LR@1 at 50 %", "at 75 %", "at 90 %", "ECE", "Brier"], rows)
            + "\n\n" + table(["goal", "measured", "target"], goals) + misses
            + f"\n\nThe modes on the same queries, database {cf['database_rows']:,} rows:\n\n"
            + table(["mode", "LR@1", "LR@5", "LR@20", "median error", "mean candidates"], modes))


def hybrid_speed(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_hybrid.py`."
    hb = json.loads(path.read_text())
    q = hb["queries"]
    rows = [[name, f"{q[name]['ms_per_query']:.4f}", f"{100 * q[name]['recall']['1']:.1f}",
             f"{q[name]['mean_candidates']:,.0f}" if "mean_candidates" in q[name] else "—"]
            for name in ("classify", "retrieve", "hybrid", "adaptive")]
    goals = [["hybrid ms/query ÷ classify ms/query", f"**{q['hybrid_over_classify']:.2f}**", "≤ 2"],
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
            f"interleaved{measured(hb)} (`pipelines/bench_hybrid.py`):\n\n"
            + table(["mode", "ms/query", "LR@1", "mean candidates"], rows) + "\n\n"
            + table(["goal", "measured", "target"], goals))
