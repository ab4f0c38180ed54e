"""`dcfeat evaluate`: localisation recall of classification, retrieval and the hybrid, and how good the confidence is.

* classify: top-k cells over every group's prototypes; the answer is a position weighed from the
  top cells (dcfeat.positions), reported beside the paper's cell centre ("classify-centre").
* retrieve: exact cosine k-NN against a database split (NetVLAD/CosPlace way),
  in the run's learned space (`projected`) or on the raw backbone features.
* hybrid (D&C): retrieval only among database images inside the top cells: the fewest holding the
  run's share of the probability (its gate), or the top --cells.
* adaptive: the gated hybrid, and exact retrieval for the least sure queries.

With no run (`evaluate_raw`), retrieval alone over the raw features: exact cosine k-NN of each
query among the database split, LR@k and the same files (what VPR-methods-evaluation measures for
descriptors of any model, extracted or imported); its report says no run was used.

The confidence of classification's answers is measured beside: the calibrated confidence
(when the run has calibration.json) and each single signal side by side on the same
queries — AUC-PR and AUROC of right-vs-wrong, LR@1 among the most confident 50/75/90 %,
and for probabilities ECE (15 equal-count bins) and Brier score; the 90 % radius is
checked against where the photos were taken. A calibrated confidence is the probability of an
answer within the threshold it was fitted at (`calibration.json`'s `threshold_m`), so the section
measures right and wrong at that threshold, which the report records beside it; a --threshold
that differs applies to LR@k only, and `Evaluation.warnings` says so. The confidence is fitted for
cosine scoring: under --scoring group-softmax the classify answers are weighed by the group probabilities
under the default rule, and the report holds no confidence section (a warning says why).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.choices import CENTRE_METHOD
from dcfeat.confidence import (
    DATABASE_SIGNAL,
    DEFAULT_GATE,
    LOWER_IS_SURER,
    FusedAnswers,
    fused_for_features,
    PROBABILITY_SIGNALS,
    TOP_K,
    Gate,
    answer_rule,
    calibration_for,
    disagreement_m,
    errors_m,
    gate_cells,
    query_scores,
    query_signals,
    scoring_note,
    signals_of,
)
from dcfeat.database import CellDatabase, unit_rows
from dcfeat.devices import resolve_device, synchronize
from dcfeat.errors import BadInput, IncompatibleFeatures, check_writable, writing
from dcfeat.finetune import tuned_splits
from dcfeat.geo import Places, metres_between
from dcfeat.fusion import DEFAULT_FUSED
from dcfeat.identity import RECORDED_ATTRS, check_features
from dcfeat.metrics import (
    DEFAULT_KS,
    THRESHOLD_M,
    LocalisationRecall,
    ece,
    localisation_recall,
    reliability_bins,
    risk_coverage,
    selective_report,
)
from dcfeat.model import EMBED_CHUNK, top_cells
from dcfeat.partition import class_keys, filed_rows, label_keys, places_of
from dcfeat.positions import answer as positions_answer
from dcfeat.positions import weighing_scale
from dcfeat.reports import Ranking, staged, training_photos, write_confidence_plots, write_grids, write_outputs
from dcfeat.retrieval import retrieval_backend, topk_cosine
from dcfeat.resume import run_lock
from dcfeat.run import EVAL_DIR, Run, database_identity, load_run, open_database, record_evaluation
from dcfeat.store import Split, read_split, same_plan, same_split


@dataclass
class Evaluation:
    """What `evaluate` measured: the report (recall per method, the confidence section, the
    settings), each method's ranked answers, their LR@k, and the arrays the confidence plots
    draw; `evaluate_files` adds the paths it wrote."""

    report: dict
    methods: list[Ranking]
    recall: dict[str, LocalisationRecall]
    confidence_plots: dict
    paths: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # inputs accepted that deserve a word (the CLI: stderr)


def coverage(run: Run, labels: pl.DataFrame) -> float:
    """Share of queries whose true cell is one of the run's classes."""
    return float(np.isin(label_keys(labels, run.M), class_keys(run.classes, run.M)).mean())


