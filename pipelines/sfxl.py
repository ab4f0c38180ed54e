"""dcfeat on SF-XL for every backbone × training preset: extract, train, evaluate every query set, one summary.

Folders as SF-XL's own README lays them out (file names carry the UTM labels,
`@UTM_east@UTM_north@zone@letter@lat@lon@…@.jpg`):

    SFXL/raw/train/database                   41.2 M training crops (the D&C paper's classes)
    SFXL/processed/train/...                  training images (5.6 M)
    SFXL/processed/val/{database,queries}     validation
    SFXL/processed/test/database              test database (2.8 M images)
    SFXL/processed/test/queries_v1            1000 queries
    SFXL/processed/test/queries_v2            598 queries
    SFXL/processed/test/queries_night         466 queries
    SFXL/processed/test/queries_occlusion     76 queries

Two recipes, one per `dcfeat train --preset`:
* `dcfeat`: dcfeat's defaults, classes from processed/train, validation on processed/val/queries, the
  backbone's centre crop.
* `dc-paper`: the official D&C code's protocol: classes from raw/train/database (~63 GB of ViT-B
  features: `dcfeat train` streams them from disk), every image resized whole (`extract --crop full`),
  the paper's optimiser, margins and epochs (`train --preset dc-paper`). The D&C code validates on
  queries_v2, a test set; here validation and the confidence's calibration use the held-out
  processed/val/queries instead (its preset keeps the epoch of lowest train loss, so validation picks
  nothing), and every query set, v2 included, stays a test figure.
Both are evaluated on the four query sets against processed/test/database in every mode (`--mode all`:
classify, retrieve, hybrid, and the adaptive hybrid where the run was calibrated on its validation split).

Outputs under OUT/<backbone>/<preset>/: feats.h5 (+ labels and shards), runs/dc/; OUT/summary.md holds
LR@1/5/10/20 and ms/query for every backbone × preset × query set × mode. Every step is a dcfeat
command, printed before it runs; a finished step is skipped on a re-run (extract resumes, a finished
run is not trained again). `--dry-run` prints every command with the disk and memory it needs.
Run: `python pipelines/sfxl.py --root /data/SFXL [--backbones facebook/dinov2-base,…] [--presets dcfeat,dc-paper]
[--gpus 8] [--dry-run]`.
"""

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from dcfeat.presets import preset_config

QUERY_SETS = {"test-v1": "processed/test/queries_v1", "test-v2": "processed/test/queries_v2",
              "test-night": "processed/test/queries_night", "test-occlusion": "processed/test/queries_occlusion"}
DATABASE = {"test-db": "processed/test/database"}


@dataclass(frozen=True)
class Recipe:
    splits: dict[str, str]  # split → folder under the SF-XL root
    val_split: str
    extract_options: tuple[str, ...]


RECIPES = {
    "dcfeat": Recipe({"train": "processed/train", "val": "processed/val/queries", "val-db": "processed/val/database",
                      **DATABASE, **QUERY_SETS}, "val", ()),
    # D&C's train.py: classes from raw/train/database, test images resized whole. Its validation on queries_v2
    # would calibrate the confidence on a test set: the held-out processed/val/queries instead.
    "dc-paper": Recipe({"train": "raw/train/database", "val": "processed/val/queries", **DATABASE, **QUERY_SETS},
                       "val", ("--crop", "full")),
}
# Images per folder from SF-XL's README (absent: not given there), for the estimates of --dry-run.
IMAGES = {"raw/train/database": 41_200_000, "processed/train": 5_600_000, "processed/test/database": 2_800_000,
          "processed/test/queries_v1": 1000, "processed/test/queries_v2": 598, "processed/test/queries_night": 466,
          "processed/test/queries_occlusion": 76}
# Width (pooled CLS dimension) and parameters of the public checkpoints, by a part of their hub id.
MODELS = {"small": (384, 22e6), "base": (768, 86e6), "large": (1024, 304e6), "giant": (1536, 1.1e9),
          "vits16plus": (384, 29e6), "vits16": (384, 21e6), "vitb16": (768, 86e6), "vitl16": (1024, 300e6),
          "vith16plus": (1280, 840e6), "vit7b16": (4096, 6.7e9)}
EXTRACT_BATCH, TOKENS = 64, 257  # extract's default batch; tokens of a 224 crop


@dataclass(frozen=True)
class Step:
    command: list[str]
    needs: str  # disk and memory, for --dry-run


def _size(n: float | None) -> str:
    if n is None:
        return "unknown (not a public checkpoint's name)"
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _spec(model: str) -> tuple[int, float] | None:
    return next((spec for name, spec in MODELS.items() if name in model), None)


def feature_bytes(model: str, rows: int) -> int | None:
    spec = _spec(model)
    return None if spec is None else rows * (spec[0] * 2 + 100)  # float16 row + its id and label


