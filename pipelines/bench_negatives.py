"""Sampled negatives (`--negative-fraction`): step speed at many classes and learning quality, CPU.

Inputs: none (random features; the synthetic feature city). Output: pipelines/results/negatives.json,
rendered into BENCHMARKS.md by pipelines/bench.py. Run from the repository root:
`python pipelines/bench_negatives.py [--classes 1000000]` (a few minutes on 2 cores; 1 M classes × 512
prototypes need ~8 GB for weights, gradients and AdamW state).
The step timed is `dcfeat.train.train_step`, the one `train` runs.
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from dcfeat.model import DCModel
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files, train_step

RESULTS = Path(__file__).resolve().parents[1] / "pipelines" / "results"


def step_seconds(classes: int, fraction: float, *, batch: int = 256, in_dim: int = 768, repeats: int = 3) -> float:
    torch.manual_seed(0)
    model = DCModel(in_dim, 512, [classes], head="aamc", s=30.0, m=0.4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = torch.randn(batch, in_dim), torch.randint(0, classes, (batch,))
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        train_step(model, opt, 0, x, y, negative_fraction=fraction, generator=gen)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first step allocates AdamW's state


@click.command()
@click.option("--classes", default=1_000_000, show_default=True)
def main(classes):
    out = {"date": time.strftime("%Y-%m-%d"), "classes": classes, "batch": 256, "step_s": {}, "city": {}}
    for r in (1.0, 0.1):
        out["step_s"][str(r)] = step_seconds(classes, r)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0), store)
        for r in (1.0, 0.2):
            res = train_files(store, "train", TrainConfig(negative_fraction=r), val_split="val", device="cpu",
                              progress=False, out=Path(tmp) / f"r{r}")
            out["city"][str(r)] = {"best_val_lr1": max(e["val_lr1"] for e in res.epochs),
                                   "seconds_per_epoch": statistics.median(e["seconds"] for e in res.epochs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "negatives.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
