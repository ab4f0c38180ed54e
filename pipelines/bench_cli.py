"""How fast the command line answers: `dcfeat --help` and `--version` against `python -c "import torch"`, side by side.

Inputs: the installed dcfeat. Output: pipelines/results/cli.json, rendered into BENCHMARKS.md by
pipelines/bench.py. Run from the repository root: `python pipelines/bench_cli.py` (under a minute).
Each measurement is a fresh process; the three commands alternate, and the median of --runs each is kept.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "dcfeat --help": [sys.executable, "-m", "dcfeat", "--help"],
    "dcfeat --version": [sys.executable, "-m", "dcfeat", "--version"],
    "python": [sys.executable, "-c", "pass"],  # the interpreter's own start, in every figure above
}


@click.command()
@click.option("--runs", default=9, show_default=True, help="Processes per command.")
def main(runs):
    seconds = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, cmd in COMMANDS.items():
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            seconds[name].append(time.perf_counter() - t)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    out = {"date": time.strftime("%Y-%m-%d"), "runs": runs, "median_s": median,
           "help_over_torch": median["dcfeat --help"] / median["import torch"],
           "version_over_torch": median["dcfeat --version"] / median["import torch"]}
    (ROOT / "pipelines" / "results" / "cli.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