def classify(run: Run, queries: Split, k: int, device: torch.device, scoring: str = "cosine") -> list[Ranking]:
    """The answers of classification: positions weighed from the top cells under the run's rule
    ("classify"), and the D&C paper's cell centres ("classify-centre"), one scoring of the cells for both: its
    scores weigh the positions (`positions.weighing_scale`), under the rule of a calibration fitted for it
    (`calibration_for`; DEFAULT_RULE where there is none), as `localizer.predictions` answers."""
    cal = calibration_for(run.calibration, scoring)
    rule = answer_rule(cal)
    t = time.perf_counter()
    p = top_cells(run.model, queries.embeddings, run.classes, max(k, TOP_K), scoring)
    centre_seconds = time.perf_counter() - t
    top = Places(p["east"], p["north"], p["zone"], p["letter"])
    at, index = positions_answer(top, p["score"], weighing_scale(run.model.heads.logit_scale, scoring), rule,
                                 ranks=k, threshold_m=cal.threshold_m if cal else THRESHOLD_M)
    synchronize(device)
    seconds = time.perf_counter() - t
    answered = lambda a: np.take_along_axis(a, index, 1)  # noqa: E731
    return [Ranking("classify", at.east, at.north, at.zone, at.letter, answered(p["score"]), answered(p["class"]),
                    seconds, {"position": rule.to_dict()}),
            Ranking(CENTRE_METHOD, p["east"][:, :k], p["north"][:, :k], p["zone"][:, :k], p["letter"][:, :k],
                    p["score"][:, :k], p["class"][:, :k], centre_seconds)]


def _db_method(name: str, db: Split | CellDatabase, scores: np.ndarray, rows: np.ndarray, seconds: float,
               ref: np.ndarray | None = None, **extra) -> Ranking:
    """A method's answers from database rows: rows of the split (`db` a Split), or of the database's own order;
    `ref`: the rows the answers name (default `rows`)."""
    if isinstance(db, CellDatabase):
        at = db.places(rows)
    else:
        safe = np.where(rows >= 0, rows, 0)
        at = Places(*(np.where(rows >= 0, db.labels[c].to_numpy()[safe], fill) for c, fill in
                      (("utm_east", np.nan), ("utm_north", np.nan), ("utm_zone", 0), ("utm_letter", ""))))
    return Ranking(name, at.east, at.north, at.zone, at.letter, scores, rows if ref is None else ref, seconds, extra)


def _spaces(run: Run, queries: Split, db: Split, space: str, device: torch.device, cache: dict | None = None):
    """Query and database descriptors in the chosen space; database embedding time apart. With
    `cache` (one evaluation's), the database is embedded once for every mode that needs it."""
    if space == "raw":
        return queries.embeddings, db.embeddings, 0.0
    if cache is not None and "projected" in cache:
        return (queries.embeddings, *cache["projected"])
    t = time.perf_counter()
    d = run.model.embed(db.embeddings).to(device)
    synchronize(device)
    if cache is not None:
        cache["projected"] = (d, time.perf_counter() - t)
    return queries.embeddings, d, time.perf_counter() - t


def _unit_queries(run: Run, q, space: str, device: torch.device) -> torch.Tensor:
    return F.normalize(run.model.embedded(q, space).to(device).float(), dim=1)


def retrieve(run: Run | None, queries: Split, db: Split | CellDatabase, k: int, device: torch.device,
             space: str = "projected", cache: dict | None = None) -> Ranking:
    """Exact cosine k-NN of the queries among the database rows; `run` None for the raw space. A
    CellDatabase is searched in its own space, every row of it."""
    if isinstance(db, CellDatabase):
        t = time.perf_counter()
        q = _unit_queries(run, queries.embeddings, db.space, device)
        scores, rows = db.search_all(q, k)
        synchronize(device)
        return _db_method("retrieve", db, scores, rows, time.perf_counter() - t, space=db.space,
                          database_embedding_seconds=0.0, backend=retrieval_backend(device, len(q)))
    q, d, index_seconds = _spaces(run, queries, db, space, device, cache)
    t = time.perf_counter()
    if space == "projected":
        q = run.model.embed(q).to(device)
    scores, rows = topk_cosine(q, d, k, device=device)
    synchronize(device)
    return _db_method("retrieve", db, scores, rows, time.perf_counter() - t, space=space,
                      database_embedding_seconds=index_seconds, backend=retrieval_backend(device, len(q)))


def cell_database(run: Run, db: Split | CellDatabase, space: str, device: torch.device,
                  cache: dict | None = None) -> tuple[CellDatabase, float]:
    """The database the hybrid searches, and the seconds it took to make: a CellDatabase as it is; a split
    embedded in `space` and filed under the run's cells in memory, as `dcfeat index` files it on disk (once
    per evaluation with `cache`)."""
    if isinstance(db, CellDatabase):
        return db, 0.0
    if cache is not None and ("cells", space) in cache:
        return cache[("cells", space)]
    t = time.perf_counter()
    chunks = (unit_rows(run.model.embedded(db.embeddings[i:i + EMBED_CHUNK], space))
              for i in range(0, len(db.embeddings), EMBED_CHUNK))
    built = CellDatabase.build(filed_rows(run.classes, run.M, db.labels, chunks), num_classes=len(run.classes),
                               space=space, built_for=database_identity(run, space), device=device)
    synchronize(device)
    made = (built, time.perf_counter() - t)
    if cache is not None:
        cache[("cells", space)] = made
    return made


