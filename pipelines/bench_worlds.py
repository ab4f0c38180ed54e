"""Every quality claim on several cities: the synthetic family (grid, aliased, shifted, sparse, occluded, irregular).

Inputs: none (the cities are generated, seeded). Output: pipelines/results/worlds.json, rendered into
BENCHMARKS.md by pipelines/bench.py. Run from the repository root: `python pipelines/bench_worlds.py`
(about 15 minutes on 2 cores; `--cities grid,sparse` for some). Measurement code: pipelines/bench/worlds.py.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click  # noqa: E402

from dcfeat.synthetic.features import FAMILY  # noqa: E402
from pipelines.bench.worlds import world  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"


@click.command()
@click.option("--cities", default=",".join(FAMILY), show_default=True, help="Comma-separated names of FAMILY.")
@click.option("--queries", default=2000, show_default=True, help="Test queries per city.")
@click.option("--val-queries", default=2000, show_default=True, help="Held-out queries per city (the fit).")
def main(cities, queries, val_queries):
    out = {"date": time.strftime("%Y-%m-%d"), "queries": queries, "val_queries": val_queries, "cities": {}}
    for name in cities.split(","):
        out["cities"][name] = world(name, queries=queries, val_queries=val_queries)
        print(name, json.dumps(out["cities"][name]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worlds.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
