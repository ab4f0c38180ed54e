"""Measure every CPU benchmark of the project (or reuse a recorded run) and rewrite BENCHMARKS.md.

Inputs: none for measuring (JPEGs, feature cities and random DINOv2 architectures
are generated). Rendering reads what is recorded in pipelines/results/: cpu.json
(this script), gpu_h200.jsonl, gpu_h200_second.jsonl, gpu_h100.jsonl and
gpu_h100_first.jsonl (pipelines/gpu_bench.py on lent GPUs), sweep_train.jsonl
(pipelines/sweep_train.py --out pipelines/results/sweep_train.jsonl), and the
JSON file each pipelines/bench_*.py script names (finetune, fingerprint, crop,
scoring, presets, negatives, confidence, hybrid, streamed).
Output: BENCHMARKS.md, plus the raw numbers in pipelines/results/cpu.json when measuring.
Run from the repository root: `python pipelines/bench.py` (about 15 minutes on
2 cores; `make bench`), or `python pipelines/bench.py --from-json
pipelines/results/cpu.json` to re-render only. Like every script that uses
pipelines/bench/, it is run by path and puts the repository root on sys.path.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click

from pipelines.bench.cpu import measure
from pipelines.bench.render import render

RESULTS = ROOT / "pipelines" / "results"


@click.command()
@click.option("--from-json", type=click.Path(path_type=Path), default=None,
              help="Re-render BENCHMARKS.md from a saved cpu.json instead of measuring.")
def main(from_json):
    if from_json:
        cpu = json.loads(Path(from_json).read_text())
    else:
        cpu = measure(plots_dir=RESULTS / "city")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu.json").write_text(json.dumps(cpu, indent=1))
    (ROOT / "BENCHMARKS.md").write_text(render(cpu, RESULTS))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    sys.exit(main())
