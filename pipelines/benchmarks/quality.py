"""Learning quality and query speed on the synthetic feature city, side by side.

One city, one trained run, the same test queries for every method: the
trained classifier, the D&C hybrid, retrieval in the learned space, and the
two baselines a projection must beat — exact k-NN retrieval and a
nearest-class-mean classifier, both on the raw features.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcfeat.confidence import answer_rule, errors_m, query_signals
from dcfeat.evaluate import evaluate, score
from dcfeat.identity import FeatureIdentity, check_features
from dcfeat.partition import places_of
from dcfeat.reports import Ranking, write_outputs
from dcfeat.run import load_run
from dcfeat.store import Split
from dcfeat.train import TrainConfig, make_partition, train


def _attrs(city) -> dict:
    """The identity a stored city carries (`write_city`), so that the run trained on it matches its splits."""
    return {"model": "synthetic-city", "model_fingerprint": f"synthetic-seed{city.seed}-dim{city.dim}",
            "pooling": "none", "image_size": 0, "dim": city.dim, "backbone_random_init": False}


def _split(city, name: str) -> Split:
    labels = city.label_frame(name).with_row_index("row")
    return Split(name=name, embeddings=city.embeddings(name), labels=labels, attrs=_attrs(city))


def nearest_class_mean(train_split: Split, queries: Split, config: TrainConfig, k: int) -> Ranking:
    """Class = cell whose mean raw feature is closest in cosine: no learning at all."""
    part = make_partition(train_split, config)
    gc = part.global_class()
    keep = gc >= 0
    x = torch.as_tensor(train_split.embeddings[keep]).float()
    x = torch.nn.functional.normalize(x, dim=1)
    means = torch.zeros(len(part.classes), x.shape[1]).index_add_(0, torch.as_tensor(gc[keep]), x)
    means = torch.nn.functional.normalize(means, dim=1)
    t = time.perf_counter()
    q = torch.nn.functional.normalize(torch.as_tensor(queries.embeddings).float(), dim=1)
    scores, ids = (q @ means.T).topk(k, dim=1)
    seconds = time.perf_counter() - t
    c, ids = part.classes, ids.numpy()
    return Ranking("class-mean (raw)", c["cell_east"].to_numpy()[ids], c["cell_north"].to_numpy()[ids],
                  c["utm_zone"].to_numpy()[ids], c["utm_letter"].to_numpy()[ids], scores.numpy(), ids, seconds)


def city_benchmark(city, config: TrainConfig, *, device: str = "cpu", ks=(1, 5, 10, 20), cells: int = 5,
                   plots_dir: Path | None = None) -> dict:
    """Train on the city, then LR@k and ms/query of every method on its test queries.

    With `plots_dir`, the projected-space evaluation's files (report, predictions,
    PNG plots) are written there as `dcfeat evaluate` writes them.
    """
    train_split, val, test, db = (_split(city, s) for s in ("train", "val", "test", "test-db"))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = train(train_split, config, Path(tmp) / "run", val=val, device=device, progress=False,
                       run_config={"features": FeatureIdentity.of_split(train_split.attrs)})
        train_seconds = time.perf_counter() - t
        run = load_run(result.out)
    for split in (test, db):  # as `dcfeat evaluate` checks them
        check_features(run.feature_identity, split.attrs, what=f"synthetic split '{split.name}'")
    rows = {}
    for space in ("projected", "raw"):
        evaluation = evaluate(run, test, database=db, ks=ks, cells=cells, space=space, device=device,
                              modes=("classify", "retrieve", "hybrid") if space == "projected" else ("retrieve",))
        report = evaluation.report
        if plots_dir is not None and space == "projected":
            write_outputs(Path(plots_dir), report, test.labels, evaluation.methods, evaluation.recall,
                          background=(db.labels["utm_east"].to_numpy(), db.labels["utm_north"].to_numpy()))
        for name, m in report["methods"].items():
            rows[name if name == "classify" else f"{name} ({space})"] = m
    ncm = nearest_class_mean(train_split, test, config, max(ks))
    lr = score(ncm, test, ks=ks, threshold_m=25.0)
    rows[ncm.name] = {"recall": {str(k): v for k, v in lr.recall.items()}, "median_error_m": lr.median_m,
                      "ms_per_query": 1000 * ncm.seconds / len(test.embeddings)}
    return {"train_rows": len(train_split.embeddings), "database_rows": len(db.embeddings),
            "queries": len(test.embeddings), "classes": result.classes, "train_seconds": train_seconds,
            "best_epoch": result.best_epoch, "seconds_per_epoch": float(np.median([e["seconds"] for e in result.epochs])),
            "methods": rows}


def near_misses(run, test) -> dict:
    """How far the wrong answers among the 50 % most confident queries are (metres, percentiles)."""
    sig = query_signals(run.model, test.embeddings, run.classes, M=run.M, rule=answer_rule(run.calibration))
    err = errors_m(sig, places_of(test.labels))
    conf = run.calibration.confidence(sig.values)
    top = np.argsort(-conf, kind="stable")[: len(conf) // 2]
    wrong = err[top][err[top] > run.calibration.threshold_m]
    return {"wrong_in_top_half": len(wrong), "queries_in_top_half": len(top),
            "error_m_percentiles_10_50_90": np.percentile(wrong, [10, 50, 90]).tolist() if len(wrong) else None}
