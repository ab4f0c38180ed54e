"""The Divide&Classify protocol on SF-XL with a frozen DINOv2 backbone.

Expected layout (as the VPR-datasets-downloader writes it; file names carry
the UTM labels, `@UTM_east@UTM_north@zone@letter@lat@lon@…@.jpg`):

    SFXL/processed/train/...            training database (5.6 M images)
    SFXL/small/val/{database,queries}   validation
    SFXL/small/test/database            test database (2.8 M images)
    SFXL/processed/test/queries_v1      1000 queries
    SFXL/processed/test/queries_v2      598 queries
    SFXL/processed/test/queries_night   466 queries
    SFXL/processed/test/queries_occlusion 76 queries

Outputs: data/sfxl/feats.h5 (+ labels and shards), data/sfxl/runs/dc/ and
data/sfxl/summary.md (LR@1/5/10/20 of classify, retrieve and hybrid for every
query set). Every step is a dcfeat command, printed before it runs; a finished
step is skipped on a re-run (extract resumes, train refuses to overwrite).
Run: `python pipelines/sfxl.py --root /data/SFXL [--gpus 8] [--dry-run]`.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click

QUERY_SETS = {"test-v1": "processed/test/queries_v1", "test-v2": "processed/test/queries_v2",
              "test-night": "processed/test/queries_night", "test-occlusion": "processed/test/queries_occlusion"}
SPLITS = {"train": "processed/train", "val": "small/val/queries", "val-db": "small/val/database",
          "test-db": "small/test/database", **QUERY_SETS}


@click.command()
@click.option("--root", type=click.Path(path_type=Path), required=True, help="SF-XL folder (layout above).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/sfxl"), show_default=True)
@click.option("--model", default="facebook/dinov2-base", show_default=True)
@click.option("--gpus", default=1, show_default=True, help="GPUs per node: extraction runs under torchrun.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the commands without running them.")
def main(root, out, model, gpus, epochs, dry_run):
    feats = out / "feats.h5"
    run = out / "runs" / "dc"
    launcher = ["torchrun", "--nproc-per-node", str(gpus), "-m", "dcfeat"] if gpus > 1 else ["dcfeat"]
    steps = [[*launcher, "extract", "--images", str(root / sub), "--out", str(feats), "--split", split,
              "--model", model] for split, sub in SPLITS.items()]
    if not (run / "config.json").is_file():
        steps.append(["dcfeat", "train", "--feats", str(feats), "--val-split", "val", "--M", "20", "--N", "2",
                      "--epochs", str(epochs), "--out", str(run)])
    steps += [["dcfeat", "evaluate", "--feats", str(feats), "--run", str(run), "--split", split,
               "--database-split", "test-db", "--mode", "all"] for split in QUERY_SETS]
    for cmd in steps:
        click.echo(shlex.join(cmd))
        if not dry_run:
            subprocess.run(cmd, check=True)
    if dry_run:
        return
    lines = ["| query set | method | LR@1 | LR@5 | LR@10 | LR@20 | ms/query |", "|---|---|---|---|---|---|---|"]
    for split in QUERY_SETS:
        report = json.loads((run / "eval" / split / "report.json").read_text())
        for name, m in report["methods"].items():
            r = m["recall"]
            lines.append(f"| {split} | {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("1", "5", "10", "20"))
                         + f" | {m['ms_per_query']:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