def extract_memory(model: str) -> float | None:
    """Accelerator memory of extraction at a 224 crop: bf16 weights, and a batch's widest activation (the
    MLP's, 4× the width) in and out."""
    spec = _spec(model)
    return None if spec is None else 2 * spec[1] + EXTRACT_BATCH * TOKENS * 4 * spec[0] * 2 * 2


def steps(root: Path, out: Path, model: str, preset: str, gpus: int, epochs: int | None) -> list[Step]:
    recipe = RECIPES[preset]
    feats, run = out / "feats.h5", out / "runs" / "dc"
    launcher = ["torchrun", "--nproc-per-node", str(gpus), "-m", "dcfeat"] if gpus > 1 else ["dcfeat"]
    plan = []
    for split, folder in recipe.splits.items():
        disk = f"disk {_size(feature_bytes(model, IMAGES[folder]))}" if folder in IMAGES else \
            f"disk {_size(feature_bytes(model, 1))} per image (SF-XL's README gives no count)"
        plan.append(Step([*launcher, "extract", "--images", str(root / folder), "--out", str(feats), "--split", split,
                          "--model", model, *recipe.extract_options],
                         f"{disk}, GPU memory {_size(extract_memory(model))} per process at 224²"))
    if not (run / "config.json").is_file():
        train_features = feature_bytes(model, IMAGES[recipe.splits["train"]])
        plan.append(Step(["dcfeat", "train", "--feats", str(feats), "--preset", preset, "--val-split", recipe.val_split,
                          *(["--epochs", str(epochs)] if epochs else []), "--out", str(run)],
                         f"memory {_size(train_features)} of features, streamed from disk where that is over half "
                         "the free memory (`train --memory-budget`)"))
    database = IMAGES[DATABASE["test-db"]]
    db_bytes = feature_bytes(model, database)
    spec = _spec(model)  # the projection's width: dcfeat's 512, or the features' own under dc-paper (D&C's)
    projected = preset_config(preset).dim or (spec[0] if spec else 0)
    for split in QUERY_SETS:
        plan.append(Step(["dcfeat", "evaluate", "--feats", str(feats), "--run", str(run), "--split", split,
                          "--database-split", "test-db", "--mode", "all"],
                         f"memory {_size(db_bytes and db_bytes + database * projected * 4)} (the database, raw "
                         "and projected)"))
    return plan


def summary(out: Path, models: list[str], presets: list[str]) -> str:
    lines = ["| backbone | preset | query set | method | LR@1 | LR@5 | LR@10 | LR@20 | ms/query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for preset in presets:
            for split in QUERY_SETS:
                folder = out / Path(model).name / preset / "runs" / "dc" / "eval" / split
                report = json.loads((folder / "report.json").read_text())
                for method, m in report["methods"].items():
                    r = m["recall"]
                    lines.append(f"| {model} | {preset} | {split} | {method} | "
                                 + " | ".join(f"{100 * r[k]:.1f}" for k in ("1", "5", "10", "20"))
                                 + f" | {m['ms_per_query']:.3f} |")
    return "\n".join(lines) + "\n"


def _names(allowed=None):
    """click callback: a comma-separated list, each name checked against `allowed` when given."""
    def parse(ctx, param, value):
        names = [n.strip() for n in value.split(",") if n.strip()]
        wrong = [n for n in names if allowed is not None and n not in allowed]
        if not names or wrong:
            raise click.BadParameter(f"{value!r}: expected a comma-separated list"
                                     + (f" of {', '.join(allowed)}" if allowed else ""), ctx, param)
        return names
    return parse


@click.command()
@click.option("--root", type=click.Path(path_type=Path), required=True, help="SF-XL folder (layout above).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/sfxl"), show_default=True)
@click.option("--backbones", default="facebook/dinov2-base", show_default=True, callback=_names(),
              help="Comma-separated DINOv2 or DINOv3 ViT hub ids or local folders.")
@click.option("--presets", default="dcfeat,dc-paper", show_default=True, callback=_names(RECIPES),
              help="Comma-separated training presets, each with its own folders and crop (above).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs per node: extraction runs under torchrun.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs [default: each preset's].")
@click.option("--dry-run", is_flag=True, help="Print every command with the disk and memory it needs; run nothing.")
def main(root, out, backbones, presets, gpus, epochs, dry_run):
    for model in backbones:
        for preset in presets:
            click.echo(f"# backbone {model}, preset {preset}")
            for step in steps(root, out / Path(model).name / preset, model, preset, gpus, epochs):
                click.echo(shlex.join(step.command) + (f"  # {step.needs}" if dry_run else ""))
                if not dry_run:
                    subprocess.run(step.command, check=True)
    if dry_run:
        return
    text = summary(out, backbones, presets)
    (out / "summary.md").write_text(text)
    click.echo(text)


if __name__ == "__main__":
    sys.exit(main())
