"""What `predict --feats` costs per query against `evaluate --mode classify`, side by side on one run and split.

Inputs: none (the city is generated, seeded). Run from the repository root:
`python -m pipelines.benchmarks run scorer` (about three minutes on 2 cores). One run (2 epochs of the default
TrainConfig: the speed of answering does not depend on how well it learned) trained on a synthetic feature
city's train split, calibrated on its val split, answering its test split (--queries).

Both sides are timed in memory, in one process, alternating, the median of --repeats each, at each k, wall
and CPU time:
* evaluate: `dcfeat.evaluate.classify`, the function whose time report.json's `ms_per_query` is (one scoring
  pass for the top cells and their positions); that figure itself is recorded beside it, from
  `dcfeat.evaluate.evaluate` with `--mode classify --ks 1,..,k`;
* predict: `Localizer.table` on the same features, what `predict --feats` answers with (one scoring pass
  with every normaliser, positions, the confidence and radius, the lat/lon table).
Neither side's file writing is in the ratio; predict's is timed beside it (`write_predictions` of that table
as Parquet), and so is the whole `predict_files --feats` call (reading the split and the run, answering,
writing). `--threads`: torch's threads; one by default, since the 2 cores are shared and a busy second core
makes two-thread figures swing by 2×.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import classify, evaluate
from dcfeat.localizer import Localizer
from dcfeat.predict import predict_files, write_predictions
from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files
from pipelines.benchmarks.markdown import command, measured, not_measured, table

GOAL = 1.1  # issue 27: predict --feats at most 1.1x evaluate-classify's ms per query
OPTIONS = [
    click.Option(["--streets"], default=20, show_default=True, type=click.IntRange(2),
                 help="Streets each way of the synthetic city (its classes grow as their square)."),
    click.Option(["--queries"], default=5000, show_default=True, type=click.IntRange(1),
                 help="Test queries answered by both."),
    click.Option(["--ks"], default="5,20", show_default=True,
                 help="The k each is measured at (comma-separated): predict's --k, evaluate's largest of --ks."),
    click.Option(["--repeats"], default=7, show_default=True, type=click.IntRange(1),
                 help="Timed runs of each side per k (alternating); the median is kept."),
    click.Option(["--threads"], default=1, show_default=True, type=click.IntRange(1), help="torch threads."),
]


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(*, streets: int = 20, queries: int = 5000, ks: str = "5,20", repeats: int = 7, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    city = {"seed": 0, "streets": streets, "queries": queries}
    out = {"city": f"make_city({', '.join(f'{k}={v}' for k, v in city.items())})", "repeats": repeats,
           "threads": threads, "train": "TrainConfig(epochs=2)", "ks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(**city), store)
        run_dir = train_files(store, "train", TrainConfig(epochs=2), val_split="val", device="cpu", progress=False,
                              out=Path(tmp) / "run").out
        calibrate_files(store, run_dir, "val", device="cpu")
        run = load_run(run_dir, torch.device("cpu"))
        test = read_split(store, "test", dtype=np.float32)
        feats, ids = test.embeddings, test.labels["image_id"].to_list()
        localizer, cpu = Localizer(run), torch.device("cpu")
        n = len(ids)
        out.update(classes=len(run.classes), queries=n, train_rows=int(read_split(store, "train").embeddings.shape[0]))
        for k in sorted(int(v) for v in ks.split(",")):
            runs = {name: [] for name in ("evaluate_report", "evaluate_classify", "predict_table",
                                          "evaluate_classify_cpu", "predict_table_cpu", "predict_write_parquet",
                                          "predict_files")}
            classify(run, test, k, cpu), localizer.table(feats[:64], ids[:64], k=k)  # warm-up, as evaluate's
            path = Path(tmp) / f"k{k}.parquet"
            for _ in range(repeats):
                report = evaluate(run, test, modes=("classify",), ks=tuple(range(1, k + 1)), device="cpu",
                                  repeats=1).report
                runs["evaluate_report"].append(report["methods"]["classify"]["ms_per_query"])
                for name, answer in (("evaluate_classify", lambda: classify(run, test, k, cpu)),
                                     ("predict_table", lambda: localizer.table(feats, ids, k=k))):
                    wall, cpu_s = time.perf_counter(), time.process_time()
                    frame = answer()
                    runs[f"{name}_cpu"].append(1000 * (time.process_time() - cpu_s) / n)
                    runs[name].append(1000 * (time.perf_counter() - wall) / n)
                runs["predict_write_parquet"].append(1000 * _seconds(
                    lambda: write_predictions(frame, path, random_backbone=False, run=run)) / n)
                runs["predict_files"].append(1000 * _seconds(
                    lambda: predict_files(run_dir, path, feats=store, split="test", k=k, device="cpu",
                                          progress=False)) / n)
            med = {name: statistics.median(v) for name, v in runs.items()}
            out["ks"][str(k)] = {"ms_per_query": med, "runs": runs,
                                 "ratio": med["predict_table"] / med["evaluate_classify"],
                                 "ratio_cpu": med["predict_table_cpu"] / med["evaluate_classify_cpu"]}
    out["load_average"] = os.getloadavg()[0]
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("scorer")
    r = results[-1]
    rows = []
    for k, m in r["ks"].items():
        ms = m["ms_per_query"]
        rows.append([k, f"{ms['evaluate_report']:.3f}",
                     f"{ms['evaluate_classify']:.3f} / {ms['evaluate_classify_cpu']:.3f}",
                     f"{ms['predict_table']:.3f} / {ms['predict_table_cpu']:.3f}",
                     f"**{m['ratio']:.2f}** / **{m['ratio_cpu']:.2f}**", f"≤ {GOAL}",
                     f"{ms['predict_write_parquet']:.3f}", f"{ms['predict_files']:.3f}"])
    return (f"`{r['city']}` ({r['classes']:,} classes, {r['train_rows']:,} train rows), one run "
            f"(`{r['train']}`, calibrated on val), its {r['queries']:,} test queries; median of {r['repeats']} "
            f"runs each, alternating in one process, {r['threads']} torch thread{'s' * (r['threads'] > 1)}"
            f"{measured(r)}, load average {r['load']['before']:.1f} before and {r['load']['after']:.1f} after "
            f"({command('scorer')}). Like for like, in memory, no file written: evaluate's side is "
            "`evaluate.classify`, the function whose time report.json's `ms_per_query` is (that figure beside it, "
            "from `evaluate --mode classify`); predict's is `Localizer.table`, what `predict --feats` answers with "
            "(one scoring pass with every normaliser, positions, confidence and radius, the lat/lon table). Wall "
            "and CPU time of the process (one thread: CPU time is the work, whatever else the shared cores run). "
            "Beside them, predict's own file work: writing that table as Parquet, and the whole `predict --feats` "
            "call (reading the run and the split, answering, writing).\n\n"
            + table(["k", "evaluate's report, ms/query", "evaluate classify, ms/query (wall / CPU)",
                     "predict --feats in memory, ms/query (wall / CPU)", "predict / evaluate (wall / CPU)", "goal",
                     "+ Parquet writing, ms/query", "whole `predict --feats`, ms/query"], rows))