def _hybrid_rows(searched: CellDatabase, db: Split | CellDatabase, rows: np.ndarray) -> np.ndarray:
    """The hybrid's answers as rows of what the user passed: the split's rows, or the database's own."""
    return rows if isinstance(db, CellDatabase) else searched.source_rows(rows)


def run_gate(run: Run) -> Gate:
    """The run's posterior-mass gate (fitted on val against a database), else DEFAULT_GATE."""
    return run.calibration.gate if run.calibration is not None and run.calibration.gate else DEFAULT_GATE


def hybrid(run: Run, queries: Split, db: Split | CellDatabase, k: int, cells: int | None, device: torch.device,
           space: str = "projected", scoring: str = "cosine", cache: dict | None = None) -> Ranking:
    """Retrieval restricted to database images inside each query's top cells: the fewest that hold the
    gate's share of the probability (`cells` None), or the top `cells`."""
    searched, index_seconds = cell_database(run, db, space, device, cache)
    t = time.perf_counter()
    if cells is None:
        gate = run_gate(run)
        top_classes = gate_cells(query_scores(run.model, queries.embeddings), answer_rule(run.calibration).temperature,
                                 gate)
    else:
        gate, top_classes = None, run.model.topk(queries.embeddings, cells, scoring=scoring)[0]
    scores, rows, _ = searched.search(_unit_queries(run, queries.embeddings, searched.space, device), top_classes, k)
    synchronize(device)
    candidates = searched.counts_of(top_classes).sum(1)
    return _db_method("hybrid", searched, scores, rows, time.perf_counter() - t, _hybrid_rows(searched, db, rows),
                      space=searched.space, cells=cells, gate=gate and gate.to_dict(), database_embedding_seconds=index_seconds,
                      mean_candidates=float(candidates.mean()))


def adaptive(run: Run, queries: Split, db: Split | CellDatabase, k: int, cells: int | None, device: torch.device,
             space: str = "projected", cache: dict | None = None) -> Ranking:
    """The gated hybrid, and exact retrieval for the least sure queries (below `fallback_below`, a val
    quantile of the confidence in calibration.json). `cells` is recorded, not used: the gate decides."""
    searched, index_seconds = cell_database(run, db, space, device, cache)
    t = time.perf_counter()
    scores_ = query_scores(run.model, queries.embeddings)
    rule, gate = answer_rule(run.calibration), run_gate(run)
    conf = run.calibration.confidence(signals_of(scores_, run.classes, M=run.M, rule=rule).values)
    top = gate_cells(scores_, rule.temperature, gate)
    fallback = conf < run.calibration.hybrid.fallback_below
    top[fallback] = -1
    unit = _unit_queries(run, queries.embeddings, searched.space, device)
    scores, rows, _ = searched.search(unit, top, k)
    if fallback.any():
        # Exact retrieval gives min(k, database rows) columns: the rest stay "none" (-1, -inf), as the hybrid's.
        found_s, found_r = searched.search_all(unit[torch.as_tensor(fallback).to(device)], k)
        scores[fallback], rows[fallback] = -np.inf, -1
        scores[fallback, :found_s.shape[1]], rows[fallback, :found_r.shape[1]] = found_s, found_r
    synchronize(device)
    candidates = np.where(fallback, searched.rows, searched.counts_of(top).sum(1))
    return _db_method("adaptive", searched, scores, rows, time.perf_counter() - t, _hybrid_rows(searched, db, rows),
                      space=searched.space, gate=gate.to_dict(), database_embedding_seconds=index_seconds,
                      mean_candidates=float(candidates.mean()), fallback_share=float(fallback.mean()))


