"""What the fused hybrid costs beside classification: ms per query, side by side in one process, on one run.

Per city of the synthetic family (default grid, the dense one, and sparse, where most queries search the
whole database): train with the default TrainConfig, calibrate on val against the database (the fused
rule and its fallback are fitted there), then evaluate classify, the paper's hybrid and the fused hybrid
on the test split against the database `--rounds` times, the modes interleaved within each round; the
median of the rounds' ms per query is reported per mode, and the fused answer's ratio to classification's.
Each ms per query covers the whole answer from cached features: scoring every cell, and for the hybrids
the search and the answer (the database's own embedding, made once per evaluation, is not counted).

Inputs: none (the cities are generated, seeded). Run from the repository root:
`python -m pipelines.benchmarks run fused` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import evaluate
from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import FAMILY, make_city, write_city
from dcfeat.train import TrainConfig, train_files
from pipelines.benchmarks.markdown import command, measured, not_measured, table

MODES = ("classify", "hybrid", "fused")
OPTIONS = [click.Option(["--cities"], default="grid,sparse", show_default=True, help="Comma-separated names of FAMILY."),
           click.Option(["--queries"], default=2000, show_default=True, type=click.IntRange(1)),
           click.Option(["--rounds"], default=5, show_default=True, type=click.IntRange(1))]


def measure(*, cities: str = "grid,sparse", queries: int = 2000, rounds: int = 5) -> dict:
    out = {"queries": queries, "rounds": rounds, "cities": {}}
    for name in cities.split(","):
        if name not in FAMILY:
            raise click.BadParameter(f"unknown city {name!r}; known: {','.join(FAMILY)}", param_hint="--cities")
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "city.h5"
            write_city(make_city(**{"queries": queries, "val_queries": queries, **FAMILY[name]}), store)
            run_dir = train_files(store, "train", TrainConfig(), val_split="val", device="cpu", progress=False,
                                  out=Path(tmp) / "run").out
            calibrate_files(store, run_dir, "val", device="cpu", database_split="test-db")
            run = load_run(run_dir)
            test, db = read_split(store, "test", dtype=np.float32), read_split(store, "test-db", dtype=np.float32)
            ms = {m: [] for m in MODES}
            for _ in range(rounds):
                report = evaluate(run, test, database=db, modes=MODES, ks=(1, 5, 10, 20), repeats=1).report
                for m in MODES:
                    ms[m].append(report["methods"][m]["ms_per_query"])
            fused = report["methods"]["fused"]
            out["cities"][name] = {
                "database_rows": len(db.labels), "ms_per_query": {m: float(np.median(v)) for m, v in ms.items()},
                "rounds_ms": ms, "lr1": {m: report["methods"][m]["recall"]["1"] for m in MODES},
                "fallback_share": fused["fallback_share"], "mean_candidates": fused["mean_candidates"]}
        print(name, out["cities"][name]["ms_per_query"], flush=True)
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("fused")
    r = results[-1]
    rows = []
    for name, c in r["cities"].items():
        ms = c["ms_per_query"]
        ratio = ms["fused"] / ms["classify"]
        rows.append([name, f"{c['database_rows']:,}", f"{ms['classify']:.3f}", f"{ms['hybrid']:.3f}",
                     f"{ms['fused']:.3f}", f"{ratio:.2f}× ({'met' if ratio <= 2 else '**missed**'})",
                     f"{c['mean_candidates']:,.0f} ({100 * c['fallback_share']:.0f} %)"])
    return (f"Per city, one trained and calibrated run, {r['queries']:,} test queries from cached features, the modes "
            f"interleaved in each of {r['rounds']} rounds of one process, median ms per query{measured(r)} "
            f"({command('fused')}); goal: the fused hybrid ≤ 2× classification's:\n\n"
            + table(["city", "database rows", "classify ms/query", "paper hybrid", "fused hybrid",
                     "fused ÷ classify", "database rows scored per query (queries searching wider than their cells)"], rows))
