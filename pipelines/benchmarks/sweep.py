"""Sweep of the training defaults on the synthetic city (BENCHMARKS.md, "Training defaults").

Inputs: none (the city is generated, seeded). Output: a `.jsonl` record, one line per setting as soon as
it is trained, with val LR@1 (used to choose) and test LR@1 (reported only). Run from the repository root:
`python -m pipelines.benchmarks run sweep` (64 settings).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click
import numpy as np
import polars as pl

from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, recall_at_1, train
from pipelines.benchmarks.markdown import table

GRID = {
    "dim": [128, 512],
    "lr_projection": [1e-4, 1e-3],
    "lr_heads": [1e-3, 1e-2],
    "s": [30.0, 64.0],
    "m": [0.2, 0.4],
    "batch_size": [64, 256],
}


OPTIONS = [click.Option(["--streets"], default=10, show_default=True, type=click.IntRange(2),
                        help="City size (streets per side)."),
           click.Option(["--epochs"], default=8, show_default=True, type=click.IntRange(1))]


def measure(rows, *, streets: int = 10, epochs: int = 8) -> None:
    """One row per setting of GRID, handed to `rows` as soon as it is trained."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0, streets=streets), store)
        tr, val, test = (read_split(store, s, dtype=np.float32) for s in ("train", "val", "test"))
        for values in itertools.product(*GRID.values()):
            config = replace(TrainConfig(epochs=epochs), **dict(zip(GRID, values)))
            res = train(tr, config, Path(tmp) / f"run{hash(values)}", val=val, progress=False)
            run = load_run(res.out)
            row = {**{k: v for k, v in asdict(config).items() if k in GRID}, "epochs": epochs,
                   "best_epoch": res.best_epoch, "val_lr1": res.epochs[res.best_epoch - 1]["val_lr1"],
                   "test_lr1": recall_at_1(run.model, test, run.classes, 25.0),
                   "s_per_epoch": float(np.median([e["seconds"] for e in res.epochs]))}
            rows(row)


def render(results: list[dict]) -> str:
    if not results:
        return "(no sweep recorded: run `python -m pipelines.benchmarks run sweep`)"
    d = pl.DataFrame(results[-1]["rows"])
    rows = []
    for col in ("s", "m", "dim", "batch_size", "lr_projection", "lr_heads"):
        for row in d.group_by(col).agg(pl.col("val_lr1").mean(), pl.col("test_lr1").mean()).sort(col).iter_rows():
            rows.append([col, f"{row[0]:g}", f"{100 * row[1]:.1f}", f"{100 * row[2]:.1f}"])
    best = d.sort("val_lr1", descending=True).head(3).select(
        "s", "m", "dim", "batch_size", "lr_projection", "lr_heads", "val_lr1", "test_lr1")
    return (f"{d.height} settings, 8 epochs each, on `make_city(seed=0)` (14 480 train rows, 745 classes); chosen "
            "by val LR@1, test LR@1 shown for information. Mean over the other settings for each value:\n\n"
            + table(["parameter", "value", "mean val LR@1", "mean test LR@1"], rows)
            + f"\n\nBest three by val LR@1:\n\n```\n{best}\n```")
