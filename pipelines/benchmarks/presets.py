"""The two training presets on the synthetic feature city, and dc-paper with one difference at a time set to dcfeat's.

Inputs: none (the city is generated, seeded). Run from the repository root:
`python -m pipelines.benchmarks run presets` (about 30 minutes, one thread). Every row trains on `make_city(seed=0)` three times (training seeds
0-2) with val LR@1 after each epoch, and is evaluated (classify) on the same 500 test queries.
dc-paper's epochs of 2,000 steps at batch 64 hold ~9 dcfeat epochs each, so its rows run EPOCHS epochs
(one per group, as it trains one group per epoch) instead of up to 500; dcfeat's 10 one-pass epochs
stay 10.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dcfeat.evaluate import evaluate_files
from dcfeat.presets import preset_config
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import train_files
from pipelines.benchmarks.markdown import command, machine_load, measured, not_measured, table

EPOCHS = 4
SEEDS = (0, 1, 2)  # initialisation and sampling; one city. 500 queries alone leave ±2 points of noise per run
# One row per difference of docs/method.md's preset table (the test-time image belongs to the features), each
# switched from dc-paper's value to dcfeat's.
DCFEAT = preset_config("dcfeat")
TOWARD_DCFEAT = {
    "s, m": ("s", "m"),
    "optimiser": ("optimizer", "lr_projection", "lr_heads", "weight_decay", "lr_schedule"),
    "batch, length": ("batch_size", "iterations_per_epoch", "epochs"),
    "group rotation": ("group_rotation",),
    "margin past π − m": ("easy_margin",),
    "prototypes at test": ("test_prototypes",),
    "prototype init": ("prototype_init",),
    "epoch kept": ("keep",),
}


def rows() -> dict[str, dict]:
    """Row name → the preset and the fields it changes (None too: dcfeat's one-pass epoch)."""
    out = {"dcfeat": {"preset": "dcfeat"}, "dc-paper": {"preset": "dc-paper", "epochs": EPOCHS}}
    for name, names in TOWARD_DCFEAT.items():
        out[f"dc-paper, {name} as dcfeat"] = {"preset": "dc-paper", "epochs": EPOCHS,
                                              **{k: getattr(DCFEAT, k) for k in names}}
    return out


def measure() -> dict:
    # One thread: on this shared 2-core machine a batch-64 step took 15 ms with one and 220 ms with two
    # threads competing with other work (measured side by side).
    torch.set_num_threads(1)
    out = {"city": "make_city(seed=0)", "epochs": EPOCHS, "seeds": SEEDS,
           "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0), store)
        for name, settings in rows().items():
            out["rows"][name] = {"settings": settings, "runs": []}
            for seed in SEEDS:
                config = replace(preset_config(settings["preset"]), **settings, seed=seed)
                folder = Path(tmp) / f"{len(list(Path(tmp).iterdir()))}"
                t = time.perf_counter()
                run = train_files(store, "train", config, val_split="val", device="cpu", progress=False,
                                  out=folder / "run")
                seconds = time.perf_counter() - t
                report = evaluate_files(store, run.out, "test", modes=("classify",), device="cpu",
                                           out=folder / "eval", plots=False).report
                kept = run.epochs[run.best_epoch - 1]
                out["rows"][name]["runs"].append({
                    "seed": seed, "kept_epoch": run.best_epoch, "epochs": len(run.epochs), "val_lr1": kept["val_lr1"],
                    "best_val_lr1": max(e["val_lr1"] for e in run.epochs),
                    "test_recall": report["methods"]["classify"]["recall"], "train_seconds": seconds})
                print(name, json.dumps(out["rows"][name]["runs"][-1]), flush=True)
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("presets")
    pr = results[-1]

    def mean(runs: list[dict], value) -> float:
        return float(np.mean([value(r) for r in runs]))

    test1 = {name: [r["test_recall"]["1"] for r in row["runs"]] for name, row in pr["rows"].items()}
    cells = [[name, ", ".join(str(r["kept_epoch"]) for r in row["runs"]) + f" of {row['runs'][0]['epochs']}",
              f"{100 * mean(row['runs'], lambda r: r['val_lr1']):.1f}",
              f"**{100 * np.mean(test1[name]):.1f}** ({100 * min(test1[name]):.1f}-{100 * max(test1[name]):.1f})",
              f"{100 * mean(row['runs'], lambda r: r['test_recall']['5']):.1f}",
              f"{mean(row['runs'], lambda r: r['train_seconds']):.0f} s"] for name, row in pr["rows"].items()]
    paper = float(np.mean(test1["dc-paper"]))
    effects = sorted(((float(np.mean(v)) - paper, name.split(", ", 1)[1].removesuffix(" as dcfeat"))
                      for name, v in test1.items() if name.startswith("dc-paper, ")), reverse=True)
    return (f"`{pr['city']}`, the same 500 test queries for every run (classify), each row trained with seeds "
            f"{', '.join(map(str, pr['seeds']))}{measured(pr)}{machine_load(pr)} ({command('presets')}, one thread). Every "
            f"dc-paper row trains {pr['epochs']} epochs of its 2,000 steps at batch 64 (one epoch per group) "
            f"instead of the preset's up to 500, to keep this CPU benchmark short: {pr['epochs'] * 2000 * 64:,} "
            "samples, against at most 10 × 14,480 for dcfeat's 10 one-pass epochs. Within so few epochs the "
            "plateau schedule (patience 10) never cuts a rate. The row \"batch, length as dcfeat\" trains dcfeat's "
            "10 one-pass epochs at batch 256. LR@1 in %, mean over the seeds (test: lowest-highest):\n\n"
            + table(["training", "epoch kept (per seed)", "val LR@1 of the epoch kept", "test LR@1", "test LR@5",
                     "train time"], cells)
            + "\n\nMean test LR@1 gained by setting one difference to dcfeat's value, from dc-paper's "
            + f"{100 * paper:.1f}: " + "; ".join(f"{name} {100 * d:+.1f}" for d, name in effects) + ".")
