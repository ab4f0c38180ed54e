"""How fast the command line answers: `dcfeat --help` and `--version` against `python -c "import torch"`, side by side,
and how fast `dcfeat extract` refuses, offline, a hub checkpoint that is not in the local cache (goal: under 2 s).

Inputs: the installed dcfeat. Output: pipelines/results/cli.json, rendered into BENCHMARKS.md by
pipelines/bench.py. Run from the repository root: `python pipelines/bench_cli.py` (under a minute).
Each measurement is a fresh process; the three commands alternate, and the median of --runs each is kept.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "dcfeat --help": [sys.executable, "-m", "dcfeat", "--help"],
    "dcfeat --version": [sys.executable, "-m", "dcfeat", "--version"],
    "python": [sys.executable, "-c", "pass"],  # the interpreter's own start, in every figure above
    # Offline, with an empty Hugging Face cache: refused (exit 6) naming --random-backbone.
    "dcfeat extract offline": [sys.executable, "-m", "dcfeat", "extract", "--images", "{tmp}", "--out", "{tmp}/f.h5"],
}
OFFLINE_EXIT = 6  # dcfeat.errors.EnvironmentProblem


@click.command()
@click.option("--runs", default=9, show_default=True, help="Processes per command.")
def main(runs):
    seconds = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": f"{tmp}/hf"}
        for _ in range(runs):
            for name, cmd in COMMANDS.items():
                t = time.perf_counter()
                r = subprocess.run([c.format(tmp=tmp) for c in cmd], capture_output=True, cwd=ROOT, env=env)
                seconds[name].append(time.perf_counter() - t)
                wanted = OFFLINE_EXIT if name == "dcfeat extract offline" else 0
                if r.returncode != wanted or (wanted and b"--random-backbone" not in r.stderr + r.stdout):
                    raise SystemExit(f"{name}: exit {r.returncode}, wanted {wanted}: {r.stderr.decode()[-500:]}")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    out = {"date": time.strftime("%Y-%m-%d"), "runs": runs, "median_s": median,
           "help_over_torch": median["dcfeat --help"] / median["import torch"],
           "version_over_torch": median["dcfeat --version"] / median["import torch"],
           "load_average": os.getloadavg()[0]}
    (ROOT / "pipelines" / "results" / "cli.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
