"""The tables the commands print (rich): recall and confidence of `evaluate`, splits and problems of `info`."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.errors import human_bytes
from dcfeat.store import SplitInfo


def splits_table(store: Path, splits: list[SplitInfo]):
    """`dcfeat info`'s table: one row per split with what identifies and what is wrong with it."""
    table = Table(title=str(store))
    for col in ("split", "rows", "dim", "dtype", "model", "pooling", "crop", "complete", "disk", "tokens",
                "failures", "problems"):
        table.add_column(col, justify="right" if col in ("rows", "dim", "disk", "failures") else "left")
    for s in splits:
        model = str(s.attrs.get("model", "?")) + (" (random init)" if s.attrs.get("backbone_random_init") else "")
        tokens = (f"K={s.cache_tokens}, {human_bytes(s.token_bytes_per_image)}/image"
                  if s.cache_tokens else "-")
        table.add_row(s.name, f"{s.rows:,}", str(s.dim), s.dtype, model, str(s.attrs.get("pooling", "?")),
                      f"{s.attrs.get('image_size', '?')} {s.attrs['crop']}", "yes" if s.complete else "no",
                      human_bytes(s.bytes_on_disk), tokens, str(s.failures), "; ".join(s.problems) or "-")
    return table


def problems_table(problems) -> Table:
    """`dcfeat info --verify`'s findings: where, what, and what to do."""
    table = Table(title="problems")
    for col in ("split", "where", "problem", "what to do"):
        table.add_column(col, overflow="fold")
    for p in problems:
        table.add_row(p.split, p.where, p.what if p.serious else f"{p.what} (harmless)", p.fix)
    return table


def recall_table(report: dict, *, what: str = "") -> Table:
    """LR@k, errors and speed of each method of an evaluation; `what`: the title's opening words (whose numbers)."""
    ks = report["ks"]
    title = f"split {report['split']}: {report['queries']} queries, LR@k at {report['threshold_m']:g} m"
    title = f"{what}, {title}" if what else title
    if report.get("scoring", "cosine") != "cosine":
        title += f", cells ranked by {report['scoring']}"
    if report.get("database_rows"):
        title += f", database {report.get('database') or report['database_split']} ({report['database_rows']:,} rows)"
    notes = [n for n in (report.get("run_status"), RANDOM_NOTICE if report["random_backbone"] else None) if n]
    table = Table(title=title, caption="\n".join(notes) or None)
    table.add_column("method")
    for k in ks:
        table.add_column(f"LR@{k}", justify="right")
    for col in ("median err", "ms/query", "queries/s"):
        table.add_column(col, justify="right")
    for name, m in report["methods"].items():
        label = f"{name} ({m['space']})" if "space" in m else name
        table.add_row(label, *[f"{100 * m['recall'][str(k)]:.1f}" for k in ks], f"{m['median_error_m']:.1f} m",
                      f"{m['ms_per_query']:.3f}", f"{m['queries_per_s']:,.0f}")
    return table


def confidence_table(report: dict) -> Table:
    """How well each signal (and the calibrated confidence) sorts classification's right answers first."""
    sec = report["confidence"]
    title = (f"confidence of classification's answers: {100 * (sec['right'] or 0):.1f} % right at "
             f"{sec.get('threshold_m', report['threshold_m']):g} m")
    notes = [sec["note"]] if sec.get("note") else []
    if sec.get("radius_90"):
        notes.append(f"90 % radius: the true position inside it for {100 * sec['radius_90']['inside']:.1f} % of "
                     f"queries (median radius {sec['radius_90']['median_m']:.0f} m)")
    table = Table(title=title, caption="\n".join(notes) or None)
    for col in ("signal", "AUC-PR", "AUROC", "LR@1 50 %", "LR@1 75 %", "LR@1 90 %", "ECE", "Brier"):
        table.add_column(col, justify="left" if col == "signal" else "right")
    fmt = lambda v, pct=False: "—" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")  # noqa: E731
    for name, m in sec["signals"].items():
        cov = m["lr1_at_coverage"]
        table.add_row(name, fmt(m["auc_pr"]), fmt(m["auroc"]), fmt(cov.get("50"), True), fmt(cov.get("75"), True),
                      fmt(cov.get("90"), True), fmt(m["ece"]), fmt(m["brier"]))
    return table


SHOWN_ANSWERS = 10  # rows of `dcfeat predict`'s table; every answer is in the output file