def fused(run: Run, queries: Split, db: Split | CellDatabase, k: int, device: torch.device,
          space: str = "projected", cache: dict | None = None) -> Ranking:
    """The fused hybrid (dcfeat.fusion): the candidate cells' photos weighed by their cell's posterior and
    their similarity, answered with the weighted centroid of the best-supported neighbourhood, under the rule
    the run's calibration fitted against this database split (DEFAULT_FUSED, with no fallback, elsewhere)."""
    searched, index_seconds = cell_database(run, db, space, device, cache)
    t = time.perf_counter()
    out, fc = fused_for_features(run.model, run.classes, run.M, run.calibration, searched, queries.embeddings, k)
    seconds = time.perf_counter() - t
    if cache is not None:
        cache["fused"] = (out, fc)
    rows = np.take_along_axis(out.candidates.rows, out.index, 1)
    weight = np.take_along_axis(out.weights, out.index, 1)
    return Ranking("fused", out.at.east, out.at.north, out.at.zone, out.at.letter, weight,
                   _hybrid_rows(searched, db, rows), seconds,
                   {"space": searched.space, "rule": (fc.rule if fc else DEFAULT_FUSED).to_dict(),
                    "fitted_against": fc.database_split if fc else None, "database_embedding_seconds": index_seconds,
                    "fallback_share": float(out.fallback.mean()) if len(rows) else 0.0,
                    "mean_candidates": float(out.rows_searched.mean()) if len(rows) else 0.0})


def fused_confidence(found: FusedAnswers, fc, queries: Split) -> dict:
    """How true the fused answers' own confidence and 90 % radius are on these queries."""
    err = metres_between(places_of(queries.labels), found.first)
    conf = fc.confidence.confidence(found.values)
    right = err <= fc.confidence.threshold_m
    radius = fc.confidence.radius_m(found.base_radius_m)
    return {"ece": ece(conf, right), "mean_confidence": float(conf.mean()), "right": float(right.mean()),
            "radius_90_inside": float((err <= radius).mean()), "radius_90_median_m": float(np.median(radius))}


def score(method: Ranking, queries: Split, *, ks: tuple[int, ...], threshold_m: float):
    lab = queries.labels
    return localisation_recall(lab["utm_east"].to_numpy(), lab["utm_north"].to_numpy(), lab["utm_zone"].to_numpy(),
                               method.east, method.north, method.zone, threshold_m=threshold_m, ks=ks,
                               q_letter=lab["utm_letter"].to_numpy(), p_letter=method.letter)


def check_rows(split: Split, option: str, store: Path | str | None = None) -> None:
    """Refuse a split with no rows: no query to answer, or no database row to retrieve from."""
    if len(split.labels) == 0:
        where = f" of {store}" if store is not None else ""
        raise BadInput(f"{option} {split.name}: split '{split.name}'{where} holds no rows, so there is nothing to "
                       f"{'evaluate' if option == '--split' else 'retrieve from'}. Extract images into it with "
                       f"`dcfeat extract --split {split.name}`, or choose another split")


def check_zones(run: Run, queries: Split) -> None:
    check_rows(queries, "--split")
    zones = set(run.classes["utm_zone"].unique().to_list())
    q = set(queries.labels["utm_zone"].unique().to_list())
    if not q & zones:
        raise IncompatibleFeatures(f"split '{queries.name}' lies in UTM zone(s) {sorted(q)} but every class of the "
                                   f"run lies in zone(s) {sorted(zones)}: the queries are from another place than "
                                   "the training images, so every prediction would be kilometres off. Evaluate "
                                   "on a split of the same city, or train a run on this place")


def check_modes(modes: tuple[str, ...], database, run: Run | None = None) -> None:
    """`database`: the database's name (split or folder), None when none was given."""
    if any(m != "classify" for m in modes) and database is None:
        raise BadInput(f"--mode {'/'.join(m for m in modes if m != 'classify')} needs --database-split (the "
                       "database images' split, e.g. test-db) or --database DB (a database `dcfeat index` wrote)")
    if "adaptive" in modes and run is not None and run.calibration is None:
        raise BadInput(f"--mode adaptive needs a calibrated run, and {run.directory} has no calibration.json: fit "
                       f"one with `dcfeat calibrate --run {run.directory} --split val`")


def default_modes(database_split, run: Run) -> tuple[str, ...]:
    """Every mode the inputs allow: the adaptive hybrid only for a calibrated run."""
    if not database_split:
        return ("classify",)
    return ("classify", "retrieve", "hybrid", "fused") + (("adaptive",) if run.calibration is not None else ())


