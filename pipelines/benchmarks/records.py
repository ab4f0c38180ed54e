"""The recorded results: one file per run of a benchmark, named and stamped by date, device and commit.

A record is `pipelines/results/<benchmark>.<date>.<device>.<n>.json` (`n` counts the runs of one day on one
device): the benchmark's `measure` dict with `date`, `commit` (git rev-parse HEAD, `+dirty` when tracked files
differ from it), `device` (the GPU's name, or the CPU's model and cores) and `load` (the 1-minute load average
before and after) beside it. A benchmark that reports row by row (gpu, sweep) writes `.jsonl`: that header
first, then one line per row as soon as it is measured, so a run cut short keeps what finished; it reads back
as the header with `rows`. Records migrated from the files named by order carry `migrated` (where they came
from) and no `date` or `commit` where none was recorded.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from dcfeat import __version__

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "pipelines" / "results"


def software() -> dict:
    """The software this process runs, recorded with the CPU figures."""
    return {"dcfeat": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def device(gpu: bool = False) -> str:
    """The GPU's name when `gpu` and one is visible, else the CPU's model and cores."""
    if gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def commit() -> str:
    """HEAD, `+dirty` when tracked files differ from it; `unknown` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_path(results: Path, name: str, date: str, dev: str, suffix: str) -> Path:
    """The next free record name of `name` for this date and device."""
    n = 1
    while any((results / f"{name}.{date}.{slug(dev)}.{n}{s}").exists() for s in (".json", ".jsonl")):
        n += 1
    return results / f"{name}.{date}.{slug(dev)}.{n}{suffix}"


def header(*, gpu: bool = False) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "device": device(gpu),
            "load": {"before": os.getloadavg()[0]}}


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read(path: Path) -> dict:
    if path.suffix == ".jsonl":
        head, *rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return {**head, "rows": rows, "file": path.name}
    return {**json.loads(path.read_text()), "file": path.name}


def _order(path: Path) -> tuple:
    _, date, dev, n = path.name.split(".")[:4]
    return date, dev, int(n)


def records(name: str, results: Path = RESULTS) -> list[dict]:
    """Every record of benchmark `name`, oldest first (by date, then device, then run of the day)."""
    paths = [p for p in results.glob(f"{name}.*.json*") if p.suffix in (".json", ".jsonl")]
    return [read(p) for p in sorted(paths, key=_order)]


def latest(name: str, results: Path = RESULTS) -> dict | None:
    found = records(name, results)
    return found[-1] if found else None