def answers_table(frame) -> Table:
    """`dcfeat predict`'s first answers: where each photo was taken, how sure, within what radius."""
    first = frame.filter(frame["rank"] == 1)
    shown = first.head(SHOWN_ANSWERS)
    more = f"; {first.height - shown.height} more in the output file" if first.height > shown.height else ""
    table = Table(title=f"where the photos were taken (rank-1 answers){more}",
                  caption="probability: the cell's share of the softmax over every cell (it ranks cells); "
                          "confidence: the calibrated probability that the answer is within threshold_m of the "
                          "truth; radius: holds the truth with probability 0.9")
    known = "error_m" in first.columns and first["error_m"].null_count() < first.height
    for col in ("image", "lat", "lon", "cell", "probability", "confidence", "radius", "abstained",
                *(("error",) if known else ())):
        table.add_column(col, justify="left" if col == "image" else "right", overflow="fold")
    fmt = lambda v, f: "—" if v is None else f.format(v)  # noqa: E731
    for r in shown.iter_rows(named=True):
        table.add_row(r["image_id"], f"{r['lat']:.6f}", f"{r['lon']:.6f}", str(r["class"]),
                      f"{r['probability']:.3f}", fmt(r["confidence"], "{:.3f}"), fmt(r["radius_m"], "{:.0f} m"),
                      "yes" if r.get("abstained") else "no", *((fmt(r["error_m"], "{:.0f} m"),) if known else ()))
    return table


def run_table(run) -> Table:
    """`dcfeat info RUN`: what a run is — preset, backbone and features, classes, training, confidence."""
    import json

    from dcfeat.run import LAST_FILE, LOG_FILE

    c, f = run.config, run.feature_identity
    log = run.directory / LOG_FILE
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    best = next((r for r in records if r.get("epoch") == c.best_epoch), {})
    cal = run.calibration
    rows = [
        ("preset", c.train.preset),
        ("backbone", f"{f.model} (fingerprint {f.model_fingerprint})"
                     + (" — RANDOM BACKBONE" if run.random_backbone else "")),
        ("features", f"pooling {f.pooling}, {f.image_size} px {f.crop} crop, dim {f.dim}"),
        ("classes", f"{len(run.classes):,} cells of M = {c.train.M:g} m in N² = {c.train.N ** 2} groups "
                    f"(at least {c.train.min_images_per_class} images each)"),
        ("model", f"{c.train.head} head, s = {c.train.s:g}, m = {c.train.m:g}, projection to {c.train.dim}"),
        ("training", f"{c.epochs_done} of {c.train.epochs} epochs" + (", complete" if c.complete else ", INCOMPLETE")
                     + (f", stopped: {c.stopped}" if c.stopped else "")),
        ("kept epoch", f"{c.best_epoch} by {c.train.keep}"
                       + (f", val LR@1 {100 * best['val_lr1']:.1f} %" if "val_lr1" in best else "")
                       + (f", train loss {best['loss']:.4f}" if "loss" in best else "")
                       + ("; the last epoch's model beside it" if (run.directory / LAST_FILE).is_file() else "")),
        ("confidence", "UNCALIBRATED (`dcfeat calibrate --split val`)" if cal is None else
         f"fitted on '{cal.fitted_on.split}' ({cal.fitted_on.queries} queries) at {cal.threshold_m:g} m; "
         f"answers weigh the cells within {cal.rule.radius_m:g} m (temperature {cal.rule.temperature:g})"
         + (f"; hybrid gate {100 * cal.gate.mass:g} % of the probability" if cal.gate else "")),
    ]
    table = Table(title=str(run.directory), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for what, value in rows:
        table.add_row(what, value)
    return table


def database_lines(db) -> str:
    """What `dcfeat info DB` says of a database (dcfeat.database.CellDatabase)."""
    built = db.built_for
    lines = [f"database {db.path}: {db.rows:,} rows in {db.cells():,} of the run's {db.classes:,} cells, "
             f"{db.outside:,} rows outside every class cell (filed under the nearest), {len(db.segments)} segment(s); "
             f"{db.space} descriptors, {db.dim} dims float16, format {db.header['format']}",
             f"built for run {built.get('run')} (classes {built.get('classes_digest')}, M = {built.get('M')} m"
             + (f", projection {built.get('projection')}" if built.get("projection") else "")
             + f"; features {built.get('model_fingerprint')}, {built.get('pooling')})"]
    for e in db.header["segments"]:
        src = e["source"]
        lines.append(f"  segment {e['name']}: {e['rows']:,} rows ({e['outside']:,} outside, the farthest "
                     f"{e.get('farthest_outside_m', 0.0):,.0f} m from its cell) from split '{src.get('split')}' of "
                     f"{src.get('store')}")
    return "\n".join(lines)