def assess_confidence(run: Run, queries: Split, *, threshold_m: float, retrieval_top1: Places | None = None,
                      database_split: str | None = None) -> tuple[dict, dict]:
    """How well the confidence of classification's answers sorts right from wrong: (report section,
    arrays for the plots). `retrieval_top1`: retrieval's top-1 answers against `database_split`, for
    the agreement signal (and the confidence fitted with it, when the run has one for that database)."""
    sig = query_signals(run.model, queries.embeddings, run.classes, M=run.M, rule=answer_rule(run.calibration))
    err = errors_m(sig, places_of(queries.labels))
    base = run.calibration
    cal = base.for_database(database_split if retrieval_top1 is not None else None) if base else None
    # A calibrated confidence is the probability of an answer within the threshold it was fitted at.
    threshold_m = cal.threshold_m if cal is not None else threshold_m
    right = err <= threshold_m
    values = dict(sig.values)
    if retrieval_top1 is not None:
        values[DATABASE_SIGNAL] = disagreement_m(sig, retrieval_top1)
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
        "threshold_m": threshold_m,  # right = top-1 within this many metres, what the confidence means
        "calibrated": cal is not None, "fitted_on": cal.fitted_on.to_dict() if cal else None,
        "uses_database": cal is not None and cal is not base,
        "answer": f"classification's position ({_rule_words(answer_rule(run.calibration))})", "right": float(right.mean()) if len(right) else None,
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


# Timing: each mode runs once on WARM_UP_QUERIES first (kernels chosen, buffers and threads made, code
# paths loaded: without it whichever mode ran first looked slow, 4.4 ms/query against 0.06), then
# TIMING_REPEATS times over every query; the median time is reported.
WARM_UP_QUERIES, TIMING_REPEATS = 64, 3


def _timed(answer, queries: Split, repeats: int) -> list[Ranking]:
    """answer(queries)'s rankings, each timed as the median of `repeats` runs after a warm-up."""
    warm = Split(queries.name, queries.embeddings[:WARM_UP_QUERIES], queries.labels[:WARM_UP_QUERIES],
                 queries.attrs)
    if len(warm.embeddings):
        answer(warm)
    runs = [answer(queries) for _ in range(max(1, repeats))]
    for i, ranking in enumerate(runs[-1]):
        ranking.seconds = float(np.median([r[i].seconds for r in runs]))
        ranking.extra["timing"] = f"median of {len(runs)} runs after a warm-up on {len(warm.embeddings)} queries"
    return runs[-1]


def _rule_words(rule) -> str:
    return ("the best cell's centre" if rule.radius_m == 0 else
            f"the top cells within {rule.radius_m:g} m of the best, weighed at temperature {rule.temperature:g}")


