"""Sweep of the training defaults on the synthetic city (BENCHMARKS.md, "Training defaults").

Inputs: none (the city is generated, seeded). Output: one JSON line per setting
on stdout and in --out (default data/sweep_train.jsonl), with val LR@1 (used to
choose) and test LR@1 (reported only). Run from the repository root:
`python pipelines/sweep_train.py`.
"""

import itertools
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click
import numpy as np

from dcfeat.run import load_run
from dcfeat.store import read_split
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, recall_at_1, train

GRID = {
    "dim": [128, 512],
    "lr_projection": [1e-4, 1e-3],
    "lr_heads": [1e-3, 1e-2],
    "s": [30.0, 64.0],
    "m": [0.2, 0.4],
    "batch_size": [64, 256],
}


@click.command()
@click.option("--streets", default=10, show_default=True, help="City size (streets per side).")
@click.option("--epochs", default=8, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/sweep_train.jsonl"), show_default=True)
def main(streets, epochs, out):
    out.parent.mkdir(parents=True, exist_ok=True)
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
            line = json.dumps(row)
            print(line, flush=True)
            with open(out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
