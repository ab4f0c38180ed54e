"""`dcfeat serve` under hostile and heavy clients: /health latency under a slowloris of 130 connections and beside
a maximal GeoPose or PNG request, and resident memory under 128 concurrent maximal requests.

Inputs: none (a street city is rendered and a calibrated run trained on it with a randomly initialised DINOv2 at
a small image size, as pipelines/bench_serve.py does; --run reuses a run folder instead). Output:
pipelines/results/serve_hostile.json. Run from the repository root, niced on a shared machine:
`nice python pipelines/bench_serve_hostile.py` (about 10 minutes on 2 cores). Every request goes to 127.0.0.1;
every loop is bounded in time, and the servers it starts stop when it ends.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click

from pipelines.bench.serve import make_run
from pipelines.bench.serve_hostile import measure


@click.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path, exists=True), default=None,
              help="A calibrated run folder to serve [default: one trained here on a rendered city].")
@click.option("--runs", default=3, show_default=True, help="Servers measured one after the other (medians over them).")
@click.option("--seconds", default=15.0, show_default=True, help="Length of each /health sampling phase.")
@click.option("--clients", default=128, show_default=True, help="Concurrent maximal requests of the memory phase.")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "pipelines" / "results" / "serve_hostile.json",
              show_default=True)
def main(run_dir, runs, seconds, clients, out):
    with tempfile.TemporaryDirectory() as tmp:
        if run_dir is None:
            run_dir, _ = make_run(Path(tmp), hidden=32, layers=2, image_size=56)
        result = {"date": time.strftime("%Y-%m-%d"), **measure(run_dir, runs=runs, seconds=seconds, clients=clients)}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
