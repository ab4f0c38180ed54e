"""Fine-tuning the last DINOv2 blocks from cached tokens: BENCHMARKS.md's step speed and city comparison.

Inputs: none (the street city is rendered, the backbone is the demo's random
DINOv2-S/14). Output: pipelines/results/finetune.json, which pipelines/bench.py
renders into BENCHMARKS.md. Run from the repository root: `python pipelines/bench_finetune.py`
(~10 min on 2 cores). Like every script that uses pipelines/bench/, it is run by path and
puts the repository root on sys.path.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click

from dcfeat.backbone import save_random_vit
from pipelines.bench.finetune import city_comparison, step_speed

RESULTS = ROOT / "pipelines" / "results"


@click.command()
@click.option("--image-size", default=112, show_default=True, help="Crop size of the city comparison.")
@click.option("--epochs", default=5, show_default=True)
def main(image_size, epochs):
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_vit("vits14", Path(tmp) / "dinov2-small-random")
        out = {"date": time.strftime("%Y-%m-%d"), "step": [step_speed(model, K) for K in (1, 2)],
               "city": city_comparison(Path(tmp) / "city", model, image_size=image_size, epochs=epochs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
