"""Streamed training: a split 4× larger than --memory-budget against the same split in memory, CPU.

Inputs: none (the synthetic feature city, seeded). Run from the repository root:
`python -m pipelines.benchmarks run streamed` (a few minutes on 2 cores). Each training runs as its own
`dcfeat train` process, so its peak RSS (wait4) is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dcfeat.store import split_info
from dcfeat.synthetic.features import make_city, write_city
from pipelines.benchmarks.markdown import command, machine_load, measured, not_measured, table


def train(store: Path, out: Path, budget: str) -> dict:
    cmd = [sys.executable, "-m", "dcfeat", "train", "--feats", str(store), "--val-split", "val", "--out", str(out),
           "--no-progress", "--memory-budget", budget]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if code := os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(code, cmd)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    seconds = sorted(e["seconds"] for e in log)[len(log) // 2]
    return {"budget": budget, "streamed": bool(config["streamed"]), "peak_rss_mb": usage.ru_maxrss / 1024,
            "best_val_lr1": max(e["val_lr1"] for e in log), "seconds_per_epoch": seconds,
            "samples_per_s": config["steps_per_epoch"] * config["batch_size"] / seconds}


def measure() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0, streets=20), store)
        info = split_info(store, "train")
        split_bytes = info.rows * info.dim * 2
        out = {"city": "make_city(seed=0, streets=20)", "rows": info.rows, "split_mb": split_bytes / 2**20,
               "in_memory": train(store, Path(tmp) / "memory", "4GB"),
               "streamed": train(store, Path(tmp) / "streamed", f"{split_bytes // 4 // 1024}kB")}
    out["samples_ratio"] = out["streamed"]["samples_per_s"] / out["in_memory"]["samples_per_s"]
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("streamed")
    st = results[-1]
    rows = [[f"{name.replace('_', ' ')} (`--memory-budget {r['budget']}`)", f"{r['samples_per_s']:,.0f}",
             f"{r['peak_rss_mb']:,.0f} MB", f"{100 * r['best_val_lr1']:.1f}"]
            for name, r in (("in_memory", st["in_memory"]), ("streamed", st["streamed"]))]
    return (f"`{st['city']}`: {st['rows']:,} train rows, {st['split_mb']:.0f} MB of float16 features; default "
            f"`TrainConfig`, each run its own `dcfeat train` process{measured(st)}{machine_load(st)} ({command('streamed')}). "
            f"Streamed samples/s ÷ in-memory: **{st['samples_ratio']:.2f}** (goal ≥ 0.8); peak RSS within the "
            "budget + 1.5 GB (goal):\n\n" + table(["split", "samples/s", "peak RSS", "best val LR@1"], rows))
