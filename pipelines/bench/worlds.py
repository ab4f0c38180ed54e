"""Quality on every city of the synthetic family: what each answer scores, and how true its confidence is.

Per city (dcfeat.synthetic.features.FAMILY): train with the default TrainConfig, calibrate on the
city's val split against its database (the position rule, the confidence and the hybrid's gate are
fitted there, never on test), evaluate every mode on its test split against the database.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import evaluate_files
from dcfeat.geo import Places
from dcfeat.metrics import localisation_recall
from dcfeat.model import top_cells
from dcfeat.positions import PositionRule, positions, probabilities
from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import FAMILY, make_city, write_city
from dcfeat.train import TrainConfig, train_files

METHODS = ("classify", "classify-centre", "retrieve", "hybrid", "adaptive")
KS = (1, 5, 10, 20)  # LR@k recorded per method: the position's ranked answers against the cell centres'


def world(name: str, *, queries: int, val_queries: int, device: str = "cpu") -> dict:
    """One city's figures (see the module docstring)."""
    city = make_city(**{"queries": queries, "val_queries": val_queries, **FAMILY[name]})
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(city, store)
        t = time.perf_counter()
        run = train_files(store, "train", TrainConfig(), val_split="val", device=device, progress=False,
                          out=Path(tmp) / "run")
        cal = calibrate_files(store, run.out, "val", device=device, database_split="test-db").calibrator
        report = evaluate_files(store, run.out, "test", database_split="test-db", device=device, ks=KS,
                                out=Path(tmp) / "eval").report
        old = old_rule(store, run.out, cal.rule)
    conf = report["confidence"]
    signal = conf["signals"]["confidence"]
    return {
        "city": FAMILY[name], "train_rows": city.size("train"), "classes": report["classes"],
        "queries": report["queries"], "database_rows": report["database_rows"], "seconds": time.perf_counter() - t,
        "position": cal.rule.to_dict(), "gate": cal.gate, "coverage": report["coverage"], "old_rule": old,
        "methods": {m: {**{f"lr{k}": r["recall"][str(k)] for k in KS}, "median_error_m": r["median_error_m"],
                        "ms_per_query": r["ms_per_query"],
                        **({"candidate_share": r["mean_candidates"] / report["database_rows"]}
                           if "mean_candidates" in r else {})}
                    for m, r in report["methods"].items() if m in METHODS},
        "confidence": {"ece": signal["ece"], "auc_pr": signal["auc_pr"],
                       "lr1_most_confident_half": signal["lr1_at_coverage"]["50"],
                       "radius_90_inside": conf["radius_90"]["inside"], "radius_90_median_m": conf["radius_90"]["median_m"],
                       "uses_database": conf["uses_database"]},
    }


def old_rule(store: Path, run_dir: Path, rule: PositionRule) -> dict:
    """LR@k on the test split of the rule before ranked answers: every rank the centroid of the candidates
    within the radius of its own cell (`positions.positions`), so ranks 2..k fell onto the rank-1 centroid."""
    run, test = load_run(run_dir), read_split(store, "test", dtype=np.float32)
    p = top_cells(run.model, test.embeddings, run.classes, max(KS))
    top = Places(p["east"], p["north"], p["zone"], p["letter"])
    at = positions(top, probabilities(p["score"], run.model.heads.logit_scale, rule.temperature), rule.radius_m)
    lab = test.labels
    lr = localisation_recall(lab["utm_east"].to_numpy(), lab["utm_north"].to_numpy(), lab["utm_zone"].to_numpy(),
                             at.east, at.north, at.zone, ks=KS, q_letter=lab["utm_letter"].to_numpy(),
                             p_letter=at.letter)
    return {f"lr{k}": lr.recall[k] for k in KS}