def evaluate(run: Run, queries: Split, *, database: Split | CellDatabase | None = None, modes: tuple[str, ...] = ("classify",),
             ks: tuple[int, ...] = DEFAULT_KS, threshold_m: float = THRESHOLD_M, cells: int | None = None,
             space: str = "projected", device: str = "cpu", scoring: str = "cosine",
             store: Path | None = None, repeats: int = TIMING_REPEATS) -> Evaluation:
    """Run each mode on `queries` and measure the confidence of classification's answers.

    `database`: a split (retrieval searches it; the hybrid files it under the run's cells in memory), or a
    CellDatabase `dcfeat index` wrote (searched from disk, in its own space).
    `store`: the feature store the splits come from, recorded in the report; the report then says
    when the run's confidence was fitted on these very queries (its figures are then optimistic).
    Each mode is timed after a warm-up on a few queries, as the median of `repeats` runs over them all.
    """
    check_modes(modes, database_name(database), run)
    dev = torch.device(device)
    run.model.to(dev)
    check_zones(run, queries)
    if isinstance(database, Split):
        check_rows(database, "--database-split", store)
    elif database is not None:
        space = database.space
    warnings = evaluation_warnings(run, queries, database, space=space, threshold_m=threshold_m, scoring=scoring)
    # No method answers more than the run's classes or the database's rows: larger k and cells say nothing more.
    most = max(len(run.classes), database_rows_of(database))
    asked_ks, asked_cells = ks, cells
    ks = tuple(sorted({min(k_, most) for k_ in ks}))
    cells = min(cells, len(run.classes)) if cells is not None else None
    k = max(ks)
    methods = []
    cache = {}  # the database embedded (and indexed) once for all the modes that search it

    def run_mode(mode: str, split: Split) -> list[Ranking]:
        if mode == "classify":
            return classify(run, split, k, dev, scoring)
        if mode == "retrieve":
            return [retrieve(run, split, database, k, dev, space, cache)]
        if mode == "hybrid":
            return [hybrid(run, split, database, k, cells, dev, space, scoring, cache)]
        if mode == "fused":
            return [fused(run, split, database, k, dev, space, cache)]
        return [adaptive(run, split, database, k, cells, dev, space, cache)]

    for mode in modes:
        methods.extend(_timed(lambda split, mode=mode: run_mode(mode, split), queries, repeats))
    n = queries.embeddings.shape[0]
    results, report_methods = _recall(methods, queries, ks=ks, threshold_m=threshold_m)
    if "fused" in cache and cache["fused"][1] is not None and len(queries.labels):
        report_methods["fused"]["confidence"] = fused_confidence(cache["fused"][0], cache["fused"][1], queries)
    retrieved = next((m for m in methods if m.name == "retrieve"), None)
    section, plots = None, {}  # the confidence is fitted and measured for cosine answers only
    if scoring == "cosine":
        section, plots = assess_confidence(
            run, queries, threshold_m=threshold_m,
            database_split=database.name if isinstance(database, Split) else None,
            retrieval_top1=None if retrieved is None else Places(retrieved.east[:, 0], retrieved.north[:, 0],
                                                                 retrieved.zone[:, 0], retrieved.letter[:, 0]))
    fitted = run.calibration.fitted_on.to_dict() if run.calibration else {}
    store = str(Path(store).resolve()) if store is not None else None
    if section is not None and same_plan(fitted.get("plan_id"), queries.attrs.get("plan_id"),
                 fitted.get("split") == queries.name and store is not None and fitted.get("store") == store):
        section["note"] = (f"CALIBRATED ON THIS SPLIT ('{queries.name}'): the confidence's figures here are "
                           "optimistic; calibrate on a held-out split (`dcfeat calibrate --split val`) and evaluate "
                           "on another")
    report = {"split": queries.name, "split_plan_id": queries.attrs.get("plan_id"), "queries": n,
              "database_split": database.name if isinstance(database, Split) else None,
              "database": str(database.path) if isinstance(database, CellDatabase) else None,
              "database_rows": database_rows_of(database) if database is not None else None,
              "threshold_m": threshold_m, "ks": list(ks), "device": str(dev), "space": space, "cells": cells, "scoring": scoring,
              "preset": run.config.train.preset, "test_prototypes": run.model.heads.test_prototypes,
              "coverage": coverage(run, queries.labels), "classes": len(run.classes),
              "random_backbone": run.random_backbone,
              "run_complete": run.complete, "epochs_done": run.epochs_done, "epochs": run.epochs,
              "run_status": run.status_line(), "methods": report_methods,
              "run": str(Path(run.directory).resolve()), "store": store,
              "options": {"modes": list(modes), "ks": list(asked_ks), "threshold_m": threshold_m,
                          "cells": asked_cells, "space": space, "device": device, "scoring": scoring},
              "confidence": section, "warnings": warnings}
    return Evaluation(report, methods, results, plots, warnings=warnings)


def _recall(methods: list[Ranking], queries: Split, *, ks: tuple[int, ...],
            threshold_m: float) -> tuple[dict[str, LocalisationRecall], dict[str, dict]]:
    """Each method's LR@k, and its entry of the report (recall, errors, speed, its own details)."""
    n = len(queries.labels)
    results, report_methods = {}, {}
    for m in methods:
        lr = score(m, queries, ks=ks, threshold_m=threshold_m)
        results[m.name] = lr
        report_methods[m.name] = {"recall": {str(k_): v for k_, v in lr.recall.items()}, "median_error_m": lr.median_m,
                                  "mean_error_m": lr.mean_m, "seconds": m.seconds,
                                  "queries_per_s": n / m.seconds if m.seconds > 0 else None,
                                  "ms_per_query": 1000 * m.seconds / n if n else None, **m.extra}
    return results, report_methods


# What a report without a run says in place of the run's status.
NO_RUN = "NO RUN: exact k-NN over the raw features of the store (no training, no confidence)"


