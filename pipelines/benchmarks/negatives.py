"""Sampled negatives (`--negative-fraction`): step speed at many classes and learning quality, CPU.

Inputs: none (random features; the synthetic feature city). Run from the repository root:
`python -m pipelines.benchmarks run negatives [--classes 1000000]` (a few minutes on 2 cores; 1 M classes × 512
prototypes need ~8 GB for weights, gradients and AdamW state). The step timed is `dcfeat.train.train_step`,
the one `train` runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from dcfeat.model import DCModel
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import TrainConfig, train_files, train_step
from pipelines.benchmarks.markdown import command, machine_load, measured, not_measured, table

OPTIONS = [click.Option(["--classes"], default=1_000_000, show_default=True, type=click.IntRange(2),
                        help="Classes of the one group whose step is timed.")]


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


def measure(*, classes: int = 1_000_000) -> dict:
    out = {"classes": classes, "batch": 256, "step_s": {}, "city": {}}
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
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("negatives")
    ng = results[-1]
    full, sampled = ng["step_s"]["1.0"], ng["step_s"]["0.1"]
    rows = [[f"training step, batch {ng['batch']}, 768→512, {ng['classes']:,} classes in one group",
             f"r = 1: {full:.1f} s; r = 0.1: {sampled:.1f} s; **{full / sampled:.1f}×**", "≥ 3×"],
            *[[f"`make_city(seed=0)`, default `TrainConfig`, r = {r}", f"best val LR@1 {100 * c['best_val_lr1']:.1f}, "
               f"{c['seconds_per_epoch']:.2f} s/epoch", "r = 0.2 within 1 point of r = 1"]
              for r, c in ng["city"].items()]]
    return (f"CPU, median of 3 steps after one that allocates AdamW's state{measured(ng)}{machine_load(ng)} "
            f"({command('negatives')}, timing `train.train_step`):\n\n" + table(["what", "measured", "goal"], rows))
