"""How well the confidence of classification's answers sorts right from wrong (for `dcfeat evaluate`).

The calibrated confidence (when the run has calibration.json) and each single signal are measured
side by side on the same queries: AUC-PR and AUROC of right-vs-wrong, LR@1 among the most confident
50/75/90 %, and for probabilities ECE (15 equal-count bins) and Brier score. The 90 % radius is
checked against where the photos were taken.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcfeat.calibrate import answer_errors_m, disagreement_m, signals_of
from dcfeat.calibration import DATABASE_SIGNAL, PROBABILITY_SIGNALS
from dcfeat.confidence_metrics import (
    ece,
    reliability_bins,
    risk_coverage,
    selective_report,
)
from dcfeat.plots import plot_reliability, plot_risk_coverage
from dcfeat.runs import Run
from dcfeat.store import Split

# Lower is surer for these: ranked by their negation.
LOWER_IS_SURER = ("entropy", "spread", DATABASE_SIGNAL)


def assess_confidence(run: Run, queries: Split, *, threshold_m: float,
                      retrieval_top1: tuple[np.ndarray, ...] | None = None,
                      database_split: str | None = None) -> tuple[dict, dict]:
    """(report section, arrays for the plots). `retrieval_top1`: (east, north, zone, letter) of
    retrieval's top-1 answers against `database_split`, for the agreement signal (and the confidence
    fitted with it, when the run has one for that database)."""
    sig = signals_of(run, queries.embeddings)
    err = answer_errors_m(run, sig, queries)
    right = err <= threshold_m
    values = dict(sig.values)
    if retrieval_top1 is not None:
        values[DATABASE_SIGNAL] = disagreement_m(run, sig, *retrieval_top1)
    base = run.calibration
    cal = base.for_database(database_split if retrieval_top1 is not None else None) if base else None
    probabilities = [n for n in PROBABILITY_SIGNALS if n in values]
    ranked = {}
    if cal is not None:
        ranked["confidence"] = cal.confidence(values)
        probabilities.append("confidence")
        if cal is not base:  # the database-free confidence beside it, as predict gives it
            ranked["confidence_without_database"] = base.confidence(values)
            probabilities.append("confidence_without_database")
    ranked.update({n: -v if n in LOWER_IS_SURER else v for n, v in values.items()})
    section = {
        "calibrated": cal is not None, "fitted_on": cal.fitted_on if cal else None,
        "uses_database": cal is not None and cal is not base,
        "answer": "classification top-1 (cells ranked by cosine)", "right": float(right.mean()) if len(right) else None,
        "signals": selective_report(ranked, right, probabilities),
        "note": None if cal else "UNCALIBRATED RUN: no calibration.json; fit one with `dcfeat calibrate --split val`",
    }
    if cal is not None:
        radius = cal.radius_m(sig.base_radius_m)
        section["radius_90"] = {"inside": float((err <= radius).mean()) if len(err) else None,
                                "median_m": float(np.median(radius)) if len(radius) else None}
    best = "confidence" if cal else "softmax_probability"
    plots = {"curves": {n: risk_coverage(ranked[n], right) for n in dict.fromkeys([best, "margin", "top1_cosine"])},
             "bins": reliability_bins(ranked[best], right), "ece": ece(ranked[best], right), "best": best}
    return section, plots


def write_confidence_plots(out: Path, plots: dict, *, split: str, notice: str = "") -> dict[str, Path]:
    """risk_coverage.png and reliability.png in `out`."""
    what = "calibrated confidence" if plots["best"] == "confidence" else "softmax probability (UNCALIBRATED)"
    return {
        "risk_coverage": plot_risk_coverage(plots["curves"], Path(out) / "risk_coverage.png",
                                            title=f"LR@1 of the most confident queries, split {split}{notice}"),
        "reliability": plot_reliability(plots["bins"], Path(out) / "reliability.png", ece=plots["ece"],
                                        title=f"Reliability of the {what}, split {split}{notice}"),
    }