def evaluate_raw(queries: Split, database: Split, *, ks: tuple[int, ...] = DEFAULT_KS,
                 threshold_m: float = THRESHOLD_M, device: str = "cpu", store: Path | None = None,
                 repeats: int = TIMING_REPEATS) -> Evaluation:
    """Retrieval with no run: exact cosine k-NN of each query among the database rows on the raw
    features, LR@k and timing as `evaluate` reports them; no classification and no confidence."""
    check_rows(queries, "--split", store)
    check_rows(database, "--database-split", store)
    dev = torch.device(device)
    warnings = _database_warnings(queries, database)
    asked_ks = ks
    ks = tuple(sorted({min(k_, len(database.labels)) for k_ in ks}))
    methods = _timed(lambda split: [retrieve(None, split, database, max(ks), dev, "raw")], queries, repeats)
    results, report_methods = _recall(methods, queries, ks=ks, threshold_m=threshold_m)
    report = {"split": queries.name, "split_plan_id": queries.attrs.get("plan_id"), "queries": len(queries.labels),
              "database_split": database.name, "database_rows": len(database.labels), "threshold_m": threshold_m,
              "ks": list(ks), "device": str(dev), "space": "raw", "run": None, "run_status": NO_RUN,
              "features": {k: queries.attrs.get(k) for k in RECORDED_ATTRS},
              "random_backbone": bool(queries.attrs.get("backbone_random_init")), "methods": report_methods,
              "store": str(Path(store).resolve()) if store is not None else None,
              "options": {"modes": ["retrieve"], "ks": list(asked_ks), "threshold_m": threshold_m, "space": "raw",
                          "device": device},
              "confidence": None, "warnings": warnings}
    return Evaluation(report, methods, results, {}, warnings=warnings)


def _database_warnings(queries: Split, database: Split | CellDatabase) -> list[str]:
    if isinstance(database, CellDatabase):
        plan = queries.attrs.get("plan_id")
        if plan and any(e["source"].get("plan_id") == plan for e in database.header["segments"]):
            return [f"--database {database.path} holds the query split '{queries.name}' itself: every query finds "
                    "its own image, so retrieval and the hybrid score near 100 % and measure nothing. Index the "
                    "database images' own split (e.g. test-db)"]
        return []
    if same_split(queries, database):
        return [f"--database-split {database.name} is the query split '{queries.name}' itself: every query finds its "
                "own image, so retrieval and the hybrid score near 100 % and measure nothing. Pass the database "
                "images' own split (e.g. test-db)"]
    return []


def database_name(database: Split | CellDatabase | None) -> str | None:
    """How the report and the messages name the database: the split's name, or the database's folder."""
    if database is None:
        return None
    return database.name if isinstance(database, Split) else str(database.path)


def database_rows_of(database: Split | CellDatabase | None) -> int:
    if database is None:
        return 0
    return database.rows if isinstance(database, CellDatabase) else len(database.labels)


def evaluation_warnings(run: Run, queries: Split, database: Split | CellDatabase | None, *, space: str,
                        threshold_m: float, scoring: str = "cosine") -> list[str]:
    """What an evaluation accepts but should say: a database that is the query split itself, a
    --space without a database, a --threshold other than the confidence's, a calibration fitted for
    another scoring than the one that ranks the cells."""
    warnings = []
    note = scoring_note(run.calibration, scoring)
    if note:
        warnings.append(f"{note}; the report measures no confidence")
    if database is not None:
        warnings += _database_warnings(queries, database)
    elif space != "projected":
        warnings.append(f"--space {space} has no effect without --database-split or --database: only retrieval and the hybrid "
                        "compare descriptors, and classification always uses the run's projection")
    cal = calibration_for(run.calibration, scoring)
    if cal is not None and cal.threshold_m != threshold_m:
        warnings.append(f"the run's confidence was fitted at {cal.threshold_m:g} m (the probability of an answer "
                        f"within {cal.threshold_m:g} m) but --threshold is {threshold_m:g} m: LR@k is measured at "
                        f"{threshold_m:g} m, the confidence at {cal.threshold_m:g} m. Refit it with `dcfeat calibrate "
                        f"--threshold {threshold_m:g}` to have both at one threshold")
    return warnings


def raw_eval_dir(feats: Path, split: str) -> Path:
    """Where an evaluation without a run writes by default: STORE_FOLDER/eval/STORE_NAME/SPLIT."""
    return Path(feats).parent / EVAL_DIR / Path(feats).stem / split


