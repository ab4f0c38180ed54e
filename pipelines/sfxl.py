"""dcfeat on SF-XL with frozen DINOv2/DINOv3 backbones: extract, train, evaluate every query set.

Folders as SF-XL's own README lays them out (file names carry the UTM labels,
`@UTM_east@UTM_north@zone@letter@lat@lon@…@.jpg`):

    SFXL/processed/train/...                  training images (5.6 M)
    SFXL/processed/val/{database,queries}     validation
    SFXL/processed/test/database              test database (2.8 M images)
    SFXL/processed/test/queries_v1            1000 queries
    SFXL/processed/test/queries_v2            598 queries
    SFXL/processed/test/queries_night         466 queries
    SFXL/processed/test/queries_occlusion     76 queries

This is the `dcfeat` recipe (dcfeat's defaults, processed/train). It is NOT the D&C paper's protocol,
which builds its classes from raw/train/database (41.2 M crops, ~63 GB of ViT-B features), validates on
queries_v2 and uses the paper's optimiser and margins; that needs `train --preset dc-paper`, not
built yet (its 63 GB of features would train streamed, `train --memory-budget`).

Outputs per backbone under OUT/<backbone>/: feats.h5 (+ labels and shards), runs/dc/, and
OUT/summary.md with LR@1/5/10/20 and ms/query of classify, retrieve and hybrid for every backbone and
query set. Every step is a dcfeat command, printed before it runs; a finished step is skipped on a re-run
(extract resumes, train refuses to overwrite a finished run). `--dry-run` prints the grid of commands
with the disk each extraction needs.
Run: `python pipelines/sfxl.py --root /data/SFXL [--model facebook/dinov2-base --model …] [--gpus 8] [--dry-run]`.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click

QUERY_SETS = {"test-v1": "processed/test/queries_v1", "test-v2": "processed/test/queries_v2",
              "test-night": "processed/test/queries_night", "test-occlusion": "processed/test/queries_occlusion"}
SPLITS = {"train": "processed/train", "val": "processed/val/queries", "val-db": "processed/val/database",
          "test-db": "processed/test/database", **QUERY_SETS}
# Images per folder from SF-XL's README (None: not given there), for the disk estimate of --dry-run.
IMAGES = {"train": 5_600_000, "test-db": 2_800_000, "test-v1": 1000, "test-v2": 598, "test-night": 466,
          "test-occlusion": 76, "val": None, "val-db": None}
# Pooled CLS dimension of the public checkpoints (hidden size).
DIMS = {"small": 384, "base": 768, "large": 1024, "giant": 1536, "vits16": 384, "vitb16": 768, "vitl16": 1024,
        "vith16plus": 1280, "vit7b16": 4096}


def feature_bytes(model: str, rows: int) -> int | None:
    dim = next((d for name, d in DIMS.items() if name in model), None)
    return None if dim is None else rows * (dim * 2 + 100)  # float16 row + its id and label


def commands(root: Path, out: Path, model: str, gpus: int, epochs: int) -> list[list[str]]:
    feats, run = out / "feats.h5", out / "runs" / "dc"
    launcher = ["torchrun", "--nproc-per-node", str(gpus), "-m", "dcfeat"] if gpus > 1 else ["dcfeat"]
    steps = [[*launcher, "extract", "--images", str(root / sub), "--out", str(feats), "--split", split,
              "--model", model] for split, sub in SPLITS.items()]
    if not (run / "config.json").is_file():
        steps.append(["dcfeat", "train", "--feats", str(feats), "--val-split", "val", "--epochs", str(epochs),
                      "--out", str(run)])
    steps += [["dcfeat", "evaluate", "--feats", str(feats), "--run", str(run), "--split", split,
               "--database-split", "test-db", "--mode", "all"] for split in QUERY_SETS]
    return steps


def summary(out: Path, models: list[str]) -> str:
    lines = ["| backbone | query set | method | LR@1 | LR@5 | LR@10 | LR@20 | ms/query |",
             "|---|---|---|---|---|---|---|---|"]
    for model in models:
        for split in QUERY_SETS:
            report = json.loads((out / Path(model).name / "runs" / "dc" / "eval" / split / "report.json").read_text())
            for name, m in report["methods"].items():
                r = m["recall"]
                lines.append(f"| {model} | {split} | {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("1", "5", "10", "20"))
                             + f" | {m['ms_per_query']:.3f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--root", type=click.Path(path_type=Path), required=True, help="SF-XL folder (layout above).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/sfxl"), show_default=True)
@click.option("--model", "models", multiple=True, default=["facebook/dinov2-base"], show_default=True,
              help="Backbone (repeat for several): DINOv2 or DINOv3 ViT hub id or local folder.")
@click.option("--gpus", default=1, show_default=True, help="GPUs per node: extraction runs under torchrun.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the commands and the disk each extraction needs; run nothing.")
def main(root, out, models, gpus, epochs, dry_run):
    for model in models:
        click.echo(f"# backbone {model}")
        for cmd in commands(root, out / Path(model).name, model, gpus, epochs):
            need = ""
            if dry_run and "extract" in cmd:
                split = cmd[cmd.index("--split") + 1]
                size = feature_bytes(model, IMAGES[split]) if IMAGES[split] else None
                need = (f"  # ~{size / 1e9:,.1f} GB" if size >= 1e9 else f"  # ~{size / 1e6:,.1f} MB") if size \
                    else "  # size: not in SF-XL's README, count its images"
            click.echo(shlex.join(cmd) + need)
            if not dry_run:
                subprocess.run(cmd, check=True)
    if dry_run:
        return
    text = summary(out, list(models))
    (out / "summary.md").write_text(text)
    click.echo(text)


if __name__ == "__main__":
    sys.exit(main())
