"""Quality on every city of the synthetic family: what each answer scores, and how true its confidence is.

Per city (dcfeat.synthetic.features.FAMILY): train with the default TrainConfig, calibrate on the
city's val split against its database (the position rule, the confidence and the hybrid's gate are
fitted there, never on test), evaluate every mode on its test split against the database.

Inputs: none (the cities are generated, seeded). Run from the repository root:
`python -m pipelines.benchmarks run worlds` (about 20 minutes on 2 shared cores; `--cities grid,sparse` for some).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import evaluate_files
from dcfeat.fusion import FALLBACK_CELLS
from dcfeat.geo import Places
from dcfeat.metrics import localisation_recall
from dcfeat.model import top_cells
from dcfeat.positions import PositionRule, positions, probabilities
from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import FAMILY, make_city, write_city
from dcfeat.train import TrainConfig, train_files
from pipelines.benchmarks.markdown import command, measured, not_measured, table

METHODS = ("classify", "classify-centre", "retrieve", "hybrid", "fused", "adaptive")
KS = (1, 5, 10, 20)  # LR@k recorded per method: the position's ranked answers against the cell centres'
OPTIONS = [click.Option(["--cities"], default=",".join(FAMILY), show_default=True,
                        help="Comma-separated names of FAMILY."),
           click.Option(["--queries"], default=2000, show_default=True, type=click.IntRange(1),
                        help="Test queries per city."),
           click.Option(["--val-queries"], default=2000, show_default=True, type=click.IntRange(1),
                        help="Held-out queries per city (the fit).")]


def measure(*, cities: str = ",".join(FAMILY), queries: int = 2000, val_queries: int = 2000) -> dict:
    unknown = [name for name in cities.split(",") if name not in FAMILY]
    if unknown:
        raise click.BadParameter(f"unknown cities {unknown}; known: {','.join(FAMILY)}", param_hint="--cities")
    out = {"queries": queries, "val_queries": val_queries, "cities": {}}
    for name in cities.split(","):
        out["cities"][name] = world(name, queries=queries, val_queries=val_queries)
        print(name, json.dumps(out["cities"][name]), flush=True)
    return out


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
                                out=Path(tmp) / "eval", plots=False).report
        old = old_rule(store, run.out, cal.rule)
    conf = report["confidence"]
    signal = conf["signals"]["confidence"]
    return {
        "city": FAMILY[name], "train_rows": city.size("train"), "classes": report["classes"],
        "queries": report["queries"], "database_rows": report["database_rows"], "seconds": time.perf_counter() - t,
        "position": cal.rule.to_dict(), "gate": cal.gate and cal.gate.to_dict(), "coverage": report["coverage"],
        "old_rule": old,
        "methods": {m: {**{f"lr{k}": r["recall"][str(k)] for k in KS}, "median_error_m": r["median_error_m"],
                        "ms_per_query": r["ms_per_query"],
                        **({"candidate_share": r["mean_candidates"] / report["database_rows"]}
                           if "mean_candidates" in r else {}),
                        **({k: r[k] for k in ("rule", "fallback_share", "confidence") if k in r} if m == "fused" else {})}
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


def render(results: list[dict]) -> str:
    """Quality per city of the synthetic family and the goals, met or not."""
    if not results:
        return not_measured("worlds")
    w = results[-1]
    cities = w["cities"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731

    def row(name, c):
        m, conf = c["methods"], c["confidence"]
        knob = ", ".join(f"{k}={v}" for k, v in c["city"].items()) or "default"
        return [f"{name} ({knob})", f"{c['train_rows']:,} / {c['classes']}", pct(m["classify"]["lr1"]),
                pct(m["classify-centre"]["lr1"]), pct(m["retrieve"]["lr1"]),
                f"{pct(m['hybrid']['lr1'])} ({100 * m['hybrid']['candidate_share']:.2f} %)",
                pct(m["adaptive"]["lr1"]), f"{conf['ece']:.3f}", pct(conf["lr1_most_confident_half"]),
                f"{pct(conf['radius_90_inside'])} ({conf['radius_90_median_m']:.0f} m)",
                f"{c['position']['radius_m']:g} m, T {c['position']['temperature']:g}; q {c['gate']['mass']:g}"]

    rows = [row(n, c) for n, c in cities.items()]
    mean = lambda f: sum(f(c) for c in cities.values()) / len(cities)  # noqa: E731
    rows.append(["**mean**", "", *(f"**{pct(mean(lambda c, m=m: c['methods'][m]['lr1']))}**"
                                    for m in ("classify", "classify-centre", "retrieve", "hybrid", "adaptive")),
                 f"**{mean(lambda c: c['confidence']['ece']):.3f}**",
                 f"**{pct(mean(lambda c: c['confidence']['lr1_most_confident_half']))}**",
                 f"**{pct(mean(lambda c: c['confidence']['radius_90_inside']))}**", ""])
    per_city = table(["city", "train rows / classes", "position LR@1", "cell centre", "retrieval",
                      "gated hybrid (share of DB)", "adaptive", "ECE", "LR@1 confident half", "90 % radius holds",
                      "fitted on val: rule; gate"], rows)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    ranked, ranked_ok = ranked_answers(w)
    m = {n: c["methods"] for n, c in cities.items()}
    gain = mean(lambda c: c["methods"]["classify"]["lr1"] - c["methods"]["classify-centre"]["lr1"])
    beat = [n for n in cities if m[n]["classify"]["lr1"] >= m[n]["retrieve"]["lr1"]]
    hyb = [n for n in cities if m[n]["hybrid"]["lr1"] >= m[n]["retrieve"]["lr1"] + 0.01
           and m[n]["hybrid"]["candidate_share"] <= 0.05]
    ece = [n for n in cities if cities[n]["confidence"]["ece"] <= 0.03]
    half = mean(lambda c: c["confidence"]["lr1_most_confident_half"])
    radius = [n for n in cities if 0.88 <= cities[n]["confidence"]["radius_90_inside"] <= 0.92]
    n = len(cities)
    goals = table(["goal", "measured", ""], [
        ["position LR@1 ≥ exact retrieval's, every city", f"{len(beat)} of {n} cities", verdict(len(beat) == n)],
        ["position LR@k ≥ cell centre's − 0.5 points, k = 1, 5, 10, 20, every city",
         f"{len(ranked_ok)} of {n} cities", verdict(len(ranked_ok) == n)],
        ["position LR@1 ≥ cell centre's + 3 points, on average", f"+{100 * gain:.1f} points", verdict(gain >= 0.03)],
        ["gated hybrid ≥ retrieval + 1 point at ≤ 5 % of the database, every city", f"{len(hyb)} of {n} cities",
         verdict(len(hyb) == n)],
        ["ECE ≤ 0.03, every city", f"{len(ece)} of {n} cities", verdict(len(ece) == n)],
        ["LR@1 of the most confident half ≥ 90 %, on average", f"{pct(half)} %", verdict(half >= 0.9)],
        ["90 % radius holds 88–92 %, every city", f"{len(radius)} of {n} cities", verdict(len(radius) == n)]])
    fused_text = fused_section(w) if all("fused" in c["methods"] for c in cities.values()) else ""
    return (f"On {machine(w)}{measured(w)}: per city {w['queries']:,} test and {w['val_queries']:,} val queries, "
            "default `TrainConfig`, the position rule, confidence and gate fitted on val against the database "
            f"({command('worlds')}).\n\n" + per_city + "\n\n" + ranked + "\n\n" + goals + fused_text)


def fused_section(w: dict) -> str:
    """The fused hybrid beside both signals and the paper's hybrid per city, its confidence and its cost, and its
    goals: LR@1 ≥ max(position, retrieval) + 1 point on every city with classes, LR@k ≥ the paper hybrid's for
    k > 1, ms/query ≤ 2× classification's (the same run and CPU, side by side)."""
    ks = (1, 5, 10, 20)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    rows, beat, ranks_ok, cheap = [], [], [], []
    for name, c in w["cities"].items():
        m = c["methods"]
        f, pos, ret, hyb = m["fused"], m["classify"], m["retrieve"], m["hybrid"]
        rule, conf = f.get("rule", {}), f.get("confidence", {})
        ratio = f["ms_per_query"] / pos["ms_per_query"]
        if f["lr1"] >= max(pos["lr1"], ret["lr1"]) + 0.01 - 1e-9:
            beat.append(name)
        if all(f[f"lr{k}"] >= hyb[f"lr{k}"] - 1e-9 for k in ks[1:]):
            ranks_ok.append(name)
        if ratio <= 2:
            cheap.append(name)
        rows.append([name, *(f"{pct(f[f'lr{k}'])} / {pct(pos[f'lr{k}'])} / {pct(ret[f'lr{k}'])} / {pct(hyb[f'lr{k}'])}"
                             for k in ks),
                     f"{100 * f['candidate_share']:.2f} % ({100 * f.get('fallback_share', 0):.0f} %)",
                     f"{conf['ece']:.3f}" if conf else "–",
                     f"{pct(conf['radius_90_inside'])} ({conf['radius_90_median_m']:.0f} m)" if conf else "–",
                     f"{f['ms_per_query']:.3f} / {pos['ms_per_query']:.3f} ({ratio:.2f}×)",
                     f"T {rule.get('temperature', 0):g}, a {rule.get('posterior', 0):g}, {rule.get('radius_m', 0):g} m, "
                     f"q {rule.get('mass', 0):g}; wider: {_wider(rule)}"])
    n = len(w["cities"])
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    per_city = table(["city", "LR@1 fused / position / retrieval / paper hybrid", "LR@5", "LR@10", "LR@20",
                      "share of DB searched (queries searching wider than their cells)", "fused ECE", "its 90 % radius holds",
                      "ms/query fused / classify", "fitted on val"], rows)
    goals = table(["goal", "measured", ""], [
        ["fused LR@1 ≥ max(position, exact retrieval) + 1 point, every city", f"{len(beat)} of {n} cities",
         verdict(len(beat) == n)],
        ["fused LR@k ≥ the paper hybrid's, k = 5, 10, 20, every city", f"{len(ranks_ok)} of {n} cities",
         verdict(len(ranks_ok) == n)],
        ["fused ms/query ≤ 2 × classification's (same run, same CPU, one evaluation)", f"{len(cheap)} of {n} cities",
         verdict(len(cheap) == n)]])
    return ("\n\n### The fused hybrid\n\nThe database photos of the candidate cells (the fewest top cells holding a "
            "share q of the probability) weighed by a softmax of their cosine at temperature T times their cell's "
            "posterior to the power a, answered with the weighted centroid of the best-supported neighbourhood; the "
            "least confident queries (a share fitted on val) search wider: their top "
            f"{' or '.join(str(c) for c in FALLBACK_CELLS if c)} cells, or the whole database, as fitted "
            "(`dcfeat/fusion.py`). Fitted on "
            "val with its own confidence; the same test queries and evaluation as above, times measured side by "
            "side in it:\n\n" + per_city + "\n\n" + goals)


