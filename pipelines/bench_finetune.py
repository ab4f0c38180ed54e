"""Fine-tuning the last DINOv2 blocks from cached tokens: the three comparisons of BENCHMARKS.md.

Inputs: none (the street city is rendered, the backbone is the demo's random
DINOv2-S/14). Output: pipelines/results/finetune.json, which pipelines/bench.py
renders into BENCHMARKS.md. Run: `python pipelines/bench_finetune.py` (~10 min on 2 cores).
"""

import json
import sys
import tempfile
from pathlib import Path

import click

from dcfeat.benchmarks import random_backbone
from dcfeat.finetune_bench import city_comparison, step_speed

RESULTS = Path(__file__).resolve().parents[1] / "pipelines" / "results"


@click.command()
@click.option("--image-size", default=112, show_default=True, help="Crop size of the city comparison.")
@click.option("--epochs", default=5, show_default=True)
def main(image_size, epochs):
    with tempfile.TemporaryDirectory() as tmp:
        model = random_backbone("vits14", Path(tmp) / "dinov2-small-random")
        out = {"step": [step_speed(model, K) for K in (1, 2)],
               "city": city_comparison(Path(tmp) / "city", model, image_size=image_size, epochs=epochs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
