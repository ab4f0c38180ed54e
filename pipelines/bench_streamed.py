"""Streamed training: a split 4× larger than --memory-budget against the same split in memory, CPU.

Inputs: none (the synthetic feature city, seeded). Output: pipelines/results/streamed.json, rendered into
BENCHMARKS.md by pipelines/bench.py. Run from the repository root: `python pipelines/bench_streamed.py`
(a few minutes on 2 cores). Each training runs as its own `dcfeat train` process, so its peak RSS
(wait4) is its own.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dcfeat.store import split_info
from dcfeat.synthetic.features import make_city, write_city

RESULTS = Path(__file__).resolve().parents[1] / "pipelines" / "results"


def train(store: Path, out: Path, budget: str) -> dict:
    cmd = [sys.executable, "-m", "dcfeat", "train", "--feats", str(store), "--val-split", "val", "--out", str(out),
           "--no-progress", "--memory-budget", budget]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(status, cmd)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    seconds = sorted(e["seconds"] for e in log)[len(log) // 2]
    return {"budget": budget, "streamed": bool(config["streamed"]), "peak_rss_mb": usage.ru_maxrss / 1024,
            "best_val_lr1": max(e["val_lr1"] for e in log), "seconds_per_epoch": seconds,
            "samples_per_s": config["steps_per_epoch"] * config["batch_size"] / seconds}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_city(make_city(seed=0, streets=20), store)
        info = split_info(store, "train")
        split_bytes = info.rows * info.dim * 2
        out = {"date": time.strftime("%Y-%m-%d"), "city": "make_city(seed=0, streets=20)", "rows": info.rows,
               "split_mb": split_bytes / 2**20,
               "in_memory": train(store, Path(tmp) / "memory", "4GB"),
               "streamed": train(store, Path(tmp) / "streamed", f"{split_bytes // 4 // 1024}kB")}
    out["samples_ratio"] = out["streamed"]["samples_per_s"] / out["in_memory"]["samples_per_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streamed.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