def _wider(rule: dict) -> str:
    """Where a fused rule's least confident queries search: none fall back, their top cells, or everywhere."""
    if not rule.get("fallback_below"):
        return "none"
    return f"{rule['fallback_cells']} cells" if rule.get("fallback_cells") else "everywhere"


def machine(w: dict) -> str:
    """Where a worlds run was measured, as recorded with it (records before the package kept a `machine`)."""
    if "machine" in w:
        mc = w["machine"]
        load = f" (shared: 1-minute load {mc['load_before']:.1f} at the start)" if "load_before" in mc else ""
        return f"{mc['cores']} cores of an {mc['cpu']}{load}"
    if "load" in w:
        return f"{w['device']} (shared: 1-minute load {w['load']['before']:.1f} at the start)"
    return "this 2-core CPU"


def ranked_answers(w: dict) -> tuple[str, list[str]]:
    """LR@1/5/10/20 of the position's ranked answers against the cell centres' per city, and of the rule before
    ranked answers measured in the same run; and the cities within 0.5 points of the centres at every k."""
    ks = (1, 5, 10, 20)
    rows, ok = [], []
    for name, c in w["cities"].items():
        pos, centre, old = c["methods"]["classify"], c["methods"]["classify-centre"], c.get("old_rule", {})
        if all(pos[f"lr{k}"] >= centre[f"lr{k}"] - 0.005 - 1e-9 for k in ks):
            ok.append(name)
        rows.append([name, *(f"{100 * pos[f'lr{k}']:.1f} / {100 * centre[f'lr{k}']:.1f} "
                             f"({100 * (pos[f'lr{k}'] - centre[f'lr{k}']):+.1f})" for k in ks),
                     " / ".join(f"{100 * old[f'lr{k}']:.1f}" if f"lr{k}" in old else "–" for k in ks)])
    return ("Ranked answers, position / cell centre (difference in points), the same test queries; the last column "
            "is the rule before ranked answers on the same run, whose ranks 2..k were pulled onto the rank-1 "
            "centroid:\n\n" + table(["city", "LR@1", "LR@5", "LR@10", "LR@20", "old rule LR@1/5/10/20"], rows)), ok