def evaluate_files(feats: Path, run_dir: Path | None, split: str, *, database_split: str | None = None,
                   database: Path | None = None, modes: tuple[str, ...] | None = None, ks: tuple[int, ...] = DEFAULT_KS,
                   threshold_m: float = THRESHOLD_M, cells: int | None = None, space: str | None = None,
                   repeats: int = TIMING_REPEATS, weights: str = "kept",
                   scoring: str = "cosine", device: str = "auto", out: Path | None = None,
                   grid: int = 0, plots: bool = True) -> Evaluation:
    """`dcfeat evaluate`: read the splits and the run, check they belong together, evaluate, write the files
    (report.json, predictions.parquet, with `plots` the plots; with `grid`, that many queries beside their answers'
    photos per method) into `out` (default RUN/eval/SPLIT), together: a failure leaves `out` as it was. Under the
    run's lock: refused while the run is trained or calibrated; the run records the split it was measured on
    (`record_evaluation`), wherever `out` is. `run_dir` None: no run, `--mode retrieve` on the raw features
    only (`evaluate_raw`; default `out` STORE_FOLDER/eval/STORE_NAME/SPLIT). `space` None: projected with a
    run, raw without. `database`: a database folder `dcfeat index` wrote for this run, searched in place of
    `database_split` (in its own space)."""
    if grid < 0:
        raise BadInput(f"--grid {grid}: give a number of queries, 0 or more")
    if grid and not plots:
        raise BadInput(f"--grid {grid} draws figures and --no-plots draws none: leave one of them out")
    if run_dir is None:
        if tuple(modes or ()) != ("retrieve",):
            raise BadInput(f"--mode {'/'.join(modes) if modes else 'all'} needs a run: train one with `dcfeat train`, "
                           "or pass --run DIR of a folder it wrote. Without a run only `--mode retrieve "
                           "--database-split SPLIT` can be evaluated: exact k-NN over the raw features")
        if space == "projected":
            raise BadInput("--space projected is the run's learned embedding, and no run is evaluated; leave --space "
                           "out (raw), or pass --run DIR")
    if database is not None:
        if database_split is not None:
            raise BadInput("--database and --database-split both name a database: pass one of them")
        if run_dir is None:
            raise BadInput(f"--database {database} was filed under a run's cells: pass the --run it was built for")
    if not out:
        out = Path(run_dir) / EVAL_DIR / split if run_dir is not None else raw_eval_dir(feats, split)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; evaluate writes a folder of files (report.json, predictions.parquet, "
                       "plots) there. Choose a folder, new or one that evaluate wrote")
    with run_lock(run_dir, "evaluate") if run_dir is not None else nullcontext():
        dev = resolve_device(device)
        run = load_run(run_dir, dev, weights=weights) if run_dir is not None else None
        index = open_database(database, run, space) if database is not None else None
        if run is not None:
            modes = default_modes(database_split or database, run) if modes is None else modes
        check_modes(modes, database_split or database, run)
        check_writable(out)
        queries = read_split(feats, split, dtype=np.float32)
        if run is not None:
            check_features(run.feature_identity, queries.attrs, what=f"split '{split}' of {feats}")
        check_rows(queries, "--split", feats)
        database = None  # from here: the database split, if any
        if database_split:
            database = read_split(feats, database_split)
            if run is not None:
                check_features(run.feature_identity, database.attrs, what=f"split '{database_split}' of {feats}")
            check_rows(database, "--database-split", feats)
        if run is None:
            result = evaluate_raw(queries, database, ks=ks, threshold_m=threshold_m, device=str(dev), store=feats,
                                  repeats=repeats)
        else:
            if run.finetune_blocks:
                queries, *rest = tuned_splits(run, feats, [queries] + ([database] if database else []), dev)
                database = rest[0] if rest else None
            result = evaluate(run, queries, database=index or database, modes=modes, ks=ks, scoring=scoring,
                              threshold_m=threshold_m, repeats=repeats, cells=cells, space=space or "projected",
                              device=str(dev), store=feats)
            result.report["weights"] = weights  # the kept epoch's model, or the last one's
        result.report["options"]["device"] = device
        result.report["options"]["plots"] = plots
        background = None
        if database is not None:
            background = (database.labels["utm_east"].to_numpy(), database.labels["utm_north"].to_numpy())
        elif index is not None:
            background = (index.table["utm_east"].to_numpy(), index.table["utm_north"].to_numpy())
        notice = f" — {RANDOM_NOTICE}" if result.report["random_backbone"] else ""
        with writing(out), staged(out) as folder:
            extra = (write_confidence_plots(folder, result.confidence_plots, split=split, notice=notice)
                     if result.confidence_plots and plots else {})
            if grid:
                photos = database or (training_photos(run.config.store, run.config.train_split) if run else None)
                grids, said = write_grids(folder, queries, result.methods, result.recall, rows=grid,
                                          threshold_m=threshold_m, database=database, photos=photos, notice=notice)
                extra.update(grids)
                result.warnings.extend(said)  # the report's list too
            result.report, paths = write_outputs(folder, result.report, queries.labels, result.methods,
                                                 result.recall, background=background, extra_files=extra,
                                                 plots=plots)
        result.paths = {name: out / path.name for name, path in paths.items()}
        if run is not None:
            record_evaluation(run_dir, split, queries.attrs.get("plan_id"), str(Path(feats).resolve()), out)
    return result
