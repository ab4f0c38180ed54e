"""The two training presets on the synthetic feature city, and dc-paper with one difference at a time set to dcfeat's.

Inputs: none (the city is generated, seeded). Output: pipelines/results/presets.json, rendered into
BENCHMARKS.md by pipelines/bench.py. Run from the repository root: `python pipelines/bench_presets.py`
(about 30 minutes, one thread). Every row trains on `make_city(seed=0)` three times (training seeds
0-2) with val LR@1 after each epoch, and is evaluated (classify) on the same 500 test queries.
dc-paper's epochs of 2,000 steps at batch 64 hold ~9 dcfeat epochs each, so its rows run EPOCHS epochs
(one per group, as it trains one group per epoch) instead of up to 500; dcfeat's 10 one-pass epochs
stay 10.
"""

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dcfeat.evaluate import evaluate_files
from dcfeat.presets import preset_config
from dcfeat.synthetic.features import make_city, write_city
from dcfeat.train import train_files

RESULTS = Path(__file__).resolve().parents[1] / "pipelines" / "results"
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


def main() -> None:
    # One thread: on this shared 2-core machine a batch-64 step took 15 ms with one and 220 ms with two
    # threads competing with other work (measured side by side).
    torch.set_num_threads(1)
    out = {"date": time.strftime("%Y-%m-%d"), "city": "make_city(seed=0)", "epochs": EPOCHS, "seeds": SEEDS,
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
                                           out=folder / "eval").report
                kept = run.epochs[run.best_epoch - 1]
                out["rows"][name]["runs"].append({
                    "seed": seed, "kept_epoch": run.best_epoch, "epochs": len(run.epochs), "val_lr1": kept["val_lr1"],
                    "best_val_lr1": max(e["val_lr1"] for e in run.epochs),
                    "test_recall": report["methods"]["classify"]["recall"], "train_seconds": seconds})
                print(name, json.dumps(out["rows"][name]["runs"][-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "presets.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
