"""Every quality claim on several cities: the synthetic family (grid, aliased, shifted, sparse, occluded, irregular).

Inputs: none (the cities are generated, seeded). Output: pipelines/results/worlds.json, rendered into
BENCHMARKS.md by pipelines/bench.py. Run from the repository root: `python pipelines/bench_worlds.py`
(about 20 minutes on 2 shared cores; `--cities grid,sparse` for some). Measurement code: pipelines/bench/worlds.py.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click  # noqa: E402

from dcfeat.synthetic.features import FAMILY  # noqa: E402
from pipelines.bench.worlds import world  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"


def machine() -> dict:
    """The CPU that measured: its model, its cores, and how busy it was at the start (1-minute load)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}


@click.command()
@click.option("--cities", default=",".join(FAMILY), show_default=True, help="Comma-separated names of FAMILY.")
@click.option("--queries", default=2000, show_default=True, help="Test queries per city.")
@click.option("--val-queries", default=2000, show_default=True, help="Held-out queries per city (the fit).")
def main(cities, queries, val_queries):
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "queries": queries, "val_queries": val_queries,
           "cities": {}}
    for name in cities.split(","):
        out["cities"][name] = world(name, queries=queries, val_queries=val_queries)
        print(name, json.dumps(out["cities"][name]), flush=True)
    out["load_after"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worlds.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
