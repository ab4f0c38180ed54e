"""`dcfeat serve` on loopback: throughput against `dcfeat predict`, latency, a 10,000-request soak and the hostile set.

Inputs: none (a street city is rendered and a run trained on it with a randomly initialised DINOv2 at a
small image size, so that 10,000 requests finish in minutes on 2 cores). Output: pipelines/results/serve.json,
rendered into BENCHMARKS.md by `python pipelines/bench.py --from-json pipelines/results/cpu.json`.
Run from the repository root: `python pipelines/bench_serve.py` (about 10 minutes here). Every request goes
to 127.0.0.1; each loop is bounded in count and in time (--max-seconds).
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click

from pipelines.bench.serve import measure


@click.command()
@click.option("--requests", default=10_000, show_default=True, help="Requests of the soak.")
@click.option("--clients", default=32, show_default=True, help="Concurrent clients (keep-alive connections).")
@click.option("--hidden", default=32, show_default=True, help="Width of the random DINOv2.")
@click.option("--layers", default=2, show_default=True, help="Depth of the random DINOv2.")
@click.option("--image-size", default=56, show_default=True, help="Crop size (a multiple of 14).")
@click.option("--max-seconds", default=1200.0, show_default=True, help="Bound of every request loop.")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "pipelines" / "results" / "serve.json",
              show_default=True)
def main(requests, clients, hidden, layers, image_size, max_seconds, out):
    result = measure(requests=requests, clients=clients, hidden=hidden, layers=layers, image_size=image_size,
                     max_seconds=max_seconds)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("throughput", "soak")}, indent=1)[:4000])


if __name__ == "__main__":
    sys.exit(main())
