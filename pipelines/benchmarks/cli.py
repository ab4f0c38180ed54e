"""How fast the command line answers: `dcfeat --help` and `--version` against `python -c "import torch"`, side by side,
and how fast `dcfeat extract` refuses, offline, a hub checkpoint that is not in the local cache (goal: under 2 s).

Inputs: the installed dcfeat. Run from the repository root: `python -m pipelines.benchmarks run cli` (under a
minute). Each measurement is a fresh process; the commands alternate, and the median of --runs each is kept.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import click

from pipelines.benchmarks.markdown import command, measured, not_measured, table
from pipelines.benchmarks.records import ROOT

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "dcfeat --help": [sys.executable, "-m", "dcfeat", "--help"],
    "dcfeat --version": [sys.executable, "-m", "dcfeat", "--version"],
    "python": [sys.executable, "-c", "pass"],  # the interpreter's own start, in every figure above
    # Offline, with an empty Hugging Face cache: refused (exit 6) naming --random-backbone.
    "dcfeat extract offline": [sys.executable, "-m", "dcfeat", "extract", "--images", "{tmp}", "--out", "{tmp}/f.h5"],
}
OFFLINE_EXIT = 6  # dcfeat.errors.EnvironmentProblem
OPTIONS = [click.Option(["--runs"], default=9, show_default=True, type=click.IntRange(1),
                        help="Processes per command.")]


def measure(*, runs: int = 9) -> dict:
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
    return {"runs": runs, "median_s": median,
            "help_over_torch": median["dcfeat --help"] / median["import torch"],
            "version_over_torch": median["dcfeat --version"] / median["import torch"],
            "load_average": os.getloadavg()[0]}


def render(results: list[dict]) -> str:
    """`dcfeat --help` against `import torch`, fresh processes side by side."""
    if not results:
        return not_measured("cli")
    c = results[-1]
    m = c["median_s"]
    return (f"On this 2-core CPU{measured(c)}: median of {c['runs']} fresh processes each, alternating ({command('cli')}); "
            f"the interpreter alone starts in {m['python']:.2f} s.\n\n" + table(["what", "measured", "goal"], [
                ["`dcfeat --help` / `python -c \"import torch\"`",
                 f"{m['dcfeat --help']:.2f} s / {m['import torch']:.2f} s = **{c['help_over_torch']:.2f}**", "≤ 0.2"],
                ["`dcfeat --version` / `python -c \"import torch\"`",
                 f"{m['dcfeat --version']:.2f} s / {m['import torch']:.2f} s = **{c['version_over_torch']:.2f}**",
                 "≤ 0.2"],
                *([["`dcfeat extract` offline, the hub model not cached: refused (exit 6) naming `--random-backbone`",
                    f"**{m['dcfeat extract offline']:.2f} s**", "< 2 s"]] if "dcfeat extract offline" in m else [])]))
